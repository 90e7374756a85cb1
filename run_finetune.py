"""Recovery training for a Whisper-MLA model: fine-tuning on transcripts, or label-free distillation from the MHA
original, after the MHA -> MLA conversion.

    python run_finetune.py configs/tiny-en-cpu.yaml
    python run_finetune.py configs/tiny-en-cpu.yaml --max_steps 50 --output_dir out/try   # CLI overrides the file
    python run_finetune.py --model_name_or_path openai/whisper-small --train_data LibriSpeech/train-other-500 \
        --eval_data LibriSpeech/dev-clean --output_dir out/small-mla --max_steps 18000 --kv_lora_rank 96 \
        --kept_key_dims 4 --key_selection 2-norm --calibration_data LibriSpeech/train-other-500 --trainable all \
        --predict_with_generate --eval_strategy steps --eval_steps 2000
    python run_finetune.py --model_name_or_path MLA_CHECKPOINT --teacher_model_name_or_path openai/whisper-small \
        --distill --trainable mla --train_data untranscribed_audio/ --output_dir out/recovered

`--model_name_or_path` is either a Whisper (MHA) checkpoint, converted at start-up with the MLA flags of
convert_whisper_to_mla.py (calibration included), or a Whisper-MLA checkpoint. `--train_data`/`--eval_data` take
anything `whisper_mla.audio.load_speech_dataset` reads (LibriSpeech-layout folder, JSON manifest, save_to_disk or
audiofolder folder, Hub id with `--train_split`); several training sources are concatenated.

With `--distill` no transcript is used: the teacher (`--teacher_model_name_or_path`, by default the MHA model the
student was converted from) transcribes every training clip once, greedily, and the student learns the teacher's
token distributions on those transcripts: loss = (1 - alpha) * T^2 * KL(teacher || student) + alpha * CE.

Every `checkpoint-N` and the final `output_dir` are Whisper-MLA checkpoints that load in a fresh process with
`AutoModelForSpeechSeq2Seq.from_pretrained(path, trust_remote_code=True)`; `--resume_from_checkpoint latest`
(or a checkpoint path) continues an interrupted run to the same weights as an uninterrupted one.

Nothing is left half-done: every input (numbers, checkpoints, output folder) is checked before any work; checkpoints
load strictly; `--overwrite_output_dir` deletes the old folder as a whole when training starts (never merging into
it); the final model appears at the top of `output_dir` only once it is complete (its config.json is written last).
With `--lazy_audio_loading --skip_bad_samples` a clip whose audio turns out damaged mid-training is logged, counted
(`train_skipped_bad_during_training`) and replaced by the next readable clip.

Scale-out is the Trainer's own:
    torchrun --nproc_per_node 2 run_finetune.py configs/tiny-en-cpu.yaml --ddp_backend gloo     # CPU processes
    accelerate launch --num_processes 8 run_finetune.py configs/whisper-small-librispeech-2norm.yaml  # GPUs
    ... --deepspeed ds_config.json                                                              # DeepSpeed
"""

import copy
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import (
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    set_seed,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperAttention, shift_tokens_right

from whisper_mla.audio import SAMPLING_RATE, SpeechDataError, as_waveform, drop_undecodable, load_speech_dataset
from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla, load_calibration_audio
from whisper_mla.hub import copy_remote_code, model_card, register_remote_code, save_mla_checkpoint
from configuration_whisper_mla import WhisperMLAConfig
from modeling_whisper_mla import WhisperMLAForConditionalGeneration
from whisper_mla.transcription import build_generate_kwargs, compute_wer, get_normalizer
from whisper_mla.arguments import check_number, run_cli
from whisper_mla.io import (
    CheckpointError,
    atomic_checkpoint_files,
    check_output_dir,
    checkpoint_config,
    from_pretrained_strict,
    remove_dir,
)


logger = logging.getLogger(__name__)

TRAINABLE = ("all", "attention", "mla", "lora")
MLA_PROJECTIONS = ("q_proj", "kv_a_proj", "k_b_proj", "v_b_proj", "out_proj")
LORA_ADAPTER_DIR = "lora_adapter"  # inside checkpoint-N: what a LoRA run resumes from
RESUME_LATEST = ("latest", "last", "true")
# What a resumed checkpoint's weights must agree on with the model this run builds before the Trainer copies them in.
RESUME_MUST_MATCH = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                     "decoder_attention_heads", "vocab_size", "mla_targets", "kv_lora_rank", "kept_key_dims",
                     "svd_method", "kept_key_indices", "cross_attention_latent", "cross_kv_lora_rank")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Whisper (MHA) checkpoint, converted to MLA at start-up with the MLA flags, or a "
                  "Whisper-MLA checkpoint (model_type whisper_mla). Folder or Hub id."},
    )
    trainable: str = field(
        default="all",
        metadata={"help": "What trains: all; attention (every attention block, the original's 'freeze non-attention'); "
                  "mla (converted blocks only); lora (LoRA on the converted blocks' projections, merged at the end).",
                  "choices": list(TRAINABLE)},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (--trainable lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (--trainable lora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (--trainable lora)."})
    precompute_encoder_outputs: bool = field(
        default=True,
        metadata={"help": "When nothing in the encoder trains (and it equals the teacher's), run it once per training "
                  "clip before training and keep its outputs in memory (max_source_positions x d_model floats per "
                  "clip: 2.3 MB for tiny, 4.6 MB for small); otherwise it runs every step, once for student and "
                  "teacher together."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in a non-empty output_dir: it is deleted as a whole when training starts."},
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop training after this many minutes (checked after every step), e.g. for a CPU budget; "
                  "max_steps still bounds it. A run stopped this way does not resume to a fixed step count."},
    )

    def __post_init__(self):
        if self.model_name_or_path is not None:
            self.model_name_or_path = os.path.expanduser(self.model_name_or_path)  # YAML files may use ~
        if self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable expects one of {list(TRAINABLE)}, but found {self.trainable!r}.")


@dataclass
class DataArguments:
    train_data: list[str] | None = field(
        default=None,
        metadata={"help": "Training audio: LibriSpeech-layout folders, JSON manifests, save_to_disk/audiofolder "
                  "folders or Hub ids; several are concatenated. With --distill transcripts are not needed."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Evaluation data (with transcripts) for eval_wer; same forms as train_data."}
    )
    train_split: str | None = field(default=None, metadata={"help": "Split or subfolder of train_data."})
    eval_split: str | None = field(default=None, metadata={"help": "Split or subfolder of eval_data."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    audio_column_name: str = field(default="audio", metadata={"help": "Audio column of a datasets dataset."})
    text_column_name: str = field(default="text", metadata={"help": "Transcript column of a datasets dataset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training clips."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation clips."})
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "Skip (count and report) rows with missing/undecodable audio or empty transcripts instead "
                  "of stopping with an error."},
    )
    max_duration_in_seconds: float = field(
        default=30.0, metadata={"help": "Drop (and count) longer clips: Whisper sees 30 s windows."}
    )
    lazy_audio_loading: bool = field(
        default=False,
        metadata={"help": "Decode each clip when a step reads it instead of all up front (corpora too large for "
                  "memory, e.g. LibriSpeech train-other-500); lengths and headers are still checked at start."},
    )
    max_label_length: int | None = field(
        default=None,
        metadata={"help": "Drop (and count) transcripts of more tokens; pseudo-labels are capped to it. Default: the "
                  "model's max_target_positions."},
    )
    do_lower_case: bool = field(default=False, metadata={"help": "Lower-case transcripts before tokenising."})
    language: str | None = field(
        default=None, metadata={"help": "Language of the audio for multilingual models, e.g. en (labels, decoding)."}
    )
    task: str = field(
        default="transcribe", metadata={"help": "transcribe or translate (multilingual models).",
                                        "choices": ["transcribe", "translate"]}
    )

    def __post_init__(self):
        if isinstance(self.train_data, str):  # a single source written as a string in a YAML file
            self.train_data = [self.train_data]


@dataclass
class DistillationArguments:
    distill: bool = field(
        default=False,
        metadata={"help": "Label-free recovery: learn the teacher's token distributions on its own greedy "
                  "transcripts of the training audio; transcripts are not read."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher for --distill. Default: the MHA model the student is converted from (required "
                  "when starting from a Whisper-MLA checkpoint)."},
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the KL term."})
    distill_alpha: float = field(
        default=0.0,
        metadata={"help": "Weight of cross-entropy on the pseudo-labels: loss = (1 - alpha) * T^2 * KL + alpha * CE."},
    )
    pseudo_label_batch_size: int = field(
        default=16, metadata={"help": "Clips per batch when the teacher transcribes (and the encoder runs) up front."}
    )

    def __post_init__(self):
        if self.teacher_model_name_or_path is not None:
            self.teacher_model_name_or_path = os.path.expanduser(self.teacher_model_name_or_path)
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"--distill_alpha expects a value in [0, 1], but found {self.distill_alpha}.")
        if self.distill_temperature <= 0:
            raise ValueError(f"--distill_temperature expects a positive value, but found {self.distill_temperature}.")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, DistillationArguments, MLAArguments, Seq2SeqTrainingArguments)


def parse_arguments(argv: list[str] | None = None):
    """Parses the five argument dataclasses from the command line, or from a YAML/JSON file given first, whose
    values the remaining command-line flags override (`run_finetune.py configs/x.yaml --max_steps 10`)."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        with open(argv[0], encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}  # JSON is YAML
        known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"{argv[0]} sets unknown arguments {unknown}; expected names of run_finetune.py's arguments (see "
                "--help); fix the spelling or remove them."
            )
        parser.set_defaults(**config)  # argparse converts string values (e.g. YAML's "1e-4") with each field's type
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def validate_arguments(model_args, data_args, distill_args, training_args) -> None:
    """Numbers that would otherwise fail deep inside the Trainer, torch or range(), or be silently ignored. (MLA
    settings are checked by the config when the model is converted; the Trainer checks a few of its own.)"""
    check_number("--lora_r", model_args.lora_r, minimum=1)
    check_number("--lora_alpha", model_args.lora_alpha, above=0)
    check_number("--lora_dropout", model_args.lora_dropout, minimum=0, below=1)
    check_number("--max_train_minutes", model_args.max_train_minutes, above=0, optional=True)
    check_number("--max_train_samples", data_args.max_train_samples, minimum=1, optional=True)
    check_number("--max_eval_samples", data_args.max_eval_samples, minimum=1, optional=True)
    check_number("--max_duration_in_seconds", data_args.max_duration_in_seconds, above=0)
    check_number("--max_label_length", data_args.max_label_length, minimum=2, optional=True,
                 fix="pass room for the prompt tokens and the text, or leave it out for the model's maximum")
    check_number("--pseudo_label_batch_size", distill_args.pseudo_label_batch_size, minimum=1)
    args = training_args
    check_number("--per_device_train_batch_size", args.per_device_train_batch_size, minimum=1)
    check_number("--per_device_eval_batch_size", args.per_device_eval_batch_size, minimum=1)
    check_number("--gradient_accumulation_steps", args.gradient_accumulation_steps, minimum=1)
    check_number("--learning_rate", args.learning_rate, above=0)
    check_number("--weight_decay", args.weight_decay, minimum=0)
    check_number("--max_grad_norm", args.max_grad_norm, minimum=0)
    check_number("--dataloader_num_workers", args.dataloader_num_workers, minimum=0)
    if args.max_steps != -1:
        check_number("--max_steps", args.max_steps, minimum=1, fix="pass a positive step count, or -1 to train "
                     "--num_train_epochs epochs")
    else:
        check_number("--num_train_epochs", args.num_train_epochs, above=0)
    if getattr(args.save_strategy, "value", args.save_strategy) == "steps":
        check_number("--save_steps", args.save_steps, above=0)
    if getattr(args.eval_strategy, "value", args.eval_strategy) == "steps":
        check_number("--eval_steps", args.eval_steps, above=0, optional=True)
    check_number("--save_total_limit", args.save_total_limit, minimum=1, optional=True)
    check_number("--generation_max_length", args.generation_max_length, minimum=1, optional=True)
    check_number("--generation_num_beams", args.generation_num_beams, minimum=1, optional=True)


# --------------------------------------------------------------------------------------------- models


def load_whisper(name_or_path: str, check_only: bool = False):
    """Loads a Whisper (MHA) or Whisper-MLA checkpoint with this project's classes, strictly (missing, unexpected
    or mis-shaped weights are an error); returns (model, is_mla). With `check_only` the model is built on the meta
    device: every check, no weights read."""
    model_type = checkpoint_config(name_or_path).get("model_type")
    if model_type == "whisper":
        return from_pretrained_strict(WhisperForConditionalGeneration, name_or_path, check_only=check_only), False
    if model_type == "whisper_mla":
        return from_pretrained_strict(WhisperMLAForConditionalGeneration, name_or_path, check_only=check_only), True
    raise ValueError(
        f"Expected a Whisper or Whisper-MLA checkpoint (model_type 'whisper' or 'whisper_mla') at {name_or_path!r}, "
        f"but found model_type {model_type!r}; pass a Whisper checkpoint."
    )


def load_processor(name_or_path: str) -> WhisperProcessor:
    # WhisperProcessor, not AutoProcessor: the latter resolves the config's auto_map and asks to trust remote code.
    try:
        return WhisperProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"Expected a Whisper processor (feature extractor + tokenizer) next to the model in {name_or_path!r}, but "
            f"loading it failed: {err}; save it there with processor.save_pretrained(...)."
        ) from err


def check_mla_flags_match(config, mla_args: MLAArguments) -> None:
    """A Whisper-MLA checkpoint is not converted again: MLA flags that differ from it are an error, not ignored."""
    defaults = MLAArguments()
    for name in ("kv_lora_rank", "kept_key_dims", "key_selection", "svd_method", "mla_targets"):
        value, default, found = getattr(mla_args, name), getattr(defaults, name), getattr(config, name)
        if value != default and value != found:
            raise ValueError(
                f"--{name} {value} asks for a conversion, but --model_name_or_path is already a Whisper-MLA checkpoint "
                f"with {name}={found}; drop --{name}, or start from the MHA checkpoint to convert again."
            )
    if mla_args.calibration_data is not None:
        logger.warning("--calibration_data is ignored: the model is already a Whisper-MLA checkpoint.")
    config.mla_attn_implementation = mla_args.mla_attn_implementation


def load_student_and_teacher(model_args, distill_args, mla_args, processor):
    """The Whisper-MLA student (converted here from an MHA checkpoint, or loaded) and, with --distill, the frozen
    teacher. Returns (student, teacher or None)."""
    model, is_mla = load_whisper(model_args.model_name_or_path)
    if is_mla:
        check_mla_flags_match(model.config, mla_args)
        student, mha = model, None
    else:
        audios = None
        if mla_args.calibration_data is not None:
            audios = load_calibration_audio(mla_args.calibration_data, mla_args.calibration_samples)
        student = convert_whisper_to_mla(model, mla_args, calibration_audio=audios,
                                         feature_extractor=processor.feature_extractor)
        mha = model
    register_remote_code(student.config)  # every checkpoint-N config.json then names the shipped code
    if not distill_args.distill:
        return student, None
    if distill_args.teacher_model_name_or_path is not None:
        teacher, _ = load_whisper(distill_args.teacher_model_name_or_path)
    elif mha is not None:
        teacher = mha
    else:
        base = (student.config.mla_conversion or {}).get("base_model")
        raise ValueError(
            f"--distill expects a teacher, but found none: {model_args.model_name_or_path!r} is a Whisper-MLA "
            "checkpoint, so there is no MHA model to default to; pass --teacher_model_name_or_path"
            + (f" {base} (the model it was converted from)." if base else " with the MHA model it came from.")
        )
    check_teacher_vocabulary(teacher.config, student.config)
    return student, teacher.eval().requires_grad_(False)


def check_teacher_vocabulary(teacher_config, student_config) -> None:
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ValueError(
            f"The teacher's vocabulary ({teacher_config.vocab_size} tokens) must match the student's "
            f"({student_config.vocab_size}); pass a teacher with the same tokenizer."
        )


def check_models(model_args, data_args, distill_args, training_args) -> None:
    """The student's and teacher's checkpoints, strictly but on the meta device (no weights read), and the settings
    that depend on them, before the conversion or any other expensive work.

    An English-only model's prompt has no language or task token: --language en is dropped here (set to None), as
    the tokenizer would otherwise put <|en|><|transcribe|> into every label, a prompt the model never sees when it
    transcribes; another language or translation is refused.
    """
    student, _ = load_whisper(model_args.model_name_or_path, check_only=True)
    max_positions = student.config.max_target_positions
    for flag, value in (("--max_label_length", data_args.max_label_length),
                        ("--generation_max_length", training_args.generation_max_length)):
        if value is not None and value > max_positions:
            raise ValueError(
                f"{flag} expects at most the model's max_target_positions ({max_positions}), but found {value}; pass "
                "a smaller value or leave it out."
            )
    if student.generation_config.is_multilingual is False:
        build_generate_kwargs(student, data_args.language, data_args.task)  # refuses anything but English
        if data_args.language is not None:
            logger.info("%s is English-only: --language %s is dropped (its prompt has no language token).",
                        model_args.model_name_or_path, data_args.language)
            data_args.language = None
    if distill_args.teacher_model_name_or_path is not None:
        teacher, _ = load_whisper(distill_args.teacher_model_name_or_path, check_only=True)
        check_teacher_vocabulary(teacher.config, student.config)


def set_trainable(model, model_args: ModelArguments):
    """Applies --trainable. Returns the model to train: the same model, or a peft `PeftModel` for LoRA.

    `all` trains every parameter but the sinusoidal encoder positions, which Whisper keeps fixed; `attention` trains
    the parameters of every attention block (q/k/v/out or the MLA projections); `mla` those of converted blocks;
    `lora` adds LoRA to the MLA projections of converted blocks and freezes everything else.
    """
    mode = model_args.trainable
    model.requires_grad_(mode == "all")
    if mode == "all":
        model.get_encoder().embed_positions.requires_grad_(False)  # fixed sinusoids (loading may unfreeze them)
        return model
    if mode == "attention":
        for module in model.modules():
            if isinstance(module, WhisperAttention):  # MLA blocks subclass it
                module.requires_grad_(True)
        return model
    shared_down = getattr(model.model.decoder, "cross_kv_a_proj", None)  # a narrow shared cross latent's projection
    if mode == "mla":
        for name in model.config.mla_block_names():
            model.model.get_submodule(name).requires_grad_(True)
        if shared_down is not None:
            shared_down.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    modules = dict(model.named_modules())
    targets = [f"model.{block}.{proj}" for block in model.config.mla_block_names() for proj in MLA_PROJECTIONS
               if f"model.{block}.{proj}" in modules]  # blocks reading a shared cross latent have no kv_a_proj
    if shared_down is not None:
        targets.append("model.decoder.cross_kv_a_proj")
    lora_config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                             lora_dropout=model_args.lora_dropout, target_modules=targets, bias="none")
    # The absorbed decode path reads k_b_proj/v_b_proj weights directly, which would skip unmerged LoRA factors:
    # decode through the modules until the adapter is merged (merge_lora restores the setting).
    attn_implementation = model.config.mla_attn_implementation
    model.config.mla_attn_implementation = "naive"
    # When saving, peft reads the config at the base model's name_or_path to see if the vocabulary changed; a converted
    # student's name_or_path is its MHA original, not a Whisper-MLA config. Only this script reads the adapter back.
    model.name_or_path = ""
    peft_model = get_peft_model(model, lora_config)
    peft_model.mla_attn_implementation_after_merge = attn_implementation
    return peft_model


def merge_lora(model):
    """A plain Whisper-MLA model from a LoRA `PeftModel` (merge_and_unload); other models are returned as they are."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    attn_implementation = model.mla_attn_implementation_after_merge
    merged = model.merge_and_unload()
    merged.config.mla_attn_implementation = attn_implementation
    return merged


# --------------------------------------------------------------------------------------------- data


def load_clips(sources: list[str], split, data_args: DataArguments, max_samples, require_text: bool):
    """Decoded examples of every source, concatenated, and the messages of the rows skipped as bad."""
    examples, skipped = [], []
    for source in sources:
        remaining = None if max_samples is None else max_samples - len(examples)
        if remaining is not None and remaining <= 0:
            break
        dataset = load_speech_dataset(
            source, split=split, audio_column=data_args.audio_column_name, text_column=data_args.text_column_name,
            max_samples=remaining, skip_bad=data_args.skip_bad_samples, require_text=require_text,
            config_name=data_args.dataset_config_name, lazy=data_args.lazy_audio_loading,
        )
        examples += dataset.examples
        skipped += dataset.skipped
    return examples, skipped


def drop_long_clips(examples: list[dict], max_seconds: float) -> tuple[list[dict], int]:
    kept = [e for e in examples if len(e["audio"]) <= max_seconds * SAMPLING_RATE]
    return kept, len(examples) - len(kept)


def tokenize_transcripts(examples, tokenizer, max_label_length: int, do_lower_case: bool):
    """Label ids `<|startoftranscript|> <prefix> text <|endoftext|>` per example; drops too-long ones.

    Returns (examples kept, their label ids, number dropped).
    """
    kept, labels = [], []
    for example in examples:
        text = example["text"].lower() if do_lower_case else example["text"]
        ids = tokenizer(text).input_ids
        if len(ids) <= max_label_length:
            kept.append(example)
            labels.append(ids)
    return kept, labels, len(examples) - len(kept)


def pseudo_label_ids(sequence: list[int], prefix: list[int], eos_token_id: int) -> list[int]:
    """Label ids from one generated sequence: the tokenizer's prefix, the text up to and including the first
    end-of-text (padding after it dropped). Whisper's generate may or may not return the prompt; both work."""
    if sequence[: len(prefix)] == prefix:
        sequence = sequence[len(prefix):]
    if eos_token_id in sequence:
        sequence = sequence[: sequence.index(eos_token_id) + 1]
    return list(prefix) + list(sequence)


@torch.no_grad()
def precompute_targets(audios, feature_extractor, encoder=None, teacher=None, batch_size=16, prefix=None,
                       generate_kwargs=None, device="cpu"):
    """One pass over the training clips, in batches: the encoder outputs (if `encoder` is given) and the teacher's
    greedy transcripts as label ids (if `teacher` is given). The teacher decodes from the precomputed encoder
    outputs when there are any, so the encoder runs once per clip.

    Returns (encoder outputs: list of (frames, d_model) CPU tensors, or None; pseudo-labels: list of id lists or None).
    """
    states = [] if encoder is not None else None
    labels = [] if teacher is not None else None
    desc = "pseudo-labelling" if teacher is not None else "encoding"
    dtype = next((encoder if encoder is not None else teacher).parameters()).dtype
    for start in tqdm(range(0, len(audios), batch_size), desc=desc, unit="batch"):
        batch = [as_waveform(audio) for audio in audios[start : start + batch_size]]
        features = feature_extractor(batch, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
        features = features.to(device, dtype)  # (B, n_mels, 3000)
        hidden = encoder(features).last_hidden_state if encoder is not None else None  # (B, frames, d_model)
        if states is not None:
            states += list(hidden.cpu().unbind(0))
        if teacher is not None:
            inputs = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)} if hidden is not None \
                else {"input_features": features}
            sequences = teacher.generate(**inputs, **(generate_kwargs or {}), num_beams=1, do_sample=False)
            labels += [pseudo_label_ids(s, prefix, teacher.config.eos_token_id) for s in sequences.tolist()]
    return states, labels


class SpeechSeq2SeqDataset(torch.utils.data.Dataset):
    """Items `{"input_features" | "encoder_hidden_states", "labels"}`; features are computed when an item is read.

    Lazily loaded clips are decoded here, mid-training, where one with a valid header but a damaged body fails. That
    stops training with an error naming the clip and --skip_bad_samples; with `skip_bad` the clip is logged once,
    flagged, and the next readable clip (with its labels) is returned in its place, so batches keep their size and a
    resumed run sees the same batches. The flags live in shared memory, so DataLoader worker processes report theirs.
    """

    def __init__(self, audios, labels, feature_extractor, encoder_states=None, skip_bad=False):
        self.audios, self.labels, self.feature_extractor = audios, labels, feature_extractor
        self.encoder_states = encoder_states
        self.bad = torch.zeros(len(labels), dtype=torch.bool).share_memory_() if skip_bad else None

    def __len__(self):
        return len(self.labels)

    @property
    def num_bad(self) -> int:
        """Clips this process (and its DataLoader workers) found undecodable and skipped."""
        return 0 if self.bad is None else int(self.bad.sum())

    def __getitem__(self, index):
        if self.encoder_states is not None:
            return {"labels": self.labels[index], "encoder_hidden_states": self.encoder_states[index]}
        index, audio = self._read(index)
        features = self.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="np")
        return {"labels": self.labels[index], "input_features": features.input_features[0]}  # (n_mels, 3000)

    def _read(self, index: int) -> tuple[int, np.ndarray]:
        """(index, waveform) of the clip at `index`, or with skip_bad of the next clip that decodes."""
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if self.bad is not None and self.bad[i]:
                continue
            try:
                return i, as_waveform(self.audios[i])  # decoded here when the data was loaded lazily
            except SpeechDataError as err:
                if self.bad is None:
                    raise SpeechDataError(
                        f"{err} (With --lazy_audio_loading a clip is decoded only when a training step reads it; pass "
                        "--skip_bad_samples to log, count and skip such clips instead of stopping.)"
                    ) from err
                self.bad[i] = True
                logger.warning("Skipping a training clip that does not decode (the next readable clip takes its "
                               "place): %s", err)
        raise SpeechDataError(f"None of the {len(self)} training clips decodes; check the training data.")


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """Stacks input features (or precomputed encoder outputs) and right-pads labels with -100.

    Padding is found from the label lengths (an attention mask), never from token ids: Whisper's pad token is its
    end-of-text token, which must stay a target. A leading `<|startoftranscript|>` is dropped when every row has it,
    because the model prepends the decoder start token again when it builds `decoder_input_ids` from the labels.
    """

    decoder_start_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in ("input_features", "encoder_hidden_states"):
            if key in features[0]:
                batch[key] = torch.stack([torch.as_tensor(f[key]) for f in features])
        lengths = torch.tensor([len(f["labels"]) for f in features])
        attention_mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (B, T)
        labels = torch.full(attention_mask.shape, -100, dtype=torch.long)
        labels[attention_mask] = torch.cat([torch.as_tensor(f["labels"], dtype=torch.long) for f in features])
        if (labels[:, 0] == self.decoder_start_token_id).all():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


# --------------------------------------------------------------------------------------------- training


def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the token distributions, summed over the vocabulary and averaged over the
    label positions (labels != -100). Logits: (B, T, V); labels: (B, T)."""
    mask = labels.ne(-100)
    student_log_probs = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)  # (N, V)
    teacher_log_probs = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature**2


class DistillationTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose loss takes precomputed encoder outputs and, given a teacher, distils from it.

    Args:
        teacher: frozen model whose token distributions the student learns, or None for plain cross-entropy.
        share_encoder: the student's encoder is frozen and equals the teacher's, so one encoder pass serves both.
        temperature, alpha: see `distillation_loss`; loss = (1 - alpha) * KL term + alpha * cross-entropy.
    """

    def __init__(self, *args, teacher=None, share_encoder=False, temperature=1.0, alpha=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.share_encoder = teacher, share_encoder
        self.temperature, self.alpha = temperature, alpha
        if teacher is not None:
            self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "encoder_hidden_states" in inputs:
            inputs["encoder_outputs"] = BaseModelOutput(last_hidden_state=inputs.pop("encoder_hidden_states"))
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        labels = inputs.pop("labels")
        config = self.teacher.config
        decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
        if "encoder_outputs" not in inputs and self.share_encoder:
            with torch.no_grad():
                inputs["encoder_outputs"] = self.teacher.get_encoder()(inputs.pop("input_features"))
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs, decoder_input_ids=decoder_input_ids).logits
        outputs = model(**inputs, decoder_input_ids=decoder_input_ids, labels=labels if self.alpha > 0 else None)
        loss = distillation_loss(outputs.logits, teacher_logits, labels, self.temperature)
        if self.alpha > 0:
            loss = (1 - self.alpha) * loss + self.alpha * outputs.loss
        return (loss, outputs) if return_outputs else loss


class WhisperMLACheckpointCallback(TrainerCallback):
    """Makes each `checkpoint-N` a Whisper-MLA checkpoint that loads with trust_remote_code=True.

    The Trainer writes weights, config (with auto_map), generation config and processor; this adds the remote code.
    For LoRA runs it moves the Trainer's adapter files to `checkpoint-N/lora_adapter/` (what a resume reads) and
    writes the merged plain Whisper-MLA model in their place.
    """

    def __init__(self, processor):
        self.processor = processor

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return
        from peft import PeftModel

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if isinstance(model, PeftModel):
            adapter_dir = os.path.join(folder, LORA_ADAPTER_DIR)
            os.makedirs(adapter_dir, exist_ok=True)
            for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
                if os.path.exists(os.path.join(folder, name)):
                    os.replace(os.path.join(folder, name), os.path.join(adapter_dir, name))
            merged = merge_lora(copy.deepcopy(model))
            with atomic_checkpoint_files(folder) as tmp:  # killed mid-save, the folder's top level does not load
                save_mla_checkpoint(merged, self.processor, tmp, card_text=model_card(merged))
        else:
            copy_remote_code(folder)


class TimeLimitCallback(TrainerCallback):
    """Stops training once `minutes` have passed since training began (--max_train_minutes)."""

    def __init__(self, minutes: float):
        self.seconds, self.start = 60 * minutes, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            logger.info("--max_train_minutes reached after %d steps; stopping.", state.global_step)
            control.should_training_stop = True


def make_compute_metrics(tokenizer, language: str | None):
    """compute_metrics for predict_with_generate: normalised corpus WER x100 (run_eval's definition) as `wer`."""
    normalizer = get_normalizer(language)

    def compute_metrics(prediction):
        # The Trainer pads predictions and labels across batches with -100.
        predictions = np.where(prediction.predictions == -100, tokenizer.pad_token_id, prediction.predictions)
        label_ids = np.where(prediction.label_ids == -100, tokenizer.pad_token_id, prediction.label_ids)
        hypotheses = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(label_ids, skip_special_tokens=True)
        return {"wer": compute_wer(references, hypotheses, normalizer)["wer"]}

    return compute_metrics


def encoders_match(student, teacher) -> bool:
    """True when the student's and teacher's encoders hold identical weights."""
    s, t = student.get_encoder().state_dict(), teacher.get_encoder().state_dict()
    return s.keys() == t.keys() and all(torch.equal(s[k], t[k].to(s[k].device)) for k in s)


def fits_in_memory(num_clips: int, config, fraction: float = 0.5) -> bool:
    """Whether `num_clips` precomputed encoder outputs (float32) take less than `fraction` of the machine's RAM."""
    needed = num_clips * config.max_source_positions * config.d_model * 4
    return needed < fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def count_bad_clips(dataset: SpeechSeq2SeqDataset, device) -> int:
    """Clips skipped mid-training as undecodable, over all processes (each reads its own share of the data)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dataset.num_bad
    flags = dataset.bad if dataset.bad is not None else torch.zeros(len(dataset), dtype=torch.bool)
    flags = flags.to(device, torch.int32)  # NCCL reduces only GPU tensors
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return int(flags.sum())


def is_complete_checkpoint(folder: str) -> bool:
    # trainer_state.json is the last file the Trainer writes into a checkpoint folder.
    return os.path.isfile(os.path.join(folder, "trainer_state.json"))


def resolve_output_dir(training_args, overwrite: bool, lora: bool = False) -> str | None:
    """Checks output_dir against --resume_from_checkpoint before any expensive work (deleting nothing yet: see
    `clear_output_dir`); returns the checkpoint to resume from (a complete checkpoint-N folder) or None. `lora`: the
    run resumes from the checkpoint's LoRA adapter (see `check_resume_checkpoint`)."""
    output_dir, resume = training_args.output_dir, training_args.resume_from_checkpoint
    checkpoints = []
    if os.path.isdir(output_dir):
        checkpoints = sorted(
            (d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)), key=lambda d: int(d[11:])
        )
    if resume is not None and str(resume).lower() in RESUME_LATEST:
        complete = [d for d in checkpoints if is_complete_checkpoint(os.path.join(output_dir, d))]
        if not complete:
            raise ValueError(
                f"--resume_from_checkpoint {resume} expects a complete checkpoint-N folder in {output_dir!r}, but "
                f"found {checkpoints or 'none'}; drop --resume_from_checkpoint to start afresh."
            )
        return check_resume_checkpoint(os.path.join(output_dir, complete[-1]), lora)
    if resume is not None:
        if not is_complete_checkpoint(resume):
            raise ValueError(
                f"--resume_from_checkpoint expects a checkpoint-N folder holding trainer_state.json, but found "
                f"{resume!r} without it (missing or interrupted while saving); pass an earlier checkpoint or 'latest'."
            )
        return check_resume_checkpoint(resume, lora)
    if checkpoints and not overwrite:
        raise ValueError(
            f"Expected a new or empty --output_dir, but found {checkpoints} in {output_dir!r}; pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to start afresh, or pick "
            "another --output_dir."
        )
    check_output_dir(output_dir, overwrite)  # anything else there (an earlier final model) is refused alike
    return None


def check_resume_checkpoint(checkpoint: str, lora: bool = False) -> str:
    """The Trainer restores a checkpoint's weights leniently (a missing tensor is only a warning): check it strictly
    first, on the meta device.

    A LoRA run resumes from the checkpoint's adapter (checked strictly by `restore_lora_adapter`); the merged model at
    the checkpoint's top is written after the Trainer marks the checkpoint complete, so a run killed in between left
    none (no config.json): that is only logged."""
    try:
        if lora and not os.path.isfile(os.path.join(checkpoint, "config.json")):
            logger.warning("%s holds no merged model (the run was killed while saving it); resuming from its LoRA "
                           "adapter.", checkpoint)
            return checkpoint
        load_whisper(checkpoint, check_only=True)
    except CheckpointError as err:
        raise CheckpointError(f"{err} To resume, pass an earlier checkpoint-N as --resume_from_checkpoint.") from err
    return checkpoint


def check_resume_matches(config, checkpoint: str) -> None:
    """The Trainer copies a checkpoint's weights into the model this run built (converted afresh, or loaded), leniently:
    a block converted in one but not the other would keep random or unconverted weights. Both must agree on the
    architecture and the MLA layout, kept key dims included (with 2-norm selection they depend on the calibration)."""
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):  # a LoRA checkpoint without its merged model
        return
    saved = WhisperMLAConfig.from_pretrained(checkpoint)
    differ = []
    for name in RESUME_MUST_MATCH:
        there, here = getattr(saved, name, None), getattr(config, name, None)
        if json.dumps(there, sort_keys=True) != json.dumps(here, sort_keys=True):
            differ.append(f"{name} differs" if name == "kept_key_indices" else f"{name}={there!r} there, {here!r} here")
    if differ:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} holds a model unlike the one this run built ({'; '.join(differ)});"
            " resume with the model, MLA flags and calibration data of that run, or start afresh."
        )


def clear_output_dir(output_dir: str) -> None:
    """--overwrite_output_dir, just before training: the old run goes as a whole (an earlier final model must not be
    taken for this run's), renamed aside first so a kill mid-deletion leaves nothing of it at output_dir."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        logger.info("--overwrite_output_dir: deleting the earlier content of %s.", output_dir)
        remove_dir(output_dir)


class _DropMergedCheckpointKeyWarnings(logging.Filter):
    """A LoRA checkpoint's top level is the merged model, whose keys the Trainer's PeftModel cannot match; the
    adapter is restored from lora_adapter/ instead, so the Trainer's missing/unexpected-key warnings are moot."""

    def filter(self, record):
        return "keys in the checkpoint model loaded" not in record.getMessage()


def restore_lora_adapter(model, checkpoint: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(checkpoint, LORA_ADAPTER_DIR, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(
            f"Resuming a --trainable lora run expects the adapter at {path}, but found no such file; resume from a "
            "checkpoint of a LoRA run (or with the --trainable it was started with)."
        )
    try:
        adapter = load_file(path)
    except SafetensorError as err:
        raise CheckpointError(f"The LoRA adapter {path} is damaged or truncated ({err}); resume from an earlier "
                              "checkpoint.") from err
    try:
        result = set_peft_model_state_dict(model, adapter)
    except RuntimeError as err:  # torch's "size mismatch for ..."
        raise CheckpointError(f"The LoRA adapter {path} does not fit this run's model ({str(err).splitlines()[-1]}); "
                              "resume with the flags of the run that saved it.") from err
    # load_state_dict(strict=False) of the whole model: every base weight is "missing", only adapter keys matter.
    problems = list(result.unexpected_keys) + [k for k in result.missing_keys if "lora_" in k]
    if problems:
        raise CheckpointError(
            f"The LoRA adapter {path} does not fit this run's model: {len(problems)} adapter weights have no place or "
            f"no value ({', '.join(problems[:3])}); resume with the --trainable, --lora_r and MLA flags of the run "
            "that saved it."
        )
    logging.getLogger("transformers.trainer").addFilter(_DropMergedCheckpointKeyWarnings())


def training_summary(model_args, data_args, distill_args, training_args, data_report, metrics) -> str:
    """Markdown for the model card: training settings, data and eval WER."""
    rows = [
        ("trainable", model_args.trainable + (f" (r={model_args.lora_r}, alpha={model_args.lora_alpha})"
                                              if model_args.trainable == "lora" else "")),
        ("objective", f"distillation from {distill_args.teacher_model_name_or_path or 'the MHA original'} on its "
                      f"greedy transcripts (T={distill_args.distill_temperature}, alpha={distill_args.distill_alpha}), "
                      "no transcripts used" if distill_args.distill else "cross-entropy on transcripts"),
        ("training data", ", ".join(data_args.train_data)),
        ("training clips", f"{data_report['train_samples']} ({data_report['train_skipped_bad']} bad rows skipped, "
                           f"{data_report['train_dropped_long']} too long dropped"
                           + (f", {metrics['train_skipped_bad_during_training']} undecodable skipped during training"
                              if metrics.get("train_skipped_bad_during_training") else "") + ")"),
        ("steps", f"{metrics.get('global_step')} (batch {training_args.per_device_train_batch_size} x "
                  f"{training_args.gradient_accumulation_steps} accumulation x {training_args.world_size} processes)"),
        ("optimizer", f"{getattr(training_args.optim, 'value', training_args.optim)}, lr {training_args.learning_rate}, betas ({training_args.adam_beta1}, "
                      f"{training_args.adam_beta2}), weight decay {training_args.weight_decay}"),
        ("schedule", f"{getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)} "
                     f"{training_args.lr_scheduler_kwargs or ''}, "
                     f"warmup {training_args.warmup_steps}"),
    ]
    if "eval_wer" in metrics:
        rows.append(("eval WER (normalised)", f"{metrics['eval_wer']:.2f} on {data_args.eval_data}"))
    if "eval_wer_before" in metrics:
        rows.append(("eval WER before training", f"{metrics['eval_wer_before']:.2f}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"\n## Recovery training (run_finetune.py)\n\n| setting | value |\n|---|---|\n{table}\n"


def build_train_dataset(data_args, distill_args, model_args, student, teacher, processor, max_label_length,
                        share_encoder: bool, device):
    """Training clips with their targets: tokenised transcripts, or with --distill the teacher's greedy transcripts
    (made once, batched). When the encoder is shared and frozen, its outputs are computed here once per clip.

    Returns (dataset, report of how many clips were used, skipped and dropped).
    """
    examples, skipped = load_clips(data_args.train_data, data_args.train_split, data_args,
                                   data_args.max_train_samples, require_text=not distill_args.distill)
    for message in skipped:
        logger.warning("Skipped: %s", message)
    examples, dropped_long = drop_long_clips(examples, data_args.max_duration_in_seconds)
    precompute = share_encoder and model_args.precompute_encoder_outputs
    if precompute or teacher is not None:
        # Every clip is decoded up front for the encoder outputs or the teacher's transcripts anyway (an extra
        # decode is cheap next to that): find lazily loaded clips that do not decode before any of it.
        examples, undecodable = drop_undecodable(examples, data_args.skip_bad_samples)
        skipped += undecodable
    labels, dropped_labels = None, 0
    if not distill_args.distill:
        examples, labels, dropped_labels = tokenize_transcripts(examples, processor.tokenizer, max_label_length,
                                                                data_args.do_lower_case)
    if not examples:
        raise ValueError(f"Found no usable training clips in {data_args.train_data} ({len(skipped)} bad, "
                         f"{dropped_long} longer than {data_args.max_duration_in_seconds} s, {dropped_labels} with "
                         "transcripts over max_label_length); check the data and those limits.")
    audios = [e["audio"] for e in examples]
    if precompute and not fits_in_memory(len(audios), student.config):
        logger.warning("Encoder outputs of %d clips would not fit in memory; the encoder runs every step instead.",
                       len(audios))
        precompute = False
    states = None
    if precompute or teacher is not None:
        prefix = processor.tokenizer.prefix_tokens
        generate_kwargs = {"max_new_tokens": max_label_length - len(prefix)}
        if data_args.language is not None:
            generate_kwargs.update(language=data_args.language, task=data_args.task)
        student.eval()
        states, pseudo_labels = precompute_targets(
            audios, processor.feature_extractor, encoder=student.get_encoder() if precompute else None,
            teacher=teacher, batch_size=distill_args.pseudo_label_batch_size, prefix=prefix,
            generate_kwargs=generate_kwargs, device=device,
        )
        if pseudo_labels is not None:
            labels = pseudo_labels
            for ids in pseudo_labels[:3]:
                logger.info("Pseudo-label: %r", processor.tokenizer.decode(ids, skip_special_tokens=True))
    dataset = SpeechSeq2SeqDataset(None if precompute else audios, labels, processor.feature_extractor, states,
                                   skip_bad=data_args.skip_bad_samples)
    report = {"train_samples": len(dataset), "train_skipped_bad": len(skipped), "train_dropped_long": dropped_long,
              "train_dropped_long_labels": dropped_labels}
    logger.info("Training clips: %s", report)
    return dataset, report


def build_eval_dataset(data_args, processor, max_label_length):
    """Evaluation clips with tokenised transcripts; returns (dataset, report)."""
    examples, skipped = load_clips([data_args.eval_data], data_args.eval_split, data_args,
                                   data_args.max_eval_samples, require_text=True)
    # Evaluating on a substitute for a damaged clip would change the eval set: damaged clips go before training.
    examples, undecodable = drop_undecodable(examples, data_args.skip_bad_samples)
    skipped += undecodable
    examples, _ = drop_long_clips(examples, data_args.max_duration_in_seconds)
    examples, labels, _ = tokenize_transcripts(examples, processor.tokenizer, max_label_length,
                                               data_args.do_lower_case)
    dataset = SpeechSeq2SeqDataset([e["audio"] for e in examples], labels, processor.feature_extractor)
    return dataset, {"eval_samples": len(dataset), "eval_skipped_bad": len(skipped)}


def save_and_push(trainer, model, processor, card: str) -> None:
    """The final Whisper-MLA checkpoint with our model card in output_dir; with --push_to_hub, the Trainer's push."""
    args = trainer.args
    if trainer.is_world_process_zero():
        # The checkpoint-N folders stay where they are; the model at the top appears complete or not at all.
        with atomic_checkpoint_files(args.output_dir) as tmp:
            save_mla_checkpoint(model, processor, tmp, card_text=card)
        logger.info("Saved the Whisper-MLA checkpoint to %s", args.output_dir)
    if not args.push_to_hub:
        return
    trainer.push_to_hub()  # the Trainer's own; it writes its generic model card, replaced by ours below
    if trainer.is_world_process_zero():
        from huggingface_hub import HfApi

        with open(os.path.join(args.output_dir, "README.md"), "w") as f:
            f.write(card)
        HfApi().upload_file(path_or_fileobj=os.path.join(args.output_dir, "README.md"), path_in_repo="README.md",
                            repo_id=trainer.hub_model_id)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, distill_args, mla_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    logger.setLevel(logging.INFO if training_args.should_log else training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    if model_args.model_name_or_path is None or not data_args.train_data:
        raise ValueError("run_finetune.py expects --model_name_or_path and --train_data, but found "
                         f"{model_args.model_name_or_path!r} and {data_args.train_data!r}; pass both (see --help).")
    # The datasets yield exactly the model inputs; encoder_hidden_states is no forward() argument: keep it.
    training_args.remove_unused_columns = False

    # 1. Every input before any expensive work: numbers, output folder and resume point, the checkpoints (strictly,
    # on the meta device).
    validate_arguments(model_args, data_args, distill_args, training_args)
    resume_checkpoint = resolve_output_dir(training_args, model_args.overwrite_output_dir,
                                           lora=model_args.trainable == "lora")
    check_models(model_args, data_args, distill_args, training_args)
    set_seed(training_args.seed)  # conversion and LoRA initialisation are then reproducible

    # 2. Processor, student (converted from MHA here, or loaded), teacher.
    processor = load_processor(model_args.model_name_or_path)
    student, teacher = load_student_and_teacher(model_args, distill_args, mla_args, processor)
    if resume_checkpoint is not None:
        check_resume_matches(student.config, resume_checkpoint)
    student.to(training_args.device)
    if teacher is not None:
        teacher.to(training_args.device)
    # Whisper's forward takes **kwargs but returns a plain mean loss: without this the Trainer would skip the
    # division by gradient_accumulation_steps (and multiply by the number of processes).
    student.accepts_loss_kwargs = False
    if data_args.language is not None:
        processor.tokenizer.set_prefix_tokens(language=data_args.language, task=data_args.task)
        student.generation_config.language, student.generation_config.task = data_args.language, data_args.task
    max_label_length = data_args.max_label_length or student.config.max_target_positions

    # 3. What trains; whether one encoder pass can serve student and teacher.
    model = set_trainable(student, model_args)
    if resume_checkpoint is not None and model_args.trainable == "lora":
        restore_lora_adapter(model, resume_checkpoint)
    encoder_frozen = not any(p.requires_grad for p in student.get_encoder().parameters())
    share_encoder = encoder_frozen and (teacher is None or encoders_match(student, teacher))

    # 4. Data.
    train_dataset, data_report = build_train_dataset(data_args, distill_args, model_args, student, teacher,
                                                     processor, max_label_length, share_encoder, training_args.device)
    eval_dataset = None
    if data_args.eval_data is not None:
        eval_dataset, eval_report = build_eval_dataset(data_args, processor, max_label_length)
        data_report.update(eval_report)

    # 5. Trainer. Only now, with every input read, does --overwrite_output_dir delete the old run.
    if training_args.should_save:
        if resume_checkpoint is None and model_args.overwrite_output_dir:
            clear_output_dir(training_args.output_dir)
        os.makedirs(training_args.output_dir, exist_ok=True)
        copy_remote_code(training_args.output_dir)  # so that pushes of intermediate checkpoints carry it too
    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorSpeechSeq2SeqWithPadding(student.config.decoder_start_token_id),
        processing_class=processor,
        compute_metrics=make_compute_metrics(processor.tokenizer, data_args.language)
        if training_args.predict_with_generate else None,
        callbacks=[WhisperMLACheckpointCallback(processor)]
        + ([TimeLimitCallback(model_args.max_train_minutes)] if model_args.max_train_minutes else []),
        teacher=teacher,
        share_encoder=share_encoder,
        temperature=distill_args.distill_temperature,
        alpha=distill_args.distill_alpha,
    )

    # 6. Train, then evaluate the merged model.
    train_result = trainer.train(resume_from_checkpoint=resume_checkpoint)
    metrics = {**train_result.metrics, **data_report, "global_step": trainer.state.global_step,
               "train_skipped_bad_during_training": count_bad_clips(train_dataset, training_args.device)}
    before = [log["eval_wer"] for log in trainer.state.log_history if "eval_wer" in log and log["step"] == 0]
    if before:
        metrics["eval_wer_before"] = before[0]
    trainer.model = trainer.model_wrapped = model = merge_lora(model)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_metrics("all", metrics)
    trainer.save_state()  # trainer_state.json: the loss and eval history

    # 7. Save the Whisper-MLA checkpoint with its model card; push.
    card = model_card(model, extra=training_summary(model_args, data_args, distill_args, training_args, data_report,
                                                    metrics))
    save_and_push(trainer, model, processor, card)
    return metrics


if __name__ == "__main__":
    run_cli(main)
