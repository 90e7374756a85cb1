"""Evaluate a Whisper or Whisper-MLA checkpoint: word error rate, decoder cache size and decode speed.

    python run_eval.py --model_name_or_path out/whisper-small-mla --data test-clean/ --output_dir eval/ \
        --baseline_model openai/whisper-small --batch_size 16

`--data` is anything `whisper_mla.audio.load_speech_dataset` reads: a LibriSpeech-layout folder, a JSON manifest, a
`save_to_disk` folder or a Hub dataset id (with `--split`). The script writes `OUTPUT_DIR/predictions.jsonl` (one
line per utterance) and `OUTPUT_DIR/results.json`; with `--baseline_model` it evaluates a second checkpoint on the
same data, writes `baseline_predictions.jsonl`, and prints a side-by-side Markdown table.

Every input (numbers, output folder, both checkpoints, data) is checked before any decoding; checkpoints load strictly
(a missing, extra or wrongly shaped weight is an error, not a random init); the output files appear together, in one
folder swap at the end, so a failed or killed run leaves OUTPUT_DIR as it was.

Other scripts reuse the evaluation on a model they already hold:

    from whisper_mla.transcription import evaluate_model
    results = evaluate_model(model, processor, dataset, batch_size=16, generate_kwargs={"num_beams": 1})
    print(results["wer"])
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from whisper_mla.audio import load_speech_dataset
from whisper_mla.metrics import get_normalizer
from whisper_mla.arguments import check_number, run_cli
from whisper_mla.io import atomic_output_dir, check_output_dir
from whisper_mla.transcription import (
    DTYPES,
    build_generate_kwargs,
    LONG_FORM_METHODS,
    evaluate_model,
    load_model_and_processor,
    resolve_device_and_dtype,
    write_predictions,
)
RESULTS_FILE = "results.json"
PREDICTIONS_FILE, BASELINE_PREDICTIONS_FILE = "predictions.jsonl", "baseline_predictions.jsonl"
OUTPUT_FILES = (RESULTS_FILE, PREDICTIONS_FILE, BASELINE_PREDICTIONS_FILE)  # all --overwrite_output_dir may replace


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Whisper or Whisper-MLA checkpoint (folder or Hub id) with its processor."}
    )
    baseline_model: str | None = field(
        default=None,
        metadata={"help": "A second checkpoint (e.g. the MHA original) evaluated on the same data for comparison."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights and cache dtype; auto: float16 on GPU, float32 on CPU.",
                  "choices": ["auto", *DTYPES]},
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1, ...; auto picks cuda if available."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel of the MHA blocks (and of the naive MLA path).",
                  "choices": ["eager", "sdpa"]},
    )
    mla_cache_quantization: str | None = field(
        default=None,
        metadata={"help": "int8: Whisper-MLA checkpoints decode with the int8 latent cache (overrides their config; "
                          "an MHA baseline is unaffected).", "choices": ["int8"]},
    )


@dataclass
class DataArguments:
    data: str = field(
        metadata={"help": "LibriSpeech-layout folder, JSON manifest, save_to_disk folder or Hub dataset id."}
    )
    split: str | None = field(default=None, metadata={"help": "Split or subfolder, e.g. test-clean (Hub: needed)."})
    audio_column: str = field(default="audio", metadata={"help": "Audio column of a datasets dataset."})
    text_column: str = field(default="text", metadata={"help": "Transcript column of a datasets dataset."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N usable samples."})
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "Skip (and count in results.json) rows with missing/unreadable audio or empty transcripts "
                  "instead of stopping with an error."},
    )


@dataclass
class EvalArguments:
    output_dir: str = field(metadata={"help": "Where predictions.jsonl and results.json are written."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir (holding only an earlier run's results)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Utterances per generate() call."})
    language: str | None = field(
        default=None, metadata={"help": "Spoken language for multilingual models, e.g. en or english."}
    )
    task: str | None = field(
        default=None, metadata={"help": "transcribe or translate (multilingual models).",
                                "choices": ["transcribe", "translate"]}
    )
    num_beams: int = field(default=1, metadata={"help": "Beam width; 1 is greedy decoding."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Cap on generated tokens per utterance (default: the generation config's)."}
    )
    long_form: str = field(
        default="sequential",
        metadata={"help": "How recordings over 30 s are decoded: sequential (Whisper's generate() walks the recording "
                  "window by window, conditioned on the previous window) or chunked (the ASR pipeline: 30 s chunks "
                  "with strides, batched, merged on timestamps).", "choices": list(LONG_FORM_METHODS)},
    )


# --------------------------------------------------------------------------------------------- loading


def validate_arguments(data_args: "DataArguments", eval_args: "EvalArguments") -> None:
    """Numbers that would otherwise fail deep inside generate() or range(), or be ignored."""
    check_number("--batch_size", eval_args.batch_size, minimum=1)
    check_number("--num_beams", eval_args.num_beams, minimum=1, fix="pass 1 for greedy decoding or a wider beam")
    check_number("--max_new_tokens", eval_args.max_new_tokens, minimum=1, optional=True)
    check_number("--max_samples", data_args.max_samples, minimum=1, optional=True,
                 fix="pass a positive count, or leave it out to evaluate everything")


def comparison_table(results: dict, baseline: dict) -> str:
    """Markdown table of a model and its baseline; cache reduction is relative to the baseline."""
    rows = ["| model | WER | ortho WER | cache bytes/token | cache reduction | peak cache (measured) | tokens/s |",
            "|---|---|---|---|---|---|---|"]
    for entry in (results, baseline):
        reduction = 100 * (1 - entry["cache_bytes_per_token"] / baseline["cache_bytes_per_token"])
        speed = entry["decode_tokens_per_s"]
        rows.append(
            f"| {entry['model']} | {entry['wer']:.2f} | {entry['wer_ortho']:.2f} | {entry['cache_bytes_per_token']} "
            f"| {reduction:.1f}% | {entry['peak_cache_bytes']['total'] / 2**20:.2f} MiB "
            f"| {'n/a' if speed is None else f'{speed:.1f}'} |"
        )
    return "\n".join(rows)


def check_checkpoint(name_or_path: str, model_args: ModelArguments, eval_args: EvalArguments) -> None:
    """Everything about one checkpoint that can fail, checked before any work: its config, weights (keys, shapes, the
    safetensors header; on the meta device, so nothing is read or allocated), processor, and that it supports the
    requested cache quantisation, language and task."""
    device, dtype = resolve_device_and_dtype(model_args.device, model_args.dtype)
    model, _ = load_model_and_processor(name_or_path, device, dtype, model_args.attn_implementation,
                                        model_args.mla_cache_quantization, check_only=True)
    check_cache_quantization(model, name_or_path, model_args)
    build_generate_kwargs(model, eval_args.language, eval_args.task, eval_args.num_beams, eval_args.max_new_tokens)


def check_cache_quantization(model, name_or_path: str, model_args: ModelArguments) -> None:
    """--mla_cache_quantization needs a Whisper-MLA model whose shipped code supports it (an MHA baseline is exempt)."""
    if model_args.mla_cache_quantization is not None:
        if name_or_path == model_args.model_name_or_path and model.config.model_type != "whisper_mla":
            raise ValueError(
                f"--mla_cache_quantization applies to Whisper-MLA checkpoints, but found model_type "
                f"{model.config.model_type!r} in {name_or_path!r}; drop the flag or convert the model first."
            )
        mla_blocks = [m for m in model.modules() if type(m).__name__ == "WhisperMLAAttention"]
        if any(not hasattr(m, "pack_int8") for m in mla_blocks):
            raise ValueError(
                f"--mla_cache_quantization expects the checkpoint's own modeling code to support it, but the "
                f"modeling_whisper_mla.py in {name_or_path!r} predates the int8 cache; copy this project's "
                "modeling_whisper_mla.py and configuration_whisper_mla.py into it."
            )


def run_checkpoint(name_or_path: str, dataset, model_args: ModelArguments,
                   eval_args: EvalArguments) -> tuple[dict, list[dict]]:
    """Loads, evaluates and frees one checkpoint. Returns (its results, its predictions)."""
    device, dtype = resolve_device_and_dtype(model_args.device, model_args.dtype)
    model, processor = load_model_and_processor(
        name_or_path, device, dtype, model_args.attn_implementation, model_args.mla_cache_quantization
    )
    generate_kwargs = build_generate_kwargs(
        model, eval_args.language, eval_args.task, eval_args.num_beams, eval_args.max_new_tokens
    )
    results = evaluate_model(model, processor, dataset, eval_args.batch_size, generate_kwargs,
                             normalizer=get_normalizer(eval_args.language), desc=os.path.basename(name_or_path),
                             long_form=eval_args.long_form)
    predictions = results.pop("predictions")
    results.update(model=name_or_path, generate_kwargs=generate_kwargs, device=str(device))
    return results, predictions


def main(args: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser((ModelArguments, DataArguments, EvalArguments))
    argv = sys.argv[1:] if args is None else args
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, eval_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, eval_args = parser.parse_args_into_dataclasses(args=argv)

    # 1. Check every input before any expensive work: numbers, the output folder, both checkpoints.
    validate_arguments(data_args, eval_args)
    check_output_dir(eval_args.output_dir, eval_args.overwrite_output_dir, allowed=OUTPUT_FILES)
    checkpoints = [model_args.model_name_or_path]
    if model_args.baseline_model is not None:
        checkpoints.append(model_args.baseline_model)
    for name_or_path in checkpoints:
        check_checkpoint(name_or_path, model_args, eval_args)
    # 2. Load and decode the data once; both checkpoints see the same utterances.
    dataset = load_speech_dataset(
        data_args.data, split=data_args.split, audio_column=data_args.audio_column,
        text_column=data_args.text_column, max_samples=data_args.max_samples, skip_bad=data_args.skip_bad_samples,
    )
    normalizer = get_normalizer(eval_args.language)
    if not any(normalizer(text).split() for text in dataset.texts):
        raise ValueError(f"Expected reference words to score against, but the {len(dataset)} transcripts of "
                         f"{data_args.data} are empty after normalisation; check the transcripts (and --language).")
    data_info = {"data": data_args.data, "split": data_args.split, "skipped": dataset.skipped,
                 "batch_size": eval_args.batch_size}
    # 3. Evaluate the model, then the baseline (one model in memory at a time).
    results, predictions = run_checkpoint(model_args.model_name_or_path, dataset, model_args, eval_args)
    results.update(data_info)
    baseline_predictions = None
    if model_args.baseline_model is not None:
        baseline, baseline_predictions = run_checkpoint(model_args.baseline_model, dataset, model_args, eval_args)
        results["baseline"] = baseline
        results["cache_reduction_percent"] = 100 * (
            1 - results["cache_bytes_per_token"] / baseline["cache_bytes_per_token"]
        )
        results["comparison_table"] = comparison_table(results, baseline)
    # 4. Report: results and predictions appear together (one folder swap) or not at all.
    with atomic_output_dir(eval_args.output_dir, eval_args.overwrite_output_dir, allowed=OUTPUT_FILES) as tmp:
        write_predictions(os.path.join(tmp, PREDICTIONS_FILE), predictions)
        if baseline_predictions is not None:
            write_predictions(os.path.join(tmp, BASELINE_PREDICTIONS_FILE), baseline_predictions)
        with open(os.path.join(tmp, RESULTS_FILE), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
    print(f"{results['model']}: WER {results['wer']:.2f}, orthographic WER {results['wer_ortho']:.2f} on "
          f"{results['num_samples']} utterances ({results['num_skipped']} skipped); decoder cache "
          f"{results['cache_bytes_per_token']} bytes/token, peak {results['peak_cache_bytes']['total']} bytes.")
    if "comparison_table" in results:
        print(results["comparison_table"])
    return results


if __name__ == "__main__":
    run_cli(main)
