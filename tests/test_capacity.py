"""The capacity search (`run_benchmark.py --find_max_batch`, `whisper_mla/capacity.py`) on tiny random shapes: the
filled cache has exactly the shapes, dtypes and aliasing of a real generate() cache, a try over the budget is refused
before it starts or killed while it runs (and the search around it returns cleanly), and the command line writes the
largest batch of each layout, bracketed by measured tries.

Memory figures are asserted only against the budget the watchdog enforces, never against expected speeds.
"""

import json

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from helpers import ROOT, fresh_env, run_script
from whisper_mla.benchmark import SIZES, generation_kwargs
from whisper_mla.capacity import (
    CAPACITY_LAYOUTS,
    GIB,
    MIB,
    PROMPT_TOKENS,
    build_model,
    bytes_per_utterance,
    earlier_searches,
    fill_cache,
    find_max_batch,
    layout_config,
    param_bytes,
    parse_memory,
    supervise,
)


SHAPES = SIZES["test-tiny"]
NEW_TOKENS = 6


def setting(layout: str, **overrides) -> dict:
    return dict(dict(shapes=SHAPES, layout=layout, dtype="float32", device="cpu", attn_implementation="sdpa",
                     num_threads=1, seed=0, mode="decode", num_beams=1, new_tokens=NEW_TOKENS, decode_steps=2),
                **overrides)


def test_parse_memory_units_and_errors():
    assert parse_memory("8GiB") == parse_memory("8G") == 8 * GIB
    assert parse_memory("512MiB") == 512 * MIB
    assert parse_memory("8GB") == 8 * 10**9
    assert parse_memory("1073741824") == GIB
    with pytest.raises(ValueError, match="expects a size such as 8GiB.*but found 'eight'"):
        parse_memory("eight")


def layer_layout(cache: EncoderDecoderCache) -> list:
    """Per layer of each sub-cache: (shape, dtype) of keys and values, and which earlier layer it aliases."""
    described = []
    for sub_cache in (cache.self_attention_cache, cache.cross_attention_cache):
        owners = {}
        for i, layer in enumerate(sub_cache.layers):
            if not layer.is_initialized:
                described.append(None)
                continue
            described.append((tuple(layer.keys.shape), layer.keys.dtype, tuple(layer.values.shape),
                              layer.values.dtype, owners.setdefault(layer.keys.data_ptr(), i)))
    return described


@pytest.mark.parametrize("layout", list(CAPACITY_LAYOUTS))
@pytest.mark.parametrize("beams", [1, 3])
def test_filled_cache_matches_generate(layout, beams):
    """What a try decodes from: the cache of a real generate() of NEW_TOKENS tokens (batch 2) has the same shapes,
    dtypes and aliasing (the shared cross latent: one tensor for every layer) as fill_cache's."""
    model = build_model(setting(layout))
    batch = 2
    real = EncoderDecoderCache(DynamicCache(), DynamicCache())
    hidden = torch.randn(batch, SHAPES["max_source_positions"], SHAPES["d_model"])
    with torch.inference_mode():
        model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), cache=real,
                       **generation_kwargs(model, NEW_TOKENS, beams))
    filled = fill_cache(model, batch, beams, PROMPT_TOKENS + NEW_TOKENS - 1)
    assert real.get_seq_length() == filled.get_seq_length() == PROMPT_TOKENS + NEW_TOKENS - 1
    assert layer_layout(filled) == layer_layout(real)


def test_analytic_prediction_counts_the_beams_mha_pays():
    """MHA's beam search keeps a cross cache and an encoder output per beam; the exact default one per utterance."""
    mha, mla = layout_config(SHAPES, "mha"), layout_config(SHAPES, "mla-default")
    frames, d, layers = SHAPES["max_source_positions"], SHAPES["d_model"], SHAPES["decoder_layers"]
    grow_mha = bytes_per_utterance(mha, torch.float32, 5, NEW_TOKENS) - bytes_per_utterance(mha, torch.float32, 1,
                                                                                             NEW_TOKENS)
    grow_mla = bytes_per_utterance(mla, torch.float32, 5, NEW_TOKENS) - bytes_per_utterance(mla, torch.float32, 1,
                                                                                            NEW_TOKENS)
    assert grow_mha > 4 * (layers * frames * 2 * d * 4 + frames * d * 4)  # 4 more cross caches and encoder outputs
    assert grow_mla < frames * d * 4  # 4 more beams cost less than one more cross latent
    assert param_bytes(mla, torch.bfloat16) * 2 == param_bytes(mla, torch.float32)


def test_search_refuses_a_try_predicted_over_the_budget():
    """A budget below the weights: the first try is refused before any child starts; the search returns 0."""
    result = find_max_batch(setting("mha"), budget=MIB, base=100 * MIB, slope=MIB, tolerance=0.05, max_tries=4,
                            log=lambda _: None)
    assert result["max_batch"] == 0 and result["fail_batch"] == 1
    assert [t["status"] for t in result["tries"]] == ["refused"]
    assert "max_rss_bytes" not in result["tries"][0]  # never started


@pytest.mark.slow
def test_watchdog_kills_a_try_over_the_budget_and_the_search_stops_cleanly():
    """A budget a little above one utterance's footprint: a large batch is killed by the watchdog while it fills its
    cache (its RSS never far above the budget), and a search under that budget brackets its largest batch with
    measured tries, then returns; this process lives on."""
    first = supervise(setting("mha", batch_size=1), 4 * GIB)
    assert first["status"] == "ok", first
    budget = first["peak_memory_bytes"] + 24 * MIB  # room for a handful of test-tiny utterances
    killed = supervise(setting("mha", batch_size=4000), budget)  # ~6 GiB of cross cache
    assert killed["status"] == "killed", killed
    assert "above the budget" in killed["reason"] and killed["phase"] in ("built", "filled")
    assert killed["max_rss_bytes"] < budget + 512 * MIB  # polled every 20 ms: stopped on its way up

    config = layout_config(SHAPES, "mha")
    result = find_max_batch(setting("mha"), budget, base=param_bytes(config, torch.float32) + 400 * MIB,
                            slope=bytes_per_utterance(config, torch.float32, 1, NEW_TOKENS), tolerance=0.25,
                            max_tries=4, log=lambda _: None)
    ok = {t["batch_size"]: t for t in result["tries"] if t["status"] == "ok"}
    assert result["max_batch"] >= 1 and result["max_batch"] in ok
    assert ok[result["max_batch"]]["peak_memory_bytes"] <= budget
    assert all(t["status"] in ("killed", "refused", "ok") for t in result["tries"])
    assert all(b <= result["max_batch"] for b, t in ok.items() if t["peak_memory_bytes"] <= budget)
    if result["fail_batch"] is not None:
        assert result["fail_batch"] > result["max_batch"]


@pytest.mark.slow
def test_cli_finds_the_largest_batches(tmp_path):
    """End to end on test-tiny shapes with a 600 MiB budget: every layout's largest batch fits, the exact default fits
    more utterances than MHA, and the throughput rounds ran at those batches."""
    out = tmp_path / "capacity"
    proc = run_script("run_benchmark.py", [
        "--find_max_batch", "--size", "test-tiny", "--num_beams", "3", "--new_tokens", str(NEW_TOKENS),
        "--memory_budget", "600MiB", "--capacity_layouts", "mha", "mla-default", "--search_tolerance", "0.25",
        "--max_tries", "4", "--throughput_rounds", "1", "--output_dir", str(out)], cwd=ROOT, env=fresh_env(),
        timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "capacity.json").read_text())
    assert {p.name for p in out.iterdir()} == {"capacity.json", "capacity.md", "capacity.png"}
    limits = {s["layout"]: s for s in results["searches"]}
    for search in limits.values():
        fitted = [t for t in search["tries"] if t["batch_size"] == search["max_batch"]]
        assert fitted and fitted[0]["status"] == "ok" and fitted[0]["peak_memory_bytes"] <= 600 * MIB
        assert search["fail_batch"] is None or search["fail_batch"] > search["max_batch"]
    assert limits["mla-default"]["max_batch"] > limits["mha"]["max_batch"] >= 1
    throughput = results["throughput"][0]
    assert throughput["batch_sizes"] == {k: v["max_batch"] for k, v in limits.items()}
    assert sum(len(r) for r in throughput["measured"].values()) + len(throughput["errors"]) == 2  # 1 round each
    assert "| 6 | 3 | MLA exact default |" in (out / "capacity.md").read_text()


def test_cli_refuses_converter_settings(tmp_path):
    proc = run_script("run_benchmark.py", ["--find_max_batch", "--size", "test-tiny", "--kv_lora_rank", "16",
                                           "--output_dir", str(tmp_path / "x")], cwd=ROOT)
    assert proc.returncode == 1
    assert "--find_max_batch measures the layouts" in proc.stderr and "--kv_lora_rank" in proc.stderr


def test_resume_reuses_only_a_run_of_the_same_settings(tmp_path):
    run = dict(size="small", model_name_or_path=None, dtype="float32", device="cpu", budget_bytes=GIB,
               decode_steps=2, attn_implementation="sdpa")
    search = dict(layout="mha", num_beams=5, new_tokens=100, max_batch=7)
    path = tmp_path / "capacity.json"
    path.write_text(json.dumps(dict(run=run, searches=[search])))
    assert earlier_searches(str(path), run) == {("mha", 5, 100): search}
    with pytest.raises(ValueError, match=r"same settings, but found \(earlier, now\) \{'budget_bytes'"):
        earlier_searches(str(path), dict(run, budget_bytes=2 * GIB))
    assert earlier_searches(None, run) == {}
