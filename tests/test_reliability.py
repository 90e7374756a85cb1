"""Nothing silently wrong: for each class of fault a user hits, the exit code or exception, its one-sentence message,
and that nothing valid-looking is left behind.

Classes: non-atomic writes (kill -9 mid-write, a failing baseline, --overwrite_output_dir merging: in
test_reliability_writes.py), missing or mismatched weights, unchecked numbers, inputs of the wrong kind, long runs that die on one damaged clip, text files
that are not UTF-8.
"""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file

import run_eval
from whisper_mla import transcription
import run_finetune
from helpers import tone
from whisper_mla.audio import LazyAudio, SpeechDataError, load_audio, load_speech_dataset
from whisper_mla.arguments import check_number
from whisper_mla.io import (
    CheckpointError,
    from_pretrained_strict,
)
from whisper_mla.training.arguments import ModelArguments
from whisper_mla.training.checkpoints import check_resume_checkpoint
from whisper_mla.training.data import SpeechSeq2SeqDataset
from whisper_mla.training.models import check_models
from whisper_mla.training.trainable import restore_lora_adapter, set_trainable
from modeling_whisper_mla import WhisperMLAForConditionalGeneration


from finetune_helpers import TEXTS
from reliability_helpers import (  # noqa: F401 (fixtures)
    KEPT_AWAY_TENSOR,
    broken_copy,
    cli,
    clips,
    eval_args,
    finetune_args,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


# --------------------------------------------------------------------------------------------- 2. strict loading


@pytest.mark.parametrize("fault, message", [
    ({"drop": KEPT_AWAY_TENSOR}, rf"lacks 1 weight \({KEPT_AWAY_TENSOR}\) that the model needs"),
    ({"truncate": True}, r"weights file of checkpoint .* is damaged or truncated \(.*\); copy or save"),
    ({"config": {"kv_lora_rank": 6}}, r"holds 12 weight\(s\) shaped unlike its config.json says \(.*kv_a_proj"
                                      r".*\(12, 16\) in the file, \(10, 16\) from config.json.*restore the "
                                      r"config.json"),
], ids=["missing-tensor", "truncated", "edited-kv_lora_rank"])
def test_run_eval_refuses_a_broken_checkpoint_before_any_work(tiny_checkpoint_dirs, clips, tmp_path, fault, message):
    _, mla_dir = tiny_checkpoint_dirs
    broken = broken_copy(mla_dir, tmp_path / "broken", **fault)
    with pytest.raises(CheckpointError, match=message):
        run_eval.main(eval_args(broken, clips / "good.json", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused(tiny_checkpoint_dirs, clips, tmp_path):
    mha_dir, _ = tiny_checkpoint_dirs
    broken = broken_copy(mha_dir, tmp_path / "nan", poison="model.decoder.layers.0.fc2.weight")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 weight "
                                              r"\(model.decoder.layers.0.fc2.weight\).*use an earlier checkpoint"):
        run_eval.main(eval_args(broken, clips / "good.json", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor_is_refused(tiny_checkpoint_dirs, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    broken = broken_copy(mla_dir, tmp_path / "extra")
    weights = load_file(os.path.join(broken, "model.safetensors"))
    weights["model.decoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)  # an MHA key projection
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"holds 1 weight \(model.decoder.layers.0.self_attn.k_proj.weight\) "
                                              "that the model has no place for"):
        from_pretrained_strict(WhisperMLAForConditionalGeneration, broken, check_only=True)


def test_finetune_refuses_a_broken_start_checkpoint_and_resume_point(tiny_checkpoint_dirs, clips, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    broken = broken_copy(mla_dir, tmp_path / "broken", drop=KEPT_AWAY_TENSOR)
    with pytest.raises(CheckpointError, match=rf"lacks 1 weight \({KEPT_AWAY_TENSOR}\)"):
        run_finetune.main(finetune_args(broken, clips / "good.json", tmp_path / "out", "--trainable", "mla"))
    assert not (tmp_path / "out").exists()
    # The Trainer would restore a checkpoint-N leniently (a missing tensor is a warning): checked up front.
    run = tmp_path / "run"
    broken_copy(mla_dir, run / "checkpoint-2", truncate=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="checkpoint-2' is damaged or truncated"):
        run_finetune.main(finetune_args(mla_dir, clips / "good.json", run, "--resume_from_checkpoint", "latest"))


def test_resume_into_a_differently_converted_model_is_refused(tiny_checkpoint_dirs, clips, tmp_path):
    """The Trainer would copy the checkpoint's weights in leniently: the self-attention-only conversion would keep
    random cross-attention projections (missing keys are only a warning)."""
    mha_dir, mla_dir = tiny_checkpoint_dirs  # mla_dir converts decoder self and cross attention
    run = tmp_path / "run"
    broken_copy(mla_dir, run / "checkpoint-2")
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"checkpoint-2 holds a model unlike the one this run built \(mla_targets="
                                         r"\['decoder_self', 'decoder_cross'\] there, \['decoder_self'\] here; kept_key_indices differs\)"):
        run_finetune.main(finetune_args(mha_dir, clips / "good.json", run, "--resume_from_checkpoint", "latest",
                                        "--mla_targets", "decoder_self"))
    assert sorted(os.listdir(run)) == ["checkpoint-2"]


def test_lora_resume_checks_the_adapter(tiny_checkpoint_dirs, tmp_path):
    """A LoRA run resumes from checkpoint-N/lora_adapter: a checkpoint whose merged model was never written (killed
    right after the Trainer marked it complete) still resumes; an adapter of another rank is refused."""
    from peft import get_peft_model_state_dict

    _, mla_dir = tiny_checkpoint_dirs
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "lora_adapter").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert check_resume_checkpoint(str(checkpoint), lora=True) == str(checkpoint)
    with pytest.raises(CheckpointError, match="Expected config.json .*pass an earlier checkpoint-N"):
        check_resume_checkpoint(str(checkpoint))

    def lora_model(rank):
        model = WhisperMLAForConditionalGeneration.from_pretrained(mla_dir)
        return set_trainable(model, ModelArguments(trainable="lora", lora_r=rank))

    save_file(get_peft_model_state_dict(lora_model(8)), str(checkpoint / "lora_adapter" / "adapter_model.safetensors"))
    restore_lora_adapter(lora_model(8), str(checkpoint))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors does not fit this run's model \(.*size "
                                              r"mismatch.*\); resume with the flags"):
        restore_lora_adapter(lora_model(4), str(checkpoint))


@pytest.mark.slow
def test_cli_prints_one_sentence_and_exits_1(tiny_checkpoint_dirs, clips, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    broken = broken_copy(mla_dir, tmp_path / "broken", drop=KEPT_AWAY_TENSOR)
    for script, args in [("run_eval.py", eval_args(broken, clips / "good.json", tmp_path / "eval")),
                         ("run_finetune.py", finetune_args(broken, clips / "good.json", tmp_path / "train"))]:
        result = cli(script, args, cwd=tmp_path)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "LOAD REPORT" not in result.stderr + result.stdout
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: Checkpoint ") and KEPT_AWAY_TENSOR in last
    assert sorted(os.listdir(tmp_path)) == ["broken"]


# --------------------------------------------------------------------------------------------- 3. numbers


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--batch_size", "-1"), ("--num_beams", "0"),
                                         ("--max_new_tokens", "0"), ("--max_samples", "0")])
def test_run_eval_checks_numbers_first(tmp_path, flag, value):
    with pytest.raises(ValueError, match=rf"{flag} expects a number >= 1.*, but found {value}; "):
        run_eval.main(eval_args("never-loaded", tmp_path / "never-read.json", tmp_path / "out", flag, value))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--per_device_train_batch_size", "0", ">= 1"), ("--learning_rate", "-1", "> 0"), ("--max_steps", "0", ">= 1"),
    ("--gradient_accumulation_steps", "0", ">= 1"), ("--lora_r", "0", ">= 1"), ("--lora_dropout", "1", "< 1"),
    ("--pseudo_label_batch_size", "0", ">= 1"), ("--max_duration_in_seconds", "0", "> 0"),
    ("--generation_num_beams", "0", ">= 1"), ("--max_train_minutes", "nan", "> 0"),
])
def test_run_finetune_checks_numbers_first(tmp_path, flag, value, expected):
    with pytest.raises(ValueError, match=rf"{flag} expects a number .*{expected}.*, but found {value}"):
        run_finetune.main(finetune_args("never-loaded", "never-read.json", tmp_path / "out", flag, value))
    assert not (tmp_path / "out").exists()


def test_max_label_length_beyond_the_model_is_refused_before_conversion(tiny_checkpoint_dirs, clips, tmp_path):
    mha_dir, _ = tiny_checkpoint_dirs  # max_target_positions 64
    with pytest.raises(ValueError, match=r"--max_label_length expects at most the model's max_target_positions "
                                         r"\(64\), but found 100"):
        run_finetune.main(finetune_args(mha_dir, clips / "good.json", tmp_path / "out", "--max_label_length", "100"))


def test_run_eval_refuses_more_new_tokens_than_decoder_positions(tiny_checkpoint_dirs, clips, tmp_path):
    args = eval_args(tiny_checkpoint_dirs[1], clips / "good.json", tmp_path / "out")
    args[args.index("--max_new_tokens") + 1] = "63"  # max_target_positions 64, English-only prompt of 2 tokens
    with pytest.raises(ValueError, match=r"--max_new_tokens expects at most 62 for .* \(its max_target_positions 64 "
                                         r"minus 2 prompt tokens\), but found 63"):
        run_eval.main(args)
    assert not (tmp_path / "out").exists()


def test_unknown_language_of_a_multilingual_model(tiny_mha):
    import copy

    model = copy.copy(tiny_mha)
    model.generation_config = copy.deepcopy(tiny_mha.generation_config)
    model.generation_config.is_multilingual = True
    model.generation_config.lang_to_id = {"<|en|>": 50259, "<|de|>": 50261}
    assert transcription.build_generate_kwargs(model, language="German")["language"] == "German"
    with pytest.raises(ValueError, match=r"--language expects a language .* knows .*, but found 'klingon'; pick one "
                                         r"of de, en\."):
        transcription.build_generate_kwargs(model, language="klingon")
    with pytest.raises(ValueError, match="but found 'fr'; pick one of de, en"):  # a Whisper language, not this model's
        transcription.build_generate_kwargs(model, language="fr")


def test_english_only_student_takes_no_language_prompt(tiny_checkpoint_dirs, clips, tmp_path):
    """--language en used to put <|en|><|transcribe|> into every label of an English-only model, whose prompt at
    inference has neither; and --distill then failed inside generate()."""
    mha_dir, _ = tiny_checkpoint_dirs
    args = run_finetune.parse_arguments(finetune_args(mha_dir, clips / "good.json", tmp_path / "out", "--language",
                                                      "en"))
    model_args, data_args, distill_args, _, training_args = args
    check_models(model_args, data_args, distill_args, training_args)
    assert data_args.language is None
    with pytest.raises(ValueError, match=r"is English-only, so it only transcribes English, but found "
                                         r"language='fr'"):
        run_finetune.main(finetune_args(mha_dir, clips / "good.json", tmp_path / "out", "--language", "fr"))
    assert not (tmp_path / "out").exists()


def test_check_number_message():
    with pytest.raises(ValueError, match=r"^--x expects a number >= 0 and < 1 \(or unset\), but found 1.5; pass a "
                                         r"value in that range\.$"):
        check_number("--x", 1.5, minimum=0, below=1, optional=True)
    check_number("--x", None, minimum=0, optional=True)


# --------------------------------------------------------------------------------------------- 5. wrong kinds of input


def test_run_eval_names_a_missing_or_wrong_model_path(tiny_checkpoint_dirs, clips, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    cases = [
        (tmp_path / "no" / "such" / "model", "no folder exists at .*no/such/model'; check the path"),
        (os.path.join(mla_dir, "model.safetensors"), "found the file .*model.safetensors'; pass the folder that holds"),
        (clips, r"Expected config.json in the checkpoint folder .*, but found \d+ entries \(clip0.flac"),
    ]
    for model, message in cases:
        with pytest.raises(CheckpointError, match=message):
            run_eval.main(eval_args(model, clips / "good.json", tmp_path / "out"))
    with pytest.raises(CheckpointError, match="no folder exists at .*missing-baseline"):
        run_eval.main(eval_args(mla_dir, clips / "good.json", tmp_path / "out", "--baseline_model",
                                str(tmp_path / "missing-baseline")))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_eval_refuses_cuda_without_a_gpu(tiny_checkpoint_dirs, clips, tmp_path):
    args = eval_args(tiny_checkpoint_dirs[1], clips / "good.json", tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    with pytest.raises(ValueError, match="--device cuda needs CUDA, but found no CUDA device .*--device cpu"):
        run_eval.main(args)
    args[args.index("--device") + 1] = "gpu0"
    with pytest.raises(ValueError, match="--device expects auto, cpu, cuda or cuda:N, but found 'gpu0'"):
        run_eval.main(args)


# --------------------------------------------------------------------------------------------- 6. damaged clips


def test_lazy_clip_with_a_damaged_body_names_its_entry(clips):
    dataset = load_speech_dataset(clips / "with_damaged.json", lazy=True)  # the header is fine: loads
    audio = dataset[3]["audio"]
    assert isinstance(audio, LazyAudio) and len(audio) == 48000
    with pytest.raises(SpeechDataError, match=r"^entry 3 of manifest .*with_damaged.json: Could not decode audio "
                                              r".*damaged.flac"):
        audio.load()


@pytest.mark.slow
def test_damaged_lazy_clip_mid_training_is_skipped_with_the_flag(tiny_checkpoint_dirs, clips, tmp_path):
    """--trainable all: the encoder trains, so clips are decoded when a step reads them (no up-front pass)."""
    mha_dir, _ = tiny_checkpoint_dirs
    data = clips / "with_damaged.json"
    args = ["--lazy_audio_loading", "--trainable", "all"]
    with pytest.raises(SpeechDataError, match=r"entry 3 of manifest .*damaged.flac.*pass --skip_bad_samples"):
        run_finetune.main(finetune_args(mha_dir, data, tmp_path / "stopped", *args))
    assert not (tmp_path / "stopped" / "config.json").exists()

    metrics = run_finetune.main(finetune_args(mha_dir, data, tmp_path / "out", *args, "--skip_bad_samples"))
    assert metrics["global_step"] == 1 and metrics["train_samples"] == 4  # its header counted it in
    assert metrics["train_skipped_bad_during_training"] == 1 and metrics["train_skipped_bad"] == 0
    assert "1 undecodable skipped during training" in (tmp_path / "out" / "README.md").read_text()
    from_pretrained_strict(WhisperMLAForConditionalGeneration, str(tmp_path / "out"))


@pytest.mark.slow
def test_damaged_lazy_clip_is_dropped_before_pseudo_labelling_and_eval(tiny_checkpoint_dirs, clips, tmp_path):
    """When every clip is decoded up front anyway (encoder outputs precomputed, a teacher's transcripts, the eval
    set), a damaged clip is dropped and counted there, before any work."""
    mha_dir, _ = tiny_checkpoint_dirs
    data = clips / "with_damaged.json"
    args = ["--lazy_audio_loading", "--trainable", "mla", "--distill", "--eval_data", str(data)]
    with pytest.raises(SpeechDataError, match=r"entry 3 of manifest .*damaged.flac"):
        run_finetune.main(finetune_args(mha_dir, data, tmp_path / "stopped", *args))
    metrics = run_finetune.main(finetune_args(mha_dir, data, tmp_path / "out", *args, "--skip_bad_samples"))
    assert metrics["train_samples"] == 3 and metrics["train_skipped_bad"] == 1
    assert metrics["eval_samples"] == 3 and metrics["eval_skipped_bad"] == 1
    assert metrics["train_skipped_bad_during_training"] == 0


def test_dataset_substitutes_the_next_readable_clip(clips, tiny_processor):
    dataset = load_speech_dataset(clips / "with_damaged.json", lazy=True)
    audios = [example["audio"] for example in dataset]
    labels = [[index] for index in range(len(audios))]
    strict = SpeechSeq2SeqDataset(audios, labels, tiny_processor.feature_extractor)
    with pytest.raises(SpeechDataError, match="damaged.flac.*--skip_bad_samples"):
        strict[3]
    lenient = SpeechSeq2SeqDataset(audios, labels, tiny_processor.feature_extractor, skip_bad=True)
    item = lenient[3]
    assert item["labels"] == [0] and item["input_features"].shape == (80, 3000)  # clip 0 (wrapping around)
    np.testing.assert_array_equal(item["input_features"], lenient[0]["input_features"])
    lenient[3]
    assert lenient.num_bad == 1  # counted once, however often it is read


# --------------------------------------------------------------------------------------------- 8. text and audio files


def test_text_files_that_are_not_utf8_are_named(clips, tmp_path):
    manifest = tmp_path / "latin1.json"
    manifest.write_bytes(json.dumps({"annotation": [{"path": str(clips / "clip0.flac"), "text": "caf\u00e9"}]},
                                    ensure_ascii=False).encode("latin-1"))
    with pytest.raises(SpeechDataError, match=r"Expected the manifest .*latin1.json to be UTF-8 text, but byte \d+ "
                                              r"is not .*re-save it as UTF-8"):
        load_speech_dataset(manifest)
    chapter = tmp_path / "libri" / "1" / "2"
    chapter.mkdir(parents=True)
    shutil.copyfile(clips / "clip0.flac", chapter / "1-2-0000.flac")
    (chapter / "1-2.trans.txt").write_bytes("1-2-0000 CAF\u00c9\n".encode("latin-1"))
    with pytest.raises(SpeechDataError, match=r"transcript file .*1-2.trans.txt to be UTF-8"):
        load_speech_dataset(tmp_path / "libri")


def test_transcripts_and_paths_of_the_wrong_type(clips, tmp_path):
    manifest = tmp_path / "typed.json"
    manifest.write_text(json.dumps({"annotation": [{"path": str(clips / "clip0.flac"), "text": ["hello", "world"]},
                                                   {"path": str(clips / "clip1.flac"), "text": TEXTS[1]}]}))
    with pytest.raises(SpeechDataError, match=r"entry 0 .*expected the transcript to be a string, but found list"):
        load_speech_dataset(manifest)
    assert load_speech_dataset(manifest, skip_bad=True).texts == [TEXTS[1]]
    manifest.write_text(json.dumps({"annotation": [{"path": 7, "text": "seven"}]}))
    with pytest.raises(SpeechDataError, match=r"entry 0 .*expected \"path\" to be a file path string, but found 7"):
        load_speech_dataset(manifest)


def test_audio_with_nan_samples_is_refused(tmp_path):
    audio = tone(220, seconds=0.5)
    audio[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", audio, 16000, subtype="FLOAT")
    with pytest.raises(SpeechDataError, match=r"nan.wav holds 1 NaN or infinite samples"):
        load_audio(tmp_path / "nan.wav")
