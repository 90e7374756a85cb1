"""Evaluate a Whisper or Whisper-MLA checkpoint: word error rate, decoder cache size and decode speed.

    python run_eval.py --model_name_or_path out/whisper-small-mla --data test-clean/ --output_dir eval/ \
        --baseline_model openai/whisper-small --batch_size 16

`--data` is anything `audio_data.load_speech_dataset` reads: a LibriSpeech-layout folder, a JSON manifest, a
`save_to_disk` folder or a Hub dataset id (with `--split`). The script writes `OUTPUT_DIR/predictions.jsonl` (one
line per utterance) and `OUTPUT_DIR/results.json`; with `--baseline_model` it evaluates a second checkpoint on the
same data, writes `baseline_predictions.jsonl`, and prints a side-by-side Markdown table.

Every input (numbers, output folder, both checkpoints, data) is checked before any decoding; checkpoints load strictly
(a missing, extra or wrongly shaped weight is an error, not a random init); the output files appear together, in one
folder swap at the end, so a failed or killed run leaves OUTPUT_DIR as it was.

Other scripts reuse the evaluation on a model they already hold:

    from run_eval import evaluate_model
    results = evaluate_model(model, processor, dataset, batch_size=16, generate_kwargs={"num_beams": 1})
    print(results["wer"])
"""

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, HfArgumentParser
from transformers.models.whisper.english_normalizer import BasicTextNormalizer
from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

from audio_data import SAMPLING_RATE, load_speech_dataset
from modeling_whisper_mla import expected_cache_bytes_per_token
from wer_utils import corpus_wer, normalize_english
from whisper_mla.arguments import check_number, run_cli
from whisper_mla.io import atomic_output_dir, check_output_dir, checkpoint_config, from_pretrained_strict


logger = logging.getLogger(__name__)

WHISPER_MODEL_TYPES = ("whisper", "whisper_mla")
ENGLISH = ("en", "english", "<|en|>")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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


# --------------------------------------------------------------------------------------------- loading


def validate_arguments(data_args: "DataArguments", eval_args: "EvalArguments") -> None:
    """Numbers that would otherwise fail deep inside generate() or range(), or be ignored."""
    check_number("--batch_size", eval_args.batch_size, minimum=1)
    check_number("--num_beams", eval_args.num_beams, minimum=1, fix="pass 1 for greedy decoding or a wider beam")
    check_number("--max_new_tokens", eval_args.max_new_tokens, minimum=1, optional=True)
    check_number("--max_samples", data_args.max_samples, minimum=1, optional=True,
                 fix="pass a positive count, or leave it out to evaluate everything")


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"--device expects auto, cpu, cuda or cuda:N, but found {device!r}; pick one of those."
            ) from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} needs CUDA, but found no CUDA device on this machine; pass --device "
                             "cpu or auto.")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device} expects a GPU index below {torch.cuda.device_count()} (the GPUs "
                             f"found), but found {device.index}; pass one of those.")
    if dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, DTYPES[dtype]


def load_model_and_processor(
    name_or_path: str,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    mla_cache_quantization: str | None = None,
    check_only: bool = False,
):
    """Loads a Whisper or Whisper-MLA checkpoint (eval mode) and its processor; `mla_cache_quantization` overrides a
    Whisper-MLA checkpoint's cache precision.

    Remote code is trusted only for checkpoints whose config says model_type "whisper_mla" (the code this project
    ships with every Whisper-MLA checkpoint); anything that is not Whisper is refused. Loading is strict
    (`whisper_mla.io.from_pretrained_strict`): missing, unexpected or mis-shaped weights are an error. With
    `check_only` the model is built on the meta device: every check, no weights read.

    Returns:
        (model, processor)
    """
    model_type = checkpoint_config(name_or_path).get("model_type")
    if model_type not in WHISPER_MODEL_TYPES:
        raise ValueError(
            f"Expected a Whisper or Whisper-MLA checkpoint (model_type in {list(WHISPER_MODEL_TYPES)}) at "
            f"{name_or_path!r}, but found model_type {model_type!r}; pass a Whisper checkpoint, or convert one with "
            "convert_whisper_to_mla.py."
        )
    trust_remote_code = model_type == "whisper_mla"
    kwargs = {"dtype": dtype}
    if mla_cache_quantization is not None and trust_remote_code:
        kwargs["mla_cache_quantization"] = mla_cache_quantization
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = from_pretrained_strict(AutoModelForSpeechSeq2Seq, name_or_path, check_only=check_only,
                                   trust_remote_code=trust_remote_code, **kwargs)
    if not check_only:
        model = model.to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Expected a Whisper processor (feature extractor + tokenizer) next to the model in {name_or_path!r}, "
            f"but loading it failed: {err}; save it there with processor.save_pretrained(...)."
        ) from err
    if not (hasattr(processor, "feature_extractor") and hasattr(processor, "tokenizer")):
        raise ValueError(
            f"Expected a Whisper processor (feature extractor + tokenizer) next to the model in {name_or_path!r}, "
            f"but found only a {type(processor).__name__}; save the full processor there with "
            "processor.save_pretrained(...)."
        )
    return model, processor


# --------------------------------------------------------------------------------------------- decoding


def build_generate_kwargs(
    model, language: str | None = None, task: str | None = None, num_beams: int = 1, max_new_tokens: int | None = None
) -> dict:
    """generate() keyword arguments. language/task go to Whisper's own arguments (never forced_decoder_ids).

    English-only models take neither: English transcription is dropped as redundant, anything else is refused. A
    language the model does not know, or more new tokens than its decoder has positions for, is refused here rather
    than inside generate().
    """
    english_only = getattr(model.generation_config, "is_multilingual", None) is False
    kwargs = {"num_beams": num_beams}
    if max_new_tokens is not None:
        prompt = 2 if english_only else 4  # <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>
        limit = model.config.max_target_positions - prompt
        if max_new_tokens > limit:
            raise ValueError(
                f"--max_new_tokens expects at most {limit} for {model.name_or_path or 'this model'} (its "
                f"max_target_positions {model.config.max_target_positions} minus {prompt} prompt tokens), but found "
                f"{max_new_tokens}; pass a smaller value or leave it out."
            )
        kwargs["max_new_tokens"] = max_new_tokens
    if english_only:
        wants_other = (language is not None and language.lower() not in ENGLISH) or task == "translate"
        if wants_other:
            raise ValueError(
                f"{model.name_or_path or 'The model'} is English-only, so it only transcribes English, but found "
                f"language={language!r}, task={task!r}; drop --language/--task or use a multilingual checkpoint."
            )
        return kwargs
    if language is not None:
        known = getattr(model.generation_config, "lang_to_id", None) or {}
        if known and language_token(language) not in known:
            codes = sorted(token.strip("<|>") for token in known)
            raise ValueError(
                f"--language expects a language {model.name_or_path or 'the model'} knows (a code or an English name, "
                f"e.g. en or english), but found {language!r}; pick one of {', '.join(codes[:20])}"
                f"{', ...' if len(codes) > 20 else ''}."
            )
        kwargs["language"] = language
    if task is not None:
        kwargs["task"] = task
    return kwargs


def language_token(language: str) -> str | None:
    """"de", "german" or "<|de|>" -> "<|de|>", as Whisper's generate() reads --language; None if unknown."""
    language = language.lower()
    if language.startswith("<|") and language.endswith("|>"):
        return language
    if language in TO_LANGUAGE_CODE:
        return f"<|{TO_LANGUAGE_CODE[language]}|>"
    return f"<|{language}|>" if language in TO_LANGUAGE_CODE.values() else None


def _count_generated_tokens(sequences: torch.Tensor, special_ids: set[int]) -> int:
    """Text and timestamp tokens in the returned sequences: prompt, end-of-text and padding are not counted."""
    special = torch.tensor(sorted(special_ids), device=sequences.device)
    return int((~torch.isin(sequences, special)).sum())


@torch.no_grad()
def transcribe(
    model, processor, audios: list[np.ndarray], batch_size: int = 16, generate_kwargs: dict | None = None,
    desc: str = "transcribing",
) -> tuple[list[str], int, float]:
    """Batched greedy/beam transcription of 16 kHz waveforms.

    Clips up to 30 s are padded to Whisper's 30 s window (no attention mask needed). A batch holding a longer clip
    is decoded with Whisper's sequential long-form algorithm, which needs the attention mask and timestamps.

    Returns:
        (hypotheses, generated token count, seconds spent in generate())
    """
    generate_kwargs = dict(generate_kwargs or {})
    feature_extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    window = feature_extractor.n_samples  # 30 s at 16 kHz
    special_ids = set(tokenizer.all_special_ids)
    hypotheses, num_tokens, seconds = [], 0, 0.0
    for start in tqdm(range(0, len(audios), batch_size), desc=desc, unit="batch"):
        batch = audios[start : start + batch_size]
        kwargs = dict(generate_kwargs)
        if max(len(a) for a in batch) <= window:
            inputs = feature_extractor(batch, sampling_rate=SAMPLING_RATE, return_tensors="pt")
        else:
            inputs = feature_extractor(
                batch, sampling_rate=SAMPLING_RATE, return_tensors="pt", truncation=False, padding="longest",
                return_attention_mask=True,
            )
            kwargs.update(attention_mask=inputs.attention_mask.to(model.device), return_timestamps=True)
        features = inputs.input_features.to(model.device, model.dtype)  # (B, n_mels, frames)
        _synchronize(model.device)
        tic = time.perf_counter()
        sequences = model.generate(features, **kwargs)
        _synchronize(model.device)
        seconds += time.perf_counter() - tic
        if not isinstance(sequences, torch.Tensor):  # a dict when the caller asked for one
            sequences = sequences["sequences"]
        num_tokens += _count_generated_tokens(sequences, special_ids)
        hypotheses += [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]
    return hypotheses, num_tokens, seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- metrics


def get_normalizer(language: str | None):
    """Whisper's English normaliser for English (the default), its basic normaliser for other languages."""
    if language is None or language.lower() in ENGLISH:
        return normalize_english
    return BasicTextNormalizer()


def compute_wer(references: list[str], hypotheses: list[str], normalizer=normalize_english) -> dict:
    """Corpus WER x100 after normalisation ("wer") and on the raw text ("wer_ortho"), plus the normalised texts."""
    references_norm = [normalizer(text) for text in references]
    hypotheses_norm = [normalizer(text) for text in hypotheses]
    return {
        "wer": 100 * corpus_wer(references_norm, hypotheses_norm),
        "wer_ortho": 100 * corpus_wer(references, hypotheses),
        "references_normalized": references_norm,
        "hypotheses_normalized": hypotheses_norm,
    }


def cache_statistics(model) -> dict:
    """Analytic decoder cache size of a loaded model, in its dtype.

    Returns:
        dict with `cache_bytes_per_token` (self + cross, summed over decoder layers), its `cache_bytes_per_token_split`,
        `cache_bytes_per_30s_utterance` and the definition of the latter.
    """
    config = model.config
    per_token = expected_cache_bytes_per_token(config, model.dtype)
    frames, tokens = config.max_source_positions, config.max_target_positions
    dtype = str(model.dtype).removeprefix("torch.")
    return {
        "cache_dtype": dtype,
        "cache_bytes_per_token": per_token["self"] + per_token["cross"],
        "cache_bytes_per_token_split": per_token,
        "cache_bytes_per_30s_utterance": per_token["cross"] * frames + per_token["self"] * tokens,
        "cache_bytes_per_30s_utterance_definition": (
            f"decoder cache of one utterance (batch 1, greedy) in {dtype}, summed over layers: cross-attention for "
            f"{frames} encoder frames (30 s) + self-attention for {tokens} decoder tokens (max_target_positions)"
        ),
    }


def evaluate_model(model, processor, dataset, batch_size: int = 16, generate_kwargs: dict | None = None,
                   normalizer=normalize_english, desc: str = "transcribing") -> dict:
    """Transcribes a dataset with an already-loaded model and scores it.

    Args:
        model: a Whisper or Whisper-MLA `...ForConditionalGeneration` in eval mode.
        processor: its `WhisperProcessor`.
        dataset: an `audio_data.SpeechDataset`, or any sequence of `{"id", "audio" (16 kHz float32), "text"}`.
        batch_size: utterances per generate() call.
        generate_kwargs: e.g. from `build_generate_kwargs` ({"num_beams": 1, "language": "en", ...}).
        normalizer: text normaliser applied before `wer` (Whisper's English one by default).

    Returns:
        dict with `wer` and `wer_ortho` (x100), `num_samples`, `num_skipped`, the cache statistics of
        `cache_statistics`, `decode_tokens_per_s`, `generated_tokens`, `generate_seconds`, `audio_seconds`, and
        `predictions`: one dict per utterance {id, reference, hypothesis, reference_normalized,
        hypothesis_normalized}.
    """
    examples = list(dataset)
    missing = [example.get("id") for example in examples if not example.get("text")]
    if missing:
        raise ValueError(
            f"Expected a reference transcript for every utterance, but found none for ids {missing[:5]}; load the "
            "data with require_text=True (the default) or drop those utterances."
        )
    audios = [example["audio"] for example in examples]
    references = [example["text"] for example in examples]
    hypotheses, num_tokens, seconds = transcribe(model, processor, audios, batch_size, generate_kwargs, desc)
    scores = compute_wer(references, hypotheses, normalizer)
    predictions = [
        {"id": example["id"], "reference": ref, "hypothesis": hyp, "reference_normalized": ref_norm,
         "hypothesis_normalized": hyp_norm}
        for example, ref, hyp, ref_norm, hyp_norm in zip(
            examples, references, hypotheses, scores["references_normalized"], scores["hypotheses_normalized"]
        )
    ]
    return {
        "model": model.name_or_path,
        "model_type": model.config.model_type,
        "num_samples": len(examples),
        "num_skipped": getattr(dataset, "num_skipped", 0),
        "wer": scores["wer"],
        "wer_ortho": scores["wer_ortho"],
        **cache_statistics(model),
        "decode_tokens_per_s": num_tokens / seconds if seconds > 0 else None,
        "generated_tokens": num_tokens,
        "generate_seconds": seconds,
        "audio_seconds": sum(len(a) for a in audios) / SAMPLING_RATE,
        "predictions": predictions,
    }


def comparison_table(results: dict, baseline: dict) -> str:
    """Markdown table of a model and its baseline; cache reduction is relative to the baseline."""
    rows = ["| model | WER | ortho WER | cache bytes/token | cache reduction | tokens/s |", "|---|---|---|---|---|---|"]
    for entry in (results, baseline):
        reduction = 100 * (1 - entry["cache_bytes_per_token"] / baseline["cache_bytes_per_token"])
        speed = entry["decode_tokens_per_s"]
        rows.append(
            f"| {entry['model']} | {entry['wer']:.2f} | {entry['wer_ortho']:.2f} | {entry['cache_bytes_per_token']} "
            f"| {reduction:.1f}% | {'n/a' if speed is None else f'{speed:.1f}'} |"
        )
    return "\n".join(rows)


def write_predictions(path: str, predictions: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for prediction in predictions:
            f.write(json.dumps(prediction, ensure_ascii=False) + "\n")


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
                             normalizer=get_normalizer(eval_args.language), desc=os.path.basename(name_or_path))
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
          f"{results['cache_bytes_per_token']} bytes/token.")
    if "comparison_table" in results:
        print(results["comparison_table"])
    return results


if __name__ == "__main__":
    run_cli(main)
