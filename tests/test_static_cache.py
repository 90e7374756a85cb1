"""transformers' static cache (`cache_implementation="static"`) and its documented fast path, `torch.compile` of the
forward: a converted block's latent and kept key dims live in the static buffers (one "head" each), a pooled shared
cross latent reads only its rows of the encoder-sized cross buffer, and the tokens equal the dynamic cache's."""

import pytest
import torch

from whisper_mla.conversion import convert_whisper_to_mla
from helpers import tiny_whisper_model


LAYOUTS = {
    "exact default": {},
    "narrow latent, kept key dims, per-layer cross": {"kv_lora_rank": 8, "kept_key_dims": 2,
                                                       "cross_attention_latent": "per_layer"},
    "int8 cache": {"kv_lora_rank": 8, "kept_key_dims": 2, "mla_cache_quantization": "int8"},
    "pooled shared cross latent": {"cross_latent_stride": 3},
}


@pytest.fixture(scope="module")
def sharp_mha():
    """A tiny random Whisper whose attention picks positions (queries x20), so a wrong row or mask shows in tokens."""
    model = tiny_whisper_model(seed=3)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for attn in (layer.self_attn, layer.encoder_attn):
                attn.q_proj.weight.mul_(20)
    return model


def features(batch=2, seed=0):
    return torch.randn(batch, 80, 3000, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_cache_decodes_like_the_dynamic_cache(sharp_mha, layout, num_beams):
    mla = convert_whisper_to_mla(sharp_mha, **LAYOUTS[layout])
    x = features()
    with torch.no_grad():
        dynamic = mla.generate(x, max_new_tokens=12, num_beams=num_beams)
        static = mla.generate(x, max_new_tokens=12, num_beams=num_beams, cache_implementation="static")
    assert torch.equal(static, dynamic)
    if layout == "exact default":  # and the original, through its own static cache
        with torch.no_grad():
            original = sharp_mha.generate(x, max_new_tokens=12, num_beams=num_beams, cache_implementation="static")
        assert torch.equal(static, original)


def test_static_buffers_hold_the_latent(sharp_mha):
    """The static buffers have the latent's shape, not MHA's keys and values: (B, 1, max_cache_len, r) and the kept
    key dims as (B, 1, max_cache_len, H * kept)."""
    from transformers.cache_utils import EncoderDecoderCache, StaticCache

    mla = convert_whisper_to_mla(sharp_mha, kv_lora_rank=8, kept_key_dims=2)
    config = mla.config
    cache = EncoderDecoderCache(StaticCache(config=config, max_cache_len=20), StaticCache(config=config,
                                                                                          max_cache_len=1500))
    ids = torch.tensor([[config.decoder_start_token_id] * 3])
    with torch.no_grad():
        mla(features(batch=1), decoder_input_ids=ids, past_key_values=cache, use_cache=True)
    layer = cache.self_attention_cache.layers[0]
    assert tuple(layer.keys.shape) == (1, 1, 20, 8)
    assert tuple(layer.values.shape) == (1, 1, 20, config.decoder_attention_heads * 2)
    assert layer.keys[:, :, 3:].abs().sum() == 0 and layer.keys[:, :, :3].abs().sum() > 0


@pytest.mark.slow
def test_compiled_static_decode_equals_eager(sharp_mha):
    """HF's documented fast path: static cache and `torch.compile(model.forward, fullgraph=True)` (no graph break in the
    absorbed decode), the same tokens as eager decoding."""
    mla = convert_whisper_to_mla(sharp_mha)
    x = features()
    with torch.no_grad():
        eager = mla.generate(x, max_new_tokens=8)
    mla.generation_config.cache_implementation = "static"
    mla.forward = torch.compile(mla.forward, fullgraph=True)
    with torch.no_grad():
        compiled = mla.generate(x, max_new_tokens=8)
    assert torch.equal(compiled, eager)
