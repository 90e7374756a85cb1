"""Nothing silently wrong, class 1: non-atomic writes. A kill -9 mid-write, a failing baseline or
--overwrite_output_dir never leaves a half-written or merged folder (the other classes: test_reliability.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import run_eval
from whisper_mla import transcription
import run_finetune
from helpers import ROOT
from whisper_mla.audio import SpeechDataError
from whisper_mla.io import (
    CheckpointError,
    atomic_checkpoint_files,
    atomic_output_dir,
    check_output_dir,
    from_pretrained_strict,
)
from whisper_mla.training.distillation import DistillationTrainer
from modeling_whisper_mla import WhisperMLAForConditionalGeneration


from reliability_helpers import (  # noqa: F401 (fixtures)
    broken_copy,
    cli,
    clips,
    eval_args,
    finetune_args,
    snapshot,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


# --------------------------------------------------------------------------------------------- 1. atomic writes


def test_atomic_output_dir_replaces_as_a_whole_and_keeps_the_old_folder_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("old")
    (out / "stale.jsonl").write_text("from an older run")
    with pytest.raises(ValueError, match=r"Expected an empty or new --output_dir, but found 2 entries .*"
                                         r"--overwrite_output_dir"):
        check_output_dir(str(out), overwrite=False)

    with pytest.raises(RuntimeError, match="failed mid-write"):
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "results.json"), "w").write("new")
            raise RuntimeError("failed mid-write")
    assert snapshot(out) == {"results.json": b"old", "stale.jsonl": b"from an older run"}
    assert os.listdir(tmp_path) == ["out"], "the temporary folder was not removed"

    with atomic_output_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "results.json"), "w").write("new")
    assert snapshot(out) == {"results.json": b"new"}  # replaced, not merged: the stale file is gone
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_refuses_folders_it_would_wrongly_delete(tmp_path, monkeypatch):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "model.safetensors").write_text("someone's model")
    with pytest.raises(ValueError, match=r"expects only what this script writes there \(results.json\), but found "
                                         r"1 entry \(model.safetensors\)"):
        check_output_dir(str(tmp_path / "eval"), overwrite=True, allowed=["results.json"])
    monkeypatch.chdir(tmp_path / "eval")
    with pytest.raises(ValueError, match="is \\(or holds\\) the current working folder"):
        check_output_dir(str(tmp_path), overwrite=True)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(ValueError, match="'.' is \\(or holds\\) the current working folder"):
        check_output_dir(".")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="Expected a folder .* but found the file"):
        check_output_dir(str(tmp_path / "file"))


KILL_CHILD = r"""
import os, shutil, signal, sys
sys.path.insert(0, sys.argv[1])
from whisper_mla import io
mode, target, new_dir, kill_at = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
step = 0

def step_done():
    global step
    step += 1
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def dying(function):
    def wrapper(*args, **kwargs):
        step_done()
        result = function(*args, **kwargs)
        step_done()
        return result
    return wrapper

os.replace, os.remove, os.rmdir, shutil.rmtree = (dying(f) for f in (os.replace, os.remove, os.rmdir, shutil.rmtree))
if mode == "folder_without_exchange":  # as on a system without renameat2: two renames
    io._exchange = lambda a, b: False
io._exchange = dying(io._exchange)
manager = io.atomic_checkpoint_files(target) if mode == "checkpoint_files" else io.atomic_output_dir(target, True)
with manager as tmp:
    for name in sorted(os.listdir(new_dir)):
        shutil.copyfile(os.path.join(new_dir, name), os.path.join(tmp, name))
        step_done()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["folder", "folder_without_exchange", "checkpoint_files"])
def test_kill_at_every_step_of_an_overwrite_leaves_old_or_new(tiny_checkpoint_dirs, tmp_path, mode):
    """SIGKILL at each file write and each rename/delete of an overwrite: the folder is the complete old or the
    complete new checkpoint, never a mix. With `checkpoint_files` it may also lack config.json (it does not load);
    without an atomic exchange it may be briefly absent, the old folder then kept aside whole."""
    _, mla_dir = tiny_checkpoint_dirs
    old = snapshot(mla_dir)
    new_dir = broken_copy(mla_dir, tmp_path / "new")  # same files, other weights and model card
    weights = load_file(os.path.join(new_dir, "model.safetensors"))
    save_file({k: 2 * v for k, v in weights.items()}, os.path.join(new_dir, "model.safetensors"),
              metadata={"format": "pt"})
    open(os.path.join(new_dir, "README.md"), "a").write("\nnew\n")
    new = snapshot(new_dir)
    extras = {"checkpoint-1/trainer_state.json": b"{}", "all_results.json": b"{}"}  # a training run's other files
    seen = set()
    for kill_at in range(1, 200):
        target = tmp_path / f"kill{kill_at}" / "out"
        shutil.copytree(mla_dir, target)
        if mode == "checkpoint_files":
            for name, content in extras.items():
                os.makedirs(os.path.dirname(target / name), exist_ok=True)
                (target / name).write_bytes(content)
        child = subprocess.run([sys.executable, "-c", KILL_CHILD, ROOT, mode, str(target), new_dir, str(kill_at)],
                               capture_output=True, text=True, timeout=60)
        state = snapshot(target)
        if mode == "checkpoint_files":
            assert {k: state.pop(k) for k in extras} == extras, "the run's other files were touched"
            if "config.json" not in state:
                seen.add("not loadable")
            else:
                assert state in (old, new), f"a mix that loads after a kill at step {kill_at}"
                seen.add("old" if state == old else "new")
        elif state is None and mode == "folder_without_exchange":
            aside = [p for p in os.listdir(target.parent) if p.startswith(".out.old-")]
            assert len(aside) == 1 and snapshot(target.parent / aside[0]) == old
            seen.add("absent")
        else:
            assert state in (old, new), f"a mix after a kill at step {kill_at}"
            seen.add("old" if state == old else "new")
        if child.returncode == 0:
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.returncode == 0 and state == new
    also_seen = {"checkpoint_files": {"not loadable"}, "folder_without_exchange": {"absent"}}.get(mode, set())
    assert seen == {"old", "new"} | also_seen
    from_pretrained_strict(WhisperMLAForConditionalGeneration, str(target))


def test_run_eval_with_a_broken_baseline_leaves_earlier_results(tiny_checkpoint_dirs, clips, tmp_path):
    """The issue's case: --overwrite_output_dir and a bad --baseline_model used to leave new predictions beside old
    results. Now the baseline is checked before any work, and nothing in the folder changes."""
    mha_dir, mla_dir = tiny_checkpoint_dirs
    out = tmp_path / "out"
    run_eval.main(eval_args(mla_dir, clips / "good.json", out))
    before = snapshot(out)
    assert set(before) == {"results.json", "predictions.jsonl"}
    broken = broken_copy(mha_dir, tmp_path / "broken", drop="model.decoder.layers.1.fc1.weight")
    with pytest.raises(CheckpointError, match=r"broken' does not match WhisperForConditionalGeneration: it lacks 1 "
                                              r"weight \(model.decoder.layers.1.fc1.weight\)"):
        run_eval.main(eval_args(mla_dir, clips / "good.json", out, "--overwrite_output_dir", "--baseline_model",
                                broken))
    assert snapshot(out) == before


def test_run_eval_overwrite_never_deletes_a_model_folder(tiny_checkpoint_dirs, clips, tmp_path):
    """--output_dir mistyped as the model folder: replacing it as a whole would delete the model."""
    _, mla_dir = tiny_checkpoint_dirs
    model = broken_copy(mla_dir, tmp_path / "model")
    with pytest.raises(ValueError, match=r"expects only what this script writes there \(results.json, "
                                         r"predictions.jsonl, baseline_predictions.jsonl\), but found \d+ entries "
                                         r"\(README.md, config.json"):
        run_eval.main(eval_args(model, clips / "good.json", model, "--overwrite_output_dir"))
    assert snapshot(model) == snapshot(mla_dir)


def test_run_eval_failing_mid_evaluation_writes_nothing(tiny_checkpoint_dirs, clips, tmp_path, monkeypatch):
    mha_dir, mla_dir = tiny_checkpoint_dirs
    evaluate = transcription.evaluate_model
    calls = []

    def fail_on_the_baseline(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the baseline")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(run_eval, "evaluate_model", fail_on_the_baseline)
    with pytest.raises(RuntimeError, match="baseline"):
        run_eval.main(eval_args(mla_dir, clips / "good.json", tmp_path / "out", "--baseline_model", mha_dir))
    assert not (tmp_path / "out").exists()  # no predictions.jsonl of the first model without its results.json
    assert os.listdir(tmp_path) == []


def test_finetune_refuses_a_folder_holding_an_earlier_final_model(tiny_checkpoint_dirs, clips, tmp_path):
    """A folder with a final model but no checkpoint-N used to be written into (merged)."""
    _, mla_dir = tiny_checkpoint_dirs
    out = tmp_path / "out"
    shutil.copytree(mla_dir, out)
    with pytest.raises(ValueError, match=r"Expected an empty or new --output_dir, but found \d+ entries .*"
                                         r"--overwrite_output_dir"):
        run_finetune.main(finetune_args(mla_dir, clips / "good.json", out, "--trainable", "mla"))
    assert snapshot(out) == snapshot(mla_dir)


def test_interrupted_overwrite_run_leaves_no_earlier_model(tiny_checkpoint_dirs, clips, tmp_path, monkeypatch):
    """Interrupted once training has started, an --overwrite_output_dir run must not leave the previous run's final
    model where the new one is expected: the old folder is gone as a whole, and the folder does not load."""
    _, mla_dir = tiny_checkpoint_dirs
    out = tmp_path / "out"
    shutil.copytree(mla_dir, out)
    (out / "checkpoint-7").mkdir()
    (out / "notes.txt").write_text("stale")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DistillationTrainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_finetune.main(finetune_args(mla_dir, clips / "good.json", out, "--trainable", "mla",
                                        "--overwrite_output_dir"))
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert not (out / "notes.txt").exists() and not (out / "checkpoint-7").exists()
    with pytest.raises(CheckpointError, match="Expected config.json in the checkpoint folder"):
        from_pretrained_strict(WhisperMLAForConditionalGeneration, str(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old folder was not left aside either


def test_overwrite_and_a_failing_input_keep_the_old_run(tiny_checkpoint_dirs, clips, tmp_path):
    """Before training starts (here: bad data), --overwrite_output_dir has deleted nothing."""
    _, mla_dir = tiny_checkpoint_dirs
    out = tmp_path / "out"
    shutil.copytree(mla_dir, out)
    with pytest.raises(SpeechDataError, match="No file or folder exists at .*nowhere.json"):
        run_finetune.main(finetune_args(mla_dir, tmp_path / "nowhere.json", out, "--overwrite_output_dir"))
    assert snapshot(out) == snapshot(mla_dir)


def test_final_save_failing_leaves_no_loadable_mix(tiny_checkpoint_dirs, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    out = tmp_path / "out"
    shutil.copytree(mla_dir, out)
    with pytest.raises(OSError):
        with atomic_checkpoint_files(str(out)) as tmp:
            shutil.copyfile(os.path.join(mla_dir, "config.json"), os.path.join(tmp, "config.json"))
            raise OSError("disk full")
    assert snapshot(out) == snapshot(mla_dir)  # an exception before the commit changes nothing


@pytest.mark.slow
def test_run_benchmark_keeps_earlier_results_unless_told_and_then_replaces_them(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    args = ["--size", "test-tiny", "--output_dir", str(out), "--kv_lora_rank", "16", "--batch_sizes", "1",
            "--new_tokens", "3", "--num_beams", "1", "--rounds", "1", "--attentions", "mha", "mla-absorbed",
            "--device", "cpu"]
    refused = cli("run_benchmark.py", args, tmp_path)
    assert refused.returncode == 1, refused.stderr
    assert "Expected an empty or new --output_dir" in refused.stderr and "--overwrite_output_dir" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_text("weights")
    mistyped = cli("run_benchmark.py", [*args[:3], str(tmp_path / "model"), *args[4:], "--overwrite_output_dir"],
                   tmp_path)
    assert mistyped.returncode == 1 and "model.safetensors" in mistyped.stderr, mistyped.stderr
    assert (tmp_path / "model" / "model.safetensors").read_text() == "weights"

    replaced = cli("run_benchmark.py", [*args, "--overwrite_output_dir"], tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert "earlier" not in results
    assert {r["attention"] for r in results["records"]} == {"mha", "mla-absorbed"}
    assert sorted(os.listdir(out)) == sorted(["results.json", "results.md", "memory_vs_batch_size.png",
                                              "cache_vs_batch_size.png", "tokens_per_s_vs_batch_size.png"])
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".bench")]  # no temporary sibling left
