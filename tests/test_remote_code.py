"""A saved Whisper-MLA checkpoint loads Hub-natively in a process that cannot import this project."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from whisper_mla.conversion import convert_whisper_to_mla
from convert_whisper_to_mla import main as convert_main
from whisper_mla.hub import save_mla_checkpoint


PROJECT_MODULES = ["configuration_whisper_mla", "modeling_whisper_mla", "pipeline_whisper_mla",
                   "convert_whisper_to_mla", "import_ctranslate2", "run_eval", "run_finetune", "whisper_mla"]

# Runs first in the fresh process: any import of a project module fails, so only the checkpoint's own code is used.
BLOCK_PROJECT = f"""
import importlib.abc, sys
class _BlockProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PROJECT_MODULES!r}:
            raise ImportError("project module " + name + " imported outside the checkpoint")
sys.meta_path.insert(0, _BlockProject())
"""


def run_fresh(code: str, tmp_path) -> dict:
    """Runs `code` in a new interpreter outside the repo; the code prints one JSON line last."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    script = tmp_path / "fresh.py"
    script.write_text(BLOCK_PROJECT + textwrap.dedent(code))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["per_layer", "shared"])
def saved_checkpoint(request, tiny_mha, tiny_en_processor, tmp_path_factory):
    """Per-layer cross latents, or one shared cross latent narrower than d_model (so its down-projection ships)."""
    shared = dict(cross_attention_latent="shared", cross_kv_lora_rank=10) if request.param == "shared" else dict(
        cross_attention_latent="per_layer")
    model = convert_whisper_to_mla(tiny_mha, kv_lora_rank=6, kept_key_dims=2, **shared)
    path = tmp_path_factory.mktemp("mla_checkpoint")
    save_mla_checkpoint(model, tiny_en_processor, str(path))
    return model, path


def test_saved_folder_is_self_contained(saved_checkpoint):
    _, path = saved_checkpoint
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_whisper_mla.py",
            "modeling_whisper_mla.py", "pipeline_whisper_mla.py", "processor_config.json", "tokenizer.json", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "whisper_mla"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSpeechSeq2Seq"}
    assert len(config["kept_key_indices"]) == 4  # 2 decoder layers x (self, cross)
    card = (path / "README.md").read_text()
    assert "pipeline_tag: automatic-speech-recognition" in card and "library_name: transformers" in card


def test_fresh_process_loads_with_same_logits(saved_checkpoint, tmp_path):
    model, path = saved_checkpoint
    x = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[50257, 50362, 1000, 2000]])
    torch.save({"features": x, "ids": ids}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(x, decoder_input_ids=ids).logits
    out = run_fresh(f"""
        import json, torch
        from transformers import AutoConfig, AutoModel, AutoModelForSpeechSeq2Seq
        inputs = torch.load("inputs.pt", weights_only=True)
        model = AutoModelForSpeechSeq2Seq.from_pretrained("{path}", trust_remote_code=True)
        base = AutoModel.from_pretrained("{path}", trust_remote_code=True)
        config = AutoConfig.from_pretrained("{path}", trust_remote_code=True)
        with torch.no_grad():
            logits = model(inputs["features"], decoder_input_ids=inputs["ids"]).logits
        torch.save(logits, "logits.pt")
        try:
            AutoModelForSpeechSeq2Seq.from_pretrained("{path}", trust_remote_code=False)
            refused = False
        except ValueError:
            refused = True
        print(json.dumps({{"model": type(model).__name__, "base": type(base).__name__,
                           "config": type(config).__name__, "refused_without_trust": refused}}))
    """, tmp_path)
    assert out == {"model": "WhisperMLAForConditionalGeneration", "base": "WhisperMLAModel",
                   "config": "WhisperMLAConfig", "refused_without_trust": True}
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected)


def test_pipeline_takes_whisper_path(saved_checkpoint, tmp_path):
    _, path = saved_checkpoint
    np.save(tmp_path / "long.npy", (0.1 * np.random.default_rng(0).standard_normal(16000 * 40)).astype(np.float32))
    out = run_fresh(f"""
        import json, numpy as np
        from transformers import pipeline
        asr = pipeline("automatic-speech-recognition", model="{path}", trust_remote_code=True)
        audio = np.load("long.npy")
        short = asr(audio[: 16000 * 3], generate_kwargs={{"max_new_tokens": 8}})
        chunked = asr(audio, chunk_length_s=30, batch_size=2, generate_kwargs={{"max_new_tokens": 8}})
        stamped = asr(audio[: 16000 * 5], return_timestamps=True, generate_kwargs={{"max_new_tokens": 8}})
        print(json.dumps({{"type": asr.type, "cls": type(asr).__name__, "short": short["text"],
                           "chunked": chunked["text"], "chunks": stamped.get("chunks")}}))
    """, tmp_path)
    assert out["type"] == "seq2seq_whisper" and out["cls"] == "WhisperMLAPipeline"
    assert isinstance(out["short"], str) and isinstance(out["chunked"], str)
    assert isinstance(out["chunks"], list) and all(len(c["timestamp"]) == 2 for c in out["chunks"])


def test_cli_refuses_bad_inputs_before_any_work(tiny_checkpoint_dirs, tmp_path, monkeypatch):
    """A non-empty output folder, an MLA checkpoint as the source, a missing folder, a bad calibration batch size:
    one sentence each, and the user's folder untouched."""
    mha_dir, mla_dir = tiny_checkpoint_dirs
    (tmp_path / "keep.txt").write_text("user data")
    cases = [
        ([mha_dir, str(tmp_path)], r"Expected an empty or new --output_dir.*overwrite_output_dir"),
        ([mla_dir, str(tmp_path / "out")], r"expects a Whisper \(MHA\) checkpoint, but found a Whisper-MLA"),
        ([str(tmp_path / "missing"), str(tmp_path / "out")], r"no folder exists at"),
        ([mha_dir, str(tmp_path / "out"), "--calibration_batch_size", "-4"],
         r"--calibration_batch_size expects a number >= 1, but found -4"),
    ]
    for (source, output, *extra), message in cases:
        monkeypatch.setattr(sys, "argv", ["convert_whisper_to_mla.py", "--model_name_or_path", source,
                                          "--output_dir", output, *extra])
        with pytest.raises(ValueError, match=message):
            convert_main()
    assert os.listdir(tmp_path) == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "user data"


def test_cli_converts_a_folder(tiny_mha, tiny_en_processor, tmp_path, monkeypatch):
    src, out = tmp_path / "mha", tmp_path / "mla"
    tiny_mha.save_pretrained(src)
    tiny_en_processor.save_pretrained(src)
    monkeypatch.setattr(sys, "argv", ["convert_whisper_to_mla.py", "--model_name_or_path", str(src), "--output_dir",
                                      str(out), "--kv_lora_rank", "4", "--kept_key_dims", "1", "--mla_targets",
                                      "decoder_cross"])
    convert_main()
    config = json.loads((out / "config.json").read_text())
    assert (config["kv_lora_rank"], config["kept_key_dims"], config["mla_targets"]) == (4, 1, ["decoder_cross"])


def test_cli_help():
    import convert_whisper_to_mla

    result = subprocess.run([sys.executable, convert_whisper_to_mla.__file__, "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--kv_lora_rank" in result.stdout and "--key_selection" in result.stdout
