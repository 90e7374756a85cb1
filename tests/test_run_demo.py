"""The README's main job end to end, on a tiny random model and generated clips (the real run is the demo itself)."""

import json
import sys

import run_demo
from helpers import write_clips


HELD_OUT = ["hello world", "the cat sat on the mat", "testing one two three"]
OTHER = ["good morning to you", "the quick brown fox"]


def test_demo_writes_table_json_and_png(tiny_checkpoint_dirs, tmp_path, monkeypatch):
    mha_dir, _ = tiny_checkpoint_dirs
    write_clips(tmp_path / "held_out", HELD_OUT, manifest="held_out.json")
    write_clips(tmp_path / "other", OTHER, sampling_rate=22050, manifest="other.json")
    held_out, other = tmp_path / "held_out" / "held_out.json", tmp_path / "other" / "other.json"
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", [
        "run_demo.py", "--model_name_or_path", mha_dir, "--eval_data", str(held_out), str(other),
        "--calibration_data", str(other), "--calibration_samples", "2", "--max_eval_samples", "2",
        "--kv_lora_rank", "8", "--kept_key_dims", "2", "--cross_attention_latent", "shared",
        "--cross_kv_lora_rank", "12", "--tokens", "100", "--output_dir", str(out),
    ])
    run_demo.main()
    results = json.loads((out / "results.json").read_text())
    mha, per_layer, shared, int8 = results["results"]
    assert all(row["num_samples"] == {"held_out": 2, "other": 2} for row in results["results"])
    # tiny config: 2 decoder layers, d_model 16; one utterance = 1500 frames + 100 tokens, float32
    assert mha["cache_per_utterance"] == 1600 * 2 * 2 * 16 * 4  # MHA: keys + values of 16 per block
    assert per_layer["cache_per_utterance"] == 1600 * 2 * (16 + 2 * 2) * 4  # the previous default, clamped to 16
    assert shared["cache_per_utterance"] == 1500 * 12 * 4 + 100 * 2 * (8 + 2 * 2) * 4  # one cross latent of 12
    assert int8["cache_per_utterance"] == 1500 * (12 + 8) + 100 * 2 * (8 + 2 * 2 + 8)
    assert "| MLA self r=8 + shared cross (r=12) |" in results["table"]
    assert "| MLA self r=16 + per-layer cross r=16 (previous default) |" in results["table"]
    reduction = 100 * (1 - shared["cache_per_utterance"] / mha["cache_per_utterance"])
    assert f"| {reduction:.1f}% |" in results["table"] and "WER held_out | WER other |" in results["table"]
    assert (out / "results.png").stat().st_size > 10_000
    for name in ("mha", "mla0", "mla1", "mla_int8"):
        for set_name, texts in (("held_out", HELD_OUT), ("other", OTHER)):
            predictions = [json.loads(line) for line in
                           (out / f"predictions_{name}_{set_name}.jsonl").read_text().splitlines()]
            assert [p["reference"] for p in predictions] == texts[:2]
