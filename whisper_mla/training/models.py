"""Loading the student and teacher of recovery training: Whisper (MHA) or Whisper-MLA checkpoints, strictly; the MHA
student converted to MLA here (or kept as it is, or re-initialised: the paired controls); and the checks on both made
on the meta device before any work."""

import copy
import logging

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from modeling_whisper_mla import WhisperMLAForConditionalGeneration
from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla, load_calibration_audio, needs_calibration
from whisper_mla.hub import register_remote_code
from whisper_mla.io import checkpoint_config, from_pretrained_strict
from whisper_mla.training.controls import check_control_flags, is_mla_model, reinitialise_low_rank_projections
from whisper_mla.transcription import build_generate_kwargs


logger = logging.getLogger(__name__)


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
    """The feature extractor and tokenizer saved next to the model. WhisperProcessor, not AutoProcessor: the latter
    resolves a Whisper-MLA config's auto_map. trust_remote_code=False: without it even WhisperProcessor reads the
    auto_map and asks on stdin (a run would stall there); the processor needs no remote code."""
    try:
        return WhisperProcessor.from_pretrained(name_or_path, trust_remote_code=False)
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
    if mla_args.kv_lora_rank_allocation != defaults.kv_lora_rank_allocation:
        logger.warning("--kv_lora_rank_allocation is ignored: the model is already a Whisper-MLA checkpoint (its "
                       "config's kv_lora_ranks holds the widths it was converted with).")
    for name in ("cross_frame_weighting", "output_aware"):
        if getattr(mla_args, name) != getattr(defaults, name):
            logger.warning("--%s is ignored: the model is already a Whisper-MLA checkpoint (its config's "
                           "mla_conversion says how it was calibrated).", name)


def load_student_and_teacher(model_args, distill_args, mla_args, processor, seed: int = 0):
    """The student and, with --distill, the frozen teacher.

    The student is the Whisper-MLA model (converted here from an MHA checkpoint, or loaded); with --mla_from_scratch
    its low-rank projections are then drawn afresh from `seed` (a loaded checkpoint's too: both arms of a recovery run
    can start from one calibrated conversion); with --mha_baseline it is the MHA model itself,
    unconverted (the paired control), and the default teacher is a frozen copy of it.

    Returns:
        (student, teacher or None).
    """
    model, is_mla = load_whisper(model_args.model_name_or_path)
    check_control_flags(model_args, is_mla)
    if model_args.mha_baseline:
        if mla_args.calibration_data is not None:
            logger.warning("--calibration_data is ignored: --mha_baseline does not convert the model.")
        student, mha = model, model
    elif is_mla:
        check_mla_flags_match(model.config, mla_args)
        student, mha = model.set_mla_runtime(attn_implementation=mla_args.mla_attn_implementation), None
    else:
        audios = None
        if mla_args.calibration_data is not None and not needs_calibration(model.config, mla_args):
            logger.info("--calibration_data is not read: these MLA settings are exact at every converted block.")
        elif mla_args.calibration_data is not None:
            audios = load_calibration_audio(mla_args.calibration_data, mla_args.calibration_samples)
        student = convert_whisper_to_mla(model, mla_args, calibration_audio=audios,
                                         feature_extractor=processor.feature_extractor)
        mha = model
    if model_args.mla_from_scratch:  # converted here or loaded converted: the conversion gives the shapes
        names = reinitialise_low_rank_projections(student, seed, self_attention_only=model_args.trainable == "mla_self")
        logger.info("--mla_from_scratch: re-initialised %d low-rank projections (seed %d): %s", len(names), seed,
                    ", ".join(names))
    if is_mla_model(student):
        register_remote_code(student.config)  # every checkpoint-N config.json then names the shipped code
    if not distill_args.distill:
        return student, None
    if distill_args.teacher_model_name_or_path is not None:
        teacher, _ = load_whisper(distill_args.teacher_model_name_or_path)
    elif mha is not None:
        teacher = copy.deepcopy(mha) if mha is student else mha  # the MHA control's teacher: a frozen copy of itself
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
    student, start_is_mla = load_whisper(model_args.model_name_or_path, check_only=True)
    check_control_flags(model_args, start_is_mla)
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


def encoders_match(student, teacher) -> bool:
    """True when the student's and teacher's encoders hold identical weights."""
    s, t = student.get_encoder().state_dict(), teacher.get_encoder().state_dict()
    return s.keys() == t.keys() and all(torch.equal(s[k], t[k].to(s[k].device)) for k in s)
