"""run_benchmark.py end to end on a tiny random shape: the files it writes and the exact cache bytes it reports.

Speed is measured by the benchmark, never asserted here.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from configuration_whisper_mla import WhisperMLAConfig
from convert_whisper_to_mla import convert_whisper_to_mla
from modeling_whisper_mla import expected_cache_bytes_per_token
from run_benchmark import AUDIO_FRAMES, SIZES, timed_generate


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KV_LORA_RANK, KEPT_KEY_DIMS, NEW_TOKENS, BATCH_SIZES = 16, 4, 4, (1, 2)
PROMPT = 1  # test-tiny has no language/task tokens: the decoder prompt is the start token only
FRAMES = SIZES["test-tiny"]["max_source_positions"]  # encoder frames the cross-attention cache holds per sequence


def expected_cache_bytes(attention: str, sequences: int, new_tokens: int, utterances=None) -> dict[str, int]:
    """Analytic bytes: sequences x cached tokens x bytes per token (all layers), self and cross attention; the cross
    latent is cached once per utterance where beams share it."""
    config = WhisperMLAConfig(**SIZES["test-tiny"], kv_lora_rank=KV_LORA_RANK, kept_key_dims=KEPT_KEY_DIMS,
                              mla_cache_quantization="int8" if attention.endswith("int8") else None)
    per_token = expected_cache_bytes_per_token(config, torch.float32, mha=attention == "mha")
    # generate never feeds the last generated token back, so it is not cached
    return {"self": sequences * (PROMPT + new_tokens - 1) * per_token["self"],
            "cross": (utterances or sequences) * FRAMES * per_token["cross"]}


def values_per_token(attention: str) -> float:
    """Cached values per token and layer, in float32 values (bytes / 4); d_model 64, 2 heads."""
    if attention == "mha":
        return 2 * 64
    if attention.endswith("int8"):
        return (KV_LORA_RANK + 2 * KEPT_KEY_DIMS + 8) / 4  # int8 values + 2 float32 scales
    return KV_LORA_RANK + 2 * KEPT_KEY_DIMS


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    command = [
        sys.executable, os.path.join(ROOT, "run_benchmark.py"), "--size", "test-tiny", "--output_dir", str(out),
        "--batch_sizes", *map(str, BATCH_SIZES), "--new_tokens", str(NEW_TOKENS), "--num_beams", "1",
        "--repeats", "1", "--kv_lora_rank", str(KV_LORA_RANK), "--kept_key_dims", str(KEPT_KEY_DIMS),
        "--device", "cpu",
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    return out


def test_records_have_exact_cache_bytes(output_dir):
    with open(output_dir / "results.json") as f:
        records = json.load(f)
    assert [r.get("error") for r in records] == [None] * len(records)
    assert sorted((r["attention"], r["batch_size"]) for r in records) == sorted(
        (a, b) for a in ("mha", "mla-naive", "mla-absorbed", "mla-absorbed-int8") for b in BATCH_SIZES
    )
    for r in records:
        assert r["device"] == "cpu" and r["device_name"] and r["model"]
        assert (r["num_beams"], r["new_tokens"], r["prompt_tokens"]) == (1, NEW_TOKENS, PROMPT)
        expected = expected_cache_bytes(r["attention"], r["batch_size"], NEW_TOKENS)
        assert (r["cache_bytes_self"], r["cache_bytes_cross"]) == (expected["self"], expected["cross"])
        assert r["cache_bytes"] == expected["self"] + expected["cross"]
        values = values_per_token(r["attention"])
        assert r["values_per_token_per_layer_self"] == r["values_per_token_per_layer_cross"] == values
        assert r["peak_memory_bytes"] > 0 and r["decode_tokens_per_s"] > 0  # measured, not judged

    by_key = {(r["attention"], r["batch_size"]): r for r in records}
    for batch in BATCH_SIZES:
        mha = by_key["mha", batch]["cache_bytes"]
        for attention in ("mla-naive", "mla-absorbed", "mla-absorbed-int8"):
            assert by_key[attention, batch]["cache_bytes"] / mha == values_per_token(attention) / (2 * 64)


def test_markdown_table_and_plots(output_dir):
    table = (output_dir / "results.md").read_text()
    for attention in ("mla-absorbed", "mla-absorbed-int8"):
        reduction = f"{100 * (1 - values_per_token(attention) / (2 * 64)):.1f}%"
        assert table.count(reduction) == len(BATCH_SIZES)
    for batch in BATCH_SIZES:
        assert f"| {batch} | 1 | {NEW_TOKENS} |" in table
    for name in ("memory_vs_batch_size.png", "cache_vs_batch_size.png", "tokens_per_s_vs_batch_size.png"):
        assert (output_dir / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("attention", ["mha", "mla-naive", "mla-absorbed", "mla-absorbed-int8"])
def test_beam_search_cache_holds_every_beam(attention):
    """Self-attention: every beam. Cross-attention: every beam for MHA, one latent per utterance for MLA."""
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**SIZES["test-tiny"])).eval()
    if attention != "mha":
        model = convert_whisper_to_mla(model, kv_lora_rank=KV_LORA_RANK, kept_key_dims=KEPT_KEY_DIMS,
                                       mla_attn_implementation="naive" if attention == "mla-naive" else "absorb",
                                       mla_cache_quantization="int8" if attention.endswith("int8") else None)
    batch, beams = 2, 3
    with torch.inference_mode():
        hidden = model.model.encoder(torch.randn(batch, model.config.num_mel_bins, AUDIO_FRAMES)).last_hidden_state
        _, _, nbytes, seq_len = timed_generate(model, hidden, NEW_TOKENS, beams)
    assert seq_len == PROMPT + NEW_TOKENS - 1
    assert nbytes == expected_cache_bytes(attention, batch * beams, NEW_TOKENS,
                                          utterances=None if attention == "mha" else batch)
