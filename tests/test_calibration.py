"""Calibration statistics of cross-attention: encoder frames weighted by the attention the decoder gives them."""

import copy

import pytest
import torch
from transformers import WhisperFeatureExtractor

from whisper_mla.conversion import (
    _BlockStatistics,
    collect_calibration_statistics,
    convert_whisper_to_mla,
    decoder_input_mask,
    input_covariance,
)


FEATURE_EXTRACTOR = WhisperFeatureExtractor(feature_size=80)
CROSS = ["decoder.layers.0.encoder_attn", "decoder.layers.1.encoder_attn"]
SELF = ["decoder.layers.0.self_attn", "decoder.layers.1.self_attn"]


@pytest.fixture(scope="module")
def peaky_mha(tiny_mha):
    """`tiny_mha` with sharp cross-attention (its queries scaled up): a random model otherwise attends to all encoder
    frames almost alike, and the weighting would not matter."""
    model = copy.deepcopy(tiny_mha)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.encoder_attn.q_proj.weight *= 30
    return model


@pytest.fixture(scope="module")
def cross_stats(peaky_mha, noise_audio):
    return collect_calibration_statistics(peaky_mha, FEATURE_EXTRACTOR, noise_audio, CROSS + SELF,
                                          batch_size=len(noise_audio))


def attention_weighted_gram(model, audios, layer):
    """Independently: eager attention probabilities of `layer`'s cross-attention, averaged over heads and the tokens
    the decoder reads, normalised per clip, weighing the encoder frames' outer products."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    features = FEATURE_EXTRACTOR(audios, sampling_rate=16000, return_tensors="pt").input_features
    tokens = model.generate(features, max_new_tokens=model.config.max_target_positions // 2,  # as calibration
                            return_dict_in_generate=True).sequences
    mask = decoder_input_mask(tokens, model.generation_config.eos_token_id).double()  # (B, T)
    with torch.no_grad():
        out = model(input_features=features, decoder_input_ids=tokens, output_attentions=True, use_cache=False)
    probs = out.cross_attentions[layer].double()  # (B, H, T, F)
    weights = (probs * mask[:, None, :, None]).sum((1, 2))  # (B, F)
    weights = weights / weights.sum(-1, keepdim=True)
    h = out.encoder_last_hidden_state.double()  # (B, F, D)
    return torch.einsum("bf,bfi,bfj->ij", weights, h, h), len(audios)


def test_attention_weighted_gram_matches_eager_attention(peaky_mha, noise_audio, cross_stats):
    for layer, name in enumerate(CROSS):
        gram, clips = attention_weighted_gram(peaky_mha, noise_audio, layer)
        stats = cross_stats[name]
        assert stats.num_attended_clips == clips == len(noise_audio)
        torch.testing.assert_close(stats.attended_gram, gram, rtol=1e-5, atol=1e-7)
        # the uniform Gram counts every frame alike: a different matrix
        uniform = stats.input_gram / stats.num_inputs
        assert (uniform - gram / clips).norm() > 0.01 * uniform.norm()
    for name in SELF:  # self-attention keeps the uniform covariance: no attention-weighted statistics
        assert cross_stats[name].num_attended_clips == 0 and cross_stats[name].num_inputs > 0
    shared = input_covariance([cross_stats[name] for name in CROSS], attention_weighted=True)
    expected = sum(attention_weighted_gram(peaky_mha, noise_audio, layer)[0] for layer in range(2)) / (2 * clips)
    torch.testing.assert_close(shared, expected, rtol=1e-5, atol=1e-7)


def weighted_error(model, mla, covariance):
    """sum_l ||(W_l - up_l down) C^(1/2)||_F^2 over the cross keys and values of every layer."""
    root = torch.linalg.cholesky(covariance + 1e-9 * torch.eye(covariance.shape[0], dtype=covariance.dtype))
    down = mla.model.decoder.cross_kv_a_proj.weight.double()
    error = 0.0
    for layer, mla_layer in zip(model.model.decoder.layers, mla.model.decoder.layers):
        for w, up in ((layer.encoder_attn.k_proj.weight, mla_layer.encoder_attn.k_b_proj.weight),
                      (layer.encoder_attn.v_proj.weight, mla_layer.encoder_attn.v_b_proj.weight)):
            error += ((w.double() - up.double() @ down) @ root).square().sum().item()
    return error


def synthetic_cross_stats(dim: int, seed: int = 0) -> dict:
    """Statistics of the two cross blocks whose uniform and attention-weighted covariances differ strongly: all frames
    spread evenly, the attended ones along a few directions."""
    generator = torch.Generator().manual_seed(seed)
    stats = {}
    for name in CROSS:
        s = _BlockStatistics(dim)
        frames = torch.randn(400, dim, generator=generator, dtype=torch.float64)
        attended = torch.randn(400, 3, generator=generator, dtype=torch.float64) @ torch.randn(
            3, dim, generator=generator, dtype=torch.float64) + 0.05 * frames
        s.add_keys(frames, frames)
        s.add_queries(frames)
        s.attended_gram, s.num_attended_clips = attended.T @ attended / 400, 1
        s.num_clips = 1
        stats[name] = s
    return stats


def test_attention_weighted_svd_is_optimal_in_its_metric(tiny_mha):
    """The shared down-projection fitted to attention-weighted frames has the smallest error where the decoder looks;
    the uniform one has the smallest over all frames; the config records which was used."""
    cross_stats = synthetic_cross_stats(tiny_mha.config.d_model)
    models = {
        weighting: convert_whisper_to_mla(
            tiny_mha, mla_targets=["decoder_cross"], kv_lora_rank=8, kept_key_dims=2, cross_attention_latent="shared",
            cross_kv_lora_rank=4, calibration_statistics=cross_stats, cross_frame_weighting=weighting)
        for weighting in ("attention", "uniform")
    }
    for weighting, model in models.items():
        assert model.config.mla_conversion["cross_frame_weighting"] == weighting
    stats = [cross_stats[name] for name in CROSS]
    attended, uniform = input_covariance(stats, attention_weighted=True), input_covariance(stats)
    errors = {(weighting, metric): weighted_error(tiny_mha, model, covariance)
              for weighting, model in models.items()
              for metric, covariance in (("attention", attended), ("uniform", uniform))}
    assert errors["attention", "attention"] < 0.5 * errors["uniform", "attention"]
    assert errors["uniform", "uniform"] < 0.9 * errors["attention", "uniform"]


def test_attention_weighting_without_attended_statistics_is_refused(tiny_mha):
    stats = _BlockStatistics(16)  # e.g. statistics summed by hand: inputs, but no attention
    stats.add_keys(torch.ones(2, 5, 16), torch.ones(2, 5, 16))
    torch.testing.assert_close(input_covariance([stats]), torch.ones(16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="Attention-weighted cross-attention calibration expects"):
        input_covariance([stats], attention_weighted=True)
    with pytest.raises(ValueError, match="--cross_frame_weighting expects attention or uniform"):
        convert_whisper_to_mla(tiny_mha, cross_frame_weighting="frames")
