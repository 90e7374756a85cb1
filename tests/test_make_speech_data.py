"""Tests for make_speech_data.py: builds the real sets and a small synthetic set into a temporary folder and
checks that they load, are 16 kHz mono, and keep evaluation audio and text out of the training sets."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audio_data import load_speech_dataset
from make_speech_data import (
    ASTERISK_SOUNDS_DIR,
    EVAL_MIN_WORDS,
    MAX_SECONDS,
    VOICES,
    clean_transcript,
    ensure_speech_data,
    synthesize,
    text_key,
)


pytestmark = pytest.mark.skipif(
    not os.path.isdir(ASTERISK_SOUNDS_DIR) or shutil.which("flite") is None,
    reason="needs apt packages asterisk-core-sounds-en, asterisk-core-sounds-en-g722 and flite",
)
NUM_SYNTHETIC = 2 * len(VOICES)  # every voice twice


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    return ensure_speech_data(tmp_path_factory.mktemp("speech"), max_synthetic_clips=NUM_SYNTHETIC)


def annotation(manifest_path: str) -> list:
    return json.loads(Path(manifest_path).read_text())["annotation"]


def test_manifests_load(manifests):
    assert set(manifests) == {"real_eval", "real_train", "synthetic_train"}
    for name, path in manifests.items():
        dataset = load_speech_dataset(path)
        assert len(dataset) == len(annotation(path)) and dataset.num_skipped == 0
        assert all(text for text in dataset.texts)
    synthetic = annotation(manifests["synthetic_train"])
    assert len(synthetic) == NUM_SYNTHETIC
    assert sorted(entry["voice"] for entry in synthetic) == sorted(VOICES * 2)
    assert (Path(manifests["real_eval"]).parent / "LICENSES.md").is_file()


def test_real_eval_is_about_100_long_clips(manifests):
    real_eval = annotation(manifests["real_eval"])
    assert 90 <= len(real_eval) <= 110
    assert all(len(entry["text"].split()) >= EVAL_MIN_WORDS for entry in real_eval)
    assert 6 < sum(entry["duration"] for entry in real_eval) / 60 < 12  # minutes
    assert all(entry["duration"] <= MAX_SECONDS for entry in real_eval)  # Whisper's window
    # The train set keeps the rest, short prompts included.
    real_train = annotation(manifests["real_train"])
    assert len(real_train) > 400
    assert any(len(entry["text"].split()) < EVAL_MIN_WORDS for entry in real_train)


def test_eval_is_disjoint_from_training(manifests):
    real_eval = annotation(manifests["real_eval"])
    train = annotation(manifests["real_train"]) + annotation(manifests["synthetic_train"])
    assert not {entry["path"] for entry in real_eval} & {entry["path"] for entry in train}
    assert not {entry["id"] for entry in real_eval} & {entry["id"] for entry in train}
    assert not {text_key(entry["text"]) for entry in real_eval} & {text_key(entry["text"]) for entry in train}


def test_wavs_are_16khz_mono(manifests):
    for path in manifests.values():
        for entry in annotation(path):
            info = soundfile.info(str(Path(path).parent / entry["path"]))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.duration == pytest.approx(entry["duration"], abs=1e-3)


def test_idempotent_and_resizable(manifests):
    output_dir = Path(manifests["real_eval"]).parent
    modified = {name: os.path.getmtime(path) for name, path in manifests.items()}
    assert ensure_speech_data(output_dir, max_synthetic_clips=NUM_SYNTHETIC) == manifests
    assert {name: os.path.getmtime(path) for name, path in manifests.items()} == modified
    # A smaller synthetic set is rebuilt from the clips already there; the real sets are untouched.
    ensure_speech_data(output_dir, max_synthetic_clips=3)
    assert len(annotation(manifests["synthetic_train"])) == 3
    assert os.path.getmtime(manifests["real_eval"]) == modified["real_eval"]
    ensure_speech_data(output_dir, max_synthetic_clips=NUM_SYNTHETIC)  # restore for the other tests


@pytest.mark.parametrize("voice", VOICES)
def test_synthesis_is_deterministic(voice):
    first, second = synthesize("Please hold the line.", voice), synthesize("Please hold the line.", voice)
    assert first.dtype == np.float32 and 0.5 < len(first) / 16000 < 5
    np.testing.assert_array_equal(first, second)


def test_clean_transcript():
    assert clean_transcript("Please leave your message after the tone. (simple tone sound plays)") == (
        "Please leave your message after the tone."
    )
    assert clean_transcript("[sound of monkeys screaming]") == ""
    assert clean_transcript("...to leave the conference.") == "to leave the conference."
    assert clean_transcript("press * to pause, press # to exit") == "press star to pause, press pound to exit"
