"""The README's main job end to end, on a tiny random model and a few real clips (the real run is the demo itself)."""

import json
import sys

import run_demo


def test_demo_writes_table_json_and_png(tiny_mha, tiny_en_processor, tmp_path, monkeypatch):
    from whisper_mla.speech_data import build_real_sets, default_output_dir

    build_real_sets(default_output_dir())  # real speech only; cheap once built
    speech = default_output_dir()
    src = tmp_path / "mha"
    tiny_mha.save_pretrained(src)
    tiny_en_processor.save_pretrained(src)
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", [
        "run_demo.py", "--model_name_or_path", str(src), "--eval_data", str(speech / "real_eval.json"),
        str(speech / "real_train.json"), "--calibration_data", str(speech / "real_train.json"),
        "--calibration_samples", "2", "--max_eval_samples", "2", "--kv_lora_rank", "8", "--kept_key_dims", "2",
        "--cross_attention_latent", "shared", "--cross_kv_lora_rank", "12", "--tokens", "100",
        "--output_dir", str(out),
    ])
    run_demo.main()
    results = json.loads((out / "results.json").read_text())
    mha, per_layer, shared, int8 = results["results"]
    assert all(row["num_samples"] == {"real_eval": 2, "real_train": 2} for row in results["results"])
    # tiny config: 2 decoder layers, d_model 16; one utterance = 1500 frames + 100 tokens, float32
    assert mha["cache_per_utterance"] == 1600 * 2 * 2 * 16 * 4  # MHA: keys + values of 16 per block
    assert per_layer["cache_per_utterance"] == 1600 * 2 * (16 + 2 * 2) * 4  # the previous default, clamped to 16
    assert shared["cache_per_utterance"] == 1500 * 12 * 4 + 100 * 2 * (8 + 2 * 2) * 4  # one cross latent of 12
    assert int8["cache_per_utterance"] == 1500 * (12 + 8) + 100 * 2 * (8 + 2 * 2 + 8)
    assert "| MLA self r=8 + shared cross (r=12) |" in results["table"]
    assert "| MLA self r=16 + per-layer cross r=16 (previous default) |" in results["table"]
    reduction = 100 * (1 - shared["cache_per_utterance"] / mha["cache_per_utterance"])
    assert f"| {reduction:.1f}% |" in results["table"] and "WER real_eval | WER real_train |" in results["table"]
    assert (out / "results.png").stat().st_size > 10_000
    for name in ("mha", "mla0", "mla1", "mla_int8"):
        for set_name in ("real_eval", "real_train"):
            assert len((out / f"predictions_{name}_{set_name}.jsonl").read_text().splitlines()) == 2
