"""The paired controls of a recovery run, one flag each, with the data, steps and schedule of the MLA run:

    --mha_baseline      the MHA model fine-tuned itself (no conversion): what fine-tuning alone is worth
    --mla_from_scratch  the converted model with random low-rank projections: what the SVD initialisation is worth

and saving either kind of model: a Whisper-MLA checkpoint, or the MHA control's plain Whisper checkpoint.
"""

import os

import torch

from configuration_whisper_mla import WhisperMLAConfig
from whisper_mla.conversion import mla_config_from_whisper
from whisper_mla.hub import save_mla_checkpoint


MLA_LOW_RANK_PROJECTIONS = ("kv_a_proj", "k_b_proj", "v_b_proj")  # what the SVD initialises (q/out are copied)


def is_mla_model(model) -> bool:
    """Whether `model` is a Whisper-MLA model (else the MHA control's plain Whisper)."""
    return isinstance(model.config, WhisperMLAConfig)


def converted_block_names(model, mla_args=None) -> list[str]:
    """Module paths (relative to `model.model`) of the attention blocks an MLA run converts: those of a Whisper-MLA
    model, or for an MHA model (--mha_baseline) the blocks `--mla_targets` would convert, found by the same code.

    Args:
        model: a Whisper-MLA or Whisper (MHA) model.
        mla_args: the run's MLA flags (`MLAArguments`); needed for an MHA model.
    """
    if is_mla_model(model):
        return model.config.mla_block_names()
    if mla_args is None:
        raise ValueError("An MHA model has no converted blocks of its own: pass the run's MLA flags (mla_args) to map "
                         "--mla_targets onto its blocks.")
    return mla_config_from_whisper(model.config, mla_args).mla_block_names()


def check_control_flags(model_args, start_is_mla: bool) -> None:
    """The MHA control starts from the MHA model (--mla_from_scratch starts from either: it redraws the low-rank
    projections of the model converted here or of the loaded Whisper-MLA checkpoint)."""
    if model_args.mha_baseline and start_is_mla:
        raise ValueError(
            "--mha_baseline fine-tunes the MHA model without converting it, so it expects a Whisper (MHA) "
            f"--model_name_or_path, but found a Whisper-MLA checkpoint at {model_args.model_name_or_path!r}; pass the "
            "MHA model it was converted from (its config's mla_conversion.base_model)."
        )


@torch.no_grad()
def reinitialise_low_rank_projections(model, seed: int, self_attention_only: bool = False) -> list[str]:
    """--mla_from_scratch: draws the low-rank projections of every converted block (kv_a_proj, k_b_proj, v_b_proj;
    and the shared `decoder.cross_kv_a_proj`), or of the self-attention blocks only (what --trainable mla_self
    trains), afresh with the model's own `_init_weights` (normal weights with std
    config.init_std, zero biases), from `seed`, leaving every other weight (q_proj, out_proj, ...) as it is and the
    global random state untouched.

    Args:
        model: a `WhisperMLAForConditionalGeneration`, changed in place.
        seed: the random seed (--seed).
        self_attention_only: redraw the converted self-attention blocks only.

    Returns:
        the re-initialised modules' names (relative to `model`).
    """
    modules = dict(model.named_modules())
    blocks = [block for block in model.config.mla_block_names()
              if not self_attention_only or block.endswith("self_attn")]
    names = [f"model.{block}.{proj}" for block in blocks for proj in MLA_LOW_RANK_PROJECTIONS
             if f"model.{block}.{proj}" in modules]  # blocks reading a shared cross latent have no kv_a_proj
    if getattr(model.model.decoder, "cross_kv_a_proj", None) is not None and not self_attention_only:
        names.append("model.decoder.cross_kv_a_proj")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            for parameter in modules[name].parameters():
                parameter._is_hf_initialized = False  # transformers' init functions skip parameters marked loaded
            model._init_weights(modules[name])
    return names


def save_model(model, processor, folder: str, card_text: str) -> None:
    """Saves the run's model with its card: a Whisper-MLA checkpoint (remote code included), or the MHA control as a
    plain Whisper checkpoint (model_type whisper) that `WhisperForConditionalGeneration` loads."""
    if is_mla_model(model):
        save_mla_checkpoint(model, processor, folder, card_text=card_text)
        return
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card_text)


def mha_control_card(model, base_model: str, extra: str = "") -> str:
    """The model card of the MHA control (--mha_baseline): what it is and what to compare it with."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", pipeline_tag="automatic-speech-recognition",
                         base_model=base_model if base_model and not os.path.isdir(base_model) else None,
                         tags=["whisper", "whisper-mla", "mha-control"])
    body = f"""
# Whisper MHA control (no MLA conversion)

This checkpoint is {base_model} fine-tuned **without** the MHA -> MLA conversion (`run_finetune.py --mha_baseline`):
the paired control of a Whisper-MLA recovery run, trained on the same data, steps and schedule. Its attention is the
original multi-head attention ({model.config.decoder_attention_heads} decoder heads, full keys and values cached).
Compare the MLA run's WER with this model's, not with the untouched original's: the difference is the cost of the
conversion after fine-tuning.

```python
from transformers import WhisperForConditionalGeneration
model = WhisperForConditionalGeneration.from_pretrained("PATH_OR_REPO")
```
{extra}"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
