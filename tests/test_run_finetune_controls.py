"""run_finetune.py's paired controls (--mha_baseline, --mla_from_scratch) and long-form samples (joined utterances of one
voice, timestamps, speed perturbation). Tests that train or start a process are marked slow."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from transformers import Seq2SeqTrainingArguments

import run_finetune
from helpers import fresh_env
from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla
from whisper_mla.training.arguments import ModelArguments
from whisper_mla.training.data import pseudo_label_ids
from whisper_mla.training.trainable import set_trainable

from finetune_helpers import (  # noqa: F401 (fixtures)
    EOT,
    NO_TIMESTAMPS,
    ROOT,
    SOT,
    fast_args,
    final_weights,
    load_output,
    parameters,
    sharp_mha_dir,
    sources,
    tone,
)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- paired controls


MHA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def mha_block_parameters(model, blocks: list[str], weights_only: bool = False) -> set[str]:
    """Parameter names of the q/k/v/out projections of `blocks` (paths under model.model) in an MHA model."""
    names = {name for name, _ in model.named_parameters()}
    suffixes = (".weight",) if weights_only else (".weight", ".bias")
    return {f"model.{b}.{p}{s}" for b in blocks for p in MHA_PROJECTIONS for s in suffixes} & names


@pytest.mark.parametrize("targets, blocks", [
    (["decoder_self"], ["decoder.layers.0.self_attn", "decoder.layers.1.self_attn"]),
    (["encoder_self", "decoder_cross"], ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
                                         "decoder.layers.0.encoder_attn", "decoder.layers.1.encoder_attn"]),
])
def test_mha_control_maps_trainable_mla_to_the_blocks_an_mla_run_converts(tiny_checkpoint_dirs, targets, blocks):
    from whisper_mla.training.controls import converted_block_names
    from whisper_mla.training.models import load_whisper

    mha_dir, _ = tiny_checkpoint_dirs
    model, is_mla = load_whisper(mha_dir)
    assert not is_mla
    names = converted_block_names(model, MLAArguments(mla_targets=targets, kv_lora_rank=8, kept_key_dims=2))
    assert sorted(names) == sorted(blocks)
    set_trainable(model, ModelArguments(trainable="mla"), names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == mha_block_parameters(model, blocks)
    lora = set_trainable(load_whisper(mha_dir)[0], ModelArguments(trainable="lora"), names)
    requires_grad = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert requires_grad and all(".lora_A." in n or ".lora_B." in n for n in requires_grad)
    targets_found = {n.split(".lora_")[0].removeprefix("base_model.model.") + ".weight" for n in requires_grad}
    assert targets_found == mha_block_parameters(model, blocks, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mla", "lora"])
def test_mha_control_trains_the_mapped_blocks_and_saves_plain_whisper(tiny_checkpoint_dirs, sources, tmp_path, mode):
    """--mha_baseline: no conversion; only the mapped q/k/v/out change; the output (and checkpoint-N) is a Whisper
    checkpoint that WhisperForConditionalGeneration loads strictly, and its card says it is the MHA control."""
    from transformers import WhisperForConditionalGeneration

    mha_dir, _ = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    out = tmp_path / "out"
    run_finetune.main(fast_args(mha_dir, data, out, "--mha_baseline", "--trainable", mode, "--mla_targets",
                                "decoder_self", "--save_strategy", "steps", "--save_steps", "2"))
    before = WhisperForConditionalGeneration.from_pretrained(mha_dir)
    blocks = ["decoder.layers.0.self_attn", "decoder.layers.1.self_attn"]
    for folder in (out, out / "checkpoint-2"):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "whisper" and "auto_map" not in config
        assert not (folder / "modeling_whisper_mla.py").exists()
        after, info = WhisperForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        old, new = parameters(before), parameters(after)
        changed = {name for name in old if not torch.equal(old[name], new[name])}
        assert changed == mha_block_parameters(before, blocks, weights_only=mode == "lora")
    card = (out / "README.md").read_text()
    assert "Whisper MHA control" in card and "| control | MHA control (--mha_baseline)" in card
    assert "q/k/v/out of the blocks an MLA run converts (decoder_self)" in card


@pytest.mark.slow
def test_mha_control_resumes_and_distils_from_a_frozen_copy(tiny_checkpoint_dirs, sources, tmp_path):
    """The MHA control resumes from its own checkpoint (an MLA run refuses it); with --distill its default teacher
    is a frozen copy of the MHA model, so the KL starts at zero while the student still trains."""
    mha_dir, _ = tiny_checkpoint_dirs
    data, _ = sources["manifest"]

    def args(output_dir, *extra):
        return fast_args(mha_dir, data, output_dir, "--trainable", "mla", "--save_strategy", "steps", "--save_steps",
                         "1", *extra)

    run_finetune.main(args(tmp_path / "a", "--mha_baseline"))
    reference = final_weights(tmp_path / "a")
    os.remove(tmp_path / "a" / "checkpoint-2" / "trainer_state.json")  # as if killed while saving checkpoint-2
    with pytest.raises(ValueError, match="holds a whisper model, but this run builds a whisper_mla model"):
        run_finetune.main(args(tmp_path / "a", "--resume_from_checkpoint", "latest"))
    metrics = run_finetune.main(args(tmp_path / "a", "--mha_baseline", "--resume_from_checkpoint", "latest"))
    assert metrics["global_step"] == 2
    resumed = final_weights(tmp_path / "a")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], msg=key)

    metrics = run_finetune.main(args(tmp_path / "d", "--mha_baseline", "--distill", "--max_steps", "1"))
    history = json.loads((tmp_path / "d" / "trainer_state.json").read_text())["log_history"]
    assert metrics["global_step"] == 1 and history[0]["loss"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("cross,trainable", [("per_layer", "mla"), ("shared", "mla"), ("shared", "mla_self")])
def test_mla_from_scratch_differs_from_the_svd_init_exactly_in_the_low_rank_projections(tiny_checkpoint_dirs,
                                                                                         tiny_processor, cross,
                                                                                         trainable):
    """Same conversion, then kv_a_proj/k_b_proj/v_b_proj (and the shared cross_kv_a_proj) drawn afresh with the
    model's init (std init_std, zero biases) from --seed; every other tensor is bit-identical to the SVD init. With
    --trainable mla_self only the self-attention blocks' projections: what trains."""
    from whisper_mla.training.arguments import DistillationArguments
    from whisper_mla.training.models import load_student_and_teacher

    mha_dir, _ = tiny_checkpoint_dirs
    mla_args = MLAArguments(kv_lora_rank=8, kept_key_dims=2, cross_attention_latent=cross,
                            cross_kv_lora_rank=8 if cross == "shared" else None)

    def student(scratch: bool, seed: int = 0):
        model_args = ModelArguments(model_name_or_path=mha_dir, mla_from_scratch=scratch, trainable=trainable)
        model, _ = load_student_and_teacher(model_args, DistillationArguments(), mla_args, tiny_processor, seed)
        return model.state_dict()

    svd, scratch, again, other = student(False), student(True, 0), student(True, 0), student(True, 1)
    assert svd.keys() == scratch.keys()
    projections = ("kv_a_proj.", "k_b_proj.", "v_b_proj.", "decoder.cross_kv_a_proj.")
    expected = {k for k in svd if any(p in k for p in projections)
                and (trainable == "mla" or ".self_attn." in k)}
    if trainable == "mla_self":
        assert expected and all(".self_attn." in k for k in expected)
    elif cross == "shared":
        assert "model.decoder.cross_kv_a_proj.weight" in expected
        assert not any("encoder_attn.kv_a_proj" in k for k in svd)  # cross blocks read the shared latent
    else:
        assert any("encoder_attn.kv_a_proj" in k for k in expected)
    for key in svd:
        if key in expected and key.endswith(".bias"):  # zero (the tiny random model's v_proj bias is zero too)
            assert torch.count_nonzero(scratch[key]) == 0, key
        elif key in expected:
            assert not torch.equal(svd[key], scratch[key]), key
            assert scratch[key].std().item() == pytest.approx(0.02, rel=0.3), key
        else:
            assert torch.equal(svd[key], scratch[key]), key
        assert torch.equal(scratch[key], again[key]), key  # seeded
    assert any(not torch.equal(scratch[k], other[k]) for k in expected)


def test_mla_from_scratch_of_a_converted_checkpoint_equals_converting_then_redrawing(tiny_checkpoint_dirs,
                                                                                     tiny_processor):
    """--mla_from_scratch on the saved Whisper-MLA checkpoint (what benchmarks/run_recovery.py passes: both
    arms start from one calibrated conversion) redraws the same projections as converting the MHA model the same way
    and redrawing them: bit-identical students."""
    from whisper_mla.training.arguments import DistillationArguments
    from whisper_mla.training.models import load_student_and_teacher

    mha_dir, mla_dir = tiny_checkpoint_dirs  # mla_dir: kv_lora_rank 8, 2 kept key dims, per-layer cross latents
    students = {}
    for start, mla_args in ((mha_dir, MLAArguments(kv_lora_rank=8, kept_key_dims=2, cross_attention_latent="per_layer")),
                            (mla_dir, MLAArguments())):
        model_args = ModelArguments(model_name_or_path=start, mla_from_scratch=True, trainable="mla")
        students[start], _ = load_student_and_teacher(model_args, DistillationArguments(), mla_args, tiny_processor)
    converted, loaded = (students[start].state_dict() for start in (mha_dir, mla_dir))
    assert converted.keys() == loaded.keys()
    for key in converted:
        assert torch.equal(converted[key], loaded[key]), key


@pytest.mark.slow
def test_mla_from_scratch_trains_and_says_so(tiny_checkpoint_dirs, sources, tmp_path):
    mha_dir, _ = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    metrics = run_finetune.main(fast_args(mha_dir, data, tmp_path / "out", "--mla_from_scratch", "--trainable", "mla",
                                          "--max_steps", "1"))
    assert metrics["global_step"] == 1
    assert "MLA from scratch (--mla_from_scratch)" in (tmp_path / "out" / "README.md").read_text()
    assert load_output(tmp_path / "out").config.kv_lora_rank == 8


def test_control_and_long_form_flags_explain_the_fix(tiny_checkpoint_dirs, sources, tmp_path):
    mha_dir, mla_dir = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    with pytest.raises(ValueError, match="--mha_baseline and --mla_from_scratch .* but found both; run them one"):
        run_finetune.main(fast_args(mha_dir, data, tmp_path / "a", "--mha_baseline", "--mla_from_scratch"))
    with pytest.raises(ValueError, match=r"--mha_baseline .* expects a Whisper \(MHA\) --model_name_or_path, but "
                                         "found a Whisper-MLA checkpoint .*; pass the MHA model"):
        run_finetune.main(fast_args(mla_dir, data, tmp_path / "b", "--mha_baseline"))
    with pytest.raises(ValueError, match="--push_to_hub expects a Whisper-MLA checkpoint"):
        run_finetune.main(fast_args(mha_dir, data, tmp_path / "c", "--mha_baseline", "--push_to_hub"))
    with pytest.raises(ValueError, match=r"--concatenate_to_seconds expects a number > 0 and <= 30 \(or unset\), "
                                         "but found 45"):
        run_finetune.main(fast_args(mha_dir, data, tmp_path / "d", "--concatenate_to_seconds", "45"))
    with pytest.raises(ValueError, match="--concatenate_timestamps expects --concatenate_to_seconds"):
        run_finetune.main(fast_args(mha_dir, data, tmp_path / "e", "--concatenate_timestamps"))
    assert not any((tmp_path / name).exists() for name in "abcde")


# --------------------------------------------------------------------------------------------- long-form samples


VOICES = ("voice_a", "voice_b", "voice_c")


@pytest.fixture(scope="module")
def voices_manifest(tmp_path_factory):
    """A synthetic_train-like manifest: 12 tone clips (0.6-1.7 s, 16 kHz) whose `voice` field cycles through three
    voices, so that one voice's utterances are never adjacent in the data."""
    folder = tmp_path_factory.mktemp("voices")
    words = ["hello world", "the cat sat", "good morning", "one two three", "quick brown fox", "you are now"]
    entries = []
    for i in range(12):
        voice = VOICES[i % 3]
        (folder / voice).mkdir(exist_ok=True)
        soundfile.write(folder / voice / f"u{i}.wav", tone(16000, 0.6 + 0.1 * i, i), 16000)
        entries.append({"id": f"{voice}/u{i}", "path": f"{voice}/u{i}.wav", "text": words[i % 6], "voice": voice})
    (folder / "train.json").write_text(json.dumps({"annotation": entries}))
    return str(folder / "train.json")


def load_examples(data, **data_kwargs):
    from whisper_mla.training.arguments import DataArguments
    from whisper_mla.training.data import load_clips

    examples, skipped = load_clips([data], None, DataArguments(train_data=[data], **data_kwargs), None, True)
    assert not skipped
    return examples


def part_boundaries(joined: np.ndarray, parts: list[np.ndarray], max_gap_seconds: float = 1.0) -> list[tuple]:
    """(start, end) in seconds of each part inside `joined`, found by exact search: the parts in order, separated by
    digital silence only, nothing before the first or after the last."""
    boundaries, position = [], 0
    for index, part in enumerate(parts):
        first = int(np.flatnonzero(part)[0])
        window = joined[position + first: position + first + int(max_gap_seconds * 16000) + 1]
        candidates = position + np.flatnonzero(window == part[first]) if index else [0]
        start = next(int(c) for c in candidates if np.array_equal(joined[c: c + len(part)], part))
        assert not np.any(joined[position:start]), "only silence between joined utterances"
        boundaries.append((start / 16000, (start + len(part)) / 16000))
        position = start + len(part)
    assert position == len(joined)
    return boundaries


def check_joined(joined_examples, originals, max_seconds, tokenizer, lower: bool = False):
    """Every original utterance is in exactly one sample, in data order within its speaker; each sample is at most
    `max_seconds`, its text is the parts' transcripts joined with spaces, its audio the parts with short silences;
    the labels decode to that text and, with timestamps, to segments at the parts' boundaries (within 0.02 s)."""
    from whisper_mla.training.data import tokenize_transcripts

    by_id = {e["id"]: e for e in originals}
    assert sorted(p for e in joined_examples for p in e["parts"]) == sorted(by_id)
    _, plain, _ = tokenize_transcripts(joined_examples, tokenizer, 448, lower)
    _, stamped, _ = tokenize_transcripts(joined_examples, tokenizer, 448, lower, timestamps=True)
    for example, plain_ids, stamped_ids in zip(joined_examples, plain, stamped):
        parts = [by_id[p] for p in example["parts"]]
        audio = example["audio"] if isinstance(example["audio"], np.ndarray) else example["audio"].load()
        assert len(audio) <= max_seconds * 16000
        texts = [p["text"].lower() if lower else p["text"] for p in parts]
        assert example["text"] == " ".join(p["text"] for p in parts)
        boundaries = part_boundaries(audio, [p["audio"] for p in parts])
        gaps = [b[0] - a[1] for a, b in zip(boundaries, boundaries[1:])]
        assert all(0.05 <= g <= 1.0 for g in gaps), gaps
        assert tokenizer.decode(plain_ids, skip_special_tokens=True) == " ".join(texts)
        assert NO_TIMESTAMPS not in stamped_ids and stamped_ids[0] == SOT and stamped_ids[-1] == EOT
        offsets = tokenizer.decode(stamped_ids, output_offsets=True)["offsets"]
        assert [o["text"].strip() for o in offsets] == texts
        for offset, (start, end) in zip(offsets, boundaries):
            assert offset["timestamp"][0] == pytest.approx(start, abs=0.0101)
            assert offset["timestamp"][1] == pytest.approx(end, abs=0.0101)
        assert tokenizer.decode(stamped_ids, skip_special_tokens=True).strip() == " ".join(texts)
    return [e["parts"] for e in joined_examples]


def test_concatenation_joins_consecutive_utterances_of_each_voice(voices_manifest, tiny_processor):
    from whisper_mla.training.concatenate import concatenate_examples

    originals = load_examples(voices_manifest)
    joined, report = concatenate_examples(originals, 4.0, seed=0)
    groups = check_joined(joined, originals, 4.0, tiny_processor.tokenizer)
    order = [e["id"] for e in originals]
    for parts in groups:
        voice = parts[0].split("/")[0]
        assert all(p.startswith(voice + "/") for p in parts)  # one voice per sample
        of_voice = [i for i in order if i.startswith(voice + "/")]
        start = of_voice.index(parts[0])
        assert parts == of_voice[start: start + len(parts)]  # consecutive utterances of that voice, in order
    assert any(len(parts) > 1 for parts in groups)
    assert [e["parts"][0] for e in joined] == [i for i in order if any(g[0] == i for g in groups)]  # data order
    assert report["train_joined_samples"] == len(joined) and report["train_joined_utterances"] == 12
    seconds = [len(e["audio"]) / 16000 for e in joined]
    assert report["train_joined_mean_seconds"] == pytest.approx(np.mean(seconds), abs=1e-3)
    again, _ = concatenate_examples(originals, 4.0, seed=0)
    other, _ = concatenate_examples(originals, 4.0, seed=1)
    assert all(np.array_equal(a["audio"], b["audio"]) for a, b in zip(joined, again))  # seeded
    assert any(len(a["audio"]) != len(b["audio"]) for a, b in zip(joined, other))


def test_concatenation_groups_librispeech_by_speaker_chapter_and_stays_lazy(sources, tiny_processor):
    from whisper_mla.training.concatenate import JoinedAudio, concatenate_examples

    data, _ = sources["librispeech"]
    originals = load_examples(data)
    joined, _ = concatenate_examples(originals, 30.0, seed=0)
    assert check_joined(joined, originals, 30.0, tiny_processor.tokenizer, lower=True) == [
        ["19-198-0000", "19-198-0001", "19-198-0002"]]
    lazy, _ = concatenate_examples(load_examples(data, lazy_audio_loading=True), 30.0, seed=0)
    assert isinstance(lazy[0]["audio"], JoinedAudio) and len(lazy[0]["audio"]) == len(joined[0]["audio"])
    np.testing.assert_array_equal(lazy[0]["audio"].load(), joined[0]["audio"])
    assert lazy[0]["segments"] == joined[0]["segments"]


@pytest.mark.real_weights
def test_concatenation_of_real_speech_decodes_with_the_real_tokenizer(real_speech, tiny_en_processor):
    """The Asterisk real_train prompts (one speaker): samples of up to 30 s, in data order, whose labels the real
    tiny.en tokenizer decodes to the joined transcripts and, with timestamps, to the utterances' boundaries."""
    from whisper_mla.training.concatenate import concatenate_examples

    originals = load_examples(real_speech["real_train"])[:80]
    joined, report = concatenate_examples(originals, 30.0, seed=0)
    groups = check_joined(joined, originals, 30.0, tiny_en_processor.tokenizer)
    assert [p for parts in groups for p in parts] == [e["id"] for e in originals]  # one speaker: data order
    assert report["train_joined_mean_seconds"] > 15 and len(joined) < len(originals) / 3


def test_pseudo_labels_with_timestamps_keep_the_first_pass_and_end_with_end_of_text():
    ts = [50363 + i for i in range(1501)]  # <|0.00|> ...
    prefix = [SOT]
    assert pseudo_label_ids([ts[0], 11, ts[50], ts[50], 12, ts[90]], prefix, EOT, ts[0]) == [
        SOT, ts[0], 11, ts[50], ts[50], 12, ts[90], EOT]  # generate drops the end-of-text of timestamped output
    assert pseudo_label_ids([ts[0], 11, ts[50], ts[0], 13, ts[20]], prefix, EOT, ts[0]) == [
        SOT, ts[0], 11, ts[50], EOT]  # a second pass over the window (times start again) is cut
    assert pseudo_label_ids([ts[0], 11, ts[50], EOT, EOT], prefix, EOT, ts[0]) == [SOT, ts[0], 11, ts[50], EOT]
    assert pseudo_label_ids([ts[0], 11, 12], prefix, EOT, ts[0]) == [SOT, ts[0], 11, 12]  # hit max length


def test_distillation_on_joined_audio_asks_the_teacher_for_timestamps(tiny_mha, tiny_processor, voices_manifest):
    """The teacher transcribes each joined sample; with timestamps its labels start <|startoftranscript|> <|t|>."""
    import copy

    from whisper_mla.training.arguments import DataArguments, DistillationArguments
    from whisper_mla.training.data import build_train_dataset

    data_args = DataArguments(train_data=[voices_manifest], concatenate_to_seconds=4.0, concatenate_timestamps=True)
    student = convert_whisper_to_mla(copy.deepcopy(tiny_mha), kv_lora_rank=8, kept_key_dims=2)
    dataset, report = build_train_dataset(data_args, DistillationArguments(distill=True, pseudo_label_batch_size=4),
                                          ModelArguments(trainable="mla"), student, tiny_mha, tiny_processor,
                                          max_label_length=20, share_encoder=True, device="cpu", seed=0)
    assert len(dataset) == report["train_joined_samples"] < 12 and report["train_joined_utterances"] == 12
    for ids in dataset.labels:
        assert ids[0] == SOT and ids[1] >= 50363 and NO_TIMESTAMPS not in ids and len(ids) <= 20
        times = [t for t in ids if t >= 50363]
        assert times == sorted(times)
    assert dataset.encoder_states is not None  # the student's encoder outputs are still precomputed


@pytest.mark.parametrize("distill", [False, True])
def test_joined_samples_can_keep_the_single_utterances_beside_them(tiny_mha, tiny_processor, voices_manifest,
                                                                    distill):
    """--concatenate_keep_utterances: the 12 utterances alone (no timestamps) and then the joined samples (with)."""
    import copy

    from whisper_mla.training.arguments import DataArguments, DistillationArguments
    from whisper_mla.training.data import build_train_dataset

    data_args = DataArguments(train_data=[voices_manifest], concatenate_to_seconds=4.0, concatenate_timestamps=True,
                              concatenate_keep_utterances=True)
    student = convert_whisper_to_mla(copy.deepcopy(tiny_mha), kv_lora_rank=8, kept_key_dims=2)
    dataset, report = build_train_dataset(data_args, DistillationArguments(distill=distill, pseudo_label_batch_size=5),
                                          ModelArguments(trainable="mla"), student, tiny_mha if distill else None,
                                          tiny_processor, max_label_length=20, share_encoder=True, device="cpu",
                                          seed=0)
    joined = report["train_joined_samples"]
    assert 1 < joined < 12 and len(dataset) == report["train_samples"] == 12 + joined
    assert len(dataset.encoder_states) == len(dataset.labels) == 12 + joined
    assert all(ids[:2] == [SOT, NO_TIMESTAMPS] for ids in dataset.labels[:12])
    assert all(ids[0] == SOT and ids[1] >= 50363 for ids in dataset.labels[12:])
    if not distill:  # the transcripts: each utterance's own, then the joined ones
        texts = [tiny_processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in dataset.labels]
        assert texts[:12] == [e["text"] for e in load_examples(voices_manifest)]
        assert sorted(" ".join(texts[:12]).split()) == sorted(" ".join(texts[12:]).split())
    with pytest.raises(ValueError, match="--concatenate_keep_utterances expects --concatenate_to_seconds"):
        from whisper_mla.training.arguments import validate_arguments

        validate_arguments(ModelArguments(), DataArguments(train_data=[voices_manifest],
                                                           concatenate_keep_utterances=True),
                           DistillationArguments(), Seq2SeqTrainingArguments(output_dir="unused"))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["transcripts", "distill"])
def test_long_form_training_runs_lazy_or_not(sharp_mha_dir, voices_manifest, tmp_path, objective):
    """A few steps on joined samples with timestamps: the report counts them, the card says so, and lazily loaded
    audio trains to the same weights."""
    extra = ["--concatenate_to_seconds", "4", "--concatenate_timestamps", "--trainable", "mla",
             "--max_label_length", "48", "--per_device_train_batch_size", "2"]
    if objective == "distill":
        extra += ["--distill", "--precompute_encoder_outputs", "false"]
    weights = []
    for lazy in ("false", "true"):
        out = tmp_path / f"lazy-{lazy}"
        metrics = run_finetune.main(fast_args(sharp_mha_dir, voices_manifest, out, "--lazy_audio_loading", lazy,
                                              *extra))
        assert metrics["global_step"] == 2 and metrics["train_joined_utterances"] == 12
        assert metrics["train_samples"] == metrics["train_joined_samples"] < 12
        assert 1.0 < metrics["train_joined_mean_seconds"] <= 4.0
        card = (out / "README.md").read_text()
        assert f"12 utterances joined into {metrics['train_joined_samples']} samples of up to 4 s" in card
        weights.append(parameters(load_output(out)))
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.slow
def test_processor_of_an_mla_checkpoint_loads_without_the_remote_code_prompt(tiny_checkpoint_dirs, tmp_path):
    """transformers asks "Do you wish to run the custom code? [y/N]" on stdin when a processor is loaded from a folder
    whose config has auto_map: a training run in a terminal would wait there forever."""
    code = ("import sys; from whisper_mla.training.models import load_processor; "
            "p = load_processor(sys.argv[1]); print(type(p).__name__, type(p.feature_extractor).__name__)")
    result = subprocess.run([sys.executable, "-c", code, tiny_checkpoint_dirs[1]], cwd=tmp_path,
                            env=fresh_env(PYTHONPATH=ROOT), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert result.stdout.split()[-2:] == ["WhisperProcessor", "WhisperFeatureExtractor"]
