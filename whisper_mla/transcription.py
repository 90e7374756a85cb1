"""Transcribe with a Whisper or Whisper-MLA checkpoint and score it: WER, decoder cache size, decode speed.

`run_eval.py` is the command line around it; other scripts reuse it on a model they already hold:

    from whisper_mla.transcription import evaluate_model
    results = evaluate_model(model, processor, dataset, batch_size=16, generate_kwargs={"num_beams": 1})
    print(results["wer"])

`load_model_and_processor` loads either kind strictly (remote code only for Whisper-MLA); `build_generate_kwargs`
holds the one place where language, task, timestamps and long-form decoding become `generate()` arguments.
"""

import json
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline
from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

from whisper_mla.audio import SAMPLING_RATE
from modeling_whisper_mla import cache_nbytes, cross_cache_frames, expected_cache_bytes_per_token
from pipeline_whisper_mla import WhisperMLAPipeline
from whisper_mla.metrics import ENGLISH, compute_wer, normalize_english
from whisper_mla.io import checkpoint_config, from_pretrained_strict


logger = logging.getLogger(__name__)

WHISPER_MODEL_TYPES = ("whisper", "whisper_mla")
LONG_FORM_METHODS = ("sequential", "chunked")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def asr_pipeline(model, processor):
    """transformers' ASR pipeline around a loaded Whisper or Whisper-MLA model (Whisper's path: chunking, timestamps);
    a Whisper-MLA model gets the pipeline class its checkpoints ship."""
    is_mla = model.config.model_type == "whisper_mla"
    return pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor, device=model.device,
                    pipeline_class=WhisperMLAPipeline if is_mla else None)


@torch.no_grad()
def transcribe_chunked(
    model, processor, audios: list[np.ndarray], batch_size: int = 16, generate_kwargs: dict | None = None,
    desc: str = "transcribing (chunked)",
) -> tuple[list[str], int, float]:
    """Transcription through the ASR pipeline's chunked long-form algorithm: audio is cut into 30 s windows with 5 s
    strides on each side, the windows are decoded in batches and their transcripts merged on timestamps.

    Returns:
        (hypotheses, generated token count, seconds spent in the pipeline, feature extraction included)
    """
    asr = asr_pipeline(model, processor)
    kwargs = {k: v for k, v in (generate_kwargs or {}).items() if k != "attention_mask"}
    special_ids = set(processor.tokenizer.all_special_ids)
    hypotheses, num_tokens, seconds = [], 0, 0.0
    for start in tqdm(range(0, len(audios), batch_size), desc=desc, unit="batch"):
        batch = [{"raw": audio, "sampling_rate": SAMPLING_RATE} for audio in audios[start : start + batch_size]]
        _synchronize(model.device)
        tic = time.perf_counter()
        outputs = asr(batch, chunk_length_s=30, batch_size=batch_size, return_timestamps=True,
                      generate_kwargs=kwargs)
        _synchronize(model.device)
        seconds += time.perf_counter() - tic
        for output in outputs:
            text = output["text"].strip()
            hypotheses.append(text)
            num_tokens += len([t for t in processor.tokenizer(text, add_special_tokens=False).input_ids
                               if t not in special_ids])
    return hypotheses, num_tokens, seconds


class PeakCacheMeter:
    """Records the largest decoder cache (bytes its tensors hold, `cache_nbytes`) that any decoder step saw while the
    `with` block ran: the memory that a smaller MLA cache saves, measured, not computed. Works for Whisper (MHA) and
    Whisper-MLA models, greedy, beam search, sequential long-form and the chunked pipeline alike.
    """

    def __init__(self, model):
        self.decoder, self.handle, self.peak = model.get_decoder(), None, {"self": 0, "cross": 0, "total": 0}

    def _record(self, module, args, kwargs, output):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and hasattr(cache, "cross_attention_cache"):
            held = cache_nbytes(cache)
            if held["self"] + held["cross"] > self.peak["total"]:
                self.peak = {**held, "total": held["self"] + held["cross"]}

    def __enter__(self) -> "PeakCacheMeter":
        self.handle = self.decoder.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- metrics


def cache_statistics(model) -> dict:
    """Analytic decoder cache size of a loaded model, in its dtype.

    Returns:
        dict with `cache_bytes_per_token` (self + cross, summed over decoder layers; a cross "token" is one cached
        frame), its `cache_bytes_per_token_split`, `cross_cache_frames_per_30s` (fewer than the encoder's frames with
        a pooled shared cross latent), `cache_bytes_per_30s_utterance` and the definition of the latter.
    """
    config = model.config
    per_token = expected_cache_bytes_per_token(config, model.dtype)
    frames, tokens = config.max_source_positions, config.max_target_positions
    cached_frames = cross_cache_frames(config, frames)
    dtype = str(model.dtype).removeprefix("torch.")
    return {
        "cache_dtype": dtype,
        "cache_bytes_per_token": per_token["self"] + per_token["cross"],
        "cache_bytes_per_token_split": per_token,
        "cross_cache_frames_per_30s": cached_frames,
        "cache_bytes_per_30s_utterance": per_token["cross"] * cached_frames + per_token["self"] * tokens,
        "cache_bytes_per_30s_utterance_definition": (
            f"decoder cache of one utterance (batch 1, greedy) in {dtype}, summed over layers: cross-attention for "
            f"{frames} encoder frames (30 s; {cached_frames} cached) + self-attention for {tokens} decoder tokens (max_target_positions)"
        ),
    }


def evaluate_model(model, processor, dataset, batch_size: int = 16, generate_kwargs: dict | None = None,
                   normalizer=normalize_english, desc: str = "transcribing", long_form: str = "sequential") -> dict:
    """Transcribes a dataset with an already-loaded model and scores it.

    Args:
        model: a Whisper or Whisper-MLA `...ForConditionalGeneration` in eval mode.
        processor: its `WhisperProcessor`.
        dataset: an `whisper_mla.audio.SpeechDataset`, or any sequence of `{"id", "audio" (16 kHz float32), "text"}`.
        batch_size: utterances per generate() call.
        generate_kwargs: e.g. from `build_generate_kwargs` ({"num_beams": 1, "language": "en", ...}).
        normalizer: text normaliser applied before `wer` (Whisper's English one by default).
        long_form: how audio over 30 s is decoded: "sequential" (Whisper's `generate()` walks the recording window by
            window, each window conditioned on the previous one's timestamps) or "chunked" (the ASR pipeline: 30 s
            chunks with strides, decoded in batches, merged). Clips up to 30 s decode the same way with either.

    Returns:
        dict with `wer` and `wer_ortho` (x100), `num_samples`, `num_skipped`, the cache statistics of
        `cache_statistics`, `peak_cache_bytes` (the largest decoder cache a step held, measured), `decode_tokens_per_s`, `generated_tokens`, `generate_seconds`, `audio_seconds`, and
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
    if long_form not in LONG_FORM_METHODS:
        raise ValueError(f"long_form expects one of {list(LONG_FORM_METHODS)}, but found {long_form!r}; pick one.")
    run = transcribe_chunked if long_form == "chunked" else transcribe
    with PeakCacheMeter(model) as meter:
        hypotheses, num_tokens, seconds = run(model, processor, audios, batch_size, generate_kwargs, desc)
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
        "peak_cache_bytes": meter.peak,
        "long_form": long_form,
        "decode_tokens_per_s": num_tokens / seconds if seconds > 0 else None,
        "generated_tokens": num_tokens,
        "generate_seconds": seconds,
        "audio_seconds": sum(len(a) for a in audios) / SAMPLING_RATE,
        "predictions": predictions,
    }


def write_predictions(path: str, predictions: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for prediction in predictions:
            f.write(json.dumps(prediction, ensure_ascii=False) + "\n")

