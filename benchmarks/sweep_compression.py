"""WER without training at several MLA settings on real speech: how the converter's defaults were chosen.

    python benchmarks/sweep_compression.py --model tiny.en --settings self=192,cross=per_layer:192 \
        self=mha,cross=shared self=256,cross=shared self=192,cross=shared:320

A setting names the self-attention latent (`self=R` or `self=mha`: not converted) and the cross-attention latent
(`cross=per_layer:R`, `cross=shared` (width d_model: exact), `cross=shared:R`, or `cross=mha`), and optionally how
the self-attention widths are shared out (`alloc=spectrum`: the same total, by each block's spectrum) and which kinds
of blocks are fitted output-aware (`oa=decoder_self`, `oa=decoder_self+decoder_cross`: `--output_aware`), and how
many encoder frames one cached frame of a shared cross latent pools (`stride=N`, the mean; `pool=subsample` keeps every
N-th: `--cross_latent_stride`, `--cross_latent_pooling`; such settings plot as their own series); every converted block
keeps `--kept_key_dims` key dims per head (a shared cross latent keeps none). The packaged real Whisper (tiny.en or
base, imported from PyPI) is converted at each setting, calibrated on `--calibration` (never evaluated), and scored on
each `--eval_sets` manifest: `multi_eval` (several real speakers calibration never heard) first, `real_eval` (the
calibration speaker's voice, held-out prompts) second. The cache column is one 30 s utterance (1500 encoder frames)
with `--tokens` decoder tokens, float32, against MHA's float32 cache; `int8` is the same model with its int8 cache.
Writes OUTPUT_DIR/sweep.json (after every setting), sweep.md (the table) and sweep.png (WER against cache cut, one
panel per eval set, one series per cross-attention layout).
"""

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoProcessor, HfArgumentParser, WhisperForConditionalGeneration

from whisper_mla.audio import load_speech_dataset
from whisper_mla.conversion import (
    collect_calibration_statistics,
    convert_whisper_to_mla,
    load_calibration_audio,
)
from whisper_mla.io import write_json_atomic
from whisper_mla.packaged_models import ensure_packaged_model
from whisper_mla.speech_data import ensure_speech_sets
from modeling_whisper_mla import expected_cache_bytes_per_utterance
from whisper_mla.transcription import build_generate_kwargs, evaluate_model


@dataclass
class SweepArguments:
    output_dir: str = field(default="outputs/sweep")
    model: str = field(default="tiny.en", metadata={"help": "Packaged model: tiny.en or base."})
    settings: list[str] = field(
        default_factory=lambda: ["self=192,cross=per_layer:192", "self=mha,cross=shared", "self=192,cross=shared"],
        metadata={"help": "Settings to convert, e.g. self=192,cross=shared:256 (see the module docstring)."},
    )
    kept_key_dims: int = field(default=4)
    eval_sets: list[str] = field(default_factory=lambda: ["multi_eval", "real_eval"],
                                 metadata={"help": "Manifest names of make_speech_data.py to score."})
    calibration: str = field(default="real_train", metadata={
        "help": "Manifest name (real_train or synthetic_train) or a manifest file, e.g. the recovery scripts' mix of "
                "both (benchmarks/mixed_train_manifest.py)."})
    calibration_samples: int = field(default=64)
    tokens: int = field(default=100, metadata={"help": "Decoder tokens of the utterance the cache column counts."})
    max_eval_samples: int | None = field(default=None)
    from_sweep: str | None = field(
        default=None,
        metadata={"help": "An earlier run's sweep.json: rebuild its table and plot (with --recovered points) without "
                  "converting or scoring again."},
    )
    recovered: list[str] = field(
        default_factory=list,
        metadata={"help": "results.json files of benchmarks/run_recovery.py: each run's SVD-init and distilled "
                  "rows join the table and the plot (an arrow from before to after recovery)."},
    )
    language: str | None = field(default=None, metadata={"help": "For multilingual models, e.g. 'en'."})


def parse_setting(spec: str, kept_key_dims: int) -> dict | None:
    """Converter keyword arguments of a setting such as "self=192,cross=shared:256"; None for MHA itself."""
    parts = dict(part.split("=", 1) for part in spec.split(","))
    if not {"self", "cross"} <= set(parts) <= {"self", "cross", "alloc", "oa", "stride", "pool"}:
        raise ValueError(f"A setting expects self=...,cross=...[,alloc=spectrum][,oa=KIND+KIND][,stride=N]"
                         f"[,pool=subsample], but found {spec!r}; e.g. self=192,cross=shared or "
                         "self=mha,cross=shared:252,stride=2.")
    targets, kwargs = [], {"kept_key_dims": kept_key_dims, "kv_lora_rank": 1}
    if "alloc" in parts:
        kwargs["kv_lora_rank_allocation"] = parts["alloc"]
    if "oa" in parts:
        kwargs["output_aware"] = parts["oa"].split("+")
    if "stride" in parts:
        if not parts["stride"].isdigit():
            raise ValueError(f"stride expects a positive integer (encoder frames per cached frame), but found "
                             f"{parts['stride']!r} in {spec!r}; e.g. self=384,cross=shared,stride=3.")
        kwargs["cross_latent_stride"] = int(parts["stride"])
    if "pool" in parts:
        kwargs["cross_latent_pooling"] = parts["pool"]
    if parts["self"] != "mha":
        targets.append("decoder_self")
        kwargs["kv_lora_rank"] = int(parts["self"])
    cross, _, rank = parts["cross"].partition(":")
    if cross == "shared":
        targets.append("decoder_cross")
        kwargs.update(cross_attention_latent="shared", cross_kv_lora_rank=int(rank) if rank else None)
    elif cross == "per_layer":
        targets.append("decoder_cross")
        kwargs["cross_attention_latent"] = "per_layer"  # not the converter's default
        if "decoder_self" in targets and int(rank) != kwargs["kv_lora_rank"]:
            raise ValueError(f"Per-layer cross and self latents share kv_lora_rank, but found {spec!r}.")
        kwargs["kv_lora_rank"] = int(rank)
    elif cross != "mha":
        raise ValueError(f"cross expects per_layer:R, shared, shared:R or mha, but found {cross!r} in {spec!r}.")
    return {**kwargs, "mla_targets": targets} if targets else None


def main():
    (args,) = HfArgumentParser(SweepArguments).parse_args_into_dataclasses()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.from_sweep is not None:
        with open(args.from_sweep) as f:
            sweep = json.load(f)
        args.model, args.tokens = sweep["model"], sweep["tokens"]
        return write_report(sweep["rows"], args)
    settings = {spec: parse_setting(spec, args.kept_key_dims) for spec in ["self=mha,cross=mha", *args.settings]}
    model_dir = ensure_packaged_model(args.model)
    manifests = ensure_speech_sets([*args.eval_sets, args.calibration])  # only the sets it reads
    processor = AutoProcessor.from_pretrained(model_dir)
    mha = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    eval_sets = {name: list(load_speech_dataset(str(manifests[name]), max_samples=args.max_eval_samples))
                 for name in args.eval_sets}
    calibration = load_calibration_audio(str(manifests.get(args.calibration, args.calibration)),
                                         args.calibration_samples)
    # one calibration pass for every setting: statistics of all decoder blocks
    blocks = [f"decoder.layers.{i}.{attn}" for i in range(mha.config.decoder_layers)
              for attn in ("self_attn", "encoder_attn")]
    stats = collect_calibration_statistics(mha, processor.feature_extractor, calibration, blocks)
    mha_bytes = expected_cache_bytes_per_utterance(mha.config, torch.float32, args.tokens, mha=True)

    rows = []
    for spec, kwargs in settings.items():
        model = mha if kwargs is None else convert_whisper_to_mla(mha, calibration_statistics=stats, **kwargs)
        row = {"setting": spec, "converter_kwargs": kwargs}
        for quantization in (None, "int8"):
            if kwargs is not None:
                model.set_mla_runtime(cache_quantization=quantization)
            utterance = expected_cache_bytes_per_utterance(model.config, torch.float32, args.tokens)
            suffix = "" if quantization is None else "_int8"
            row[f"cache_per_utterance{suffix}"] = utterance
            row[f"reduction{suffix}_%"] = round(100 * (1 - utterance / mha_bytes), 1)
        if kwargs is not None:
            model.set_mla_runtime(cache_quantization=None)
        generate_kwargs = build_generate_kwargs(model, language=args.language)
        for name, eval_set in eval_sets.items():
            row[f"wer_{name}"] = evaluate_model(model, processor, eval_set, generate_kwargs=generate_kwargs,
                                                desc=f"{spec} on {name}")["wer"]
        rows.append(row)
        print(row, flush=True)
        write_json_atomic(os.path.join(args.output_dir, "sweep.json"),  # after every setting: stoppable
                          {"model": args.model, "calibration": args.calibration, "tokens": args.tokens, "rows": rows},
                          indent=2)
    write_report(rows, args)


def write_report(rows: list[dict], args: SweepArguments) -> None:
    """sweep.md (the table, --recovered rows last) and sweep.png (the plot) in args.output_dir."""
    eval_sets = args.eval_sets
    missing = sorted({name for row in rows for name in eval_sets if f"wer_{name}" not in row})
    if missing:
        raise ValueError(f"The report expects every row scored on --eval_sets {eval_sets}, but the rows lack "
                         f"{missing}; pass the --eval_sets the sweep scored.")
    header = " | ".join(f"WER {name}" for name in eval_sets)
    table = [f"| setting | cache per 30 s utterance (T={args.tokens}) | reduction | int8: reduction | {header} |",
             "|---|---|---|---|" + "---|" * len(eval_sets)]
    recovered = [read_recovery(path, args.eval_sets) for path in args.recovered]
    recovered_rows = [{**row, "setting": row["label"], "reduction_int8_%": None} for pair in recovered for row in pair]
    for row in rows + recovered_rows:
        wers = " | ".join(f"{row[f'wer_{name}']:.2f}" for name in eval_sets)
        int8 = "-" if row["reduction_int8_%"] is None else f"{row['reduction_int8_%']}%"
        table.append(f"| {row['setting']} | {row['cache_per_utterance'] / 2**20:.2f} MiB | {row['reduction_%']}% | "
                     f"{int8} | {wers} |")
    with open(os.path.join(args.output_dir, "sweep.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    plot_trade_off(rows, args.eval_sets, os.path.join(args.output_dir, "sweep.png"), args.model, recovered)


def read_recovery(path: str, eval_sets: list[str]) -> tuple[dict, dict]:
    """(SVD init, distilled) rows of a recovery run's results.json, checked to hold every eval set."""
    with open(path) as f:
        rows = {row["arm"]: row for row in json.load(f)["rows"]}
    missing = [f"{arm}: wer_{name}" for arm in ("init", "mla-svd") for name in eval_sets
               if f"wer_{name}" not in rows.get(arm, {})]
    if missing:
        raise ValueError(f"--recovered expects results.json of benchmarks/run_recovery.py with the init and "
                         f"mla-svd rows scored on {eval_sets}, but {path} lacks {missing}; pass --eval_sets the run "
                         "scored, or rerun it.")
    return rows["init"], rows["mla-svd"]


def cross_layout(spec: str) -> str:
    """The series a setting belongs to: its cross-attention layout."""
    parts = dict(part.split("=", 1) for part in spec.split(","))
    cross = parts["cross"].partition(":")[0]
    if int(parts.get("stride", 1)) > 1:
        pooling = "" if parts.get("pool", "mean") == "mean" else f" ({parts['pool']})"
        return f"shared cross latent, one per {parts['stride']} frames{pooling}"
    return {"shared": "shared cross latent", "per_layer": "per-layer cross latents", "mha": "cross-attention MHA"}[cross]


def point_label(spec: str) -> str:
    """A point's short label beside its series (which names the cross layout): the self-attention latent, how it was
    fitted, and the cross width where the setting narrows it, e.g. "self 352, oa" or "self MHA, cross 192"."""
    parts = dict(part.split("=", 1) for part in spec.split(","))
    label = f"self {parts['self'].upper() if parts['self'] == 'mha' else parts['self']}"
    label += ", oa" if "oa" in parts else ""
    label += ", spectrum" if "alloc" in parts else ""
    width = parts["cross"].partition(":")[2]
    return label + (f", cross {width}" if width and not parts["cross"].startswith("per_layer") else "")


def plot_trade_off(rows: list[dict], eval_names: list[str], path: str, model: str, recovered=()) -> None:
    """WER against the float cache reduction, one panel per eval set and one series per cross-attention layout, each
    point labelled with its self-attention latent; MHA as a horizontal line; each (before, after) recovery pair as an
    arrow. The legend sits below the panels, so no label hides a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(eval_names), figsize=(6.5 * len(eval_names), 5.5), squeeze=False)
    mha = next(row for row in rows if row["converter_kwargs"] is None)
    series = {}
    for row in rows:
        if row["converter_kwargs"] is not None:
            series.setdefault(cross_layout(row["setting"]), []).append(row)
    for ax, eval_name in zip(axes[0], eval_names):
        key = f"wer_{eval_name}"
        ax.axhline(mha[key], color="gray", linestyle="--", label="MHA")
        for label, points in series.items():
            points.sort(key=lambda row: row["reduction_%"])
            line, = ax.plot([row["reduction_%"] for row in points], [row[key] for row in points], marker="o",
                            label=label)
            for index, row in enumerate(points):  # alternate above / below: neighbours at one WER stay apart
                ax.annotate(point_label(row["setting"]), (row["reduction_%"], row[key]), fontsize=7,
                            color=line.get_color(), textcoords="offset points", xytext=(4, 4 if index % 2 else -10))
        for index, (before, after) in enumerate(recovered):
            (x0, y0), (x1, y1) = ((row["reduction_%"], row[key]) for row in (before, after))
            ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "black"})
            ax.plot([x0], [y0], marker="x", color="black", linestyle="none",
                    label="recovery's own SVD init (its calibration)" if index == 0 else None)
            ax.plot([x1], [y1], marker="**PDsv^"[index % 6], markersize=11, color="black", linestyle="none",
                    label=f"after recovery: {after['setting']}, {after.get('training') or 'distilled'}")
        ax.set_xlabel("decoder cache reduction, 30 s utterance, float (%)")
        ax.set_ylabel(f"WER on {eval_name} (log scale; MHA {mha[key]:.2f})")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.margins(x=0.1)  # room for the labels of the outermost points
        ax.set_title(eval_name)
    fig.suptitle(f"Whisper {model}: WER against cache cut" + (", before and after recovery" if recovered
                                                               else ", no training"))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * (len(labels) + 1) / 2, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)

if __name__ == "__main__":
    main()
