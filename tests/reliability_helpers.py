"""Fixtures and helpers shared by the reliability tests (test_reliability.py, test_reliability_writes.py): damaged
and broken inputs, folder snapshots, the scripts' fast arguments."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file

from helpers import run_script, tone, write_clips


from finetune_helpers import MLA_FLAGS, TEXTS


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
