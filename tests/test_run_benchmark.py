"""run_benchmark.py on a tiny random shape: the files it writes, the exact cache bytes it reports, and paired rounds
that keep the median MLA/MHA ratio when one worker of one round is slowed on purpose.

Speed itself is never asserted: the end-to-end run slows MHA's worker in round 2 of 3 by 1 s per decoding step
(WHISPER_MLA_BENCH_SLOW), while a decoding step of the tiny model takes milliseconds (under 0.1 s even on a busy
2-core machine). The slowed round's ratios are therefore 10x or more off, far beyond the machine's own noise, and
the assertions only need that round to be the outlier: the median must stay inside the range of the two other rounds
(the machine's noise, which no statistic removes) and the spread must be flagged.
"""

import json
import os
import statistics
import sys

import pytest
import torch
from transformers import WhisperConfig

import run_benchmark
from configuration_whisper_mla import WhisperMLAConfig
from helpers import ROOT, fresh_env, random_whisper, run_script
from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla
from whisper_mla.hub import save_mla_checkpoint
from modeling_whisper_mla import expected_cache_bytes_per_token
from whisper_mla.benchmark import (
    ATTENTIONS,
    AUDIO_FRAMES,
    SIZES,
    SLOW_ENV,
    MLA_VARIANTS,
    injected_step_delay,
    load_models,
    timed_generate,
)
from whisper_mla.benchmark_report import machine_description, run_warnings
from whisper_mla.benchmark_rounds import SPREAD_LIMIT, load_between, paired_ratios, rotated


KV_LORA_RANK, KEPT_KEY_DIMS, NEW_TOKENS, BATCH_SIZES, ROUNDS = 16, 4, 4, (1, 2), 3
SLOWED_ROUND, STEP_DELAY_S = 1, 1.0  # MHA's worker, round 2 of 3: 1 s per step against milliseconds
PROMPT = 1  # test-tiny has no language/task tokens: the decoder prompt is the start token only
FRAMES = SIZES["test-tiny"]["max_source_positions"]  # encoder frames the cross-attention cache holds per sequence
MLA_ATTENTIONS = ATTENTIONS[1:]


def expected_cache_bytes(attention: str, sequences: int, new_tokens: int, utterances=None) -> dict[str, int]:
    """Analytic bytes: sequences x cached tokens x bytes per token (all layers), self and cross attention; the cross
    latent is cached once per utterance where beams share it."""
    config = WhisperMLAConfig(**SIZES["test-tiny"], kv_lora_rank=KV_LORA_RANK, kept_key_dims=KEPT_KEY_DIMS,
                              mla_cache_quantization="int8" if attention.endswith("int8") else None,
                              cross_attention_latent="shared" if "shared" in attention else "per_layer")
    per_token = expected_cache_bytes_per_token(config, torch.float32, mha=attention == "mha")
    # generate never feeds the last generated token back, so it is not cached
    return {"self": sequences * (PROMPT + new_tokens - 1) * per_token["self"],
            "cross": (utterances or sequences) * FRAMES * per_token["cross"]}


def values_per_token(attention: str, kind: str = "self") -> float:
    """Cached values per token and layer, in float32 values (bytes / 4); d_model 64, 2 heads, 2 decoder layers.
    A shared cross latent is the encoder output itself (64 values, no kept dims), cached once for both layers."""
    if attention == "mha":
        return 2 * 64
    values = 64 if kind == "cross" and "shared" in attention else KV_LORA_RANK + 2 * KEPT_KEY_DIMS
    if attention.endswith("int8"):
        values = (values + 8) / 4  # int8 values + 2 float32 scales
    return values / 2 if kind == "cross" and "shared" in attention else values


def cache_share(attention: str) -> float:
    """Cache bytes of an attention over MHA's at NEW_TOKENS generated tokens, from the analytic bytes."""
    mla, mha = (expected_cache_bytes(a, 1, NEW_TOKENS) for a in (attention, "mha"))
    return (mla["self"] + mla["cross"]) / (mha["self"] + mha["cross"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One benchmark run with MHA slowed in one round: (output dir, results.json, terminal output)."""
    out = tmp_path_factory.mktemp("benchmark")
    command = [
        "--size", "test-tiny", "--output_dir", str(out),
        "--batch_sizes", *map(str, BATCH_SIZES), "--new_tokens", str(NEW_TOKENS), "--num_beams", "1",
        "--rounds", str(ROUNDS), "--kv_lora_rank", str(KV_LORA_RANK), "--kept_key_dims", str(KEPT_KEY_DIMS),
        "--device", "cpu",
    ]
    proc = run_script("run_benchmark.py", command, cwd=ROOT, timeout=1800,
                      env=fresh_env(**{SLOW_ENV: f"mha:{SLOWED_ROUND}:{STEP_DELAY_S}"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


@pytest.mark.slow
def test_records_have_exact_cache_bytes(run):
    _, results, _ = run
    records = results["records"]
    assert [r.get("error") for r in records] == [None] * len(records)
    assert sorted((r["attention"], r["batch_size"]) for r in records) == sorted(
        (a, b) for a in ATTENTIONS for b in BATCH_SIZES
    )
    for r in records:
        assert (r["device"], r["device_name"]) == ("cpu", machine_description("cpu"))
        assert r["model"] == "whisper-test-tiny (random weights)"
        assert (r["num_beams"], r["new_tokens"], r["prompt_tokens"]) == (1, NEW_TOKENS, PROMPT)
        expected = expected_cache_bytes(r["attention"], r["batch_size"], NEW_TOKENS)
        assert (r["cache_bytes_self"], r["cache_bytes_cross"]) == (expected["self"], expected["cross"])
        assert r["cache_bytes"] == expected["self"] + expected["cross"]
        assert r["values_per_token_per_layer_self"] == values_per_token(r["attention"], "self")
        assert r["values_per_token_per_layer_cross"] == values_per_token(r["attention"], "cross")
        # the worker's peak holds at least its weights and the encoder output it keeps for every round
        encoder_bytes = r["batch_size"] * FRAMES * SIZES["test-tiny"]["d_model"] * 4
        assert r["peak_memory_bytes"] > r["param_bytes"] + encoder_bytes
        assert [m["round"] for m in r["rounds"]] == list(range(ROUNDS))
        # each round: batch tokens per step; the record: the median and range over the rounds
        for m in r["rounds"]:
            assert m["decode_tokens_per_s"] * m["decode_step_ms"] / 1000 == pytest.approx(r["batch_size"])
        for metric in ("decode_tokens_per_s", "decode_step_ms", "first_step_s", "decode_tokens_per_cpu_s"):
            values = [m[metric] for m in r["rounds"]]
            assert (r[metric], r[f"{metric}_min"], r[f"{metric}_max"]) == (
                statistics.median(values), min(values), max(values)), metric

    by_key = {(r["attention"], r["batch_size"]): r for r in records}
    for batch in BATCH_SIZES:
        mha = by_key["mha", batch]["cache_bytes"]
        for attention in MLA_ATTENTIONS:
            assert by_key[attention, batch]["cache_bytes"] / mha == pytest.approx(cache_share(attention), rel=1e-12)
            if "shared" not in attention:  # self and cross cache the same values per token
                assert by_key[attention, batch]["cache_bytes"] / mha == values_per_token(attention) / (2 * 64)


@pytest.mark.slow
def test_rounds_rotate_and_record_threads_and_load(run):
    _, results, _ = run
    assert results["run"]["num_threads"] == 1 and results["run"]["rounds"] == ROUNDS
    assert {r["num_threads"] for r in results["records"]} == {1}
    assert [(r["batch_size"], r["round"], r["order"]) for r in results["rounds"]] == [
        (batch, i, rotated(list(ATTENTIONS), i)) for batch in BATCH_SIZES for i in range(ROUNDS)
    ]
    cpus = os.cpu_count()
    for load in [results["load"]["before"], results["load"]["during"], *results["rounds"]]:
        assert 0 <= load["other_cpus"] <= cpus and 0 <= load["steal_share"] <= 1
        assert len(load["load_average"]) == 3
    # the wall-clock spans: 2 s of sampling before the run; the run holds every round; a slowed round holds MHA's
    # NEW_TOKENS delayed steps (its other settings take milliseconds per step)
    assert results["load"]["before"]["seconds"] == pytest.approx(2.0, abs=0.5)
    assert results["load"]["during"]["seconds"] >= sum(r["seconds"] for r in results["rounds"])
    for r in results["rounds"]:
        if r["round"] == SLOWED_ROUND:
            assert r["seconds"] >= NEW_TOKENS * STEP_DELAY_S


@pytest.mark.slow
def test_slowed_round_leaves_the_median_ratio_and_is_flagged(run):
    out, results, terminal = run
    for mha in (r for r in results["records"] if r["attention"] == "mha"):
        slowed = mha["rounds"][SLOWED_ROUND]
        # each of the NEW_TOKENS - 1 timed steps waited STEP_DELAY_S: a bound that holds however busy the machine
        assert slowed["decode_step_ms"] >= 1000 * STEP_DELAY_S
        assert slowed["decode_tokens_per_s"] <= mha["batch_size"] / STEP_DELAY_S
        assert slowed["decode_tokens_per_s"] < mha["decode_tokens_per_s"] / 10, "the hook did not slow MHA's worker"
    speed = [r for r in results["ratios"] if r["metric"] == "decode_tokens_per_s"]
    assert sorted((r["attention"], r["batch_size"]) for r in speed) == sorted(
        (a, b) for a in MLA_ATTENTIONS for b in BATCH_SIZES
    )
    for ratio in speed:
        others = [v for i, v in enumerate(ratio["rounds"]) if i != SLOWED_ROUND]
        assert ratio["rounds"][SLOWED_ROUND] == ratio["max"] > max(others)
        assert min(others) <= ratio["median"] <= max(others)  # a mean would be pulled far above both
        assert not ratio["steady"] and ratio["spread"] > SPREAD_LIMIT
        label = f"decode tok/s {ratio['attention']}/MHA at batch {ratio['batch_size']}, beams 1"
        assert any(w.startswith(f"Unsteady: {label}") for w in results["warnings"])
        assert f"WARNING: Unsteady: {label}" in terminal
    assert any(SLOW_ENV in w for w in results["warnings"])

    table = markdown_rows((out / "results.md").read_text())
    assert sorted((row["attention"], row["batch"]) for row in table) == sorted(
        (a, str(b)) for a in ATTENTIONS for b in BATCH_SIZES
    )
    for row in table:
        if row["attention"] != "mha":
            assert "⚠ spread" in row["tok/s /MHA"]
            assert row["cache reduction"] == f"{100 * (1 - cache_share(row['attention'])):.1f}%"
    for name in ("memory_vs_batch_size.png", "cache_vs_batch_size.png", "tokens_per_s_vs_batch_size.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def markdown_rows(markdown: str) -> list[dict]:
    """The rows of results.md's main table, as dicts keyed by its header."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| batch | beams | new tokens | attention"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_paired_ratios_cancel_load_shared_within_a_round():
    """Round 2 runs both settings at half speed (a job shared the machine): paired ratios do not move, while the
    ratio of medians would; one MLA measurement off by 2x in round 3 leaves the median and is flagged."""

    def record(attention, tokens_per_s, first_step_s):
        rounds = [dict(round=i, decode_tokens_per_s=t, first_step_s=f)
                  for i, (t, f) in enumerate(zip(tokens_per_s, first_step_s))]
        return dict(attention=attention, batch_size=1, num_beams=1, new_tokens=32, rounds=rounds)

    records = [record("mha", [10.0, 5.0, 10.0, 12.0, 10.0], [1.0, 2.0, 1.0, 1.0, 1.0]),
               record("mla-absorbed", [15.0, 7.5, 30.0, 18.0, 15.0], [0.5, 1.0, 0.5, 0.5, 0.5]),
               record("mla-naive", [4.0, 2.0, 4.0, 4.8, 4.0], [2.0, 4.0, 2.0, 2.0, 2.0])]
    ratios = {(r["attention"], r["metric"]): r for r in paired_ratios(records)}
    absorbed = ratios["mla-absorbed", "decode_tokens_per_s"]
    assert absorbed["rounds"] == pytest.approx([1.5, 1.5, 3.0, 1.5, 1.5])
    assert (absorbed["median"], absorbed["min"], absorbed["max"]) == pytest.approx((1.5, 1.5, 3.0))
    assert absorbed["spread"] == pytest.approx(1.0) and not absorbed["steady"]
    naive = ratios["mla-naive", "decode_tokens_per_s"]
    assert (naive["median"], naive["spread"], naive["steady"]) == (pytest.approx(0.4), pytest.approx(0), True)
    assert ratios["mla-absorbed", "first_step_s"]["median"] == pytest.approx(0.5)
    assert ratios["mla-naive", "first_step_s"]["rounds"] == pytest.approx([2.0] * 5)
    metrics = ("decode_tokens_per_s", "first_step_s")  # no CPU-time figures in these records
    assert set(ratios) == {(a, m) for a in ("mla-absorbed", "mla-naive") for m in metrics}


def test_load_between_counts_other_processes_and_steal(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    start = dict(time=100.0, total=1000.0, idle=600.0, steal=10.0, ours=50.0)
    # 10 s on 2 CPUs: 20 CPU-s, 5 idle, 1 stolen, 4 ours: others kept 10 CPU-s busy, i.e. one CPU
    end = dict(time=110.0, total=1020.0, idle=605.0, steal=11.0, ours=54.0)
    load = load_between(start, end)
    assert (load["seconds"], load["other_cpus"], load["steal_share"]) == pytest.approx((10.0, 1.0, 0.05))
    assert len(load["load_average"]) == 3


def test_warnings_name_a_busy_machine_and_the_fix(monkeypatch):
    monkeypatch.delenv(SLOW_ENV, raising=False)
    quiet = dict(seconds=2.0, other_cpus=0.0, steal_share=0.0, load_average=[0.0, 0.0, 0.0])
    busy = dict(quiet, other_cpus=float(os.cpu_count()))
    assert run_warnings([], dict(before=quiet, during=quiet), num_threads=2, device="cpu") == []
    warnings = run_warnings([], dict(before=quiet, during=busy), num_threads=2, device="cpu")
    assert warnings[0].startswith("The machine was busy (during the measurement)")
    assert "--num_threads 1" in warnings[1] and "idle machine" in warnings[1]


def test_benchmark_takes_the_converters_defaults(monkeypatch, tmp_path):
    """The converter's MLA defaults (one default per setting) on the command line and in a JSON file; an explicit
    value wins."""
    default_rank = MLAArguments().kv_lora_rank
    assert default_rank is WhisperMLAConfig.kv_lora_rank is None  # None: d_model, resolved by the config
    for argv, rank in (([], default_rank), (["--kv_lora_rank", "48"], 48)):
        monkeypatch.setattr(sys, "argv", ["run_benchmark.py", "--output_dir", "x", "--size", "tiny", *argv])
        args, mla_args = run_benchmark.parse_arguments()
        assert (mla_args.kv_lora_rank, args.num_threads, args.rounds) == (rank, 1, 5)
    (tmp_path / "args.json").write_text(json.dumps({"output_dir": "x", "size": "tiny", "kept_key_dims": 2}))
    monkeypatch.setattr(sys, "argv", ["run_benchmark.py", str(tmp_path / "args.json")])
    args, mla_args = run_benchmark.parse_arguments()
    assert (args.size, mla_args.kv_lora_rank, mla_args.kept_key_dims) == ("tiny", default_rank, 2)


def test_an_mla_checkpoint_is_measured_with_the_variants_of_its_layout(tmp_path):
    """--mla_model_name_or_path: by default the variants its cross-attention layout serves; asking for another
    layout's variant is refused, naming the layout found."""
    mha = random_whisper(WhisperConfig(**SIZES["test-tiny"]))
    mha.save_pretrained(tmp_path / "mha")
    save_mla_checkpoint(convert_whisper_to_mla(mha, kv_lora_rank=KV_LORA_RANK, cross_attention_latent="shared"),
                        None, str(tmp_path / "mla"))
    args = run_benchmark.BenchmarkArguments(output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "mha"),
                                            mla_model_name_or_path=str(tmp_path / "mla"))
    _, mlas, _ = load_models(args, MLAArguments())
    assert sorted(mlas) == ["mla-shared-absorbed", "mla-shared-absorbed-int8"]
    args.attentions = ["mha", "mla-absorbed"]
    with pytest.raises(ValueError, match="cross_attention_latent='shared'"):
        load_models(args, MLAArguments())


def test_malformed_slow_hook_is_refused(monkeypatch):
    monkeypatch.setenv(SLOW_ENV, "mha-1-0.5")
    with pytest.raises(ValueError, match="ATTENTION:ROUND:SECONDS_PER_STEP"):
        injected_step_delay("mha", 1)
    monkeypatch.setenv(SLOW_ENV, "mha:1:0.5")
    assert [injected_step_delay(a, r) for a, r in (("mha", 1), ("mha", 0), ("mla-naive", 1))] == [
        0.5, 0.0, 0.0]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_beam_search_cache_holds_every_beam(attention):
    """Self-attention: every beam. Cross-attention: every beam for MHA, one latent per utterance for MLA."""
    model = random_whisper(WhisperConfig(**SIZES["test-tiny"]))
    if attention != "mha":
        model = convert_whisper_to_mla(model, kv_lora_rank=KV_LORA_RANK, kept_key_dims=KEPT_KEY_DIMS,
                                       **MLA_VARIANTS[attention].get("conversion", {}),
                                       **MLA_VARIANTS[attention]["config"])
    batch, beams = 2, 3
    with torch.inference_mode():
        hidden = model.model.encoder(torch.randn(batch, model.config.num_mel_bins, AUDIO_FRAMES)).last_hidden_state
        *_, nbytes, seq_len = timed_generate(model, hidden, NEW_TOKENS, beams)
    assert seq_len == PROMPT + NEW_TOKENS - 1
    assert nbytes == expected_cache_bytes(attention, batch * beams, NEW_TOKENS,
                                          utterances=None if attention == "mha" else batch)
