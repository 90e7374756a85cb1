"""run_finetune.py and whisper_mla.training: collator, data sources, what trains, LoRA merging, label-free
distillation, gradient accumulation, checkpoints that load in a fresh process, resuming after SIGKILL, torchrun with
two CPU processes, bad input, shipped configs. Tests that train or start a process are marked slow."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open
from transformers import Seq2SeqTrainingArguments

import helpers
import run_finetune
from helpers import fresh_env
from modeling_whisper_mla import WhisperMLAForConditionalGeneration
from whisper_mla.audio import SpeechDataError
from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla
from whisper_mla.training.arguments import ModelArguments
from whisper_mla.training.data import DataCollatorSpeechSeq2SeqWithPadding, pseudo_label_ids
from whisper_mla.training.distillation import DistillationTrainer, distillation_loss
from whisper_mla.training.trainable import MLA_PROJECTIONS, merge_lora, set_trainable


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256  # tiny.en: <|startoftranscript|>, <|notimestamps|>, <|endoftext|>
RATES = (8000, 22050, 44100)
TEXTS = ("hello world", "the quick brown fox", "good morning to you")
MLA_FLAGS = ["--kv_lora_rank", "8", "--kept_key_dims", "2"]


# --------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_mha_dir(tmp_path_factory, tiny_processor):
    """A random tiny MHA Whisper with large weights (init_std 0.5): peaked token distributions, so that conversion
    at rank 8 visibly changes them (conftest's model predicts nearly uniformly, leaving nothing to distil)."""
    from helpers import tiny_whisper_model

    model = tiny_whisper_model(seed=0, init_std=0.5)
    folder = str(tmp_path_factory.mktemp("sharp") / "mha")
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


def tone(rate: int, seconds: float, index: int) -> np.ndarray:
    """Clip `index`: its own pitch and noise."""
    return helpers.tone(220 + 110 * index, rate, seconds, noise=0.02, seed=index)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same three clips (8, 22.05 and 44.1 kHz) in every layout the script reads: {layout: (data, extra args)}."""
    from datasets import Audio, Dataset

    root = tmp_path_factory.mktemp("sources")
    clips = [(f"clip{i}", tone(rate, 1.0 + 0.25 * i, i), rate, text) for i, (rate, text) in
             enumerate(zip(RATES, TEXTS))]

    libri = root / "librispeech" / "19" / "198"
    libri.mkdir(parents=True)
    lines = []
    for i, (_, audio, rate, text) in enumerate(clips):
        soundfile.write(libri / f"19-198-{i:04d}.flac", audio, rate)
        lines.append(f"19-198-{i:04d} {text.upper()}")
    (libri / "19-198.trans.txt").write_text("\n".join(lines) + "\n")

    manifest_dir = root / "manifest"
    manifest_dir.mkdir()
    for name, audio, rate, _ in clips:
        soundfile.write(manifest_dir / f"{name}.wav", audio, rate)
    (manifest_dir / "train.json").write_text(json.dumps(
        {"annotation": [{"path": f"{name}.wav", "text": text} for name, _, _, text in clips]}))

    audiofolder = root / "audiofolder"
    audiofolder.mkdir()
    for name, audio, rate, _ in clips:
        soundfile.write(audiofolder / f"{name}.ogg", audio, rate)
    (audiofolder / "metadata.csv").write_text(
        "file_name,transcription\n" + "".join(f"{name}.ogg,{text}\n" for name, _, _, text in clips))

    rows = {"speech": [], "sentence": []}
    for name, audio, rate, text in clips:
        path = manifest_dir / f"{name}.wav"
        rows["speech"].append({"bytes": path.read_bytes(), "path": f"{name}.wav"})
        rows["sentence"].append(text)
    # Bytes embedded, cast after construction: encoding through the Audio feature would need torchcodec.
    Dataset.from_dict(rows).cast_column("speech", Audio()).save_to_disk(str(root / "saved"))

    unlabelled = root / "unlabelled"  # audio files only: label-free distillation
    unlabelled.mkdir()
    for name, audio, rate, _ in clips:
        soundfile.write(unlabelled / f"{name}.wav", audio, rate)

    column_args = ["--audio_column_name", "speech", "--text_column_name", "sentence"]
    return {
        "librispeech": (str(root / "librispeech"), ["--do_lower_case"]),  # LibriSpeech transcripts are upper case
        "manifest": (str(manifest_dir / "train.json"), []),
        "audiofolder": (str(audiofolder), ["--text_column_name", "transcription"]),
        "save_to_disk": (str(root / "saved"), column_args),
        "unlabelled": (str(unlabelled), []),
    }


def fast_args(model_dir, data, output_dir, *extra) -> list[str]:
    """A CPU run of a few steps on the tiny model, each batch holding all three clips."""
    return [
        "--model_name_or_path", str(model_dir), "--train_data", str(data), "--output_dir", str(output_dir),
        "--max_steps", "2", "--per_device_train_batch_size", "3", "--per_device_eval_batch_size", "3",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--seed", "0", "--max_label_length", "16", "--generation_max_length", "8",
        "--pseudo_label_batch_size", "3", "--disable_tqdm", "true", *MLA_FLAGS, *extra,
    ]


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def load_output(folder) -> WhisperMLAForConditionalGeneration:
    return WhisperMLAForConditionalGeneration.from_pretrained(str(folder))


def start_run_finetune(args: list[str], cwd) -> subprocess.Popen:
    """run_finetune.py started in a new process, not waited for (full determinism only there: it is a process-wide
    torch setting; a test may kill it)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "run_finetune.py"), *args], cwd=cwd, env=fresh_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def waveform_16k(path) -> np.ndarray:
    """A clip as the script must read it, read here without the script's loader: mono float32 at 16 kHz."""
    import soxr

    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, 16000).astype(np.float32)


def clip_files(layout: str, sources) -> tuple[list[str], list[str]]:
    """(audio files, transcripts) that `sources[layout]` holds, in the fixture's clip order."""
    data, _ = sources[layout]
    manifest_dir = os.path.dirname(sources["manifest"][0])
    files = {
        "librispeech": [os.path.join(data, "19", "198", f"19-198-{i:04d}.flac") for i in range(3)],
        "manifest": [os.path.join(manifest_dir, f"clip{i}.wav") for i in range(3)],
        "audiofolder": [os.path.join(data, f"clip{i}.ogg") for i in range(3)],
        "save_to_disk": [os.path.join(manifest_dir, f"clip{i}.wav") for i in range(3)],  # the same bytes, embedded
    }[layout]
    return files, list(TEXTS)  # LibriSpeech's upper-case transcripts are lower-cased (--do_lower_case)


def cross_entropy(model, processor, files, texts) -> float:
    """Whisper's mean token cross-entropy on these clips and transcripts, computed without the script."""
    features = processor.feature_extractor([waveform_16k(f) for f in files], sampling_rate=16000,
                                           return_tensors="pt").input_features  # (3, 80, 3000)
    ids = [processor.tokenizer(text).input_ids for text in texts]  # <|startoftranscript|> ... <|endoftext|>
    labels = torch.full((len(ids), max(map(len, ids))), -100)
    for row, sequence in enumerate(ids):
        labels[row, : len(sequence)] = torch.tensor(sequence)
    with torch.no_grad():  # the model prepends <|startoftranscript|> itself
        return model(input_features=features, labels=labels[:, 1:]).loss.item()


def normalised_wer(model, processor, manifest, max_length: int) -> float:
    """Corpus WER x100 of the model's greedy transcripts of a manifest's clips, after Whisper's English
    normalisation, computed with jiwer directly."""
    import jiwer
    from whisper_mla.metrics import normalize_english

    entries = json.loads(open(manifest).read())["annotation"]
    folder = os.path.dirname(manifest)
    features = processor.feature_extractor([waveform_16k(os.path.join(folder, e["path"])) for e in entries],
                                           sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        tokens = model.eval().generate(features, max_length=max_length, num_beams=1)
    hypotheses = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return 100 * jiwer.wer([normalize_english(e["text"]) for e in entries], [normalize_english(h) for h in hypotheses])


# --------------------------------------------------------------------------------------------- collator, helpers


def test_collator_masks_padding_by_length_not_by_token_id():
    """Whisper's pad token is its end-of-text token: the real EOT must stay a target, only padding becomes -100."""
    collator = DataCollatorSpeechSeq2SeqWithPadding(decoder_start_token_id=SOT)
    features = [
        {"input_features": np.zeros((80, 3000), np.float32), "labels": [SOT, NO_TIMESTAMPS, 11, 12, EOT]},
        {"input_features": np.ones((80, 3000), np.float32), "labels": [SOT, NO_TIMESTAMPS, EOT]},
    ]
    batch = collator(features)
    expected = torch.tensor([[NO_TIMESTAMPS, 11, 12, EOT], [NO_TIMESTAMPS, EOT, -100, -100]])
    torch.testing.assert_close(batch["labels"], expected)
    assert batch["input_features"].shape == (2, 80, 3000)


def test_collator_keeps_labels_without_decoder_start_and_stacks_encoder_outputs():
    collator = DataCollatorSpeechSeq2SeqWithPadding(decoder_start_token_id=SOT)
    states = [torch.randn(1500, 16), torch.randn(1500, 16)]
    batch = collator([{"encoder_hidden_states": states[0], "labels": [SOT, 5, EOT]},
                      {"encoder_hidden_states": states[1], "labels": [7, EOT]}])
    torch.testing.assert_close(batch["labels"], torch.tensor([[SOT, 5, EOT], [7, EOT, -100]]))
    torch.testing.assert_close(batch["encoder_hidden_states"], torch.stack(states))
    assert "input_features" not in batch


def test_pseudo_label_ids_cut_at_first_end_of_text():
    prefix = [SOT, NO_TIMESTAMPS]
    assert pseudo_label_ids([11, 12, EOT, EOT, EOT], prefix, EOT) == [SOT, NO_TIMESTAMPS, 11, 12, EOT]
    assert pseudo_label_ids([SOT, NO_TIMESTAMPS, 11, EOT], prefix, EOT) == [SOT, NO_TIMESTAMPS, 11, EOT]
    assert pseudo_label_ids([11, 12], prefix, EOT) == [SOT, NO_TIMESTAMPS, 11, 12]  # hit max length


def test_distillation_loss_is_token_mean_kl_on_label_positions():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    assert distillation_loss(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1)  # (B, T)
    expected = (kl[0, 0] + kl[0, 1] + kl[1, 0]) / 3
    torch.testing.assert_close(distillation_loss(student, teacher, labels), expected)
    # Temperature: T^2 * KL of the softened distributions.
    p2, log_q2 = (teacher / 2).softmax(-1), (student / 2).log_softmax(-1)
    kl2 = (p2 * (p2.log() - log_q2)).sum(-1)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, temperature=2.0),
                               4 * (kl2[0, 0] + kl2[0, 1] + kl2[1, 0]) / 3)


# --------------------------------------------------------------------------------------------- data sources


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["librispeech", "manifest", "audiofolder", "save_to_disk"])
def test_each_data_source_trains(tiny_checkpoint_dirs, tiny_processor, sources, tmp_path, layout):
    """One step on a batch of all three clips (8, 22.05, 44.1 kHz), converting the MHA model on the fly: the logged
    loss is the cross-entropy of the converted model on the clips read, resampled and tokenised independently."""
    from transformers import WhisperForConditionalGeneration

    mha_dir, _ = tiny_checkpoint_dirs
    data, extra = sources[layout]
    metrics = run_finetune.main(fast_args(mha_dir, data, tmp_path / "out", "--max_steps", "1", "--trainable", "mla",
                                          *extra))
    assert metrics["train_samples"] == 3 and metrics["global_step"] == 1
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    converted = convert_whisper_to_mla(WhisperForConditionalGeneration.from_pretrained(mha_dir),
                                       MLAArguments(kv_lora_rank=8, kept_key_dims=2))
    expected = cross_entropy(converted, tiny_processor, *clip_files(layout, sources))
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    model = load_output(tmp_path / "out")
    assert model.config.kv_lora_rank == 8
    auto_model = model.config.auto_map["AutoModelForSpeechSeq2Seq"]
    assert auto_model == "modeling_whisper_mla.WhisperMLAForConditionalGeneration"


@pytest.mark.slow
@pytest.mark.parametrize("distill", [False, True], ids=["transcripts", "distill"])
def test_lazy_audio_loading_trains_the_same_weights(tiny_checkpoint_dirs, sources, tmp_path, distill):
    """Decoding each clip when a step reads it (or when pseudo-labels are made) changes nothing but memory."""
    mha_dir, _ = tiny_checkpoint_dirs
    data, extra = sources["save_to_disk"]  # encoded bytes; file paths take the same LazyAudio path
    extra = [*extra, "--trainable", "mla", *(["--distill", "--precompute_encoder_outputs", "false"] if distill else [])]
    weights = []
    for lazy in ("false", "true"):
        out = tmp_path / f"lazy-{lazy}"
        run_finetune.main(fast_args(mha_dir, data, out, "--lazy_audio_loading", lazy, *extra))
        weights.append(parameters(load_output(out)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.slow
def test_eval_reports_normalised_wer(tiny_checkpoint_dirs, tiny_processor, sources, tmp_path):
    """eval_wer_before (step 0) and eval_wer (the trained model) are the normalised WER of each model's greedy
    transcripts (generation_max_length 8), computed here independently."""
    _, mla_dir = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    metrics = run_finetune.main(fast_args(mla_dir, data, tmp_path / "out", "--max_steps", "1", "--trainable", "mla",
                                          "--eval_data", data, "--predict_with_generate", "--eval_on_start"))
    assert metrics["eval_samples"] == 3
    before = normalised_wer(load_output(mla_dir), tiny_processor, data, max_length=8)
    after = normalised_wer(load_output(tmp_path / "out"), tiny_processor, data, max_length=8)
    assert metrics["eval_wer_before"] == pytest.approx(before) and metrics["eval_wer"] == pytest.approx(after)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| eval WER (normalised) | {after:.2f} on {data} |" in card and "| trainable | mla |" in card


# --------------------------------------------------------------------------------------------- what trains


def expected_trainable(model, mode: str) -> set[str]:
    names = {name for name, _ in model.named_parameters()}
    blocks = [f"model.{b}." for b in model.config.mla_block_names()]
    if mode == "all":
        return names - {"model.encoder.embed_positions.weight"}  # Whisper freezes its sinusoidal positions
    if mode == "attention":
        return {n for n in names if ".self_attn." in n or ".encoder_attn." in n}
    if mode == "mla":
        return {n for n in names if n.startswith(tuple(blocks)) or n.startswith("model.decoder.cross_kv_a_proj.")}
    if mode == "mla_self":
        return {n for n in names if n.startswith(tuple(b for b in blocks if b.endswith(".self_attn.")))}
    return {f"{b}{proj}.weight" for b in blocks for proj in MLA_PROJECTIONS}  # merged LoRA deltas


@pytest.mark.parametrize("mode", ["all", "attention", "mla", "mla_self", "lora"])
def test_set_trainable_selects_the_parameters(tiny_checkpoint_dirs, mode):
    _, mla_dir = tiny_checkpoint_dirs
    before_model = load_output(mla_dir)
    model = set_trainable(load_output(mla_dir), ModelArguments(trainable=mode))
    requires_grad = {name for name, p in model.named_parameters() if p.requires_grad}
    if mode == "lora":
        assert requires_grad and all(".lora_A." in n or ".lora_B." in n for n in requires_grad)
        targets = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in requires_grad}
        assert targets == {n.removesuffix(".weight") for n in expected_trainable(before_model, mode)}
        assert model.config.mla_attn_implementation == "naive"  # unmerged LoRA factors are read through the modules
    else:
        assert requires_grad == expected_trainable(before_model, mode)


def test_mla_self_keeps_the_shared_cross_projection_frozen(tiny_mha):
    """A narrow shared cross latent: `mla` trains its down-projection and the cross blocks' up-projections, `mla_self`
    neither (its calibrated projections stay as converted)."""
    model = convert_whisper_to_mla(tiny_mha, kv_lora_rank=8, kept_key_dims=2, cross_attention_latent="shared",
                                   cross_kv_lora_rank=8)
    for mode in ("mla", "mla_self"):
        set_trainable(model, ModelArguments(trainable=mode))
        requires_grad = {name for name, p in model.named_parameters() if p.requires_grad}
        assert requires_grad == expected_trainable(model, mode)
        assert ("model.decoder.cross_kv_a_proj.weight" in requires_grad) == (mode == "mla")
        assert any(".encoder_attn.k_b_proj" in n for n in requires_grad) == (mode == "mla")


def changed_parameters(before_dir, after_dir) -> set[str]:
    before, after = parameters(load_output(before_dir)), parameters(load_output(after_dir))
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["all", "attention", "mla", "mla_self", "lora"])
def test_training_changes_exactly_the_trainable_parameters(tiny_checkpoint_dirs, sources, tmp_path, mode):
    _, mla_dir = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    run_finetune.main(fast_args(mla_dir, data, tmp_path / "out", "--trainable", mode))
    assert changed_parameters(mla_dir, tmp_path / "out") == expected_trainable(load_output(mla_dir), mode)


@pytest.mark.slow
def test_lora_output_is_a_plain_whisper_mla_checkpoint(tiny_checkpoint_dirs, sources, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    run_finetune.main(fast_args(mla_dir, data, tmp_path / "out", "--trainable", "lora", "--save_strategy", "steps",
                                "--save_steps", "1"))
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-1", tmp_path / "out" / "checkpoint-2"):
        assert not (folder / "adapter_config.json").exists()
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
        model, info = WhisperMLAForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
        assert info["missing_keys"] == set() or info["missing_keys"] == []
        assert not info["unexpected_keys"]
        assert model.config.mla_attn_implementation == "absorb"
    assert (tmp_path / "out" / "checkpoint-2" / "lora_adapter" / "adapter_model.safetensors").is_file()


def test_lora_decodes_like_its_merged_model(tiny_checkpoint_dirs):
    """Unmerged LoRA decodes through the modules (naive); merged, the absorbed path gives the same logits."""
    _, mla_dir = tiny_checkpoint_dirs
    model = set_trainable(load_output(mla_dir), ModelArguments(trainable="lora"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0, 0.5)  # LoRA starts as a no-op (B = 0): make it count
    features, tokens = torch.randn(1, 80, 3000), torch.tensor([[SOT, NO_TIMESTAMPS, 11, 12]])
    model.eval()
    with torch.no_grad():
        lora_logits = model(input_features=features, decoder_input_ids=tokens).logits
        merged = merge_lora(model, "absorb").eval()
        assert merged.config.mla_attn_implementation == "absorb"
        torch.testing.assert_close(merged(input_features=features, decoder_input_ids=tokens).logits, lora_logits,
                                   atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- distillation


@pytest.mark.slow
def test_label_free_distillation_loss_decreases(sharp_mha_dir, sources, tmp_path):
    """Audio without transcripts: the MHA original transcribes it and the converted student learns from it."""
    data, _ = sources["unlabelled"]
    metrics = run_finetune.main(fast_args(sharp_mha_dir, data, tmp_path / "out", "--distill", "--trainable", "mla",
                                          "--max_steps", "6", "--learning_rate", "3e-3"))
    assert metrics["train_samples"] == 3 and metrics["global_step"] == 6
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    losses = [log["loss"] for log in history if "loss" in log]
    assert losses[0] > 0.1 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.6 * losses[0], losses


def test_distillation_matches_per_step_encoder_path(tiny_checkpoint_dirs, tiny_mha):
    """Precomputed encoder outputs, the per-step shared encoder and separate encoders give the same loss."""
    mha_dir, _ = tiny_checkpoint_dirs
    student = convert_whisper_to_mla(tiny_mha, kv_lora_rank=8, kept_key_dims=2).train()
    student.get_encoder().requires_grad_(False)
    features = torch.randn(2, 80, 3000)
    labels = torch.tensor([[NO_TIMESTAMPS, 11, 12, EOT], [NO_TIMESTAMPS, EOT, -100, -100]])
    args = Seq2SeqTrainingArguments(output_dir=str(mha_dir), use_cpu=True, report_to="none")
    losses = []
    for share, precomputed in ((True, True), (True, False), (False, False)):
        trainer = DistillationTrainer(model=student, args=args, teacher=tiny_mha, share_encoder=share,
                                                   temperature=2.0, alpha=0.3)
        inputs = {"labels": labels.clone()}
        if precomputed:
            with torch.no_grad():
                inputs["encoder_hidden_states"] = tiny_mha.get_encoder()(features).last_hidden_state
        else:
            inputs["input_features"] = features
        losses.append(trainer.compute_loss(student, inputs))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])


def test_distilling_an_mla_checkpoint_needs_a_teacher(tiny_checkpoint_dirs, sources, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    data, _ = sources["unlabelled"]
    with pytest.raises(ValueError, match="--teacher_model_name_or_path"):
        run_finetune.main(fast_args(mla_dir, data, tmp_path / "a", "--distill"))


@pytest.mark.slow
def test_distilling_an_mla_checkpoint_from_a_named_teacher(tiny_checkpoint_dirs, sources, tmp_path):
    mha_dir, mla_dir = tiny_checkpoint_dirs
    data, _ = sources["unlabelled"]
    metrics = run_finetune.main(fast_args(mla_dir, data, tmp_path / "b", "--distill", "--trainable", "lora",
                                          "--teacher_model_name_or_path", mha_dir, "--max_steps", "1"))
    assert metrics["global_step"] == 1 and metrics["train_samples"] == 3
    assert changed_parameters(mla_dir, tmp_path / "b") == expected_trainable(load_output(mla_dir), "lora")


def one_sgd_step(student, teacher, tmp_path, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    """The student's parameters after one optimizer step (plain SGD, no clipping) on the same two clips."""
    import copy

    torch.manual_seed(0)
    features = torch.randn(2, 80, 3000).numpy()
    dataset = [{"input_features": features[i], "labels": [SOT, NO_TIMESTAMPS, 11 + i, 12, EOT]} for i in range(2)]
    model = set_trainable(copy.deepcopy(student), ModelArguments(trainable="mla"))
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / f"ga{accumulation}"), use_cpu=True, report_to="none", max_steps=1,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True, seed=0,
    )
    trainer = DistillationTrainer(model=model, args=args, train_dataset=dataset, teacher=teacher,
                                  data_collator=DataCollatorSpeechSeq2SeqWithPadding(SOT))
    trainer.train()
    return parameters(model)


@pytest.mark.slow
@pytest.mark.parametrize("distill", [False, True], ids=["cross-entropy", "distill"])
def test_gradient_accumulation_matches_one_large_batch(tiny_mha, tmp_path, distill):
    """Both losses are per-batch means: two accumulated batches of one clip take the step of one batch of two (equal
    label lengths). Were the loss not divided by the accumulation steps, the step would be twice as large."""
    student = convert_whisper_to_mla(tiny_mha, kv_lora_rank=8, kept_key_dims=2)
    teacher = tiny_mha if distill else None
    before = parameters(student)
    large = one_sgd_step(student, teacher, tmp_path, batch_size=2, accumulation=1)
    accumulated = one_sgd_step(student, teacher, tmp_path, batch_size=1, accumulation=2)
    changed = [name for name in before if not torch.equal(before[name], large[name])]
    assert changed and all(".self_attn." in n or ".encoder_attn." in n or "cross_kv_a_proj" in n for n in changed)
    for name in before:
        torch.testing.assert_close(accumulated[name] - before[name], large[name] - before[name], atol=1e-6,
                                   rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------- checkpoints


LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor
for path in sys.argv[1:]:
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.model_type == "whisper_mla", model.config.model_type
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    features = processor.feature_extractor([torch.zeros(16000).numpy()], sampling_rate=16000,
                                           return_tensors="pt").input_features
    with torch.no_grad():
        tokens = model.generate(features, max_new_tokens=3)
    print("LOADED", path, tuple(tokens.shape))
"""


def assert_loads_in_fresh_process(folders, cwd):
    """Loads each folder with trust_remote_code in a new interpreter, outside the repo, without PYTHONPATH."""
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, *map(str, folders)], cwd=cwd, env=fresh_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("LOADED") == len(folders)


@pytest.mark.slow
def test_checkpoints_load_in_a_fresh_process(tiny_checkpoint_dirs, sources, tmp_path):
    mha_dir, _ = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    run_finetune.main(fast_args(mha_dir, data, tmp_path / "mla", "--trainable", "mla", "--save_strategy", "steps",
                                "--save_steps", "1"))
    run_finetune.main(fast_args(mha_dir, data, tmp_path / "lora", "--trainable", "lora", "--save_strategy", "steps",
                                "--save_steps", "2"))
    folders = [tmp_path / "mla" / "checkpoint-1", tmp_path / "mla" / "checkpoint-2", tmp_path / "mla",
               tmp_path / "lora" / "checkpoint-2", tmp_path / "lora"]
    assert_loads_in_fresh_process(folders, cwd=tmp_path)


def final_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mla", "lora"])
def test_resume_after_sigkill_reaches_the_same_weights(sharp_mha_dir, sources, tmp_path, mode):
    """Uninterrupted vs. killed (-9) once a checkpoint exists and resumed: the same final weights."""
    data, _ = sources["unlabelled"]

    def args(output_dir, *extra):
        return fast_args(sharp_mha_dir, data, output_dir, "--distill", "--trainable", mode, "--max_steps", "10",
                         "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "2",
                         "--learning_rate", "1e-3", "--full_determinism", "--dataloader_num_workers", "0", *extra)

    reference = start_run_finetune(args(tmp_path / "reference"), cwd=tmp_path)  # runs alongside the one that gets killed
    killed = start_run_finetune(args(tmp_path / "run"), cwd=tmp_path)
    deadline = time.time() + 300
    while not glob.glob(str(tmp_path / "run" / "checkpoint-*" / "trainer_state.json")):
        assert killed.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "all_results.json").exists(), "the run finished before it was killed"
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]

    resumed = start_run_finetune(args(tmp_path / "run", "--resume_from_checkpoint", "latest"), cwd=tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    if mode == "lora":  # the merged model at the top of the checkpoint is not what the PeftModel resumes from
        assert "keys in the checkpoint model loaded" not in out
    expected, actual = final_weights(tmp_path / "reference"), final_weights(tmp_path / "run")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_checkpoint_dirs, sources, tmp_path):
    import yaml

    mha_dir, _ = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    config = {
        "model_name_or_path": mha_dir, "train_data": [data], "output_dir": str(tmp_path / "out"),
        "trainable": "mla", "kv_lora_rank": 8, "kept_key_dims": 2, "max_steps": 2, "per_device_train_batch_size": 2,
        "learning_rate": "1e-3", "use_cpu": True, "ddp_backend": "gloo", "report_to": "none", "save_steps": 1,
        "max_label_length": 16, "disable_tqdm": True,
    }
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "run_finetune.py"), str(tmp_path / "ddp.yaml")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=fresh_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "x 2 processes" in (tmp_path / "out" / "README.md").read_text()
    assert_loads_in_fresh_process([tmp_path / "out", tmp_path / "out" / "checkpoint-2"], cwd=tmp_path)


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_skip_bad_samples_counts_and_reports(tiny_checkpoint_dirs, sources, tmp_path):
    mha_dir, _ = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    entries = json.loads(open(data).read())["annotation"]
    folder = os.path.dirname(data)
    bad = [{"path": os.path.join(folder, e["path"]), "text": e["text"]} for e in entries] + [
        {"path": "missing.wav", "text": "no audio"}, {"path": os.path.join(folder, "clip0.wav"), "text": " "}]
    manifest = tmp_path / "bad.json"
    manifest.write_text(json.dumps({"annotation": bad}))
    with pytest.raises(SpeechDataError, match="missing.wav"):
        run_finetune.main(fast_args(mha_dir, manifest, tmp_path / "a", "--trainable", "mla"))
    metrics = run_finetune.main(fast_args(mha_dir, manifest, tmp_path / "b", "--trainable", "mla", "--max_steps", "1",
                                          "--skip_bad_samples"))
    assert metrics["train_skipped_bad"] == 2 and metrics["train_samples"] == 3
    assert "2 bad rows skipped" in (tmp_path / "b" / "README.md").read_text()


def test_bad_arguments_explain_the_fix(tiny_checkpoint_dirs, sources, tmp_path):
    mha_dir, mla_dir = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    with pytest.raises(ValueError, match="expects --model_name_or_path and --train_data"):
        run_finetune.main(["--output_dir", str(tmp_path / "x"), "--use_cpu"])
    with pytest.raises(ValueError, match="already a Whisper-MLA checkpoint"):
        run_finetune.main(fast_args(mla_dir, data, tmp_path / "y", "--kv_lora_rank", "4"))
    (tmp_path / "z" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest"):
        run_finetune.main(fast_args(mha_dir, data, tmp_path / "z"))
    with pytest.raises(ValueError, match="complete checkpoint-N"):
        run_finetune.main(fast_args(mha_dir, data, tmp_path / "z", "--resume_from_checkpoint", "latest"))
    config = tmp_path / "typo.yaml"
    config.write_text("model_name_or_path: x\nlearning_rte: 1e-4\n")
    with pytest.raises(ValueError, match="learning_rte"):
        run_finetune.parse_arguments([str(config)])
    with pytest.raises(ValueError, match="--distill_alpha"):
        run_finetune.parse_arguments(["--distill_alpha", "2", "--use_cpu"])


# --------------------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["2norm", "uniform"])
def test_whisper_small_configs_mirror_the_original(name):
    import transformers

    model_args, data_args, distill_args, mla_args, training_args = run_finetune.parse_arguments(
        [os.path.join(ROOT, "configs", f"whisper-small-librispeech-{name}.yaml"), "--use_cpu", "true"])
    assert model_args.model_name_or_path == "openai/whisper-small" and model_args.trainable == "all"
    assert (mla_args.kv_lora_rank, mla_args.kept_key_dims, mla_args.svd_method) == (96, 4, "joint")
    assert mla_args.key_selection == {"2norm": "2-norm", "uniform": "uniform"}[name]
    assert mla_args.kept_key_dims * 12 == 48  # whisper-small has 12 heads
    assert (training_args.learning_rate, training_args.adam_beta1, training_args.adam_beta2) == (1e-4, 0.9, 0.95)
    assert training_args.weight_decay == 0.01 and training_args.bf16 and training_args.max_steps == 18000
    assert training_args.lr_scheduler_kwargs["decay_type"] == "1-sqrt"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=training_args.learning_rate)
    scheduler = transformers.get_scheduler(
        training_args.lr_scheduler_type, optimizer, num_warmup_steps=training_args.get_warmup_steps(18000),
        num_training_steps=18000, scheduler_specific_kwargs=training_args.lr_scheduler_kwargs)
    lrs = []
    for step in range(18000):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[450] == pytest.approx(5e-5) and lrs[900] == pytest.approx(1e-4) and lrs[16199] == pytest.approx(1e-4)
    assert lrs[17999] < 1e-5


def test_tiny_en_cpu_config_parses():
    model_args, data_args, distill_args, mla_args, training_args = run_finetune.parse_arguments(
        [os.path.join(ROOT, "configs", "tiny-en-cpu.yaml"), "--max_steps", "3"])
    assert training_args.max_steps == 3 and training_args.use_cpu and distill_args.distill
    assert (mla_args.kv_lora_rank, mla_args.kept_key_dims) == (48, 4)


# --------------------------------------------------------------------------------------------- real weights


@pytest.mark.slow
@pytest.mark.real_weights
def test_real_tiny_en_label_free_recovery_runs(tiny_en_dir, real_speech, tmp_path):
    """The CPU config on the real tiny.en (converted with calibration), a few label-free steps on real speech: the
    KL to the MHA original falls on a fixed batch, and the checkpoint loads in a fresh process."""
    from transformers import WhisperProcessor

    from whisper_mla.audio import load_speech_dataset
    from whisper_mla.transcription import evaluate_model

    manifests = real_speech
    metrics = run_finetune.main([
        os.path.join(ROOT, "configs", "tiny-en-cpu.yaml"), "--model_name_or_path", tiny_en_dir,
        "--train_data", manifests["real_train"], "--calibration_data", manifests["real_train"],
        "--calibration_samples", "8", "--eval_data", manifests["real_eval"], "--max_eval_samples", "8",
        "--max_train_samples", "8", "--output_dir", str(tmp_path / "out"), "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--disable_tqdm", "true",
        "--learning_rate", "1e-4",  # the calibrated init is already close: the config's 1e-3 overshoots a fixed batch
    ])
    assert metrics["global_step"] == 4 and metrics["eval_samples"] == 8
    # 4 steps do not recover -90% yet: what is checked is that eval_wer is run_eval's WER of the saved model.
    reference = evaluate_model(load_output(tmp_path / "out"), WhisperProcessor.from_pretrained(tiny_en_dir),
                               load_speech_dataset(manifests["real_eval"], max_samples=8), batch_size=8,
                               generate_kwargs={"num_beams": 1, "max_length": 128})
    assert metrics["eval_wer"] == pytest.approx(reference["wer"])
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    losses = [log["loss"] for log in history if "loss" in log]
    assert losses[-1] < losses[0], losses
    assert_loads_in_fresh_process([tmp_path / "out"], cwd=tmp_path)


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
