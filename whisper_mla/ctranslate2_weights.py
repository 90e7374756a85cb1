"""The variables of a parsed CTranslate2 Whisper `model.bin` as a `WhisperConfig` and a transformers state dict.

Stored values are dequantized to float32 and aliases resolved; the config is derived from the shapes; the variable
names are those of `ctranslate2/specs/whisper_spec.py` as filled by the `WhisperLoader` of
`ctranslate2/converters/transformers.py`, whose mapping this file inverts, strictly (every variable used, every shape
checked). Its siblings: `whisper_mla.ctranslate2_model_bin` reads the file, and `whisper_mla.ctranslate2` is the
import around both.
"""

import re

import numpy as np
import torch
from transformers import WhisperConfig

from whisper_mla.ctranslate2_model_bin import Ct2ModelBin, Ct2Variable


MAX_SPEC_REVISION = 3  # WhisperSpec.revision in ctranslate2 4.x
CT2_ACTIVATION_GELU = 3  # common_spec.Activation.GELU


# ----------------------------------------------------------------------------------------------------
# Stored values -> float32, aliases resolved


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
# CTranslate2 names -> transformers names


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
