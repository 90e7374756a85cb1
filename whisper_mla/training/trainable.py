"""What trains (--trainable): whole model, attention blocks, converted blocks, or LoRA on the converted blocks'
projections; merging LoRA into a plain Whisper-MLA model; restoring a LoRA run's adapter on resume."""

import os

from transformers.models.whisper.modeling_whisper import WhisperAttention

from whisper_mla.io import CheckpointError
from whisper_mla.training.arguments import ModelArguments
from whisper_mla.training.controls import converted_block_names, is_mla_model


MLA_PROJECTIONS = ("q_proj", "kv_a_proj", "k_b_proj", "v_b_proj", "out_proj")
MHA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # the MHA control's blocks (--mha_baseline)
LORA_ADAPTER_DIR = "lora_adapter"  # inside checkpoint-N: what a LoRA run resumes from


def set_trainable(model, model_args: ModelArguments, block_names: list[str] | None = None):
    """Applies --trainable. Returns the model to train: the same model, or a peft `PeftModel` for LoRA.

    `all` trains every parameter but the sinusoidal encoder positions, which Whisper keeps fixed; `attention` trains
    the parameters of every attention block (q/k/v/out or the MLA projections); `mla` those of converted blocks and
    the shared cross projection; `mla_self` those of converted self-attention blocks only;
    `lora` adds LoRA to the MLA projections of converted blocks and freezes everything else; until the adapter is
    merged (`merge_lora`), the model decodes through the modules (mla_attn_implementation "naive").

    The MHA control (--mha_baseline) trains the same blocks unconverted: `mla` (`mla_self`) their q/k/v/out, `lora`
    LoRA on those.

    Args:
        model: a `WhisperMLAForConditionalGeneration`, or the MHA control's `WhisperForConditionalGeneration`; its
            requires_grad flags are changed in place.
        model_args: --trainable and the LoRA settings.
        block_names: the blocks `mla` and `lora` train (relative to `model.model`); default: the converted blocks of
            a Whisper-MLA model. Required for an MHA model (`controls.converted_block_names`).

    Returns:
        the model to train.
    """
    mode = model_args.trainable
    mla = is_mla_model(model)
    if block_names is None:
        block_names = converted_block_names(model)
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
    if mode in ("mla", "mla_self"):
        for name in block_names:
            if mode == "mla" or name.endswith("self_attn"):
                model.model.get_submodule(name).requires_grad_(True)
        if shared_down is not None and mode == "mla":
            shared_down.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    modules = dict(model.named_modules())
    projections = MLA_PROJECTIONS if mla else MHA_PROJECTIONS
    targets = [f"model.{block}.{proj}" for block in block_names for proj in projections
               if f"model.{block}.{proj}" in modules]  # blocks reading a shared cross latent have no kv_a_proj
    if shared_down is not None:
        targets.append("model.decoder.cross_kv_a_proj")
    lora_config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                             lora_dropout=model_args.lora_dropout, target_modules=targets, bias="none")
    if mla:
        # The absorbed decode path reads k_b_proj/v_b_proj weights directly, which would skip unmerged LoRA factors:
        # decode through the modules until the adapter is merged (merge_lora sets the decode path again).
        model.set_mla_runtime(attn_implementation="naive")
    # When saving, peft reads the config at the base model's name_or_path to see if the vocabulary changed; a converted
    # student's name_or_path is its MHA original, not a Whisper-MLA config. Only this script reads the adapter back.
    model.name_or_path = ""
    return get_peft_model(model, lora_config)


def merge_lora(model, attn_implementation: str):
    """A plain Whisper-MLA model from a LoRA `PeftModel` (merge_and_unload); other models are returned as they are.

    Args:
        model: the model `set_trainable` returned; a `PeftModel` is merged in place.
        attn_implementation: the decode path of the merged model ("absorb" or "naive"; `set_trainable` switched a
            LoRA model to "naive"): the run's --mla_attn_implementation.

    Returns:
        a `WhisperMLAForConditionalGeneration` (the MHA control: a `WhisperForConditionalGeneration`).
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    merged = model.merge_and_unload()
    return merged.set_mla_runtime(attn_implementation=attn_implementation) if is_mla_model(merged) else merged


def restore_lora_adapter(model, checkpoint: str) -> None:
    """Loads a LoRA run's adapter from `checkpoint/lora_adapter/` into `model` (a `PeftModel` from `set_trainable`),
    strictly: a missing, damaged or mis-shaped adapter is an error, not a silently fresh adapter.

    The top level of a LoRA run's checkpoint-N holds the merged model (for loading elsewhere), whose keys the
    `PeftModel` does not have: resuming reads the adapter instead (see `DistillationTrainer._load_from_checkpoint`).

    Raises:
        ValueError: there is no adapter; `CheckpointError`: it is damaged or does not fit the model.
    """
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
