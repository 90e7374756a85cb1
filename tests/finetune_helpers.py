"""Fixtures and helpers shared by the run_finetune.py tests (test_run_finetune.py, test_run_finetune_controls.py):
the tiny training sources in every layout the script reads, a sharp tiny MHA model, the script's fast arguments, and
references computed without the script."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

import helpers
from helpers import fresh_env
from modeling_whisper_mla import WhisperMLAForConditionalGeneration


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


def final_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))
