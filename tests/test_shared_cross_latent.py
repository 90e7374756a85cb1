"""One cross-attention latent shared by every decoder layer (`cross_attention_latent="shared"`)."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from configuration_whisper_mla import WhisperMLAConfig
from whisper_mla.conversion import convert_whisper_to_mla
from modeling_whisper_mla import WhisperMLAForConditionalGeneration, cache_nbytes, expected_cache_bytes_per_token
from test_modeling_whisper_mla import features, greedy, incremental_logits, prompt


def logits(model, x, ids):
    with torch.no_grad():
        return model(x, decoder_input_ids=ids).logits


def shared(tiny_mha, **kwargs):
    return convert_whisper_to_mla(tiny_mha, cross_attention_latent="shared", **kwargs)


@pytest.mark.parametrize("targets", [["decoder_cross"], ["decoder_self", "decoder_cross"]], ids="+".join)
def test_full_width_is_exact(tiny_mha, targets):
    """At width d_model the latent is the encoder output itself: no down-projection, MHA's logits and tokens."""
    mla = shared(tiny_mha, mla_targets=targets, kv_lora_rank=16, kept_key_dims=2)
    assert mla.model.decoder.cross_kv_a_proj is None
    cross = mla.model.decoder.layers[1].encoder_attn
    assert not hasattr(cross, "kv_a_proj") and cross.qk_kept_head_dim == 0 and cross.kv_lora_rank == 16
    x, ids = features(batch=2), prompt(tiny_mha, batch=2)
    torch.testing.assert_close(logits(mla, x, ids), logits(tiny_mha, x, ids), atol=1e-4, rtol=0)
    for path in ("absorb", "naive"):
        mla.config.mla_attn_implementation = path
        assert torch.equal(greedy(mla, x), greedy(tiny_mha, x))
        assert torch.equal(greedy(mla, x, num_beams=3), greedy(tiny_mha, x, num_beams=3))


def test_default_conversion_is_exact(tiny_mha):
    """The converter's defaults: self-attention latents of d_model whose down-projection is the identity (the cache
    holds each block's input, half of MHA's keys and values) and the shared cross latent: MHA's logits and tokens,
    greedy and beam, without calibration; the cache holds d_model values per token and layer plus one cross latent."""
    mla = convert_whisper_to_mla(tiny_mha)
    self_attn = mla.model.decoder.layers[0].self_attn
    assert (mla.config.kv_lora_rank, mla.config.kept_key_dims, mla.config.cross_attention_latent) == (16, 0, "shared")
    torch.testing.assert_close(self_attn.kv_a_proj.weight, torch.eye(16), atol=0, rtol=0)
    x, ids = features(batch=2), prompt(tiny_mha, batch=2)
    torch.testing.assert_close(logits(mla, x, ids), logits(tiny_mha, x, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(incremental_logits(mla, x, ids), logits(tiny_mha, x, ids), atol=1e-5, rtol=0)
    assert torch.equal(greedy(mla, x), greedy(tiny_mha, x))
    assert torch.equal(greedy(mla, x, num_beams=3), greedy(tiny_mha, x, num_beams=3))
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        mla(x, decoder_input_ids=ids, cache=cache, use_cache=True)
    nbytes = cache_nbytes(cache)
    assert (nbytes["self"], nbytes["cross"]) == (2 * 2 * ids.shape[1] * 16 * 4, 2 * 1500 * 16 * 4)


def test_exact_conversion_skips_calibration(tiny_mha, noise_audio, monkeypatch):
    """Calibration cannot change an exact conversion: it is skipped (minutes on a real model), and the config says the
    SVD was not activation-aware."""
    import whisper_mla.conversion as conversion

    def refuse(*args, **kwargs):
        raise AssertionError("calibration ran for an exact conversion")

    monkeypatch.setattr(conversion, "collect_calibration_statistics", refuse)
    mla = convert_whisper_to_mla(tiny_mha, calibration_audio=noise_audio, feature_extractor=object())
    assert mla.config.mla_conversion["activation_aware"] is False and mla.config.mla_conversion["calibration_clips"] == 0
    x, ids = features(), prompt(tiny_mha)
    torch.testing.assert_close(logits(mla, x, ids), logits(tiny_mha, x, ids), atol=1e-5, rtol=0)
    exact_2norm = convert_whisper_to_mla(tiny_mha, key_selection="2-norm")  # no kept dims to score: no audio needed
    assert exact_2norm.config.kept_key_dims == 0
    with pytest.raises(AssertionError, match="calibration ran"):  # a lossy width still calibrates
        convert_whisper_to_mla(tiny_mha, kv_lora_rank=8, calibration_audio=noise_audio, feature_extractor=object())


def test_narrow_latent_error_shrinks_with_width(tiny_mha):
    x, ids = features(), prompt(tiny_mha)
    reference = logits(tiny_mha, x, ids)
    errors = []
    for rank in (2, 6, 12, 16):
        mla = shared(tiny_mha, mla_targets=["decoder_cross"], kv_lora_rank=8, kept_key_dims=2, cross_kv_lora_rank=rank)
        if rank < 16:
            assert tuple(mla.model.decoder.cross_kv_a_proj.weight.shape) == (rank, 16)
        errors.append((logits(mla, x, ids) - reference).norm().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 < errors[0]


@pytest.fixture(scope="module")
def narrow(tiny_mha, noise_audio):
    """Self-attention MLA at rank 6 and a shared cross latent of width 6, activation-aware."""
    from transformers import WhisperFeatureExtractor

    return shared(tiny_mha, kv_lora_rank=6, kept_key_dims=2, cross_kv_lora_rank=6, calibration_audio=noise_audio,
                  feature_extractor=WhisperFeatureExtractor(feature_size=80))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_absorbed_equals_naive_and_incremental_equals_full(narrow, attn_implementation):
    naive, absorbed = copy.deepcopy(narrow), copy.deepcopy(narrow)
    naive.config.mla_attn_implementation = "naive"
    for model in (naive, absorbed):
        model.set_attn_implementation(attn_implementation)
    x, ids = features(batch=2), prompt(narrow, batch=2)
    full = logits(naive, x, ids)
    torch.testing.assert_close(logits(absorbed, x, ids), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(absorbed, x), greedy(naive, x))
    # step by step through the cache, where layers > 0 read layer 0's latent
    torch.testing.assert_close(incremental_logits(absorbed, x, ids), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("share_beams", [True, False])
def test_cache_holds_the_latent_once(narrow, quantization, share_beams):
    model = copy.deepcopy(narrow)
    model.config.mla_cache_quantization = quantization
    model.config.share_cross_latent_across_beams = share_beams
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    model.generate(features(batch=2), max_new_tokens=5, min_new_tokens=5, num_beams=3, cache=cache)
    per_token = expected_cache_bytes_per_token(model.config, torch.float32)
    # one latent of 6 values per frame for all layers (int8: 6 bytes + two float32 scales); self: 6 + 2 heads x 2
    assert per_token == ({"self": 2 * 10 * 4, "cross": 6 * 4} if quantization is None
                         else {"self": 2 * (10 + 8), "cross": 6 + 8})
    entries = 2 if share_beams else 2 * 3
    assert cache_nbytes(cache) == {"self": 2 * 3 * 6 * per_token["self"], "cross": entries * 1500 * per_token["cross"]}
    layers = cache.cross_attention_cache.layers
    assert len(layers) == 2 and layers[1].keys is layers[0].keys  # every layer points at the one latent
    assert layers[0].keys.shape[:3] == (entries, 1, 1500)


def test_int8_and_beams_transcribe_like_float(narrow):
    x = features(batch=2)
    reference = greedy(narrow, x, num_beams=3)
    int8 = copy.deepcopy(narrow)
    int8.config.mla_cache_quantization = "int8"
    assert (greedy(int8, x, num_beams=3) == reference).float().mean() > 0.8
    unshared = copy.deepcopy(narrow)
    unshared.config.share_cross_latent_across_beams = False
    assert torch.equal(greedy(unshared, x, num_beams=3), reference)


def test_word_timestamps_with_beams(narrow):
    model = copy.deepcopy(narrow)
    model.set_attn_implementation("eager")
    model.generation_config.alignment_heads = [[1, 0], [1, 1]]
    out = model.generate(features(), max_new_tokens=5, num_beams=2, return_token_timestamps=True,
                         return_dict_in_generate=True)
    assert out["token_timestamps"].shape == out["sequences"].shape
    assert (out["token_timestamps"].diff(dim=-1) >= 0).all()


def test_training_reaches_the_shared_projection(narrow):
    model = copy.deepcopy(narrow).train()
    x, ids = features(), prompt(narrow)
    model(x, decoder_input_ids=ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert model.model.decoder.cross_kv_a_proj.weight.grad.abs().sum() > 0
    assert all(layer.encoder_attn.k_b_proj.weight.grad.abs().sum() > 0 for layer in model.model.decoder.layers)


def test_save_and_load_round_trip(narrow, tmp_path):
    narrow.save_pretrained(tmp_path)
    loaded, info = WhisperMLAForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert (loaded.config.cross_attention_latent, loaded.config.cross_kv_lora_rank) == ("shared", 6)
    x, ids = features(), prompt(narrow)
    torch.testing.assert_close(logits(loaded, x, ids), logits(narrow, x, ids))


SMALL = dict(d_model=16, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=1, decoder_layers=2,
             vocab_size=100, kv_lora_rank=8, kept_key_dims=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cross_attention_latent="global"), r"`cross_attention_latent` expects one of \['per_layer', 'shared'\]"),
    (dict(cross_attention_latent="per_layer", cross_kv_lora_rank=8),
     r"found cross_kv_lora_rank=8 with cross_attention_latent='per_layer'"),
    (dict(cross_attention_latent="shared", cross_kv_lora_rank=17), r"`cross_kv_lora_rank` expects an int in \[1, "
                                                                    r"d_model=16\].*found 17"),
    (dict(cross_attention_latent="shared", cross_kv_lora_rank=0), r"found 0"),
])
def test_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WhisperMLAConfig(**SMALL, **kwargs)


def test_layout_without_converted_cross_attention_is_moot():
    """The default layout (shared) with only self-attention converted: nothing shares a latent, nothing is refused."""
    config = WhisperMLAConfig(**SMALL, mla_targets=["decoder_self"])
    assert config.cross_attention_latent == "shared" and not config.shares_cross_latent_across_layers()
    assert config.mla_block_names() == ["decoder.layers.0.self_attn", "decoder.layers.1.self_attn"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mla_cache_quantization="INT8"), r"`mla_cache_quantization` expects one of \[None, 'int8'\].*'INT8'"),
    (dict(mla_attn_implementation="fast"), r"`mla_attn_implementation` expects one of"),
    (dict(kept_key_dims=999), r"`kept_key_dims` expects a value in \[0, head_dim=8\].*found 999"),
    (dict(cross_kv_lora_rank=99), r"`cross_kv_lora_rank` expects an int"),
])
def test_from_pretrained_settings_are_validated(narrow, tmp_path, kwargs, message):
    """Keyword arguments of from_pretrained change the config after it was built: the model checks them again."""
    narrow.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        WhisperMLAForConditionalGeneration.from_pretrained(tmp_path, **kwargs)
