"""What the Trainer calls back into: Whisper-MLA checkpoints at every save, the --max_train_minutes stop, and the
WER of predict_with_generate."""

import copy
import logging
import os
import time

import numpy as np
from transformers import TrainerCallback

from whisper_mla.hub import copy_remote_code, model_card
from whisper_mla.io import atomic_checkpoint_files
from whisper_mla.metrics import compute_wer, get_normalizer
from whisper_mla.training.controls import is_mla_model, save_model
from whisper_mla.training.trainable import LORA_ADAPTER_DIR, merge_lora


logger = logging.getLogger(__name__)


class WhisperMLACheckpointCallback(TrainerCallback):
    """Makes each `checkpoint-N` a Whisper-MLA checkpoint that loads with trust_remote_code=True (the MHA control's:
    a plain Whisper checkpoint).

    The Trainer writes weights, config (with auto_map), generation config and processor; this adds the remote code.
    For LoRA runs it moves the Trainer's adapter files to `checkpoint-N/lora_adapter/` (what a resume reads) and
    writes the merged plain model in their place.

    Args:
        processor: saved into every merged checkpoint.
        attn_implementation: the decode path of merged LoRA checkpoints (see `merge_lora`).
        card: the model card of merged checkpoints, from the merged model; default: `whisper_mla.hub.model_card`.
    """

    def __init__(self, processor, attn_implementation: str, card=None):
        self.processor, self.attn_implementation = processor, attn_implementation
        self.card = card or model_card

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
            merged = merge_lora(copy.deepcopy(model), self.attn_implementation)
            with atomic_checkpoint_files(folder) as tmp:  # killed mid-save, the folder's top level does not load
                save_model(merged, self.processor, tmp, card_text=self.card(merged))
        elif is_mla_model(model):
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
    """compute_metrics for predict_with_generate: normalised corpus WER x100 (run_eval's definition) as `wer`.

    Args:
        tokenizer: decodes predictions and labels (special tokens skipped).
        language: picks the normaliser (`whisper_mla.metrics.get_normalizer`).
    """
    normalizer = get_normalizer(language)

    def compute_metrics(prediction):
        # The Trainer pads predictions and labels across batches with -100.
        predictions = np.where(prediction.predictions == -100, tokenizer.pad_token_id, prediction.predictions)
        label_ids = np.where(prediction.label_ids == -100, tokenizer.pad_token_id, prediction.label_ids)
        hypotheses = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(label_ids, skip_special_tokens=True)
        return {"wer": compute_wer(references, hypotheses, normalizer)["wer"]}

    return compute_metrics
