"""The output folder and the resume point of recovery training, checked before any work: a new or empty folder, or
a complete checkpoint-N that matches the model this run builds."""

import json
import logging
import os

from transformers import WhisperConfig
from transformers.trainer_utils import sort_checkpoints

from configuration_whisper_mla import WhisperMLAConfig
from whisper_mla.io import CheckpointError, check_output_dir, checkpoint_config, remove_dir
from whisper_mla.training.models import load_whisper


logger = logging.getLogger(__name__)

RESUME_LATEST = ("latest", "last", "true")
RESUME_MUST_MATCH = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                     "decoder_attention_heads", "vocab_size", "mla_targets", "kv_lora_rank", "kept_key_dims",
                     "svd_method", "kept_key_indices", "cross_attention_latent", "cross_kv_lora_rank", "kv_lora_ranks",
                     "cross_latent_stride", "cross_latent_pooling")


def is_complete_checkpoint(folder: str) -> bool:
    """Whether the Trainer finished writing checkpoint `folder`: trainer_state.json is the last file it writes."""
    return os.path.isfile(os.path.join(folder, "trainer_state.json"))


def resolve_output_dir(training_args, overwrite: bool, lora: bool = False) -> str | None:
    """Checks output_dir against --resume_from_checkpoint before any expensive work, deleting nothing yet (see
    `clear_output_dir`).

    Args:
        training_args: output_dir and resume_from_checkpoint (a checkpoint-N path, "latest", or None).
        overwrite: --overwrite_output_dir; a folder with content is otherwise refused.
        lora: the run resumes from the checkpoint's LoRA adapter (see `check_resume_checkpoint`).

    Returns:
        the checkpoint to resume from (a complete checkpoint-N folder), or None to start afresh.
    """
    output_dir, resume = training_args.output_dir, training_args.resume_from_checkpoint
    # The Trainer's own ordering (by step). Not get_last_checkpoint: the last one may be incomplete (killed while
    # saving), and "latest" means the latest complete one.
    checkpoints = sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    names = [os.path.basename(c) for c in checkpoints]
    if resume is not None and str(resume).lower() in RESUME_LATEST:
        complete = [c for c in checkpoints if is_complete_checkpoint(c)]
        if not complete:
            raise ValueError(
                f"--resume_from_checkpoint {resume} expects a complete checkpoint-N folder in {output_dir!r}, but "
                f"found {names or 'none'}; drop --resume_from_checkpoint to start afresh."
            )
        return check_resume_checkpoint(complete[-1], lora)
    if resume is not None:
        if not is_complete_checkpoint(resume):
            raise ValueError(
                f"--resume_from_checkpoint expects a checkpoint-N folder holding trainer_state.json, but found "
                f"{resume!r} without it (missing or interrupted while saving); pass an earlier checkpoint or 'latest'."
            )
        return check_resume_checkpoint(resume, lora)
    if checkpoints and not overwrite:
        raise ValueError(
            f"Expected a new or empty --output_dir, but found {names} in {output_dir!r}; pass "
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
    model type (the MHA control's plain Whisper, or Whisper-MLA), the architecture and the MLA layout, kept key dims
    included (with 2-norm selection they depend on the calibration)."""
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):  # a LoRA checkpoint without its merged model
        return
    saved_type = checkpoint_config(checkpoint).get("model_type")
    if saved_type != config.model_type:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} holds a {saved_type} model, but this run builds a "
            f"{config.model_type} model (--mha_baseline trains the unconverted Whisper); resume with the flags of "
            "that run, or start afresh."
        )
    saved = (WhisperMLAConfig if saved_type == "whisper_mla" else WhisperConfig).from_pretrained(checkpoint)
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
