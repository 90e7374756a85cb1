"""WhisperMLAConfig: defaults, round trip, and a clear ValueError for each invalid setting."""

import json

import pytest
import torch

from configuration_whisper_mla import WhisperMLAConfig, uniform_kept_indices
from whisper_mla.conversion import convert_whisper_to_mla


SMALL = dict(d_model=16, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=1, decoder_layers=2,
             vocab_size=100)


def test_defaults_and_round_trip(tmp_path):
    config = WhisperMLAConfig(**SMALL, kv_lora_rank=8, kept_key_dims=2)
    assert config.model_type == "whisper_mla"
    assert config.mla_targets == ["decoder_self", "decoder_cross"]
    assert config.mla_block_names() == ["decoder.layers.0.self_attn", "decoder.layers.0.encoder_attn",
                                        "decoder.layers.1.self_attn", "decoder.layers.1.encoder_attn"]
    assert (config.cross_attention_latent, config.cross_kv_lora_rank) == ("shared", None)
    assert config.kept_key_indices["decoder.layers.1.self_attn"] == [[0, 7], [0, 7]]
    assert config.kept_key_indices["decoder.layers.1.encoder_attn"] == [[], []]  # the shared latent keeps no dims
    assert config.mla_cache_values_per_token("decoder.layers.0.self_attn") == 8 + 2 * 2
    per_layer = WhisperMLAConfig(**SMALL, kv_lora_rank=8, kept_key_dims=2, cross_attention_latent="per_layer")
    assert per_layer.kept_key_indices["decoder.layers.1.encoder_attn"] == [[0, 7], [0, 7]]
    config.save_pretrained(tmp_path)
    loaded = WhisperMLAConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_default_latent_is_full_width(tmp_path):
    """No rank given: the latent is d_model wide (exact) and keeps no key dims; a narrower one keeps 4 unless told.
    config.json names the resolved values, so a checkpoint does not change meaning with the defaults."""
    config = WhisperMLAConfig(**SMALL)
    assert (config.kv_lora_rank, config.kept_key_dims) == (16, 0)
    assert config.kept_key_indices["decoder.layers.0.self_attn"] == [[], []]
    assert config.mla_cache_values_per_token("decoder.layers.0.self_attn") == 16  # MHA: 2 * 16
    assert (WhisperMLAConfig(**SMALL, kv_lora_rank=8).kept_key_dims, WhisperMLAConfig(**SMALL, kv_lora_rank=16,
            kept_key_dims=2).kept_key_dims) == (4, 2)
    assert WhisperMLAConfig(**SMALL, svd_method="split").kept_key_dims == 4  # a split latent is lossy at any width
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["kv_lora_rank"], saved["kept_key_dims"]) == (16, 0)


def test_uniform_indices():
    assert uniform_kept_indices(64, 4) == [0, 21, 42, 63]
    assert uniform_kept_indices(64, 1) == [0]
    assert uniform_kept_indices(64, 0) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_lora_rank=0), r"`kv_lora_rank` expects a value in \[1, 16\].*found 0"),
    (dict(kv_lora_rank=17), r"`kv_lora_rank` expects a value in \[1, 16\].*found 17"),
    (dict(kv_lora_rank=26, kept_key_dims=4, svd_method="split"), r"svd_method='split'.*kv_lora_rank=26.*\[2, 17\]"),
    (dict(kv_lora_rank=8, kept_key_dims=9), r"`kept_key_dims` expects a value in \[0, head_dim=8\].*found 9"),
    (dict(kv_lora_rank=8, kept_key_dims=-1), r"`kept_key_dims` expects.*found -1"),
    (dict(kv_lora_rank=8, mla_targets=["decoder_mlp"]), r"`mla_targets` expects.*decoder_mlp"),
    (dict(kv_lora_rank=8, mla_targets=[]), r"`mla_targets` expects a non-empty list"),
    (dict(kv_lora_rank=8, key_selection="l1"), r"`key_selection` expects one of \['uniform', '2-norm'\]"),
    (dict(kv_lora_rank=8, svd_method="qr"), r"`svd_method` expects one of \['joint', 'split'\]"),
    (dict(kv_lora_rank=8, mla_attn_implementation="fast"), r"`mla_attn_implementation` expects one of"),
    (dict(kv_lora_rank=8, mla_cache_quantization="int4"), r"`mla_cache_quantization` expects one of \[None, 'int8'\]"),
    (dict(kv_lora_rank=8, kept_key_dims=1, mla_targets=["decoder_cross"],
          kept_key_indices={"decoder.layers.0.self_attn": [[0], [0]]}), r"expects exactly the converted blocks"),
    (dict(kv_lora_rank=8, kept_key_dims=1, mla_targets=["encoder_self"],
          kept_key_indices={"encoder.layers.0.self_attn": [[0]]}), r"expects 2 lists \(one per head\) of 1"),
    (dict(kv_lora_rank=8, kept_key_dims=2, mla_targets=["encoder_self"],
          kept_key_indices={"encoder.layers.0.self_attn": [[0, 8], [1, 2]]}), r"distinct ints in \[0, 8\).*\[0, 8\]"),
    (dict(kv_lora_rank=8, kept_key_dims=2, mla_targets=["encoder_self"],
          kept_key_indices={"encoder.layers.0.self_attn": [[3, 3], [1, 2]]}), r"distinct ints"),
])
def test_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WhisperMLAConfig(**SMALL, **kwargs)


def test_converter_rejects_what_it_cannot_convert(tiny_mha):
    with pytest.raises(ValueError, match="expect calibration audio"):
        convert_whisper_to_mla(tiny_mha, kv_lora_rank=4, kept_key_dims=2, key_selection="2-norm")
    with pytest.raises(ValueError, match="expects a transformers WhisperForConditionalGeneration"):
        convert_whisper_to_mla(torch.nn.Linear(2, 2), kv_lora_rank=4)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        convert_whisper_to_mla(tiny_mha, kv_lora_rank=17)


def test_uncalibrated_lossy_conversion_warns(tiny_mha, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="whisper_mla.conversion"):
        convert_whisper_to_mla(tiny_mha, kv_lora_rank=16, kept_key_dims=2)  # full rank, shared cross at d_model
    assert "without calibration" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="whisper_mla.conversion"):
        convert_whisper_to_mla(tiny_mha, kv_lora_rank=8, kept_key_dims=2)
    assert "Converting without calibration audio" in caplog.text and "--calibration_data" in caplog.text
