"""The MLA model against its MHA original: parity at full rank, cache contents, decode paths, dtypes, training."""

import copy

import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from whisper_mla.conversion import convert_whisper_to_mla
from modeling_whisper_mla import WhisperMLAAttention, cache_nbytes, expected_cache_bytes_per_token


TARGETS = [["encoder_self"], ["decoder_self"], ["decoder_cross"], ["encoder_self", "decoder_self", "decoder_cross"]]
FEATURE_EXTRACTOR = WhisperFeatureExtractor(feature_size=80)


def features(batch=1, seed=0):
    return torch.randn(batch, 80, 3000, generator=torch.Generator().manual_seed(seed))


def prompt(model, batch=1):
    ids = [model.generation_config.decoder_start_token_id, model.generation_config.no_timestamps_token_id]
    return torch.tensor([ids + [1000, 2000, 3000]] * batch)


def greedy(model, input_features, **kwargs):
    return model.generate(input_features, max_new_tokens=12, do_sample=False, **kwargs)


@torch.no_grad()
def incremental_logits(model, x, ids):
    """Logits of `ids` decoded through the cache: the 2-token prompt at once, then one token per step."""
    out = model(x, decoder_input_ids=ids[:, :2], use_cache=True)
    steps = [out.logits]
    for t in range(2, ids.shape[1]):
        out = model(encoder_outputs=(out.encoder_last_hidden_state,), decoder_input_ids=ids[:, t : t + 1],
                    cache=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("targets", TARGETS, ids="+".join)
@pytest.mark.parametrize("key_selection", ["uniform", "2-norm"])
def test_full_rank_matches_mha(tiny_mha, noise_audio, targets, key_selection):
    mla = convert_whisper_to_mla(
        tiny_mha, cross_attention_latent="per_layer", mla_targets=targets, kv_lora_rank=16, kept_key_dims=3, key_selection=key_selection,
        calibration_audio=noise_audio if key_selection == "2-norm" else None, feature_extractor=FEATURE_EXTRACTOR,
    )
    x, ids = features(), prompt(tiny_mha)
    with torch.no_grad():
        torch.testing.assert_close(mla(x, decoder_input_ids=ids).logits, tiny_mha(x, decoder_input_ids=ids).logits,
                                   atol=1e-4, rtol=0)
    assert torch.equal(greedy(mla, x), greedy(tiny_mha, x))
    for path in ("absorb", "naive"):
        mla.config.mla_attn_implementation = path
        assert torch.equal(greedy(mla, x, num_beams=3), greedy(tiny_mha, x, num_beams=3))


@torch.no_grad()
def key_dim_scores(model, audios, block_names) -> dict[str, torch.Tensor]:
    """mean|q_i| * mean|k_i| per query/key dim of each block, (heads, head_dim), scored here on its own: the clips in
    one batch, each decoded greedily (calibration's length: half the decoder positions) and teacher-forced on its
    prompt and transcript;
    queries at the positions before each clip's first end of text, keys there too (self-attention) or at every
    encoder frame (cross-attention)."""
    x = FEATURE_EXTRACTOR(audios, sampling_rate=16000, return_tensors="pt").input_features  # (B, 80, 3000)
    ids = model.generate(x, max_new_tokens=model.config.max_target_positions // 2,
                         return_dict_in_generate=True).sequences  # (B, T): prompt, transcript, end of text
    read = (ids == model.generation_config.eos_token_id).cumsum(-1) == 0  # (B, T): before the first end of text
    outputs, hooks = {}, []
    for name in block_names:
        for proj in ("q_proj", "k_proj"):
            module = getattr(model.model.get_submodule(name), proj)
            hooks.append(module.register_forward_hook(lambda m, i, o, key=(name, proj): outputs.__setitem__(key, o)))
    try:
        model(x, decoder_input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    scores = {}
    for name in block_names:
        q, k = outputs[name, "q_proj"][read], outputs[name, "k_proj"]  # q: (N, D); k: (B, T or 1500, D)
        k = k[read] if "self_attn" in name else k.flatten(0, 1)
        heads = model.config.decoder_attention_heads
        scores[name] = (q.double().abs().mean(0) * k.double().abs().mean(0)).view(heads, -1)
    return scores


def test_2norm_keeps_the_highest_scoring_dims(tiny_mha, noise_audio):
    """Per block and head, the kept key dims are the top 2 of mean|q_i| * mean|k_i| on the calibration clips."""
    mla = convert_whisper_to_mla(tiny_mha, cross_attention_latent="per_layer", kv_lora_rank=8, kept_key_dims=2,
                                 key_selection="2-norm", calibration_audio=noise_audio,
                                 feature_extractor=FEATURE_EXTRACTOR)
    indices = mla.config.kept_key_indices
    scores = key_dim_scores(tiny_mha, noise_audio, mla.config.mla_block_names())
    assert sorted(indices) == sorted(scores)
    for name, heads in indices.items():
        for head, kept in enumerate(heads):
            score = scores[name][head]
            others = [i for i in range(len(score)) if i not in kept]
            assert len(kept) == 2 and kept == sorted(kept), (name, head, kept)
            # rounding between the converter's float64 sums and this float64 mean is far below the gaps
            assert score[kept].min() > score[others].max() * (1 + 1e-9), (name, head, kept, score)
    uniform = convert_whisper_to_mla(tiny_mha, cross_attention_latent="per_layer", kv_lora_rank=8, kept_key_dims=2)
    assert indices != uniform.config.kept_key_indices  # the scores chose, not the default


@pytest.fixture(scope="module")
def low_rank_mla(tiny_mha, noise_audio):
    """Low rank, activation-aware, all the decoder converted: a model whose outputs differ from MHA."""
    return convert_whisper_to_mla(tiny_mha, cross_attention_latent="per_layer", kv_lora_rank=6, kept_key_dims=2, calibration_audio=noise_audio,
                                  feature_extractor=FEATURE_EXTRACTOR)


@pytest.mark.parametrize("path", ["absorb", "naive"])
def test_incremental_decoding_equals_full_forward(low_rank_mla, path):
    model = copy.deepcopy(low_rank_mla)
    model.config.mla_attn_implementation = path
    x, ids = features(batch=2), prompt(model, batch=2)
    with torch.no_grad():
        full = model(x, decoder_input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(incremental_logits(model, x, ids), full, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def split_mla(tiny_mha, noise_audio):
    """Split SVD: the first half of the latent serves the keys, the second the values."""
    return convert_whisper_to_mla(tiny_mha, cross_attention_latent="per_layer", kv_lora_rank=8, kept_key_dims=2, svd_method="split",
                                  calibration_audio=noise_audio, feature_extractor=FEATURE_EXTRACTOR)


def test_split_svd_error_shrinks_with_rank(tiny_mha, noise_audio, split_mla):
    x, ids = features(), prompt(tiny_mha)
    errors = []
    for rank in (4, 8, 16, 25):  # 25: the key latent is full (12 = 2 heads x 6 dims)
        model = convert_whisper_to_mla(tiny_mha, cross_attention_latent="per_layer", kv_lora_rank=rank, kept_key_dims=2, svd_method="split")
        assert model.model.decoder.layers[0].self_attn.k_b_proj.in_features == rank // 2
        with torch.no_grad():
            errors.append((model(x, decoder_input_ids=ids).logits - tiny_mha(x, decoder_input_ids=ids).logits).norm())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.2 * errors[0]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("svd_method", ["joint", "split"])
def test_absorbed_equals_naive(low_rank_mla, split_mla, attn_implementation, svd_method):
    source = low_rank_mla if svd_method == "joint" else split_mla
    naive, absorbed = copy.deepcopy(source), copy.deepcopy(source)
    naive.config.mla_attn_implementation = "naive"
    for model in (naive, absorbed):
        model.set_attn_implementation(attn_implementation)
    x, ids = features(batch=2), prompt(naive, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(absorbed(x, decoder_input_ids=ids).logits, naive(x, decoder_input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(absorbed, x), greedy(naive, x))


def test_cache_holds_only_latent_and_kept_dims(low_rank_mla, tiny_mha):
    x = features(batch=3)
    for model in (low_rank_mla, tiny_mha):
        out = model.generate(x, max_new_tokens=7, min_new_tokens=7, return_dict_in_generate=True)
        cached_tokens = out.sequences.shape[1] - 1  # the last generated token is never fed back
        per_token = expected_cache_bytes_per_token(model.config, model.dtype)
        assert cache_nbytes(out.past_key_values) == {
            "self": 3 * cached_tokens * per_token["self"], "cross": 3 * 1500 * per_token["cross"],
        }
    # (latent 6 + 2 heads x 2 kept dims) fp32 values per token and layer, 2 layers
    assert expected_cache_bytes_per_token(low_rank_mla.config, torch.float32) == {"self": 80, "cross": 80}
    layer = out.past_key_values.cross_attention_cache.layers[0]
    assert tuple(layer.keys.shape) == (3, 2, 1500, 8)  # the MHA model: full keys for comparison


def test_beam_search_and_batch_of_different_lengths(low_rank_mla, tiny_processor):
    clips = [torch.randn(16000 * s, generator=torch.Generator().manual_seed(s)).numpy() * 0.1 for s in (1, 5, 9)]
    x = tiny_processor.feature_extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
    for num_beams in (1, 4):
        batched = greedy(low_rank_mla, x, num_beams=num_beams)
        for i in range(3):
            single = greedy(low_rank_mla, x[i : i + 1], num_beams=num_beams)
            assert torch.equal(batched[i, : single.shape[1]], single[0])


def test_beams_share_one_cross_latent_per_utterance(low_rank_mla):
    x = features(batch=2)
    unshared = copy.deepcopy(low_rank_mla)
    unshared.config.share_cross_latent_across_beams = False
    caches = [EncoderDecoderCache(DynamicCache(), DynamicCache()) for _ in range(2)]  # as generation leaves them
    sequences = [model.generate(x, max_new_tokens=6, num_beams=3, cache=cache)
                 for model, cache in zip((low_rank_mla, unshared), caches)]
    assert torch.equal(sequences[0], sequences[1])
    per_token = expected_cache_bytes_per_token(low_rank_mla.config, torch.float32)
    assert cache_nbytes(caches[0])["cross"] == 2 * 1500 * per_token["cross"]  # one latent per utterance
    assert cache_nbytes(caches[1])["cross"] == 2 * 3 * 1500 * per_token["cross"]  # one per beam
    assert cache_nbytes(caches[0])["self"] == cache_nbytes(caches[1])["self"] == 2 * 3 * 7 * per_token["self"]
    # token timestamps follow the beams through the shared latent
    model = copy.deepcopy(low_rank_mla)
    model.set_attn_implementation("eager")
    out = model.generate(x, max_new_tokens=5, num_beams=3, return_token_timestamps=True, return_dict_in_generate=True)
    assert out["token_timestamps"].shape == out["sequences"].shape


def test_int8_cache(low_rank_mla):
    """Per-token absmax int8: bytes exact, values within half a quantisation step, logits and tokens close."""
    model = copy.deepcopy(low_rank_mla)
    model.config.mla_cache_quantization = "int8"
    # (latent 6 + 2 heads x 2 kept) int8 values + 2 float32 scales per token, 2 layers
    assert expected_cache_bytes_per_token(model.config, torch.float32) == {"self": 36, "cross": 36}
    x, cache = features(batch=3), EncoderDecoderCache(DynamicCache(), DynamicCache())
    tokens = model.generate(x, max_new_tokens=7, min_new_tokens=7, num_beams=2, cache=cache)
    assert cache.get_seq_length() == 8  # 2 prompt tokens + 7 generated, the last never fed back
    assert cache_nbytes(cache) == {"self": 3 * 2 * 8 * 36, "cross": 3 * 1500 * 36}
    layer = cache.cross_attention_cache.layers[0]
    assert layer.keys.dtype == torch.int8 and layer.values.numel() == 0

    attn = model.model.decoder.layers[0].encoder_attn
    latent, k_kept = attn.compress(torch.randn(2, 50, attn.embed_dim) * 3)
    restored_latent, restored_kept = attn.unpack_int8(attn.pack_int8(latent, k_kept), torch.float32)
    step = latent.abs().amax(-1, keepdim=True) / 127  # one scale per token
    assert ((restored_latent - latent).abs() <= step / 2 * 1.001).all()
    kept_step = k_kept.abs().amax((1, 3), keepdim=True) / 127  # one scale per token over all heads' kept dims
    assert ((restored_kept - k_kept).abs() <= kept_step / 2 * 1.001).all()
    assert (restored_latent - latent).abs().max() > 0

    ids = prompt(model, batch=3)
    with torch.no_grad():
        reference = low_rank_mla(x, decoder_input_ids=ids[:, :2]).logits
        first = model(x, decoder_input_ids=ids[:, :2], use_cache=True)  # the cache quantises what it holds
    assert not torch.equal(first.logits, reference)
    torch.testing.assert_close(first.logits, reference, atol=0.05 * reference.abs().max().item(), rtol=0)
    fp_tokens = low_rank_mla.generate(x, max_new_tokens=7, min_new_tokens=7, num_beams=2)
    assert (tokens == fp_tokens).float().mean() > 0.8


def test_no_kept_dims(tiny_mha):
    """kept_key_dims=0 (all of every key compressed): both paths agree, beams and the int8 cache work."""
    absorbed = convert_whisper_to_mla(tiny_mha, cross_attention_latent="per_layer", kv_lora_rank=6, kept_key_dims=0)
    naive = copy.deepcopy(absorbed)
    naive.config.mla_attn_implementation = "naive"
    x, ids = features(batch=2), prompt(tiny_mha, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(absorbed(x, decoder_input_ids=ids).logits, naive(x, decoder_input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(absorbed, x, num_beams=2), greedy(naive, x, num_beams=2))
    absorbed.config.mla_cache_quantization = "int8"
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    absorbed.generate(x, max_new_tokens=4, min_new_tokens=4, num_beams=2, cache=cache)
    assert cache_nbytes(cache)["cross"] == 2 * 1500 * expected_cache_bytes_per_token(absorbed.config, torch.float32)[
        "cross"] == 2 * 1500 * 2 * (6 + 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(low_rank_mla, dtype):
    model = copy.deepcopy(low_rank_mla).to(dtype)
    x, ids = features(), prompt(model)
    with torch.no_grad():
        reference = low_rank_mla(x, decoder_input_ids=ids).logits
        absorbed = model(x.to(dtype), decoder_input_ids=ids).logits
        model.config.mla_attn_implementation = "naive"
        naive = model(x.to(dtype), decoder_input_ids=ids).logits
    assert absorbed.dtype == dtype
    torch.testing.assert_close(absorbed.float(), reference, atol=0.1, rtol=0.05)
    torch.testing.assert_close(naive.float(), reference, atol=0.1, rtol=0.05)
    out = model.generate(x.to(dtype), max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True)
    assert cache_nbytes(out.past_key_values)["cross"] == 1500 * expected_cache_bytes_per_token(model.config, dtype)["cross"]


def test_gradient_checkpointing_gives_the_same_gradients(low_rank_mla):
    x, ids = features(batch=2), prompt(low_rank_mla, batch=2)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(low_rank_mla).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(x, decoder_input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.decoder.layers[0].self_attn.kv_a_proj.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_output_attentions_eager(low_rank_mla):
    model = copy.deepcopy(low_rank_mla)
    model.set_attn_implementation("eager")
    x, ids = features(), prompt(model)
    for path in ("absorb", "naive"):
        model.config.mla_attn_implementation = path
        out = model(x, decoder_input_ids=ids, output_attentions=True)
        # probabilities asked for (the eager formulation) or not (the fused SDPA one): the same logits
        torch.testing.assert_close(out.logits, model(x, decoder_input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert len(out.cross_attentions) == 2 and tuple(out.cross_attentions[0].shape) == (1, 2, 5, 1500)
        torch.testing.assert_close(out.cross_attentions[0].sum(-1), torch.ones(1, 2, 5))
    # token timestamps (the cross-attention of the alignment heads) work with the latent cache
    generated = model.generate(x, max_new_tokens=5, return_token_timestamps=True, return_dict_in_generate=True)
    assert generated["token_timestamps"].shape == generated["sequences"].shape


def test_converted_blocks_are_mla(low_rank_mla):
    decoder_layer = low_rank_mla.model.decoder.layers[0]
    assert isinstance(decoder_layer.self_attn, WhisperMLAAttention)
    assert isinstance(decoder_layer.encoder_attn, WhisperMLAAttention)
    assert not isinstance(low_rank_mla.model.encoder.layers[0].self_attn, WhisperMLAAttention)
    assert not any(name.endswith(("k_proj.weight", "v_proj.weight")) and "decoder" in name
                   for name in low_rank_mla.state_dict())
