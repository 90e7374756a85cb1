"""Tests for whisper_mla/audio.py: every source decodes to 16 kHz mono float32 with the right texts and ids, and
every kind of bad input fails with a message that names it (or is skipped and counted with skip_bad)."""

import json

import numpy as np
import pytest
import soundfile

from helpers import tone
from whisper_mla.audio import SAMPLING_RATE, LazyAudio, SpeechDataError, as_waveform, load_audio, load_speech_dataset


# (sampling rate, tone frequency): every rate is resampled to 16 kHz; tones stay below each Nyquist.
RATES_AND_TONES = [(8000, 440.0), (22050, 1000.0), (44100, 3000.0)]
SECONDS = 0.5
TEXTS = ["the first utterance", "a second one", "and the third"]


def dominant_frequency(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / SAMPLING_RATE)[spectrum.argmax()])


def assert_is_tone(audio: np.ndarray, frequency: float, seconds: float = SECONDS) -> None:
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - seconds * SAMPLING_RATE) <= 2
    assert abs(dominant_frequency(audio) - frequency) < 5


def write_tones(folder, extension: str, names: list) -> list:
    """Writes one tone per (rate, frequency); the second one in stereo, to exercise the mono mix."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (name, (rate, frequency)) in enumerate(zip(names, RATES_AND_TONES)):
        path = folder / f"{name}{extension}"
        soundfile.write(path, tone(frequency, rate, SECONDS, amplitude=0.5, channels=2 if index == 1 else 1), rate)
        paths.append(path)
    return paths


def check_examples(dataset, ids: list) -> None:
    assert dataset.ids == ids
    assert dataset.texts == TEXTS
    assert dataset.num_skipped == 0
    for example, (_, frequency) in zip(dataset, RATES_AND_TONES):
        assert_is_tone(example["audio"], frequency)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one per source
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def librispeech_dir(tmp_path):
    root = tmp_path / "LibriSpeech" / "test-clean"
    chapter = root / "19" / "198"
    ids = ["19-198-0000", "19-198-0001", "19-198-0002"]
    write_tones(chapter, ".flac", ids)
    lines = [f"{utterance_id} {text.upper()}" for utterance_id, text in zip(ids, TEXTS)]
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def manifest_path(tmp_path):
    paths = write_tones(tmp_path / "clips", ".wav", ["a", "b", "c"])
    annotation = [
        {"path": "clips/a.wav", "text": TEXTS[0]},
        {"path": str(paths[1]), "text": TEXTS[1], "id": "custom-id"},  # absolute path, explicit id
        {"path": "clips/c.wav", "text": TEXTS[2]},
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"annotation": annotation}))
    return path


def save_dataset(folder, audio_paths: list, columns: dict, split=None):
    """A save_to_disk dataset with an Audio column (bytes embedded), built without torchcodec."""
    from datasets import Audio, Dataset, DatasetDict

    audio = [{"bytes": p.read_bytes(), "path": p.name} for p in audio_paths]
    dataset = Dataset.from_dict({"audio": audio, **columns}).cast_column("audio", Audio())
    (DatasetDict({split: dataset}) if split else dataset).save_to_disk(str(folder))
    return folder


@pytest.fixture
def saved_dataset_dir(tmp_path):
    paths = write_tones(tmp_path / "src", ".wav", ["a", "b", "c"])
    return save_dataset(tmp_path / "saved", paths, {"text": TEXTS, "id": ["u0", "u1", "u2"]})


@pytest.fixture
def audiofolder_dir(tmp_path):
    folder = tmp_path / "audiofolder"
    write_tones(folder / "clips", ".flac", ["a", "b", "c"])
    rows = [f"clips/{name}.flac,\"{text}\"" for name, text in zip("abc", TEXTS)]
    (folder / "metadata.csv").write_text("file_name,text\n" + "\n".join(rows) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------------
# Each source decodes to 16 kHz
# ---------------------------------------------------------------------------------------------------------


def test_librispeech_folder(librispeech_dir):
    ids = ["19-198-0000", "19-198-0001", "19-198-0002"]
    dataset = load_speech_dataset(librispeech_dir)
    # LibriSpeech transcripts are upper case; they are returned as written.
    assert dataset.texts == [text.upper() for text in TEXTS]
    assert dataset.ids == ids
    for example, (_, frequency) in zip(dataset, RATES_AND_TONES):
        assert_is_tone(example["audio"], frequency)
    # The LibriSpeech root with a subset as the split reads the same data.
    assert load_speech_dataset(librispeech_dir.parent, split="test-clean").ids == ids


def test_manifest(manifest_path):
    dataset = load_speech_dataset(manifest_path)
    check_examples(dataset, ["clips/a", "custom-id", "clips/c"])
    assert load_speech_dataset(str(manifest_path)).ids == dataset.ids  # stable across loads


def test_saved_dataset(saved_dataset_dir, tmp_path):
    check_examples(load_speech_dataset(saved_dataset_dir), ["u0", "u1", "u2"])
    paths = write_tones(tmp_path / "src2", ".flac", ["a", "b", "c"])
    dict_dir = save_dataset(tmp_path / "saved_dict", paths, {"sentence": TEXTS}, split="test")
    dataset = load_speech_dataset(dict_dir, split="test", text_column="sentence")
    check_examples(dataset, ["0", "1", "2"])


def test_audiofolder(audiofolder_dir):
    check_examples(load_speech_dataset(audiofolder_dir), ["clips/a", "clips/b", "clips/c"])


def test_plain_audio_folder_without_text(tmp_path):
    write_tones(tmp_path / "calib", ".wav", ["x", "y", "z"])
    dataset = load_speech_dataset(tmp_path / "calib", require_text=False)
    assert dataset.ids == ["x", "y", "z"] and dataset.texts == [None, None, None]
    with pytest.raises(SpeechDataError, match="no transcripts.*require_text=False"):
        load_speech_dataset(tmp_path / "calib")


def test_manifest_without_text_for_distillation(tmp_path):
    write_tones(tmp_path, ".wav", ["a"])
    (tmp_path / "m.json").write_text(json.dumps({"annotation": [{"path": "a.wav"}]}))
    assert load_speech_dataset(tmp_path / "m.json", require_text=False).texts == [None]
    with pytest.raises(SpeechDataError, match="entry 0 of manifest .*transcript is empty or missing"):
        load_speech_dataset(tmp_path / "m.json")


def test_max_samples(manifest_path):
    assert load_speech_dataset(manifest_path, max_samples=2).ids == ["clips/a", "custom-id"]


def test_g722(tmp_path):
    G722 = pytest.importorskip("G722")
    samples = (tone(440.0, 16000, SECONDS, amplitude=0.5) * 20000).astype(np.int16)
    path = tmp_path / "prompt.g722"
    path.write_bytes(G722.G722(16000, 64000).encode(samples))
    assert_is_tone(load_audio(path), 440.0)
    assert_is_tone(load_audio("any-name.g722", data=path.read_bytes()), 440.0)


def test_lazy_loading_decodes_on_read(librispeech_dir, saved_dataset_dir, tmp_path):
    """Paths (files) and encoded bytes (datasets) stay undecoded; lengths come from headers; reads decode alike."""
    G722 = pytest.importorskip("G722")
    samples = (tone(440.0, 16000, SECONDS, amplitude=0.5) * 20000).astype(np.int16)
    (tmp_path / "prompt.g722").write_bytes(G722.G722(16000, 64000).encode(samples))
    (tmp_path / "g722.json").write_text(json.dumps({"annotation": [{"path": "prompt.g722", "text": "a prompt"}]}))
    for data in (librispeech_dir, saved_dataset_dir, tmp_path / "g722.json"):
        eager, lazy = load_speech_dataset(data), load_speech_dataset(data, lazy=True)
        assert lazy.ids == eager.ids and lazy.texts == eager.texts
        for lazy_example, example in zip(lazy, eager):
            assert isinstance(lazy_example["audio"], LazyAudio)
            assert abs(len(lazy_example["audio"]) - len(example["audio"])) <= 1  # header length at 16 kHz
            np.testing.assert_array_equal(as_waveform(lazy_example["audio"]), example["audio"])
        assert lazy.total_seconds == pytest.approx(eager.total_seconds, abs=1e-3)
    # a file without a readable header is found at load time (or skipped and counted)
    (librispeech_dir / "19" / "198" / "19-198-0000.flac").write_bytes(b"not audio")
    with pytest.raises(SpeechDataError, match=r"19-198-0000.*Could not read the header"):
        load_speech_dataset(librispeech_dir, lazy=True)
    assert load_speech_dataset(librispeech_dir, lazy=True, skip_bad=True).num_skipped == 1


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors, or skipped and counted
# ---------------------------------------------------------------------------------------------------------


def test_missing_audio_file(manifest_path, tmp_path):
    (tmp_path / "clips" / "c.wav").unlink()
    with pytest.raises(SpeechDataError, match=r"entry 2 of manifest .*c\.wav does not exist"):
        load_speech_dataset(manifest_path)
    dataset = load_speech_dataset(manifest_path, skip_bad=True)
    assert dataset.ids == ["clips/a", "custom-id"]
    assert dataset.num_skipped == 1 and "c.wav does not exist" in dataset.skipped[0]


def test_unreadable_audio_file(librispeech_dir):
    (librispeech_dir / "19" / "198" / "19-198-0001.flac").write_bytes(b"definitely not audio")
    with pytest.raises(SpeechDataError, match=r"utterance 19-198-0001 .*Could not decode audio .*19-198-0001\.flac"):
        load_speech_dataset(librispeech_dir)
    dataset = load_speech_dataset(librispeech_dir, skip_bad=True)
    assert dataset.ids == ["19-198-0000", "19-198-0002"] and dataset.num_skipped == 1


def test_empty_transcript(librispeech_dir):
    transcript = librispeech_dir / "19" / "198" / "19-198.trans.txt"
    lines = transcript.read_text().splitlines()
    transcript.write_text("\n".join([lines[0], "19-198-0001", lines[2]]) + "\n")
    with pytest.raises(SpeechDataError, match="utterance 19-198-0001 .*transcript is empty"):
        load_speech_dataset(librispeech_dir)
    assert load_speech_dataset(librispeech_dir, skip_bad=True).num_skipped == 1
    assert load_speech_dataset(librispeech_dir, require_text=False).texts[1] is None


def test_empty_audio(tmp_path):
    soundfile.write(tmp_path / "silent.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(SpeechDataError, match="silent.wav contains no samples"):
        load_audio(tmp_path / "silent.wav")


def test_wrong_column_names(saved_dataset_dir, audiofolder_dir):
    columns = r"found columns \['audio', 'text', 'id'\]"
    with pytest.raises(SpeechDataError, match=rf"transcript column 'sentence' .*{columns}"):
        load_speech_dataset(saved_dataset_dir, text_column="sentence")
    with pytest.raises(SpeechDataError, match=rf"audio column 'speech' .*{columns}"):
        load_speech_dataset(saved_dataset_dir, audio_column="speech")
    with pytest.raises(SpeechDataError, match=r"transcript column 'sentence' .*found columns \['file_name', 'text'\]"):
        load_speech_dataset(audiofolder_dir, text_column="sentence")
    # Structural problems are never skipped.
    with pytest.raises(SpeechDataError, match="transcript column"):
        load_speech_dataset(saved_dataset_dir, text_column="sentence", skip_bad=True)


def test_wrong_split(librispeech_dir):
    with pytest.raises(SpeechDataError, match=r"subfolder 'test-other' .*found only \['test-clean'\]"):
        load_speech_dataset(librispeech_dir.parent, split="test-other")


def test_bad_manifests(tmp_path):
    (tmp_path / "broken.json").write_text('{"annotation": [')
    with pytest.raises(SpeechDataError, match="broken.json is not valid JSON"):
        load_speech_dataset(tmp_path / "broken.json")
    (tmp_path / "no_annotation.json").write_text(json.dumps({"data": []}))
    with pytest.raises(SpeechDataError, match=r"no \"annotation\" list; found keys \['data'\]"):
        load_speech_dataset(tmp_path / "no_annotation.json")


def test_unknown_data_path(tmp_path):
    with pytest.raises(SpeechDataError, match="No file or folder exists at .*does-not-exist"):
        load_speech_dataset(tmp_path / "does-not-exist")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SpeechDataError, match="only JSON manifests"):
        load_speech_dataset(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpeechDataError, match="Found no speech data in the folder"):
        load_speech_dataset(tmp_path / "empty")


def test_all_rows_bad(manifest_path, tmp_path):
    for name in "abc":
        (tmp_path / "clips" / f"{name}.wav").unlink()
    with pytest.raises(SpeechDataError, match=r"no usable examples .*\(3 skipped\)"):
        load_speech_dataset(manifest_path, skip_bad=True)
