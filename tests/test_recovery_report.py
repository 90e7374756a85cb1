"""benchmarks/recovery_report.py: the recovery run's table from the eval folders, "-" for arms that were not scored."""

import json
import subprocess
import sys

import pytest


def write_eval(root, arm, name, wer, cross_bytes, self_bytes, **extra):
    folder = root / f"eval-{arm}-{name}"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(
        {"wer": wer, "cache_bytes_per_token_split": {"cross": cross_bytes, "self": self_bytes}, **extra}))


def run_report(root, *args):
    return subprocess.run([sys.executable, "benchmarks/recovery_report.py", "--output_dir", str(root),
                           "--steps", "300", "--self_rank", "120", *args], capture_output=True, text=True)


def test_report_rows_cut_and_unscored_arms(tmp_path):
    for name, wer in (("multi_eval", 9.52), ("multi_eval_long", 9.38), ("real_eval", 1.77)):
        write_eval(tmp_path, "mha", name, wer, cross_bytes=1000, self_bytes=1000)
    write_eval(tmp_path, "init", "multi_eval", 40.0, cross_bytes=100, self_bytes=50)
    result = run_report(tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["arm"] for row in rows] == ["mha", "init"]  # the unscored arms have no record
    # MHA 1000*1500 + 1000*100 bytes per utterance; init 100*1500 + 50*100: a 90.3% cut
    assert rows[1]["reduction_%"] == pytest.approx(round(100 * (1 - 155000 / 1600000), 1))
    assert rows[1]["wer_multi_eval"] == 40.0 and "wer_real_eval" not in rows[1]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + 4  # header, rule, mha, init, mla-svd, mla-random
    assert "| 9.52 | 9.38 | 1.77 |" in table[2]
    assert "| 40.00 | - | - |" in table[3]
    assert table[4].endswith("| - | - | - | - | - | - |") and "300 steps" in table[4]


def test_report_without_mha_says_how_to_fix(tmp_path):
    result = run_report(tmp_path)
    assert result.returncode != 0
    assert "eval-mha-" in result.stderr and "run_recovery.py" in result.stderr


def test_report_counts_the_cached_frames_of_a_pooled_cross_latent(tmp_path):
    """run_eval.py's `cross_cache_frames_per_30s` (500 for a stride of 3), not the encoder's 1500 frames."""
    for name in ("multi_eval", "multi_eval_long", "real_eval"):
        write_eval(tmp_path, "mha", name, 9.5, cross_bytes=1000, self_bytes=1000, cross_cache_frames_per_30s=1500)
    write_eval(tmp_path, "init", "multi_eval", 9.3, cross_bytes=100, self_bytes=50, cross_cache_frames_per_30s=500)
    result = run_report(tmp_path, "--cross_rank", "384", "--cross_stride", "3", "--long_steps", "150")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[1]["cache_per_utterance"] == 100 * 500 + 50 * 100
    assert rows[1]["setting"] == "self=120+0,cross=shared:384,stride=3"
    assert "over every 3 frames" in rows[1]["label"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + 6  # --steps 300 and --long_steps 150: mha, init, a short-clip and a final row per arm
    write_eval(tmp_path, "mla-svd", "multi_eval", 8.8, cross_bytes=100, self_bytes=50, cross_cache_frames_per_30s=500)
    without_short = run_report(tmp_path, "--steps", "0", "--long_steps", "150")
    assert without_short.returncode == 0, without_short.stderr
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + 4 and "short clips" not in table[4]  # mha, init, mla-svd, mla-random
    assert "150 steps at 0.0001 on joined 30 s samples" in table[4]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(row["arm"], row["training"]) for row in rows] == [("mha", None), ("init", None),
                                                               ("mla-svd", "long-form stage")]


def test_report_refuses_pooled_results_without_their_frame_count(tmp_path):
    """Results written before run_eval.py recorded the cached frames would count a pooled model's 1500 frames."""
    for name in ("multi_eval", "multi_eval_long", "real_eval"):
        write_eval(tmp_path, "mha", name, 9.5, cross_bytes=1000, self_bytes=1000)
    write_eval(tmp_path, "init", "multi_eval", 9.3, cross_bytes=100, self_bytes=50)
    result = run_report(tmp_path, "--cross_stride", "3")
    assert result.returncode != 0
    assert "cross_cache_frames_per_30s" in result.stderr and "eval-init-" in result.stderr
