"""One loader for every speech data source the whisper-mla scripts use.

`load_speech_dataset` turns any of the sources below into a `SpeechDataset`: a list of examples
`{"id": str, "audio": np.ndarray, "text": str | None}` where `audio` is always float32, mono, 16 kHz (with
`lazy=True`, a `LazyAudio` that decodes to that when read).

Sources (`data` argument):
    * a LibriSpeech-layout folder: `SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt` with lines `UTT_ID TEXT`,
      audio next to it as `UTT_ID.flac`; with `split="test-clean"` a LibriSpeech root folder works too;
    * a JSON manifest file `{"annotation": [{"path": ..., "text": ...}, ...]}` (paths relative to the
      manifest's folder, or absolute; an optional "id" key per entry);
    * a `datasets` dataset: a `save_to_disk` folder, an `audiofolder` folder (audio files + `metadata.csv`
      or `metadata.jsonl` with a `file_name` column), or a Hub dataset id (streamed with `load_dataset`);
    * a plain folder of audio files without transcripts (only with `require_text=False`, for calibration).

Audio is decoded here, never by `datasets`: its `Audio` feature decodes through torchcodec, which is not
usable on our machines, so audio columns are cast to `Audio(decode=False)` and the raw bytes or paths go
through `load_audio` (soundfile for WAV/FLAC/OGG/MP3, the `G722` package for raw `.g722`). Audio at any
sampling rate other than 16 kHz is resampled with soxr; multi-channel audio is averaged to mono.
"""

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import soundfile
import soxr


logger = logging.getLogger(__name__)

SAMPLING_RATE = 16_000
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3", ".g722")
# Raw G.722 as shipped by Asterisk: 16 kHz audio at 64 kbit/s, no header.
G722_SAMPLE_RATE = 16_000
G722_BIT_RATE = 64_000
MANIFEST_FORMAT = '{"annotation": [{"path": "clip.wav", "text": "the transcript"}, ...]}'

PathLike = Union[str, os.PathLike]


class SpeechDataError(ValueError):
    """Bad speech data: a missing or undecodable audio file, an empty transcript, a malformed manifest, ..."""


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------


def _check_source(path: Optional[PathLike], data: Optional[bytes]) -> str:
    """The clip's name for messages; raises unless there are bytes or an existing file."""
    name = str(path) if path is not None else "<audio bytes>"
    if data is None:
        if path is None:
            raise SpeechDataError("Expected an audio path or audio bytes, but found neither.")
        if not os.path.isfile(path):
            raise SpeechDataError(
                f"Audio file {name} does not exist. Check the path (manifest paths are resolved against the "
                "manifest's folder) or pass skip_bad=True to skip such rows."
            )
    return name


def load_audio(path: Optional[PathLike], data: Optional[bytes] = None) -> np.ndarray:
    """Decodes one audio file to a float32 mono waveform at 16 kHz.

    Args:
        path: the audio file. When `data` is given, `path` is only used for its extension (to recognise
            `.g722`) and in error messages, and may be None.
        data: the encoded file content, for audio stored as bytes (e.g. in a `datasets` Arrow file).

    Returns:
        A 1-D float32 array in [-1, 1] sampled at 16 kHz. Audio recorded at another rate is resampled
        (soxr, high quality); stereo or multi-channel audio is averaged to mono.

    Raises:
        SpeechDataError: the file does not exist, cannot be decoded, or holds no samples.
    """
    name = _check_source(path, data)
    try:
        if name.lower().endswith(".g722"):
            raw = data if data is not None else Path(path).read_bytes()
            waveform, sampling_rate = _decode_g722(raw), G722_SAMPLE_RATE
        else:
            source = io.BytesIO(data) if data is not None else path
            waveform, sampling_rate = soundfile.read(source, dtype="float32", always_2d=True)
            waveform = waveform.mean(axis=1)  # (num_samples, channels) -> (num_samples,)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError... depending on input
        raise SpeechDataError(
            f"Could not decode audio {name}: {err}. Expected a format soundfile reads (WAV, FLAC, OGG, MP3) "
            "or raw G.722 with a .g722 extension; re-encode the file or pass skip_bad=True."
        ) from err
    if waveform.size == 0:
        raise SpeechDataError(f"Audio {name} contains no samples; remove it or pass skip_bad=True.")
    if not np.isfinite(waveform).all():  # float WAVs can hold NaN/inf, which would silently poison the features
        raise SpeechDataError(
            f"Audio {name} holds {int((~np.isfinite(waveform)).sum())} NaN or infinite samples; expected finite "
            "samples in [-1, 1]: re-encode the file or pass skip_bad=True."
        )
    if sampling_rate != SAMPLING_RATE:
        waveform = soxr.resample(waveform, sampling_rate, SAMPLING_RATE)
    return np.ascontiguousarray(waveform, dtype=np.float32)


def audio_num_samples(path: Optional[PathLike], data: Optional[bytes] = None) -> int:
    """The length of a clip at 16 kHz, read from its header without decoding it (raw G.722: from its size).

    Raises:
        SpeechDataError: the file does not exist, has no readable header, or holds no samples.
    """
    name = _check_source(path, data)
    if name.lower().endswith(".g722"):
        num_bytes = len(data) if data is not None else os.path.getsize(path)
        num_samples = num_bytes * 8 * G722_SAMPLE_RATE // G722_BIT_RATE
    else:
        try:
            info = soundfile.info(io.BytesIO(data) if data is not None else path)
        except Exception as err:  # as in load_audio: the exception type depends on the input
            raise SpeechDataError(
                f"Could not read the header of audio {name}: {err}. Expected a format soundfile reads (WAV, FLAC, "
                "OGG, MP3) or raw G.722 with a .g722 extension; re-encode the file or pass skip_bad=True."
            ) from err
        num_samples = round(info.frames * SAMPLING_RATE / info.samplerate)
    if num_samples == 0:
        raise SpeechDataError(f"Audio {name} contains no samples; remove it or pass skip_bad=True.")
    return num_samples


@dataclass(frozen=True)
class LazyAudio:
    """A clip decoded only when read (`load_speech_dataset(..., lazy=True)`): `len()` is its length at 16 kHz, from
    the header; `load()` decodes it like `load_audio`.

    Only the header was checked when the dataset was loaded, so `load()` can still fail (a FLAC whose body is
    damaged); its `SpeechDataError` then starts with `where`, the clip's row in its source (e.g. "entry 3 of manifest
    train.json"), and names the file.
    """

    path: Optional[str]
    data: Optional[bytes]
    num_samples: int
    where: Optional[str] = None

    def __len__(self) -> int:
        return self.num_samples

    def load(self) -> np.ndarray:
        try:
            return load_audio(self.path, data=self.data)
        except SpeechDataError as err:
            if self.where is None:
                raise
            raise SpeechDataError(f"{self.where}: {err}") from err


def as_waveform(audio: Union[np.ndarray, LazyAudio]) -> np.ndarray:
    """The waveform of an example's audio, decoding it now if it was loaded lazily."""
    return audio.load() if isinstance(audio, LazyAudio) else audio


def drop_undecodable(examples: list, skip_bad: bool) -> tuple[list, list]:
    """Decodes every lazily loaded clip once, without keeping the waveform, to find the ones whose body is damaged
    (their header, checked at load time, can be fine). For data read in full anyway before training (evaluation
    sets, clips a teacher transcribes up front), so that a bad clip is skipped or reported before any work.

    Returns:
        (the examples that decode, one message per dropped example).

    Raises:
        SpeechDataError: a clip does not decode and `skip_bad` is False; it names the clip.
    """
    kept, skipped = [], []
    for example in examples:
        if isinstance(example["audio"], LazyAudio):
            try:
                example["audio"].load()
            except SpeechDataError as err:
                if not skip_bad:
                    raise
                logger.warning("Skipping %s", err)
                skipped.append(str(err))
                continue
        kept.append(example)
    return kept, skipped


def _decode_g722(raw: bytes) -> np.ndarray:
    import G722  # PyPI package "g722"; the module name is upper case

    # A fresh decoder per file: G.722 is adaptive, so decoder state must not leak between files.
    samples = G722.G722(G722_SAMPLE_RATE, G722_BIT_RATE).decode(raw)  # array('h'), 16 kHz
    return np.asarray(samples, dtype=np.int16).astype(np.float32) / 32768.0


# ---------------------------------------------------------------------------------------------------------
# The dataset container
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SpeechDataset:
    """Decoded examples plus an account of the rows that were skipped.

    Attributes:
        examples: dicts `{"id": str, "audio": float32 mono 16 kHz np.ndarray, "text": str | None,
            "speaker": str | None}` (speaker: a manifest entry's "speaker" or "voice", LibriSpeech's SPEAKER-CHAPTER).
        skipped: one message per row skipped with `skip_bad=True` (where it was and why).
        source: a description of where the data came from, for logs.
    """

    examples: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    source: str = ""

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def ids(self) -> list:
        return [example["id"] for example in self.examples]

    @property
    def texts(self) -> list:
        return [example["text"] for example in self.examples]

    @property
    def total_seconds(self) -> float:
        return sum(len(example["audio"]) for example in self.examples) / SAMPLING_RATE

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def __iter__(self):
        return iter(self.examples)


class _Row(NamedTuple):
    """One not-yet-decoded example. `where` locates it for error messages."""

    id: str
    where: str
    path: Optional[str]
    data: Optional[bytes]
    text: Optional[str]
    speaker: Optional[str] = None  # who speaks, where the source says (manifest "speaker"/"voice", LibriSpeech ids)


# ---------------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------------


def load_speech_dataset(
    data: PathLike,
    split: Optional[str] = None,
    audio_column: str = "audio",
    text_column: str = "text",
    max_samples: Optional[int] = None,
    skip_bad: bool = False,
    require_text: bool = True,
    config_name: Optional[str] = None,
    lazy: bool = False,
) -> SpeechDataset:
    """Loads and decodes a speech dataset from any supported source (see the module docstring).

    Args:
        data: a LibriSpeech-layout folder, a JSON manifest, a `save_to_disk` or `audiofolder` folder, a plain
            folder of audio files (with `require_text=False`), or a Hub dataset id.
        split: the split of a saved `DatasetDict` or Hub dataset, or a subfolder (e.g. LibriSpeech's
            "test-clean"). Required for Hub datasets.
        audio_column: the audio column of a `datasets` dataset. Manifests always use "path".
        text_column: the transcript column of a `datasets` dataset or `audiofolder` metadata. Manifests
            always use "text".
        max_samples: stop after this many good examples (skipped rows do not count).
        skip_bad: skip rows whose audio is missing/undecodable or whose transcript is empty, recording each
            in `SpeechDataset.skipped`, instead of raising. Structural problems (wrong columns, invalid
            manifest) always raise.
        require_text: when False, examples may have `text=None` (label-free distillation, calibration).
        config_name: the configuration of a Hub dataset (e.g. "clean" for "librispeech_asr").
        lazy: keep each clip's audio as a `LazyAudio` (path or encoded bytes, length from its header) and decode it
            only when read, for corpora too large to hold decoded; headers are still checked here.

    Returns:
        A `SpeechDataset`; every `audio` is float32 mono at 16 kHz (other rates are resampled).

    Raises:
        SpeechDataError: with what was expected, what was found, and how to fix it.
    """
    if max_samples is not None and max_samples < 1:
        raise SpeechDataError(f"max_samples must be a positive number or None, but found {max_samples}.")
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise SpeechDataError(
                f"Found the file {path}, but only JSON manifests ({MANIFEST_FORMAT}) can be passed as a file. "
                "For audio files, pass their folder (with require_text=False if they have no transcripts)."
            )
        rows = _manifest_rows(path)
    elif path.is_dir():
        rows = _folder_rows(path, split, audio_column, text_column, require_text)
    elif _looks_like_hub_id(str(data)):
        rows = _hub_rows(str(data), config_name, split, audio_column, text_column, require_text)
    else:
        raise SpeechDataError(
            f"No file or folder exists at {str(data)!r}, and it is not a Hub dataset id. Expected a LibriSpeech "
            "folder, a JSON manifest, a save_to_disk/audiofolder folder, a folder of audio files, or a Hub id "
            "such as 'openslr/librispeech_asr'; check the path."
        )
    dataset = _decode_rows(rows, require_text, skip_bad, max_samples, source=str(data), lazy=lazy)
    if not dataset.examples:
        raise SpeechDataError(
            f"Found no usable examples in {data} ({dataset.num_skipped} skipped). Check the data path and split."
        )
    if dataset.num_skipped:
        logger.warning("Skipped %d bad examples in %s (see SpeechDataset.skipped).", dataset.num_skipped, data)
    return dataset


def _decode_rows(
    rows: Iterator[_Row], require_text: bool, skip_bad: bool, max_samples: Optional[int], source: str, lazy: bool
) -> SpeechDataset:
    dataset = SpeechDataset(source=source)
    for row in rows:
        if max_samples is not None and len(dataset.examples) >= max_samples:
            break
        try:
            text = _check_text(row, require_text)
            if row.path is None and row.data is None:
                raise SpeechDataError("expected an audio path or audio bytes, but found neither.")
            if lazy:
                audio = LazyAudio(row.path, row.data, audio_num_samples(row.path, data=row.data), where=row.where)
            else:
                audio = load_audio(row.path, data=row.data)
        except SpeechDataError as err:
            message = f"{row.where}: {err}"
            if not skip_bad:
                raise SpeechDataError(message) from err
            logger.warning("Skipping %s", message)
            dataset.skipped.append(message)
            continue
        dataset.examples.append({"id": row.id, "audio": audio, "text": text, "speaker": row.speaker})
    return dataset


def _check_text(row: _Row, require_text: bool) -> Optional[str]:
    if row.text is not None and not isinstance(row.text, str):  # str() of a list or number would train on it
        raise SpeechDataError(
            f"expected the transcript to be a string, but found {type(row.text).__name__} {row.text!r:.80}; fix the "
            "transcript, or pass skip_bad=True to skip such rows."
        )
    text = None if row.text is None else row.text.strip()
    if not text:
        if require_text:
            raise SpeechDataError(
                "the transcript is empty or missing. Fix the transcript, pass skip_bad=True to skip such rows, "
                "or require_text=False for label-free use."
            )
        return None
    return text


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


def _read_text(path: Path, what: str) -> str:
    """A text file's content; a file in another encoding than UTF-8 is named in the error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpeechDataError(
            f"Expected {what} {path} to be UTF-8 text, but byte {err.start} is not ({err.reason}); re-save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)."
        ) from err


def _manifest_rows(manifest_path: Path) -> Iterator[_Row]:
    try:
        manifest = json.loads(_read_text(manifest_path, "the manifest"))
    except json.JSONDecodeError as err:
        raise SpeechDataError(
            f"Manifest {manifest_path} is not valid JSON ({err}). Expected {MANIFEST_FORMAT}."
        ) from err
    annotation = manifest.get("annotation") if isinstance(manifest, dict) else None
    if not isinstance(annotation, list):
        found = f"keys {sorted(manifest)}" if isinstance(manifest, dict) else f"a {type(manifest).__name__}"
        raise SpeechDataError(
            f"Manifest {manifest_path} has no \"annotation\" list; found {found}. Expected {MANIFEST_FORMAT}."
        )
    folder = manifest_path.parent
    for index, entry in enumerate(annotation):
        where = f"entry {index} of manifest {manifest_path}"
        entry = entry if isinstance(entry, dict) else {}
        audio_path = entry.get("path")
        if audio_path is not None and not isinstance(audio_path, str):
            raise SpeechDataError(
                f"{where}: expected \"path\" to be a file path string, but found {audio_path!r}. Expected "
                f"{MANIFEST_FORMAT}."
            )
        if audio_path is not None:
            audio_path = str(folder / audio_path)  # absolute paths stay absolute
        example_id = str(entry.get("id") or Path(str(entry.get("path", index))).with_suffix("").as_posix())
        speaker = entry.get("speaker") or entry.get("voice")
        yield _Row(example_id, where, audio_path, None, entry.get("text"), str(speaker) if speaker else None)


def _folder_rows(
    folder: Path, split: Optional[str], audio_column: str, text_column: str, require_text: bool
) -> Iterator[_Row]:
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        return _saved_dataset_rows(folder, split, audio_column, text_column, require_text)
    if split is not None:
        if not (folder / split).is_dir():
            subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise SpeechDataError(
                f"Expected a subfolder {split!r} in {folder} for split={split!r}, but found only {subfolders}. "
                "Pass one of those as the split, or split=None to read the folder itself."
            )
        folder = folder / split
        if (folder / "dataset_info.json").is_file():
            return _saved_dataset_rows(folder, None, audio_column, text_column, require_text)
    for metadata_name in ("metadata.csv", "metadata.jsonl"):
        if (folder / metadata_name).is_file():
            return _audiofolder_rows(folder / metadata_name, text_column, require_text)
    transcript_files = sorted(folder.rglob("*.trans.txt"))
    if transcript_files:
        return _librispeech_rows(transcript_files)
    audio_files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not audio_files:
        raise SpeechDataError(
            f"Found no speech data in the folder {folder}: expected LibriSpeech *.trans.txt files, an audiofolder "
            f"metadata.csv/metadata.jsonl, a save_to_disk dataset, or audio files ({', '.join(AUDIO_EXTENSIONS)})."
        )
    if require_text:
        raise SpeechDataError(
            f"Found {len(audio_files)} audio files in {folder} but no transcripts (no *.trans.txt, metadata.csv or "
            "metadata.jsonl). Pass require_text=False to use them without text, or add a metadata.csv with "
            "columns file_name,text."
        )
    return (
        _Row(p.relative_to(folder).with_suffix("").as_posix(), f"audio file {p}", str(p), None, None)
        for p in audio_files
    )


def _librispeech_rows(transcript_files: list) -> Iterator[_Row]:
    for transcript_file in transcript_files:
        lines = _read_text(transcript_file, "the transcript file").splitlines()
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            utterance_id, _, text = line.strip().partition(" ")
            where = f"utterance {utterance_id} (line {line_number} of {transcript_file})"
            candidates = [transcript_file.parent / f"{utterance_id}{ext}" for ext in AUDIO_EXTENSIONS]
            audio_path = next((p for p in candidates if p.is_file()), candidates[0])  # missing: .flac in the error
            yield _Row(utterance_id, where, str(audio_path), None, text, utterance_id.rsplit("-", 1)[0])


def _audiofolder_rows(metadata_path: Path, text_column: str, require_text: bool) -> Iterator[_Row]:
    # Read like datasets' "audiofolder" builder would, but without it: the builder encodes audio through
    # torchcodec, which is not available here.
    content = _read_text(metadata_path, "the audiofolder metadata")
    if metadata_path.suffix == ".csv":
        records = list(csv.DictReader(io.StringIO(content, newline="")))
        columns = list(records[0]) if records else []
    else:
        records = []
        for line_number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SpeechDataError(
                    f"Line {line_number} of the audiofolder metadata {metadata_path} is not valid JSON ({err}); "
                    'expected one object per line, e.g. {"file_name": "clip.wav", "text": "the transcript"}.'
                ) from err
            if not isinstance(record, dict):
                raise SpeechDataError(
                    f"Line {line_number} of the audiofolder metadata {metadata_path} is a {type(record).__name__}, "
                    'not an object; expected e.g. {"file_name": "clip.wav", "text": "the transcript"}.'
                )
            records.append(record)
        columns = sorted({key for record in records for key in record})
    if "file_name" not in columns:
        raise SpeechDataError(
            f"audiofolder metadata {metadata_path} needs a 'file_name' column; found columns {columns}."
        )
    _check_text_column(text_column, columns, require_text, f"audiofolder metadata {metadata_path}")
    for index, record in enumerate(records):
        file_name = record.get("file_name")
        where = f"row {index} ({file_name}) of {metadata_path}"
        if not isinstance(file_name, str) or not file_name:  # a short CSV row, or a null/number in JSON lines
            yield _Row(str(index), where, None, None, record.get(text_column))  # refused (or skipped) as pathless
            continue
        example_id = Path(file_name).with_suffix("").as_posix()
        yield _Row(example_id, where, str(metadata_path.parent / file_name), None, record.get(text_column))


def _saved_dataset_rows(
    folder: Path, split: Optional[str], audio_column: str, text_column: str, require_text: bool
) -> Iterator[_Row]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(folder))
    if isinstance(dataset, DatasetDict):
        if split is None and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            raise SpeechDataError(
                f"The saved DatasetDict {folder} has splits {list(dataset)}, but split={split!r} was requested. "
                "Pass one of those splits."
            )
        dataset = dataset[split]
    return _hf_rows(dataset, f"saved dataset {folder}", audio_column, text_column, require_text)


def _hub_rows(
    name: str,
    config_name: Optional[str],
    split: Optional[str],
    audio_column: str,
    text_column: str,
    require_text: bool,
) -> Iterator[_Row]:
    from datasets import load_dataset

    if split is None:
        raise SpeechDataError(f"Loading the Hub dataset {name!r} needs a split, e.g. split='test'.")
    try:
        # Streaming reads only the rows we use instead of downloading every split of the dataset.
        dataset = load_dataset(name, config_name, split=split, streaming=True)
    except Exception as err:  # connection errors, unknown repos, bad configs all surface here
        raise SpeechDataError(
            f"{name!r} is not a local file or folder, so it was loaded as a Hub dataset, which failed: {err}. "
            "Check the path, or the Hub id, config and split (and the network)."
        ) from err
    return _hf_rows(dataset, f"Hub dataset {name} ({split})", audio_column, text_column, require_text)


def _hf_rows(dataset, description: str, audio_column: str, text_column: str, require_text: bool) -> Iterator[_Row]:
    from datasets import Audio

    columns = dataset.column_names  # None for a streamed dataset whose features are unknown
    if columns is not None:
        if audio_column not in columns:
            raise SpeechDataError(
                f"Expected an audio column {audio_column!r} in {description}, but found columns {columns}. "
                "Pass the right name as audio_column (--audio_column_name)."
            )
        _check_text_column(text_column, columns, require_text, description)
    if dataset.features is not None:
        dataset = dataset.cast_column(audio_column, Audio(decode=False))  # {"bytes", "path"}, no torchcodec
    for index, record in enumerate(dataset):
        example_id = str(record.get("id", index))
        where = f"row {index} (id {example_id}) of {description}"
        audio = record.get(audio_column)
        if isinstance(audio, dict):
            path, data = audio.get("path"), audio.get("bytes")
        else:  # a plain string column of file paths
            path, data = audio, None
        yield _Row(example_id, where, path, data, record.get(text_column))


def _check_text_column(text_column: str, columns: list, require_text: bool, description: str) -> None:
    if require_text and text_column not in columns:
        raise SpeechDataError(
            f"Expected a transcript column {text_column!r} in {description}, but found columns {columns}. "
            "Pass the right name as text_column (--text_column_name), or require_text=False for label-free use."
        )


def _looks_like_hub_id(name: str) -> bool:
    # "librispeech_asr" or "openslr/librispeech_asr"; local-looking paths ("./x", "/x", "x.json") are not.
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name)) and not name.endswith(".json")
