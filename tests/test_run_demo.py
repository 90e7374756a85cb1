"""The README's main job end to end, on a tiny random model and generated clips (the real run is the demo itself)."""

import json
import sys

import pytest

import run_demo
import whisper_mla.speech_data as speech_data
from helpers import write_clips


HELD_OUT = ["hello world", "the cat sat on the mat", "testing one two three"]
OTHER = ["good morning to you", "the quick brown fox"]
# tiny config: 2 decoder layers, d_model 16, one utterance = 1500 encoder frames + 100 decoder tokens, float32
MHA_BYTES = 1600 * 2 * 2 * 16 * 4  # keys + values of 16 per block


def held_out_sets(tmp_path) -> tuple[str, str]:
    write_clips(tmp_path / "held_out", HELD_OUT, manifest="held_out.json")
    write_clips(tmp_path / "other", OTHER, sampling_rate=22050, manifest="other.json")
    return str(tmp_path / "held_out" / "held_out.json"), str(tmp_path / "other" / "other.json")


def refuse(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"the default main job ran {what}")
    return fail


def test_default_demo_is_exact_and_calibrates_nothing(tiny_checkpoint_dirs, tmp_path, monkeypatch):
    """The defaults: MHA, the exact default conversion (the same transcripts as MHA) and its int8 cache, plus a given
    checkpoint; no calibration audio is prepared or read."""
    mha_dir, mla_dir = tiny_checkpoint_dirs
    held_out, other = held_out_sets(tmp_path)
    for name in ("collect_calibration_statistics", "load_calibration_audio"):
        monkeypatch.setattr(run_demo, name, refuse(name))
    monkeypatch.setattr(speech_data, "ensure_real_speech", refuse("ensure_real_speech"))
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", [
        "run_demo.py", "--model_name_or_path", mha_dir, "--eval_data", held_out, other, "--max_eval_samples", "2",
        "--checkpoints", mla_dir, "--output_dir", str(out),
    ])
    run_demo.main()
    results = json.loads((out / "results.json").read_text())
    mha, mla, int8, checkpoint = results["results"]
    assert results["calibrated"] is False
    assert [row["short_label"] for row in results["results"]] == [
        "MHA (original)", "MLA default", "MLA default, int8 cache", "mla"]
    assert all(row["num_samples"] == {"held_out": 2, "other": 2} for row in results["results"])
    assert mha["cache_per_utterance"] == MHA_BYTES
    assert mla["cache_per_utterance"] == 1500 * 16 * 4 + 100 * 2 * 16 * 4  # the encoder output once, each input
    assert int8["cache_per_utterance"] == 1500 * (16 + 8) + 100 * 2 * (16 + 8)  # int8 values + two float32 scales
    assert checkpoint["cache_per_utterance"] == 1600 * 2 * (8 + 2 * 2) * 4  # per-layer latents of 8 + 2x2 kept dims
    # exact: token for token the original's transcripts, so the same WER
    for set_name in ("held_out", "other"):
        hypotheses = [[json.loads(line)["hypothesis"] for line in
                       (out / f"predictions_{name}_{set_name}.jsonl").read_text().splitlines()]
                      for name in ("mha", "mla0")]
        assert hypotheses[0] == hypotheses[1]
        assert mla["wer"][set_name] == mha["wer"][set_name]
    table = results["table"]
    assert table.splitlines()[0] == ("| model | cache per 30 s utterance (T=100) | reduction | WER held_out | "
                                     "WER other |")
    reduction = 100 * (1 - mla["cache_per_utterance"] / MHA_BYTES)
    assert f"| MLA self d_model + shared cross (d_model) | {mla['cache_per_utterance'] / 2**20:.2f} MiB | " \
           f"{reduction:.1f}% |" in table
    assert "tokens/s" not in table and "decode_tokens_per_s" not in mha  # speed: run_benchmark.py
    markdown = (out / "results.md").read_text()
    assert table + "\n" in markdown and run_demo.INT8_NOTE in markdown
    assert (out / "results.png").stat().st_size > 10_000


def test_per_layer_comparison_calibrates_once(tiny_checkpoint_dirs, tmp_path, monkeypatch):
    """--compare_per_layer with lossy settings: one calibration pass serves the conversions that read it."""
    mha_dir, _ = tiny_checkpoint_dirs
    held_out, other = held_out_sets(tmp_path)
    calls = []
    collect = run_demo.collect_calibration_statistics
    monkeypatch.setattr(run_demo, "collect_calibration_statistics",
                        lambda *args, **kwargs: calls.append(args[3]) or collect(*args, **kwargs))
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", [
        "run_demo.py", "--model_name_or_path", mha_dir, "--eval_data", held_out, "--compare_per_layer",
        "--calibration_data", other, "--calibration_samples", "2", "--max_eval_samples", "2",
        "--kv_lora_rank", "8", "--kept_key_dims", "2", "--cross_kv_lora_rank", "12", "--output_dir", str(out),
    ])
    run_demo.main()
    results = json.loads((out / "results.json").read_text())
    per_layer, shared, int8 = results["results"][1:]
    assert len(calls) == 1 and results["calibrated"] is True
    assert per_layer["cache_per_utterance"] == 1600 * 2 * (16 + 2 * 2) * 4  # the previous default, clamped to 16
    assert shared["cache_per_utterance"] == 1500 * 12 * 4 + 100 * 2 * (8 + 2 * 2) * 4  # one cross latent of 12
    assert int8["cache_per_utterance"] == 1500 * (12 + 8) + 100 * 2 * (8 + 2 * 2 + 8)
    assert "| MLA self r=8 + shared cross (r=12) |" in results["table"]
    assert "| MLA self r=16 + per-layer cross r=16 (previous default) |" in results["table"]


def test_default_data_builds_only_the_sets_it_reads(monkeypatch, tmp_path):
    """No flags: the held-out multi-speaker sets only (no synthesis, no Asterisk prompts); --real_eval adds its set."""
    built = {"multi_eval": str(tmp_path / "multi_eval.json"), "multi_eval_long": str(tmp_path / "long.json")}
    monkeypatch.setattr(speech_data, "ensure_speech_data", refuse("ensure_speech_data"))
    monkeypatch.setattr(speech_data, "ensure_real_speech", refuse("ensure_real_speech"))
    monkeypatch.setattr(speech_data, "ensure_multi_speaker_speech", lambda: built)
    args, mla_args = run_demo.DemoArguments(), run_demo.MLAArguments()
    settings = run_demo.conversion_settings(args, mla_args, type("Config", (), {"d_model": 384}))
    run_demo.default_data(args, settings, calibrate=False)
    assert args.eval_data == list(built.values()) and mla_args.calibration_data is None
    monkeypatch.setattr(speech_data, "ensure_real_speech",
                        lambda: {"real_eval": tmp_path / "real_eval.json", "real_train": tmp_path / "real_train.json"})
    args = run_demo.DemoArguments(real_eval=True)
    run_demo.default_data(args, settings, calibrate=True)
    assert args.eval_data == list(built.values()) + [str(tmp_path / "real_eval.json")]
    assert mla_args.calibration_data == str(tmp_path / "real_train.json")


@pytest.mark.parametrize("flag", ["--real_eval", "--compare_per_layer", "--checkpoints", "--packaged_model",
                                  "run_benchmark.py"])
def test_help_names_the_optional_work_and_where_speed_is_measured(flag, capsys):
    with pytest.raises(SystemExit):
        run_demo.parse_arguments(["--help"])
    assert flag in capsys.readouterr().out
