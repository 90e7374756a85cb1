"""A converted checkpoint records where it came from without the local path of its source (config.json goes to the
Hub with --push_to_hub): a Hub id as such, a local folder by its name and a digest of its weights. And the converter
does no work its settings do not need."""

import json
import sys

import torch
from transformers import WhisperForConditionalGeneration

from whisper_mla.conversion import convert_whisper_to_mla, source_description
from whisper_mla.hub import save_mla_checkpoint


def test_local_source_is_recorded_without_its_path(tiny_mha, tiny_processor, tmp_path):
    source = tmp_path / "private" / "my-whisper"
    tiny_mha.save_pretrained(source)
    loaded = WhisperForConditionalGeneration.from_pretrained(str(source))
    mla = convert_whisper_to_mla(loaded)
    save_mla_checkpoint(mla, tiny_processor, str(tmp_path / "mla"))
    text = (tmp_path / "mla" / "config.json").read_text()
    assert str(tmp_path) not in text and "private" not in text
    provenance = json.loads(text)["mla_conversion"]
    assert provenance["base_model"] is None
    assert provenance["base_model_local"].startswith("my-whisper (local folder, weights sha256 ")

    # the digest names the weights, not the folder: a copy elsewhere matches, other weights do not
    tiny_mha.save_pretrained(tmp_path / "copy" / "my-whisper")
    copy = WhisperForConditionalGeneration.from_pretrained(str(tmp_path / "copy" / "my-whisper"))
    assert source_description(copy) == source_description(loaded)
    with torch.no_grad():
        copy.model.decoder.layers[0].self_attn.k_proj.weight[0, 0] += 1.0
    assert source_description(copy)["base_model_local"] != provenance["base_model_local"]


def test_hub_source_is_recorded_as_its_id(tiny_mha):
    model = WhisperForConditionalGeneration(tiny_mha.config)
    model.config._name_or_path = "openai/whisper-tiny.en"  # what from_pretrained sets for a Hub id
    assert source_description(model) == {"base_model": "openai/whisper-tiny.en"}
    assert convert_whisper_to_mla(model).config.mla_conversion["base_model"] == "openai/whisper-tiny.en"
    model.config._name_or_path = ""
    assert source_description(model) == {"base_model": None}


def test_converter_cli_reads_no_calibration_audio_for_exact_settings(tiny_checkpoint_dirs, tmp_path, monkeypatch,
                                                                     capsys):
    """The exact defaults: --calibration_data is not read (here it does not even exist), and the saved config names
    the source folder without its path."""
    from convert_whisper_to_mla import main as convert_main

    mha_dir, _ = tiny_checkpoint_dirs
    monkeypatch.setattr(sys, "argv", ["convert_whisper_to_mla.py", "--model_name_or_path", mha_dir, "--output_dir",
                                      str(tmp_path / "out"), "--calibration_data", str(tmp_path / "missing.json")])
    convert_main()
    assert "would change no weight, so it is not read" in capsys.readouterr().out
    text = (tmp_path / "out" / "config.json").read_text()
    assert mha_dir not in text
    assert json.loads(text)["mla_conversion"]["base_model_local"].startswith("mha (local folder, weights sha256 ")
