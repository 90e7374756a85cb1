"""Per-block latent widths: `kv_lora_ranks` in the config, and the converter's spectrum allocation."""

import copy

import pytest
import torch
from transformers import WhisperFeatureExtractor

from configuration_whisper_mla import WhisperMLAConfig
from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla
from modeling_whisper_mla import WhisperMLAForConditionalGeneration, expected_cache_bytes_per_token
from test_modeling_whisper_mla import features, prompt


SMALL = dict(d_model=16, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=1, decoder_layers=2,
             vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1)
SELF_0, SELF_1 = "decoder.layers.0.self_attn", "decoder.layers.1.self_attn"


def logits(model, x, ids):
    with torch.no_grad():
        return model(x, decoder_input_ids=ids).logits


@pytest.fixture(scope="module")
def low_rank_first_layer(tiny_mha):
    """The tiny MHA model with layer 0's self-attention keys and values made rank 2: its spectrum ends there."""
    mha = copy.deepcopy(tiny_mha)
    attn = mha.model.decoder.layers[0].self_attn
    with torch.no_grad():
        basis = torch.linalg.qr(torch.randn(16, 2, generator=torch.Generator().manual_seed(0))).Q  # (16, 2)
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight.copy_(proj.weight @ basis @ basis.T)  # rows in a 2-dim input subspace
    return mha


def test_per_block_ranks_in_the_config(tmp_path):
    config = WhisperMLAConfig(**SMALL, kv_lora_rank=8, kept_key_dims=2, kv_lora_ranks={SELF_1: 12})
    assert (config.mla_rank(SELF_0), config.mla_rank(SELF_1)) == (8, 12)
    assert config.mla_cache_values_per_token(SELF_1) == 12 + 2 * 2
    model = WhisperMLAForConditionalGeneration(config)
    assert model.model.decoder.layers[1].self_attn.kv_a_proj.weight.shape == (12 + 2 * 2, 16)
    assert expected_cache_bytes_per_token(config, torch.float32)["self"] == 4 * (8 + 4 + 12 + 4)
    config.save_pretrained(tmp_path)
    assert WhisperMLAConfig.from_pretrained(tmp_path).kv_lora_ranks == {SELF_1: 12}


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_lora_ranks={"decoder.layers.0.encoder_attn": 4}), r"`kv_lora_ranks` expects a dict.*over converted"),
    (dict(kv_lora_ranks={"decoder.layers.7.self_attn": 4}), r"`kv_lora_ranks` expects.*decoder.layers.7"),
    (dict(kv_lora_ranks={SELF_0: 17}), r"`kv_lora_ranks\['decoder.layers.0.self_attn'\]` expects a value in \[1, 16\]"),
    (dict(kv_lora_ranks={SELF_0: 0}), r"expects a value in \[1, 16\].*found 0"),
])
def test_invalid_per_block_ranks_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WhisperMLAConfig(**SMALL, kv_lora_rank=8, kept_key_dims=2, **kwargs)


def test_spectrum_gives_the_width_where_the_spectrum_is(low_rank_first_layer, noise_audio):
    """Layer 0's self-attention holds rank 2 of keys and values, layer 1's is full: the spectrum allocation keeps the
    total of 2 x 8 and moves the width to layer 1; layer 0 at width 2 loses nothing; the whole model is closer to
    MHA than with the uniform allocation."""
    mha, fe = low_rank_first_layer, WhisperFeatureExtractor(feature_size=80)
    x, ids = features(batch=2), prompt(mha, batch=2)
    reference = logits(mha, x, ids)
    errors = {}
    for allocation in ("uniform", "spectrum"):
        mla = convert_whisper_to_mla(mha, mla_targets=["decoder_self"], kv_lora_rank=8, kept_key_dims=0,
                                     kv_lora_rank_allocation=allocation, calibration_audio=noise_audio,
                                     feature_extractor=fe)
        errors[allocation] = (logits(mla, x, ids) - reference).norm().item()
    assert mla.config.kv_lora_ranks == {SELF_0: 2, SELF_1: 14}
    assert mla.config.mla_conversion["kv_lora_rank_allocation"] == "spectrum"
    assert errors["spectrum"] < 0.5 * errors["uniform"]
    absorbed = logits(mla, x, ids)
    mla.config.mla_attn_implementation = "naive"  # both paths read the per-block widths
    torch.testing.assert_close(logits(mla, x, ids), absorbed, atol=1e-5, rtol=0)


def test_spectrum_allocation_needs_joint_svd():
    with pytest.raises(ValueError, match="spectrum expects --svd_method joint"):
        MLAArguments(kv_lora_rank_allocation="spectrum", svd_method="split")
    with pytest.raises(ValueError, match="--kv_lora_rank_allocation expects uniform or spectrum"):
        MLAArguments(kv_lora_rank_allocation="greedy")
