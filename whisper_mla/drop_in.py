"""The drop-in matrix: Whisper's `generate()` options, each run on the original and on a Whisper-MLA model.

Each case names its inputs (short clips of several speakers in one padded batch, one clip, one ~45 s recording, or
mixed lengths batched for long-form) and its `generate` kwargs. `run_case` decodes both models under the same seed and
returns what a user would compare: the sequences, and the scores, token timestamps or segments the case asks for.
`tests/test_drop_in.py` asserts the exact default equal to the original on every case; `benchmarks/drop_in_report.py`
runs the lossy layouts (int8 cache, pooled or narrowed latents) through the same cases and reports their differences.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path
import json

import numpy as np
import soundfile
import torch

# held-out clips of speakers calibration never hears (make_speech_data.py: multi_eval / multi_eval_long)
SHORT_CLIP_IDS = ("whisper_cpp/jfk", "pocketsphinx/librivox/sense_and_sensibility_01_austen_64kb-0870",
                  "alsa/Front_Center", "mfa/mfa_her")
LONG_CLIP_ID = "pocketsphinx_joined"  # 44.7 s: two 30 s windows
# the long-form recipe of transformers' Whisper docs (OpenAI's thresholds, compression ratio as in the docs)
FALLBACK = {"temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "logprob_threshold": -1.0,
            "compression_ratio_threshold": 1.35, "no_speech_threshold": 0.6}


@dataclass(frozen=True)
class Case:
    """One row of the matrix. inputs: "short" (4 clips, one padded batch), "one" (the first clip), "long" (the
    45 s recording alone) or "mixed" (the recording and the first clip, batched long-form). multilingual: needs a
    multilingual model (language detection, translation)."""

    name: str
    inputs: str
    kwargs: dict = field(default_factory=dict)
    compare: tuple = ("sequences",)
    multilingual: bool = False


def cases(prompt_ids: torch.Tensor) -> list[Case]:
    """The matrix. `prompt_ids`: `processor.get_prompt_ids(text, return_tensors="pt")`."""
    dict_out = {"return_dict_in_generate": True}
    return [
        Case("greedy", "short"),
        Case("beam search, num_return_sequences", "short", {"num_beams": 3, "num_return_sequences": 2}),
        Case("return_timestamps", "short", {"return_timestamps": True}),
        Case("return_token_timestamps", "short", {"return_token_timestamps": True, **dict_out},
             ("sequences", "token_timestamps")),
        Case("prompt_ids", "short", {"prompt_ids": prompt_ids}),
        Case("prompt_ids, beam search", "short", {"prompt_ids": prompt_ids, "num_beams": 3}),
        Case("seeded sampling", "short", {"do_sample": True, "temperature": 0.8, "top_k": 20}),
        Case("output_scores, return_dict_in_generate", "short", {"output_scores": True, **dict_out},
             ("sequences", "scores")),
        Case("max_new_tokens", "short", {"max_new_tokens": 6}),
        Case("cache_implementation static", "short", {"cache_implementation": "static"}),
        Case("assistant_model", "one", {"assistant_model": "self"}),
        Case("long-form", "long", {"return_timestamps": True}, ("sequences", "segments")),
        Case("long-form, condition_on_prev_tokens, temperature fallback, thresholds", "long",
             {"return_timestamps": True, "condition_on_prev_tokens": True, **FALLBACK}, ("sequences", "segments")),
        Case("long-form, prompt_ids all-segments", "long",
             {"return_timestamps": True, "condition_on_prev_tokens": True, "prompt_ids": prompt_ids,
              "prompt_condition_type": "all-segments", **FALLBACK}, ("sequences", "segments")),
        Case("long-form, prompt_ids first-segment", "long",
             {"return_timestamps": True, "prompt_ids": prompt_ids, "prompt_condition_type": "first-segment"}),
        Case("long-form batched, mixed lengths", "mixed",
             {"return_timestamps": True, "condition_on_prev_tokens": True, **FALLBACK}),
        Case("language detection", "short", {}, multilingual=True),
        Case("task translate", "short", {"task": "translate", "language": "en"}, multilingual=True),
    ]


# Options the original refuses: the MLA model must refuse them with the same error.
REFUSED = {
    "assistant_model with a batch": ("short", {"assistant_model": "self"}),
    "prompt_condition_type all-segments without condition_on_prev_tokens":
        ("long", {"prompt_ids": "prompt", "prompt_condition_type": "all-segments", "return_timestamps": True}),
    "return_token_timestamps in long-form without alignment": ("long", {"return_token_timestamps": True,
                                                                        "alignment_heads": "none"}),
}


def read_clips(manifest: str | Path, ids) -> list[np.ndarray]:
    """The 16 kHz audio of the clips `ids` of a speech manifest, in that order."""
    manifest = Path(manifest)
    by_id = {entry["id"]: entry for entry in json.loads(manifest.read_text())["annotation"]}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"Expected clips {missing} in {manifest}, but found ids {sorted(by_id)[:5]}...; rebuild it "
                         "with `python make_speech_data.py`.")
    clips = []
    for i in ids:
        audio, rate = soundfile.read(manifest.parent / by_id[i]["path"], dtype="float32")
        if rate != 16000:
            raise ValueError(f"Expected 16 kHz audio in {by_id[i]['path']}, but found {rate} Hz; rebuild the set.")
        clips.append(audio)
    return clips


def model_inputs(processor, short_clips: list, long_clip: np.ndarray) -> dict:
    """{"short" | "one" | "long" | "mixed": generate kwargs with input_features (and attention_mask)}."""
    fe = processor.feature_extractor

    def features(audio, long_form):
        extra = {"truncation": False, "padding": "longest"} if long_form else {}
        out = fe(audio, sampling_rate=16000, return_tensors="pt", return_attention_mask=True, **extra)
        return {"input_features": out.input_features, "attention_mask": out.attention_mask}

    return {"short": features(short_clips, False), "one": features(short_clips[:1], False),
            "long": features([long_clip], True), "mixed": features([long_clip, short_clips[0]], True)}


def generate(model, inputs: dict, kwargs: dict, seed: int = 0, prompt_ids=None):
    """`model.generate(**inputs, **kwargs)` under `seed`; "self" as assistant_model is a copy of the model itself (a
    copy: assisted generation rewrites its assistant's generation config, which would change later calls)."""
    kwargs = dict(kwargs)
    if kwargs.get("assistant_model") == "self":
        kwargs["assistant_model"] = copy.deepcopy(model)
    if kwargs.get("prompt_ids") == "prompt":
        kwargs["prompt_ids"] = prompt_ids
    if kwargs.get("alignment_heads") == "none":
        kwargs.pop("alignment_heads")
        kwargs["generation_config"] = _without_alignment_heads(model.generation_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**{k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()},
                              **kwargs)


def _without_alignment_heads(generation_config):
    config = copy.deepcopy(generation_config)
    config.alignment_heads = None
    return config


def outputs_of(result, compare: tuple) -> dict:
    """What a case compares, from a `generate` result: {"sequences": LongTensor, "scores": [Tensor], ...}."""
    if isinstance(result, torch.Tensor):
        return {"sequences": result}
    out = {"sequences": result["sequences"]}
    if "scores" in compare:
        out["scores"] = torch.stack(list(result["scores"]))
    if "token_timestamps" in compare:
        out["token_timestamps"] = result["token_timestamps"]
    if "segments" in compare and "segments" in result:
        out["segments"] = [[(float(s["start"]), float(s["end"]), s["tokens"].tolist()) for s in segments]
                           for segments in result["segments"]]
    return out


def differences(reference: dict, candidate: dict, scores_atol: float = 1e-3) -> list[str]:
    """What differs between two `outputs_of` results: [] when the candidate decodes like the reference."""
    found = []
    ref, cand = reference["sequences"], candidate["sequences"]
    if ref.shape != cand.shape or not torch.equal(ref, cand):
        if ref.shape == cand.shape:
            rows = int((ref != cand).any(-1).sum())
            found.append(f"sequences: {rows} of {ref.shape[0]} rows differ")
        else:
            found.append(f"sequences: shape {tuple(cand.shape)} instead of {tuple(ref.shape)}")
    if "scores" in reference:
        if reference["scores"].shape != candidate["scores"].shape:
            found.append("scores: other shape")
        else:
            finite = reference["scores"].isfinite() & candidate["scores"].isfinite()
            gap = (reference["scores"] - candidate["scores"])[finite].abs().max().item()
            same_mask = torch.equal(reference["scores"].isfinite(), candidate["scores"].isfinite())
            if gap > scores_atol or not same_mask:
                found.append(f"scores: max gap {gap:.2e}" + ("" if same_mask else ", other -inf positions"))
    if "token_timestamps" in reference:
        a, b = reference["token_timestamps"], candidate["token_timestamps"]
        if a.shape != b.shape or not torch.allclose(a, b, atol=0.021):
            found.append("token_timestamps differ by more than one 20 ms frame")
    if "segments" in reference and reference["segments"] != candidate.get("segments"):
        found.append("segments differ")
    return found
