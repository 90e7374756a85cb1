"""A saved Whisper-MLA checkpoint loads Hub-natively in a process that cannot import this project."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from convert_whisper_to_mla import main as convert_main
from helpers import (  # noqa: F401 (BLOCK_PROJECT, PROJECT_MODULES, run_fresh: imported from here by other tests)
    BLOCK_PROJECT,
    PROJECT_MODULES,
    noise_clips,
    run_fresh,
    run_script,
)
from whisper_mla.conversion import convert_whisper_to_mla
from whisper_mla.hub import save_mla_checkpoint


@pytest.fixture(scope="module", params=["per_layer", "shared"])
def saved_checkpoint(request, tiny_mha, tiny_processor, tmp_path_factory):
    """Per-layer cross latents, or one shared cross latent narrower than d_model (so its down-projection ships)."""
    shared = dict(cross_attention_latent="shared", cross_kv_lora_rank=10) if request.param == "shared" else dict(
        cross_attention_latent="per_layer")
    model = convert_whisper_to_mla(tiny_mha, kv_lora_rank=6, kept_key_dims=2, **shared)
    path = tmp_path_factory.mktemp("mla_checkpoint")
    save_mla_checkpoint(model, tiny_processor, str(path))
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_pipeline_takes_whisper_path(saved_checkpoint, tiny_processor, tmp_path):
    """The Hub-native pipeline (remote code, fresh process) is the project's WhisperMLAPipeline and transcribes
    exactly as it does in this process: short, chunked long-form with batches, and with timestamps."""
    from pipeline_whisper_mla import WhisperMLAPipeline

    model, path = saved_checkpoint
    (audio,) = noise_clips((40,))
    np.save(tmp_path / "long.npy", audio)
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

    # the same calls in this process, on one thread as the fresh process runs (OMP_NUM_THREADS=1): the same floats
    asr = WhisperMLAPipeline(model=model, tokenizer=tiny_processor.tokenizer,
                             feature_extractor=tiny_processor.feature_extractor)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        short = asr(audio[: 16000 * 3], generate_kwargs={"max_new_tokens": 8})["text"]
        chunked = asr(audio, chunk_length_s=30, batch_size=2, generate_kwargs={"max_new_tokens": 8})["text"]
        chunks = asr(audio[: 16000 * 5], return_timestamps=True, generate_kwargs={"max_new_tokens": 8})["chunks"]
    finally:
        torch.set_num_threads(threads)
    assert short.strip() and chunked.strip() and chunks  # the random model does say something
    assert (out["short"], out["chunked"]) == (short, chunked)
    assert out["chunks"] == [{"text": c["text"], "timestamp": list(c["timestamp"])} for c in chunks]


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


def test_cli_converts_a_folder(tiny_checkpoint_dirs, tmp_path, monkeypatch):
    mha_dir, _ = tiny_checkpoint_dirs
    out = tmp_path / "mla"
    monkeypatch.setattr(sys, "argv", ["convert_whisper_to_mla.py", "--model_name_or_path", mha_dir, "--output_dir",
                                      str(out), "--kv_lora_rank", "4", "--kept_key_dims", "1", "--mla_targets",
                                      "decoder_cross"])
    convert_main()
    config = json.loads((out / "config.json").read_text())
    assert (config["kv_lora_rank"], config["kept_key_dims"], config["mla_targets"]) == (4, 1, ["decoder_cross"])
    assert {"model.safetensors", "tokenizer.json", "modeling_whisper_mla.py"} <= set(os.listdir(out))


@pytest.mark.slow
def test_cli_help(tmp_path):
    result = run_script("convert_whisper_to_mla.py", ["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--kv_lora_rank" in result.stdout and "--key_selection" in result.stdout
