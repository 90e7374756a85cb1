"""benchmarks/diverse_train_manifest.py: espeak-ng voices and augmented copies, never an eval text, reproducible."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import soundfile

from tests.helpers import write_clips, write_manifest
from whisper_mla.speech_data import ASTERISK_SOUNDS_DIR


pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or not os.path.isdir(ASTERISK_SOUNDS_DIR),
                                reason="needs the apt packages espeak-ng and asterisk-core-sounds-en")


def build(tmp_path, mixed, speech_dir, name):
    output_dir = tmp_path / name
    result = subprocess.run([sys.executable, "benchmarks/diverse_train_manifest.py", "--mixed_manifest", mixed,
                             "--speech_dir", str(speech_dir), "--output_dir", str(output_dir), "--num_voices", "2",
                             "--texts_per_voice", "2", "--num_augmented", "6", "--num_mixed", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {n: json.loads((output_dir / f"{n}.json").read_text())["annotation"] for n in ("diverse", "train", "probe")}


def test_builds_voices_and_augmented_copies_reproducibly(tmp_path):
    texts = ["one", "two", "three", "four", "five", "six", "seven"]
    paths = write_clips(tmp_path / "clips", texts, manifest=None)
    mixed = write_manifest(tmp_path / "mixed.json", [{"path": p, "text": t, "speaker": "tone"}
                                                     for p, t in zip(paths, texts)])
    speech = tmp_path / "speech"
    speech.mkdir()
    eval_texts = ["Where the value is not defined an error is raised."]  # not read aloud even if in the text pool
    for name in ("real_eval", "multi_eval"):
        write_manifest(speech / f"{name}.json", [{"path": "x.wav", "text": t} for t in eval_texts])

    first = build(tmp_path, mixed, speech, "a")
    assert len(first["diverse"]) == 2 * 2 + 6 and len(first["train"]) == 10 + 3 and len(first["probe"]) == 32
    espeak = [e for e in first["diverse"] if e["speaker"].startswith("espeak_")]
    assert len({e["speaker"] for e in espeak}) == 2
    assert {e["speaker"] for e in first["diverse"]} - {e["speaker"] for e in espeak} == {
        "tone_reverb", "tone_noise", "tone_phone", "tone_speed", "tone_reverb_noise", "tone_speed_noise"}
    assert not {e["text"] for e in first["diverse"]} & set(eval_texts)
    for entry in first["diverse"] + first["probe"]:
        info = soundfile.info(entry["path"])
        assert info.samplerate == 16000 and info.duration > 0.5
    second = build(tmp_path, mixed, speech, "b")
    digest = lambda entries: [hashlib.sha256(open(e["path"], "rb").read()).hexdigest() for e in entries]
    assert digest(first["diverse"]) == digest(second["diverse"])
    assert [e["text"] for e in first["train"]] == [e["text"] for e in second["train"]]


def test_more_augmented_copies_than_clips_says_how_to_fix(tmp_path):
    paths = write_clips(tmp_path / "clips", ["one"], manifest=None)
    mixed = write_manifest(tmp_path / "mixed.json", [{"path": paths[0], "text": "one"}])
    speech = tmp_path / "speech"
    speech.mkdir()
    for name in ("real_eval", "multi_eval"):
        write_manifest(speech / f"{name}.json", [])
    result = subprocess.run([sys.executable, "benchmarks/diverse_train_manifest.py", "--mixed_manifest", mixed,
                             "--speech_dir", str(speech), "--output_dir", str(tmp_path / "out"), "--num_voices", "1",
                             "--texts_per_voice", "1", "--num_augmented", "6"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "--num_augmented expects at most the 1 clips" in result.stderr and "pass a smaller number" in result.stderr
