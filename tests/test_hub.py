"""Pushing to the Hub: the converter's and run_finetune.py's --push_to_hub upload a checkpoint that loads, with the
same logits, in a fresh process that downloads it; `push_checkpoint` refuses a folder that would not load.

The Hub is `hub_stand_in.HubStandIn`, a local server speaking the Hub's HTTP API."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from convert_whisper_to_mla import main as convert_main
from hub_stand_in import DEFAULT_GITATTRIBUTES, hub_stand_in  # noqa: F401 (hub_stand_in: a fixture)
from modeling_whisper_mla import WhisperMLAForConditionalGeneration
import run_finetune
from test_remote_code import run_fresh
from finetune_helpers import fast_args, sources  # noqa: F401 (sources: a fixture)
from whisper_mla.hub import REMOTE_CODE_FILES, push_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


# What a pushed Whisper-MLA checkpoint holds: weights, configs, the code that loads it, its card, the processor.
CHECKPOINT_FILES = {"config.json", "model.safetensors", "generation_config.json", *REMOTE_CODE_FILES, "README.md",
                    "processor_config.json", "tokenizer.json", "tokenizer_config.json"}
# What AutoModelForSpeechSeq2Seq.from_pretrained needs of them.
# what from_pretrained downloads: the modeling file imports the pipeline file (model.pipeline_class), so it comes too
MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json", "configuration_whisper_mla.py",
               "modeling_whisper_mla.py", "pipeline_whisper_mla.py"}


@pytest.fixture(scope="module")
def converted_and_pushed(hub_stand_in, tiny_checkpoint_dirs, tmp_path_factory):  # noqa: F811
    """convert_whisper_to_mla.py --push_to_hub --hub_model_id user/tiny-mla on the tiny MHA model: the output folder."""
    mha_dir, _ = tiny_checkpoint_dirs
    out = tmp_path_factory.mktemp("converted") / "tiny-mla"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["convert_whisper_to_mla.py", "--model_name_or_path", mha_dir,
                                          "--output_dir", str(out), "--kv_lora_rank", "8", "--kept_key_dims", "2",
                                          "--push_to_hub", "--hub_model_id", "user/tiny-mla"])
        convert_main()
    return out


def read_folder(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in os.listdir(folder) if (folder / name).is_file()}


def load_in_fresh_process(hub, repo_id: str, tmp_path) -> tuple[dict, torch.Tensor, dict]:
    """Loads `repo_id` from the stand-in in a new interpreter that cannot import this project, with an empty cache.

    Returns:
        what the process reported (the model's class and module, the files from_pretrained put in the cache, the
        folder of a full snapshot_download), its logits on fixed inputs, and the inputs.
    """
    inputs = {"features": torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1)),
              "ids": torch.tensor([[50257, 50362, 1000, 2000]])}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = hub.environment(hf_home=tmp_path / "hf_home")
    out = run_fresh(f"""
        import json, os
        os.environ.pop("HF_HUB_OFFLINE", None)  # run_fresh loads folders offline; this process downloads
        os.environ.update({env!r})
        import torch
        from huggingface_hub import constants, snapshot_download
        from transformers import AutoModelForSpeechSeq2Seq

        def cached_files():
            snapshots = os.path.join(constants.HF_HUB_CACHE, "models--" + {repo_id!r}.replace("/", "--"), "snapshots")
            return sorted(os.path.relpath(os.path.join(folder, name), snapshots).split(os.sep, 1)[1]
                          for folder, _, names in os.walk(snapshots) for name in names)

        inputs = torch.load("inputs.pt", weights_only=True)
        model = AutoModelForSpeechSeq2Seq.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(inputs["features"], decoder_input_ids=inputs["ids"]).logits, "logits.pt")
        loaded = cached_files()
        print(json.dumps({{"cls": type(model).__name__, "module": type(model).__module__, "loaded": loaded,
                           "snapshot": snapshot_download({repo_id!r})}}))
    """, tmp_path)
    return out, torch.load(tmp_path / "logits.pt", weights_only=True), inputs


def check_pushed_checkpoint_loads(hub, repo_id: str, folder, tmp_path) -> None:
    """A fresh process downloads exactly the pushed files (byte for byte), and its model computes the logits of the
    model saved in `folder`."""
    start = len(hub.log)
    out, logits, inputs = load_in_fresh_process(hub, repo_id, tmp_path)
    assert out["cls"] == "WhisperMLAForConditionalGeneration"
    assert out["module"].startswith("transformers_modules.")  # the class came from the downloaded code
    assert set(out["loaded"]) == MODEL_FILES
    pushed = hub.files(repo_id)
    # Every pushed file served once: snapshot_download reused what from_pretrained had cached.
    assert sorted(hub.downloads(repo_id, since=start)) == sorted(pushed)
    snapshot = {str(path.relative_to(out["snapshot"])): path.read_bytes()
                for path in Path(out["snapshot"]).rglob("*") if path.is_file()}
    assert snapshot == pushed
    expected = WhisperMLAForConditionalGeneration.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, expected(inputs["features"], decoder_input_ids=inputs["ids"]).logits)
    assert hub.unhandled == []


def test_converter_pushes_the_checkpoint(hub_stand_in, converted_and_pushed):  # noqa: F811
    hub, out = hub_stand_in, converted_and_pushed
    _, push = hub.commits("user/tiny-mla")  # the Hub's commit of .gitattributes, then one commit of everything
    assert set(push.paths_added) == CHECKPOINT_FILES == set(os.listdir(out))
    files = hub.files("user/tiny-mla")
    assert files.pop(".gitattributes") == DEFAULT_GITATTRIBUTES.encode()
    assert files == read_folder(out)
    assert push.tree["model.safetensors"].sha256 is not None  # stored through LFS (uploaded to the storage)
    assert {path for path, entry in push.tree.items() if entry.sha256 is not None} == {"model.safetensors"}
    config = json.loads(files["config.json"])
    assert config["model_type"] == "whisper_mla"
    assert config["auto_map"]["AutoModelForSpeechSeq2Seq"] == "modeling_whisper_mla.WhisperMLAForConditionalGeneration"
    card = files["README.md"].decode()
    assert "pipeline_tag: automatic-speech-recognition" in card and "| kv_lora_rank | 8 |" in card
    assert hub.unhandled == []


def test_push_again_changes_nothing(hub_stand_in, converted_and_pushed):  # noqa: F811
    """Pushing the same folder again makes no commit: every file is found unchanged on the Hub."""
    commits = len(hub_stand_in.commits("user/tiny-mla"))
    assert push_checkpoint(str(converted_and_pushed), "user/tiny-mla") == "user/tiny-mla"
    assert len(hub_stand_in.commits("user/tiny-mla")) == commits
    assert hub_stand_in.unhandled == []


@pytest.mark.slow
def test_fresh_process_loads_the_pushed_checkpoint(hub_stand_in, converted_and_pushed, tmp_path):  # noqa: F811
    check_pushed_checkpoint_loads(hub_stand_in, "user/tiny-mla", converted_and_pushed, tmp_path)


@pytest.mark.slow
def test_run_finetune_pushes_a_loadable_checkpoint(hub_stand_in, tiny_checkpoint_dirs, sources, tmp_path,  # noqa: F811
                                                   monkeypatch):
    """Two steps of training with a checkpoint saved at each (the Trainer pushes the model as they are saved), then
    the final push: the repo holds the top of output_dir (our checkpoint and model card), never a checkpoint-N
    folder. The token comes from --hub_token alone."""
    hub = hub_stand_in
    mha_dir, _ = tiny_checkpoint_dirs
    data, _ = sources["manifest"]
    out = tmp_path / "ft"
    monkeypatch.delenv("HF_TOKEN")
    run_finetune.main(fast_args(mha_dir, data, out, "--trainable", "mla", "--save_strategy", "steps",
                                "--save_steps", "1", "--push_to_hub", "--hub_model_id", "user/ft",
                                "--hub_token", hub.token))
    files = hub.files("user/ft")
    assert files.pop(".gitattributes") == DEFAULT_GITATTRIBUTES.encode()
    assert files == read_folder(out)  # the top of output_dir: no checkpoint-N folder
    assert CHECKPOINT_FILES <= set(files) and any(name.startswith("checkpoint-") for name in os.listdir(out))
    card = files["README.md"].decode()
    assert "## Recovery training (run_finetune.py)" in card and "pipeline_tag: automatic-speech-recognition" in card
    config = json.loads(files["config.json"])
    assert config["model_type"] == "whisper_mla" and "AutoModelForSpeechSeq2Seq" in config["auto_map"]
    (tmp_path / "fresh").mkdir()
    check_pushed_checkpoint_loads(hub, "user/ft", out, tmp_path / "fresh")


def test_push_refuses_a_folder_that_would_not_load(hub_stand_in, tiny_checkpoint_dirs, tmp_path):  # noqa: F811
    """An MHA checkpoint, an MLA checkpoint missing its modeling code, one whose config lost auto_map, no folder:
    each refused with expected / found / fix, before any request reaches the Hub."""
    hub = hub_stand_in
    mha_dir, mla_dir = tiny_checkpoint_dirs
    no_code = tmp_path / "no_code"
    shutil.copytree(mla_dir, no_code)
    (no_code / "modeling_whisper_mla.py").unlink()
    no_auto_map = tmp_path / "no_auto_map"
    shutil.copytree(mla_dir, no_auto_map)
    config = json.loads((no_auto_map / "config.json").read_text())
    del config["auto_map"]
    (no_auto_map / "config.json").write_text(json.dumps(config))
    requests = len(hub.log)
    cases = [
        (mha_dir, FileNotFoundError, r"but found no configuration_whisper_mla.py, modeling_whisper_mla.py, "
                                     r"pipeline_whisper_mla.py; save it with whisper_mla.hub.save_mla_checkpoint"),
        (no_code, FileNotFoundError, r"but found no modeling_whisper_mla.py; save it with"),
        (no_auto_map, ValueError, r"to map AutoModelForSpeechSeq2Seq .* but found auto_map=\{\}; save it with"),
        (tmp_path / "missing", FileNotFoundError, r"no folder exists at"),
    ]
    for folder, error, message in cases:
        with pytest.raises(error, match=message):
            push_checkpoint(str(folder), "user/refused")
    assert len(hub.log) == requests and "user/refused" not in hub.repos
