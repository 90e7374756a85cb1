"""Nothing silently wrong: for each class of fault a user hits, the exit code or exception, its one-sentence message,
and that nothing valid-looking is left behind.

Classes: non-atomic writes (kill -9 mid-write, a failing baseline, --overwrite_output_dir merging), missing or
mismatched weights, unchecked numbers, inputs of the wrong kind, long runs that die on one damaged clip, text files
that are not UTF-8.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file

import run_eval
from whisper_mla import transcription
import run_finetune
from helpers import ROOT, run_script, tone, write_clips
from whisper_mla.audio import LazyAudio, SpeechDataError, load_audio, load_speech_dataset
from whisper_mla.arguments import check_number
from whisper_mla.io import (
    CheckpointError,
    atomic_checkpoint_files,
    atomic_output_dir,
    check_output_dir,
    from_pretrained_strict,
)
from whisper_mla.training.arguments import ModelArguments
from whisper_mla.training.checkpoints import check_resume_checkpoint
from whisper_mla.training.data import SpeechSeq2SeqDataset
from whisper_mla.training.distillation import DistillationTrainer
from whisper_mla.training.models import check_models
from whisper_mla.training.trainable import restore_lora_adapter, set_trainable
from modeling_whisper_mla import WhisperMLAForConditionalGeneration


from finetune_helpers import MLA_FLAGS, TEXTS


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


# --------------------------------------------------------------------------------------------- helpers


def damaged_flac(path, seconds: float = 3.0) -> None:
    """A FLAC whose header (and so its length) reads fine but whose frames are noise: found only when decoded."""
    soundfile.write(path, tone(220, seconds=seconds), 16000)
    content = path.read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, len(content) - 100, dtype=np.uint8).tobytes()
    path.write_bytes(content[:100] + noise)
    assert soundfile.info(str(path)).frames == 16000 * seconds


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three good FLAC clips with a manifest, and a fourth clip whose body is damaged, in a second manifest."""
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, TEXTS, extension=".flac", manifest=None)
    damaged_flac(folder / "damaged.flac")
    entries = [{"path": f"clip{i}.flac", "text": text} for i, text in enumerate(TEXTS)]
    (folder / "good.json").write_text(json.dumps({"annotation": entries}))
    (folder / "with_damaged.json").write_text(json.dumps(
        {"annotation": entries + [{"path": "damaged.flac", "text": "a damaged clip"}]}))
    return folder


def snapshot(folder) -> dict | None:
    """{relative path: bytes} of every file under `folder`, or None when it does not exist."""
    if not os.path.isdir(folder):
        return None
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = open(path, "rb").read()
    return files


def broken_copy(source, destination, *, drop=None, truncate=False, config=None, poison=None) -> str:
    """A copy of a checkpoint folder with one fault: a tensor dropped, the weights file cut in half, config.json
    fields changed, or a tensor set to NaN."""
    shutil.copytree(source, destination)
    weights_path = os.path.join(destination, "model.safetensors")
    if drop or poison:
        weights = load_file(weights_path)
        if drop:
            del weights[drop]
        if poison:
            weights[poison] = torch.full_like(weights[poison], float("nan"))
        save_file(weights, weights_path, metadata={"format": "pt"})
    if truncate:
        content = open(weights_path, "rb").read()
        open(weights_path, "wb").write(content[: len(content) // 2])
    if config:
        path = os.path.join(destination, "config.json")
        values = json.load(open(path))
        values.update(config)
        json.dump(values, open(path, "w"))
    return str(destination)


def eval_args(model_dir, data, output_dir, *extra) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--data", str(data), "--output_dir", str(output_dir),
            "--batch_size", "3", "--max_new_tokens", "4", "--device", "cpu", *extra]


def finetune_args(model_dir, data, output_dir, *extra) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--train_data", str(data), "--output_dir", str(output_dir),
            "--max_steps", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--save_strategy",
            "no", "--report_to", "none", "--use_cpu", "--seed", "0", "--max_label_length", "16", "--disable_tqdm",
            "true", "--dataloader_num_workers", "0", *MLA_FLAGS, *extra]


def cli(script: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    return run_script(script, args, cwd, timeout=300)


KEPT_AWAY_TENSOR = "model.decoder.layers.0.encoder_attn.kv_a_proj.weight"  # an MLA down-projection


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


# --------------------------------------------------------------------------------------------- 2. strict loading


@pytest.mark.parametrize("fault, message", [
    ({"drop": KEPT_AWAY_TENSOR}, rf"lacks 1 weight \({KEPT_AWAY_TENSOR}\) that the model needs"),
    ({"truncate": True}, r"weights file of checkpoint .* is damaged or truncated \(.*\); copy or save"),
    ({"config": {"kv_lora_rank": 6}}, r"holds 12 weight\(s\) shaped unlike its config.json says \(.*kv_a_proj"
                                      r".*\(12, 16\) in the file, \(10, 16\) from config.json.*restore the "
                                      r"config.json"),
], ids=["missing-tensor", "truncated", "edited-kv_lora_rank"])
def test_run_eval_refuses_a_broken_checkpoint_before_any_work(tiny_checkpoint_dirs, clips, tmp_path, fault, message):
    _, mla_dir = tiny_checkpoint_dirs
    broken = broken_copy(mla_dir, tmp_path / "broken", **fault)
    with pytest.raises(CheckpointError, match=message):
        run_eval.main(eval_args(broken, clips / "good.json", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused(tiny_checkpoint_dirs, clips, tmp_path):
    mha_dir, _ = tiny_checkpoint_dirs
    broken = broken_copy(mha_dir, tmp_path / "nan", poison="model.decoder.layers.0.fc2.weight")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 weight "
                                              r"\(model.decoder.layers.0.fc2.weight\).*use an earlier checkpoint"):
        run_eval.main(eval_args(broken, clips / "good.json", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor_is_refused(tiny_checkpoint_dirs, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    broken = broken_copy(mla_dir, tmp_path / "extra")
    weights = load_file(os.path.join(broken, "model.safetensors"))
    weights["model.decoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)  # an MHA key projection
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"holds 1 weight \(model.decoder.layers.0.self_attn.k_proj.weight\) "
                                              "that the model has no place for"):
        from_pretrained_strict(WhisperMLAForConditionalGeneration, broken, check_only=True)


def test_finetune_refuses_a_broken_start_checkpoint_and_resume_point(tiny_checkpoint_dirs, clips, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    broken = broken_copy(mla_dir, tmp_path / "broken", drop=KEPT_AWAY_TENSOR)
    with pytest.raises(CheckpointError, match=rf"lacks 1 weight \({KEPT_AWAY_TENSOR}\)"):
        run_finetune.main(finetune_args(broken, clips / "good.json", tmp_path / "out", "--trainable", "mla"))
    assert not (tmp_path / "out").exists()
    # The Trainer would restore a checkpoint-N leniently (a missing tensor is a warning): checked up front.
    run = tmp_path / "run"
    broken_copy(mla_dir, run / "checkpoint-2", truncate=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="checkpoint-2' is damaged or truncated"):
        run_finetune.main(finetune_args(mla_dir, clips / "good.json", run, "--resume_from_checkpoint", "latest"))


def test_resume_into_a_differently_converted_model_is_refused(tiny_checkpoint_dirs, clips, tmp_path):
    """The Trainer would copy the checkpoint's weights in leniently: the self-attention-only conversion would keep
    random cross-attention projections (missing keys are only a warning)."""
    mha_dir, mla_dir = tiny_checkpoint_dirs  # mla_dir converts decoder self and cross attention
    run = tmp_path / "run"
    broken_copy(mla_dir, run / "checkpoint-2")
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"checkpoint-2 holds a model unlike the one this run built \(mla_targets="
                                         r"\['decoder_self', 'decoder_cross'\] there, \['decoder_self'\] here; kept_key_indices differs\)"):
        run_finetune.main(finetune_args(mha_dir, clips / "good.json", run, "--resume_from_checkpoint", "latest",
                                        "--mla_targets", "decoder_self"))
    assert sorted(os.listdir(run)) == ["checkpoint-2"]


def test_lora_resume_checks_the_adapter(tiny_checkpoint_dirs, tmp_path):
    """A LoRA run resumes from checkpoint-N/lora_adapter: a checkpoint whose merged model was never written (killed
    right after the Trainer marked it complete) still resumes; an adapter of another rank is refused."""
    from peft import get_peft_model_state_dict

    _, mla_dir = tiny_checkpoint_dirs
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "lora_adapter").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert check_resume_checkpoint(str(checkpoint), lora=True) == str(checkpoint)
    with pytest.raises(CheckpointError, match="Expected config.json .*pass an earlier checkpoint-N"):
        check_resume_checkpoint(str(checkpoint))

    def lora_model(rank):
        model = WhisperMLAForConditionalGeneration.from_pretrained(mla_dir)
        return set_trainable(model, ModelArguments(trainable="lora", lora_r=rank))

    save_file(get_peft_model_state_dict(lora_model(8)), str(checkpoint / "lora_adapter" / "adapter_model.safetensors"))
    restore_lora_adapter(lora_model(8), str(checkpoint))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors does not fit this run's model \(.*size "
                                              r"mismatch.*\); resume with the flags"):
        restore_lora_adapter(lora_model(4), str(checkpoint))


@pytest.mark.slow
def test_cli_prints_one_sentence_and_exits_1(tiny_checkpoint_dirs, clips, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    broken = broken_copy(mla_dir, tmp_path / "broken", drop=KEPT_AWAY_TENSOR)
    for script, args in [("run_eval.py", eval_args(broken, clips / "good.json", tmp_path / "eval")),
                         ("run_finetune.py", finetune_args(broken, clips / "good.json", tmp_path / "train"))]:
        result = cli(script, args, cwd=tmp_path)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "LOAD REPORT" not in result.stderr + result.stdout
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: Checkpoint ") and KEPT_AWAY_TENSOR in last
    assert sorted(os.listdir(tmp_path)) == ["broken"]


# --------------------------------------------------------------------------------------------- 3. numbers


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--batch_size", "-1"), ("--num_beams", "0"),
                                         ("--max_new_tokens", "0"), ("--max_samples", "0")])
def test_run_eval_checks_numbers_first(tmp_path, flag, value):
    with pytest.raises(ValueError, match=rf"{flag} expects a number >= 1.*, but found {value}; "):
        run_eval.main(eval_args("never-loaded", tmp_path / "never-read.json", tmp_path / "out", flag, value))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--per_device_train_batch_size", "0", ">= 1"), ("--learning_rate", "-1", "> 0"), ("--max_steps", "0", ">= 1"),
    ("--gradient_accumulation_steps", "0", ">= 1"), ("--lora_r", "0", ">= 1"), ("--lora_dropout", "1", "< 1"),
    ("--pseudo_label_batch_size", "0", ">= 1"), ("--max_duration_in_seconds", "0", "> 0"),
    ("--generation_num_beams", "0", ">= 1"), ("--max_train_minutes", "nan", "> 0"),
])
def test_run_finetune_checks_numbers_first(tmp_path, flag, value, expected):
    with pytest.raises(ValueError, match=rf"{flag} expects a number .*{expected}.*, but found {value}"):
        run_finetune.main(finetune_args("never-loaded", "never-read.json", tmp_path / "out", flag, value))
    assert not (tmp_path / "out").exists()


def test_max_label_length_beyond_the_model_is_refused_before_conversion(tiny_checkpoint_dirs, clips, tmp_path):
    mha_dir, _ = tiny_checkpoint_dirs  # max_target_positions 64
    with pytest.raises(ValueError, match=r"--max_label_length expects at most the model's max_target_positions "
                                         r"\(64\), but found 100"):
        run_finetune.main(finetune_args(mha_dir, clips / "good.json", tmp_path / "out", "--max_label_length", "100"))


def test_run_eval_refuses_more_new_tokens_than_decoder_positions(tiny_checkpoint_dirs, clips, tmp_path):
    args = eval_args(tiny_checkpoint_dirs[1], clips / "good.json", tmp_path / "out")
    args[args.index("--max_new_tokens") + 1] = "63"  # max_target_positions 64, English-only prompt of 2 tokens
    with pytest.raises(ValueError, match=r"--max_new_tokens expects at most 62 for .* \(its max_target_positions 64 "
                                         r"minus 2 prompt tokens\), but found 63"):
        run_eval.main(args)
    assert not (tmp_path / "out").exists()


def test_unknown_language_of_a_multilingual_model(tiny_mha):
    import copy

    model = copy.copy(tiny_mha)
    model.generation_config = copy.deepcopy(tiny_mha.generation_config)
    model.generation_config.is_multilingual = True
    model.generation_config.lang_to_id = {"<|en|>": 50259, "<|de|>": 50261}
    assert transcription.build_generate_kwargs(model, language="German")["language"] == "German"
    with pytest.raises(ValueError, match=r"--language expects a language .* knows .*, but found 'klingon'; pick one "
                                         r"of de, en\."):
        transcription.build_generate_kwargs(model, language="klingon")
    with pytest.raises(ValueError, match="but found 'fr'; pick one of de, en"):  # a Whisper language, not this model's
        transcription.build_generate_kwargs(model, language="fr")


def test_english_only_student_takes_no_language_prompt(tiny_checkpoint_dirs, clips, tmp_path):
    """--language en used to put <|en|><|transcribe|> into every label of an English-only model, whose prompt at
    inference has neither; and --distill then failed inside generate()."""
    mha_dir, _ = tiny_checkpoint_dirs
    args = run_finetune.parse_arguments(finetune_args(mha_dir, clips / "good.json", tmp_path / "out", "--language",
                                                      "en"))
    model_args, data_args, distill_args, _, training_args = args
    check_models(model_args, data_args, distill_args, training_args)
    assert data_args.language is None
    with pytest.raises(ValueError, match=r"is English-only, so it only transcribes English, but found "
                                         r"language='fr'"):
        run_finetune.main(finetune_args(mha_dir, clips / "good.json", tmp_path / "out", "--language", "fr"))
    assert not (tmp_path / "out").exists()


def test_check_number_message():
    with pytest.raises(ValueError, match=r"^--x expects a number >= 0 and < 1 \(or unset\), but found 1.5; pass a "
                                         r"value in that range\.$"):
        check_number("--x", 1.5, minimum=0, below=1, optional=True)
    check_number("--x", None, minimum=0, optional=True)


# --------------------------------------------------------------------------------------------- 5. wrong kinds of input


def test_run_eval_names_a_missing_or_wrong_model_path(tiny_checkpoint_dirs, clips, tmp_path):
    _, mla_dir = tiny_checkpoint_dirs
    cases = [
        (tmp_path / "no" / "such" / "model", "no folder exists at .*no/such/model'; check the path"),
        (os.path.join(mla_dir, "model.safetensors"), "found the file .*model.safetensors'; pass the folder that holds"),
        (clips, r"Expected config.json in the checkpoint folder .*, but found \d+ entries \(clip0.flac"),
    ]
    for model, message in cases:
        with pytest.raises(CheckpointError, match=message):
            run_eval.main(eval_args(model, clips / "good.json", tmp_path / "out"))
    with pytest.raises(CheckpointError, match="no folder exists at .*missing-baseline"):
        run_eval.main(eval_args(mla_dir, clips / "good.json", tmp_path / "out", "--baseline_model",
                                str(tmp_path / "missing-baseline")))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_eval_refuses_cuda_without_a_gpu(tiny_checkpoint_dirs, clips, tmp_path):
    args = eval_args(tiny_checkpoint_dirs[1], clips / "good.json", tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    with pytest.raises(ValueError, match="--device cuda needs CUDA, but found no CUDA device .*--device cpu"):
        run_eval.main(args)
    args[args.index("--device") + 1] = "gpu0"
    with pytest.raises(ValueError, match="--device expects auto, cpu, cuda or cuda:N, but found 'gpu0'"):
        run_eval.main(args)


# --------------------------------------------------------------------------------------------- 6. damaged clips


def test_lazy_clip_with_a_damaged_body_names_its_entry(clips):
    dataset = load_speech_dataset(clips / "with_damaged.json", lazy=True)  # the header is fine: loads
    audio = dataset[3]["audio"]
    assert isinstance(audio, LazyAudio) and len(audio) == 48000
    with pytest.raises(SpeechDataError, match=r"^entry 3 of manifest .*with_damaged.json: Could not decode audio "
                                              r".*damaged.flac"):
        audio.load()


@pytest.mark.slow
def test_damaged_lazy_clip_mid_training_is_skipped_with_the_flag(tiny_checkpoint_dirs, clips, tmp_path):
    """--trainable all: the encoder trains, so clips are decoded when a step reads them (no up-front pass)."""
    mha_dir, _ = tiny_checkpoint_dirs
    data = clips / "with_damaged.json"
    args = ["--lazy_audio_loading", "--trainable", "all"]
    with pytest.raises(SpeechDataError, match=r"entry 3 of manifest .*damaged.flac.*pass --skip_bad_samples"):
        run_finetune.main(finetune_args(mha_dir, data, tmp_path / "stopped", *args))
    assert not (tmp_path / "stopped" / "config.json").exists()

    metrics = run_finetune.main(finetune_args(mha_dir, data, tmp_path / "out", *args, "--skip_bad_samples"))
    assert metrics["global_step"] == 1 and metrics["train_samples"] == 4  # its header counted it in
    assert metrics["train_skipped_bad_during_training"] == 1 and metrics["train_skipped_bad"] == 0
    assert "1 undecodable skipped during training" in (tmp_path / "out" / "README.md").read_text()
    from_pretrained_strict(WhisperMLAForConditionalGeneration, str(tmp_path / "out"))


@pytest.mark.slow
def test_damaged_lazy_clip_is_dropped_before_pseudo_labelling_and_eval(tiny_checkpoint_dirs, clips, tmp_path):
    """When every clip is decoded up front anyway (encoder outputs precomputed, a teacher's transcripts, the eval
    set), a damaged clip is dropped and counted there, before any work."""
    mha_dir, _ = tiny_checkpoint_dirs
    data = clips / "with_damaged.json"
    args = ["--lazy_audio_loading", "--trainable", "mla", "--distill", "--eval_data", str(data)]
    with pytest.raises(SpeechDataError, match=r"entry 3 of manifest .*damaged.flac"):
        run_finetune.main(finetune_args(mha_dir, data, tmp_path / "stopped", *args))
    metrics = run_finetune.main(finetune_args(mha_dir, data, tmp_path / "out", *args, "--skip_bad_samples"))
    assert metrics["train_samples"] == 3 and metrics["train_skipped_bad"] == 1
    assert metrics["eval_samples"] == 3 and metrics["eval_skipped_bad"] == 1
    assert metrics["train_skipped_bad_during_training"] == 0


def test_dataset_substitutes_the_next_readable_clip(clips, tiny_processor):
    dataset = load_speech_dataset(clips / "with_damaged.json", lazy=True)
    audios = [example["audio"] for example in dataset]
    labels = [[index] for index in range(len(audios))]
    strict = SpeechSeq2SeqDataset(audios, labels, tiny_processor.feature_extractor)
    with pytest.raises(SpeechDataError, match="damaged.flac.*--skip_bad_samples"):
        strict[3]
    lenient = SpeechSeq2SeqDataset(audios, labels, tiny_processor.feature_extractor, skip_bad=True)
    item = lenient[3]
    assert item["labels"] == [0] and item["input_features"].shape == (80, 3000)  # clip 0 (wrapping around)
    np.testing.assert_array_equal(item["input_features"], lenient[0]["input_features"])
    lenient[3]
    assert lenient.num_bad == 1  # counted once, however often it is read


# --------------------------------------------------------------------------------------------- 8. text and audio files


def test_text_files_that_are_not_utf8_are_named(clips, tmp_path):
    manifest = tmp_path / "latin1.json"
    manifest.write_bytes(json.dumps({"annotation": [{"path": str(clips / "clip0.flac"), "text": "caf\u00e9"}]},
                                    ensure_ascii=False).encode("latin-1"))
    with pytest.raises(SpeechDataError, match=r"Expected the manifest .*latin1.json to be UTF-8 text, but byte \d+ "
                                              r"is not .*re-save it as UTF-8"):
        load_speech_dataset(manifest)
    chapter = tmp_path / "libri" / "1" / "2"
    chapter.mkdir(parents=True)
    shutil.copyfile(clips / "clip0.flac", chapter / "1-2-0000.flac")
    (chapter / "1-2.trans.txt").write_bytes("1-2-0000 CAF\u00c9\n".encode("latin-1"))
    with pytest.raises(SpeechDataError, match=r"transcript file .*1-2.trans.txt to be UTF-8"):
        load_speech_dataset(tmp_path / "libri")


def test_transcripts_and_paths_of_the_wrong_type(clips, tmp_path):
    manifest = tmp_path / "typed.json"
    manifest.write_text(json.dumps({"annotation": [{"path": str(clips / "clip0.flac"), "text": ["hello", "world"]},
                                                   {"path": str(clips / "clip1.flac"), "text": TEXTS[1]}]}))
    with pytest.raises(SpeechDataError, match=r"entry 0 .*expected the transcript to be a string, but found list"):
        load_speech_dataset(manifest)
    assert load_speech_dataset(manifest, skip_bad=True).texts == [TEXTS[1]]
    manifest.write_text(json.dumps({"annotation": [{"path": 7, "text": "seven"}]}))
    with pytest.raises(SpeechDataError, match=r"entry 0 .*expected \"path\" to be a file path string, but found 7"):
        load_speech_dataset(manifest)


def test_audio_with_nan_samples_is_refused(tmp_path):
    audio = tone(220, seconds=0.5)
    audio[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", audio, 16000, subtype="FLOAT")
    with pytest.raises(SpeechDataError, match=r"nan.wav holds 1 NaN or infinite samples"):
        load_audio(tmp_path / "nan.wav")
