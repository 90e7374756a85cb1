"""The README's main job end to end, on a tiny random model and a few real clips (the real run is the demo itself)."""

import json
import sys

import run_demo


def test_demo_writes_table_json_and_png(tiny_mha, tiny_en_processor, tmp_path, monkeypatch):
    from make_speech_data import build_real_sets, default_output_dir

    build_real_sets(default_output_dir())  # real speech only; cheap once built
    speech = default_output_dir()
    src = tmp_path / "mha"
    tiny_mha.save_pretrained(src)
    tiny_en_processor.save_pretrained(src)
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", [
        "run_demo.py", "--model_name_or_path", str(src), "--eval_data", str(speech / "real_eval.json"),
        "--calibration_data", str(speech / "real_train.json"), "--calibration_samples", "2",
        "--max_eval_samples", "2", "--kv_lora_rank", "8", "--kept_key_dims", "2", "--output_dir", str(out),
    ])
    run_demo.main()
    results = json.loads((out / "results.json").read_text())
    mha, mla, int8 = results["results"]
    assert mha["num_samples"] == mla["num_samples"] == int8["num_samples"] == 2
    # tiny config: 2 decoder layers, MHA 2 x 16 values per block; MLA 8 + 2 heads x 2 kept dims, fp32; int8: those
    # values in one byte each plus two float32 scales
    assert mha["cache_bytes_per_token"] == 2 * 2 * 32 * 4 and mla["cache_bytes_per_token"] == 2 * 2 * 12 * 4
    assert int8["cache_bytes_per_token"] == 2 * 2 * (12 + 8)
    assert "| MLA r=8 |" in results["table"] and "62.5%" in results["table"]
    assert "| MLA r=8 int8 cache |" in results["table"] and "84.4%" in results["table"]
    assert (out / "results.png").stat().st_size > 10_000
    for name in ("mha", "mla", "mla_int8"):
        assert len((out / f"predictions_{name}.jsonl").read_text().splitlines()) == 2
