"""benchmarks/sweep_compression.py: a setting string becomes the converter's arguments, and bad ones are refused."""

import importlib.util
import os

import pytest
import torch

from configuration_whisper_mla import WhisperMLAConfig
from modeling_whisper_mla import expected_cache_bytes_per_utterance
from whisper_mla.conversion import convert_whisper_to_mla
from helpers import tiny_whisper_model


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_compression",
                                                  os.path.join(ROOT, "benchmarks", "sweep_compression.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_become_converter_arguments(sweep):
    assert sweep.parse_setting("self=mha,cross=mha", 0) is None
    assert sweep.parse_setting("self=352,cross=shared,stride=3,oa=decoder_self", 0) == {
        "kept_key_dims": 0, "kv_lora_rank": 352, "output_aware": ["decoder_self"], "cross_latent_stride": 3,
        "cross_attention_latent": "shared", "cross_kv_lora_rank": None, "mla_targets": ["decoder_self", "decoder_cross"]}
    assert sweep.parse_setting("self=mha,cross=shared:252,stride=2,pool=subsample", 4) == {
        "kept_key_dims": 4, "kv_lora_rank": 1, "cross_latent_stride": 2, "cross_latent_pooling": "subsample",
        "cross_attention_latent": "shared", "cross_kv_lora_rank": 252, "mla_targets": ["decoder_cross"]}
    assert sweep.parse_setting("self=96,cross=per_layer:96", 4)["cross_attention_latent"] == "per_layer"


@pytest.mark.parametrize("spec, message", [
    ("self=96,cross=shared,rank=3", "expects self=...,cross=..."),
    ("cross=shared", "expects self=...,cross=..."),
    ("self=96,cross=per_layer:128", "share kv_lora_rank"),
    ("self=96,cross=pooled", "cross expects per_layer:R"),
    ("self=mha,cross=shared,stride=two", "stride expects a positive integer"),
])
def test_bad_settings_are_refused(sweep, spec, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_setting(spec, 0)


def test_a_stride_setting_converts_and_plots_as_its_own_series(sweep):
    """The parsed arguments are ones the converter takes: the checkpoint caches ceil(1500 / 3) cross frames."""
    kwargs = sweep.parse_setting("self=mha,cross=shared,stride=3,pool=subsample", 0)
    mla = convert_whisper_to_mla(tiny_whisper_model(), **kwargs)
    assert (mla.config.cross_latent_stride, mla.config.cross_latent_pooling) == (3, "subsample")
    unpooled = WhisperMLAConfig(**{**mla.config.to_dict(), "cross_latent_stride": 1})
    frames = mla.config.max_source_positions
    saved = (expected_cache_bytes_per_utterance(unpooled, torch.float32, tokens=0)
             - expected_cache_bytes_per_utterance(mla.config, torch.float32, tokens=0))
    assert saved == (frames - -(-frames // 3)) * mla.config.d_model * 4  # one float32 latent of d_model per frame
    assert sweep.cross_layout("self=mha,cross=shared,stride=3") == "shared cross latent, one per 3 frames"
    assert sweep.cross_layout("self=mha,cross=shared") == "shared cross latent"
    assert sweep.cross_layout("self=mha,cross=shared,stride=3,pool=subsample") == (
        "shared cross latent, one per 3 frames (subsample)")


def test_point_labels_name_the_self_latent_and_a_narrowed_cross_width(sweep):
    assert sweep.point_label("self=352,cross=shared,stride=3,oa=decoder_self") == "self 352, oa"
    assert sweep.point_label("self=mha,cross=shared:192") == "self MHA, cross 192"
    assert sweep.point_label("self=96,cross=mha,alloc=spectrum") == "self 96, spectrum"
    assert sweep.point_label("self=192,cross=per_layer:192") == "self 192"  # per-layer width is the self width


def _row(spec, reduction, wers, kwargs=True):
    return {"setting": spec, "converter_kwargs": {} if kwargs else None, "cache_per_utterance": 2**20,
            "reduction_%": reduction, "reduction_int8_%": reduction, **{f"wer_{k}": v for k, v in wers.items()}}


def test_report_from_a_sweep_writes_one_panel_per_eval_set(sweep, tmp_path):
    """--from_sweep redraws table and plot; rows without a requested eval set are refused, not half-plotted."""
    import matplotlib.image

    rows = [_row("self=mha,cross=mha", 0.0, {"a": 9.5, "b": 9.4}, kwargs=False),
            _row("self=384,cross=shared", 85.2, {"a": 9.5, "b": 9.4}),
            _row("self=352,cross=shared,stride=3,oa=decoder_self", 93.2, {"a": 9.3, "b": 10.9})]
    args = sweep.SweepArguments(output_dir=str(tmp_path), eval_sets=["a", "b"])
    sweep.write_report(rows, args)
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0].endswith("| WER a | WER b |") and len(table) == 2 + len(rows)
    assert "| self=352,cross=shared,stride=3,oa=decoder_self | 1.00 MiB | 93.2% | 93.2% | 9.30 | 10.90 |" in table
    one_panel = sweep.SweepArguments(output_dir=str(tmp_path / "one"), eval_sets=["a"])
    os.makedirs(one_panel.output_dir)
    sweep.write_report(rows, one_panel)
    two, one = (matplotlib.image.imread(path) for path in (tmp_path / "sweep.png", tmp_path / "one" / "sweep.png"))
    assert two.shape[1] == 2 * one.shape[1]  # 6.5 inches per panel
    with pytest.raises(ValueError, match=r"lack \['c'\]"):
        sweep.write_report(rows, sweep.SweepArguments(output_dir=str(tmp_path), eval_sets=["a", "c"]))
