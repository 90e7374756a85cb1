"""Output-aware factorisation (`--output_aware`): each lossy latent is fitted to what its block makes of the keys and
values (attention logits, output projection), on centered inputs with the value offset folded into the bias."""

import logging

import pytest
import torch

from whisper_mla.conversion import (
    BlockReading,
    MLAArguments,
    _BlockStatistics,
    convert_whisper_to_mla,
    low_rank,
    matrix_sqrt,
    output_aware_low_rank,
)


def random_reading(dim: int, rank: int | None = None, seed: int = 0) -> tuple[BlockReading, torch.Tensor]:
    """(reading, inputs (N, dim)) of inputs with a non-zero mean, spanning `rank` directions (all if None)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank or dim, dim, generator=generator, dtype=torch.float64)
    inputs = 3.0 + torch.randn(500, rank or dim, generator=generator, dtype=torch.float64) @ basis
    mean = inputs.mean(0)
    covariance = (inputs - mean).T @ (inputs - mean) / len(inputs)
    queries = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return BlockReading(mean, covariance, queries @ queries.T), inputs


def objective(matrix, up, down, offset, weights, inputs):
    """E || A ((W - U D) x - offset) ||^2: the error that remains after the offset is folded into a bias."""
    error = (inputs @ (matrix - up @ down).T - offset) @ weights.T
    return error.square().sum(1).mean().item()


def test_full_rank_reproduces_the_matrix_and_needs_no_offset():
    reading, _ = random_reading(6)
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    weights = torch.diag(torch.rand(10, generator=generator, dtype=torch.float64) + 0.5)
    (up,), down, (offset,) = output_aware_low_rank([matrix], [weights], [reading], rank=6)
    torch.testing.assert_close(up @ down, matrix)
    torch.testing.assert_close(offset, torch.zeros(10, dtype=torch.float64), atol=1e-6, rtol=0)


def test_low_rank_fit_is_optimal_in_its_weighted_metric():
    """Rank 3 of a (10, 6) matrix: the weighted error equals Eckart-Young's bound (the trailing singular values of
    A W C^(1/2)), and beats the plain activation-aware SVD (identity A) in that metric, and loses to it without A."""
    reading, inputs = random_reading(6, seed=1)
    matrix = torch.randn(10, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = torch.diag(torch.logspace(-2, 1, 10, dtype=torch.float64))
    (up,), down, (offset,) = output_aware_low_rank([matrix], [weights], [reading], rank=3)
    bound = torch.linalg.svdvals(weights @ matrix @ matrix_sqrt(reading.covariance)[0])[3:].square().sum().item()
    assert objective(matrix, up, down, offset, weights, inputs) == pytest.approx(bound, rel=1e-4)
    plain_up, plain_down = low_rank(matrix, 3, *matrix_sqrt(reading.covariance))
    plain_offset = (matrix - plain_up @ plain_down) @ reading.mean
    eye = torch.eye(10, dtype=torch.float64)
    assert objective(matrix, up, down, offset, weights, inputs) < 0.8 * objective(
        matrix, plain_up, plain_down, plain_offset, weights, inputs)
    assert objective(matrix, plain_up, plain_down, plain_offset, eye, inputs) < objective(
        matrix, up, down, offset, eye, inputs)
    assert 2 * objective(matrix, up, down, offset, weights, inputs) < objective(
        matrix, up, down, torch.zeros(10, dtype=torch.float64), weights, inputs)  # the offset matters


def subspace_statistics(model, rank: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """(statistics of every decoder block, inputs (1, 40, D)): inputs a constant vector plus `rank` directions."""
    dim = model.config.d_model
    generator = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(dim, generator=generator) + torch.randn(1, 40, rank, generator=generator)
              @ torch.randn(rank, dim, generator=generator)).double()
    stats = {}
    for i, layer in enumerate(model.model.decoder.layers):
        for attn in ("self_attn", "encoder_attn"):
            block, s = getattr(layer, attn), _BlockStatistics(dim)
            with torch.no_grad():
                s.add_keys(inputs, block.k_proj(inputs.float()).double())
                s.add_queries(block.q_proj(inputs.float()).double())
            s.attended_gram, s.attended_sum, s.num_attended_clips = inputs[0].T @ inputs[0] / 40, inputs[0].mean(0), 1
            s.num_clips = 1
            stats[f"decoder.layers.{i}.{attn}"] = s
    return stats, inputs.float()


@pytest.mark.parametrize("layout", ["self", "shared_cross"])
def test_inputs_in_the_latent_subspace_are_attended_exactly(tiny_mha, layout):
    """Inputs that span exactly `rank` directions around a non-zero mean: the output-aware latent of width `rank`
    reproduces the MHA block's output on them, the constant part's key error moving no logit and its value error
    folded into the bias. The plain activation-aware SVD (uncentered) does not."""
    rank = 5
    stats, inputs = subspace_statistics(tiny_mha, rank)
    kwargs = (dict(mla_targets=["decoder_self"], kv_lora_rank=rank, kept_key_dims=0) if layout == "self" else
              dict(mla_targets=["decoder_cross"], cross_attention_latent="shared", cross_kv_lora_rank=rank))
    errors = {}
    kind = "decoder_self" if layout == "self" else "decoder_cross"
    for output_aware in (True, False):
        mla = convert_whisper_to_mla(tiny_mha, calibration_statistics=stats, output_aware=[kind] * output_aware,
                                     **kwargs)
        assert mla.config.mla_conversion.get("output_aware", []) == [kind] * output_aware
        attn = "self_attn" if layout == "self" else "encoder_attn"
        mha_block, mla_block = (getattr(m.model.decoder.layers[1], attn) for m in (tiny_mha, mla))
        queries = torch.randn(1, 7, tiny_mha.config.d_model, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            if layout == "self":
                expected, got = mha_block(inputs)[0], mla_block(inputs)[0]
            else:
                latent = mla.model.decoder.cross_kv_a_proj(inputs)  # the shared latent the decoder caches
                expected = mha_block(queries, key_value_states=inputs)[0]
                got = mla_block(queries, key_value_states=latent)[0]
        errors[output_aware] = (got - expected).abs().max().item()
    assert errors[True] < 1e-4, errors
    assert errors[False] > 100 * errors[True], errors


def test_output_aware_needs_calibration_and_a_joint_latent(tiny_mha):
    with pytest.raises(ValueError, match="Activation-aware \\(and output-aware\\) SVD .* expect calibration audio"):
        convert_whisper_to_mla(tiny_mha, kv_lora_rank=8, kept_key_dims=2, output_aware=["decoder_self"],
                               key_selection="uniform")
    with pytest.raises(ValueError, match="--output_aware expects --svd_method joint"):
        MLAArguments(output_aware=["decoder_self"], svd_method="split")
    with pytest.raises(ValueError, match="--output_aware expects --svd_method joint"):
        MLAArguments(output_aware=["decoder_cross"], activation_aware=False)
    with pytest.raises(ValueError, match=r"--output_aware expects kinds of blocks .* but found \['decoder'\]"):
        MLAArguments(output_aware=["decoder"])


def test_output_aware_on_a_converted_checkpoint_is_reported_as_ignored(tiny_mha, caplog):
    """run_finetune.py does not convert a Whisper-MLA checkpoint again: the flag is named in a warning, not dropped
    silently."""
    from whisper_mla.training.models import check_mla_flags_match

    mla = convert_whisper_to_mla(tiny_mha)
    with caplog.at_level(logging.WARNING, logger="whisper_mla.training.models"):
        check_mla_flags_match(mla.config, MLAArguments(output_aware=["decoder_self"]))
    assert "--output_aware is ignored" in caplog.text
