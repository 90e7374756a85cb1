"""The shared cross latent pooled over time (`cross_latent_stride`): one cached latent per `stride` encoder frames."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from configuration_whisper_mla import WhisperMLAConfig
from modeling_whisper_mla import WhisperMLAForConditionalGeneration, cache_nbytes, expected_cache_bytes_per_utterance
from whisper_mla.conversion import convert_whisper_to_mla
from whisper_mla.transcription import cache_statistics
from test_modeling_whisper_mla import features, greedy, incremental_logits, prompt


def pooled_by_hand(states: torch.Tensor, stride: int, pooling: str) -> torch.Tensor:
    """(B, S, D) -> (B, ceil(S / stride), D), one group at a time."""
    groups = [states[:, start : start + stride] for start in range(0, states.shape[1], stride)]
    return torch.stack([g[:, 0] if pooling == "subsample" else g.mean(dim=1) for g in groups], dim=1)


def mha_on_pooled_frames(tiny_mha, stride: int, pooling: str):
    """`tiny_mha` whose encoder output is pooled by hand: what a full-width shared latent with that stride equals."""
    model = copy.deepcopy(tiny_mha)
    encoder_forward = model.model.encoder.forward

    def forward(*args, **kwargs):
        out = encoder_forward(*args, **kwargs)
        out.last_hidden_state = pooled_by_hand(out.last_hidden_state, stride, pooling)
        return out

    model.model.encoder.forward = forward
    return model


@pytest.fixture(scope="module")
def sharp_mha(tiny_mha):
    """`tiny_mha` with cross-attention queries x30 and its output x10: attention that picks frames and counts, so
    pooling them changes the logits (the random model's near-uniform cross-attention barely notices it)."""
    model = copy.deepcopy(tiny_mha)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.encoder_attn.q_proj.weight.mul_(30)
            layer.encoder_attn.q_proj.bias.mul_(30)
            layer.encoder_attn.out_proj.weight.mul_(10)
    return model


def logits(model, x, ids):
    with torch.no_grad():
        return model(x, decoder_input_ids=ids).logits


@pytest.mark.parametrize("stride,pooling", [(2, "mean"), (2, "subsample"), (7, "mean")])
def test_full_width_equals_mha_on_pooled_frames(sharp_mha, stride, pooling):
    """At width d_model the only change is the pooling: MHA reading the pooled encoder frames gives the same logits
    (full forward and step by step through the cache) and the same greedy and beam tokens, on both decode paths.
    Stride 7 leaves a last group of 1500 mod 7 = 2 frames, averaged over those two."""
    mla = convert_whisper_to_mla(sharp_mha, cross_latent_stride=stride, cross_latent_pooling=pooling)
    reference = mha_on_pooled_frames(sharp_mha, stride, pooling)
    x, ids = features(batch=2), prompt(sharp_mha, batch=2)
    expected = logits(reference, x, ids)
    assert (expected - logits(sharp_mha, x, ids)).abs().max() > 1e-4  # pooling moves the logits 100x the tolerance
    torch.testing.assert_close(logits(mla, x, ids), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(incremental_logits(mla, x, ids), expected, atol=1e-6, rtol=0)
    for path in ("absorb", "naive"):
        mla.config.mla_attn_implementation = path
        assert torch.equal(greedy(mla, x), greedy(reference, x))
        assert torch.equal(greedy(mla, x, num_beams=3), greedy(reference, x, num_beams=3))


def test_stride_one_is_the_exact_default(tiny_mha):
    mla = convert_whisper_to_mla(tiny_mha, cross_latent_stride=1, cross_latent_pooling="subsample")
    x, ids = features(), prompt(tiny_mha)
    torch.testing.assert_close(logits(mla, x, ids), logits(tiny_mha, x, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [None, 8])
def test_cache_holds_one_latent_per_stride_frames(tiny_mha, noise_audio, tiny_processor, rank):
    """The cross cache holds ceil(1500 / stride) frames of the latent, once for all layers, and the analytic figures
    (`expected_cache_bytes_per_utterance`, `cache_statistics`) count exactly what it holds."""
    mla = convert_whisper_to_mla(tiny_mha, cross_latent_stride=3, cross_kv_lora_rank=rank,
                                 calibration_audio=noise_audio, feature_extractor=tiny_processor.feature_extractor)
    width = rank or mla.config.d_model
    x, ids = features(), prompt(tiny_mha)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        mla(x, decoder_input_ids=ids, cache=cache, use_cache=True)
    assert cache.cross_attention_cache.layers[0].keys.shape == (1, 1, 500, width)
    nbytes = cache_nbytes(cache)
    assert nbytes["cross"] == 500 * width * 4
    assert nbytes["self"] + nbytes["cross"] == expected_cache_bytes_per_utterance(mla.config, torch.float32,
                                                                                   tokens=ids.shape[1])
    mha_bytes = expected_cache_bytes_per_utterance(mla.config, torch.float32, tokens=ids.shape[1], mha=True)
    assert mha_bytes == mla.config.decoder_layers * 2 * 16 * 4 * (1500 + ids.shape[1])  # MHA: keys + values, every frame
    stats = cache_statistics(mla)
    assert stats["cache_bytes_per_30s_utterance"] == expected_cache_bytes_per_utterance(
        mla.config, torch.float32, tokens=mla.config.max_target_positions)
    assert "500 cached" in stats["cache_bytes_per_30s_utterance_definition"]
    assert stats["cross_cache_frames_per_30s"] == 500


def test_saved_and_loaded_with_its_stride(tiny_mha, tmp_path):
    mla = convert_whisper_to_mla(tiny_mha, cross_latent_stride=2, cross_latent_pooling="subsample")
    mla.save_pretrained(tmp_path)
    loaded = WhisperMLAForConditionalGeneration.from_pretrained(tmp_path)
    assert (loaded.config.cross_latent_stride, loaded.config.cross_latent_pooling) == (2, "subsample")
    x, ids = features(), prompt(tiny_mha)
    torch.testing.assert_close(logits(loaded, x, ids), logits(mla, x, ids), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"cross_latent_stride": 0}, r"expects an int in \[1, max_source_positions=1500\].*found 0"),
    ({"cross_latent_stride": 1501}, r"expects an int in \[1, max_source_positions=1500\].*found 1501"),
    ({"cross_latent_pooling": "max"}, r"expects one of \['mean', 'subsample'\].*found 'max'"),
    ({"cross_latent_stride": 2, "cross_attention_latent": "per_layer"},
     r"pools the shared cross-attention latent.*cross_attention_latent='per_layer'.*use cross_attention_latent="),
    ({"cross_latent_stride": 2, "mla_targets": ["decoder_self"]}, r"pools the shared.*'decoder_cross' in mla_targets"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WhisperMLAConfig(d_model=16, encoder_attention_heads=2, decoder_attention_heads=2, **kwargs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_token_timestamps_span_the_pooled_frames(sharp_mha, num_beams):
    """Word-level timestamps read the cross-attention weights over cached frames: with stride 2 each column spans
    two encoder frames (40 ms), so the times are exactly twice those MHA gives on the pooled frames (20 ms a column),
    and the tokens are the same."""
    mla = convert_whisper_to_mla(sharp_mha, cross_latent_stride=2)
    reference = mha_on_pooled_frames(sharp_mha, 2, "mean")
    x = features()
    outs = []
    for model in (mla, reference):
        model.set_attn_implementation("eager")
        outs.append(model.generate(x, max_new_tokens=6, num_beams=num_beams, return_token_timestamps=True,
                                   return_dict_in_generate=True))
    assert torch.equal(outs[0]["sequences"], outs[1]["sequences"])
    assert outs[1]["token_timestamps"].max() > 0  # something to scale
    torch.testing.assert_close(outs[0]["token_timestamps"], 2 * outs[1]["token_timestamps"], atol=1e-6, rtol=0)


def test_token_timestamps_map_num_frames_to_the_pooled_columns(tiny_mha, monkeypatch):
    """Whisper keeps num_frames // 2 columns of the cross-attention weights (one per encoder frame); pooled, a clip
    of n mel frames covers 2 * ceil((n // 2) / stride) of them, in every form generate passes num_frames."""
    from transformers import WhisperForConditionalGeneration

    seen = []
    monkeypatch.setattr(WhisperForConditionalGeneration, "_extract_token_timestamps",
                        lambda self, outputs, heads, time_precision=0.02, num_frames=None, num_input_ids=None:
                        seen.append((time_precision, num_frames)))
    mla = convert_whisper_to_mla(tiny_mha, cross_latent_stride=3)
    mla._extract_token_timestamps(None, None, num_frames=1000)
    mla._extract_token_timestamps(None, None, num_frames=torch.tensor([3000, 1001, 6]))
    mla._extract_token_timestamps(None, None, num_frames=[2000, 7])
    mla._extract_token_timestamps(None, None)
    assert seen[0] == (pytest.approx(0.06), 334)  # 500 encoder frames -> 167 columns of 60 ms
    assert seen[1][1].tolist() == [1000, 334, 2]
    assert seen[2][1] == [668, 2]
    assert seen[3][1] is None


def test_model_card_names_the_stride(tiny_mha):
    from whisper_mla.hub import model_card

    card = str(model_card(convert_whisper_to_mla(tiny_mha, cross_latent_stride=2, cross_latent_pooling="subsample")))
    assert "one latent per 2 encoder frames (subsample), 750 for a 30 s window" in card
    assert "values per 2 encoder frames, cached once" in card
    assert "exact" not in card.split("Cross-attention reads", 1)[1].split("\n")[0]
    assert "(the encoder output itself: exact)" in str(model_card(convert_whisper_to_mla(tiny_mha)))
