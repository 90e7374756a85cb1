"""Label-free recovery: the distillation loss, and the Trainer that computes it (or plain cross-entropy) from raw
features or precomputed encoder outputs."""

import torch
import torch.nn.functional as F
from transformers import Seq2SeqTrainer
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from whisper_mla.training.trainable import restore_lora_adapter


def token_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the token distributions at softmax temperature T, summed over the vocabulary.

    Args:
        student_logits, teacher_logits: (N, V), one row per position.

    Returns:
        (N,): one KL per position (float32).
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)


def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the token distributions, summed over the vocabulary and averaged over the
    label positions (labels != -100).

    Args:
        student_logits, teacher_logits: (B, T, V).
        labels: (B, T); -100 marks padding.
        temperature: softmax temperature T of both distributions.

    Returns:
        a scalar tensor.
    """
    mask = labels.ne(-100)
    return token_kl(student_logits[mask], teacher_logits[mask], temperature).mean() * temperature**2


class DistillationTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose loss takes precomputed encoder outputs and, given a teacher, distils from it.

    Both losses are per-batch means (Whisper's cross-entropy averages over the batch's label tokens; so does the
    distillation loss), so the Trainer divides them by the gradient accumulation steps. A LoRA model resumes from its
    checkpoint's `lora_adapter/` (see `restore_lora_adapter`).

    Args:
        teacher: frozen model whose token distributions the student learns, or None for plain cross-entropy.
        share_encoder: the student's encoder is frozen and equals the teacher's, so one encoder pass serves both.
        temperature, alpha: see `distillation_loss`; loss = (1 - alpha) * KL term + alpha * cross-entropy.
    """

    # Whisper's forward takes **kwargs, so the Trainer would take it for a model that normalises its loss by
    # num_items_in_batch and skip the division by the accumulation steps (and multiply by the number of processes).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher=None, share_encoder=False, temperature=1.0, alpha=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # no num_items_in_batch to forward(): it returns a plain mean
        self.teacher, self.share_encoder = teacher, share_encoder
        self.temperature, self.alpha = temperature, alpha

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
            teacher_logits = self.teacher(**inputs, decoder_input_ids=decoder_input_ids).logits  # (B, T, V)
        outputs = model(**inputs, decoder_input_ids=decoder_input_ids, labels=labels if self.alpha > 0 else None)
        loss = distillation_loss(outputs.logits, teacher_logits, labels, self.temperature)
        if self.alpha > 0:
            loss = (1 - self.alpha) * loss + self.alpha * outputs.loss
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """As the Trainer's, but a LoRA model restores its adapter from `lora_adapter/`: the checkpoint's top level
        holds the merged plain model, whose keys the `PeftModel` does not have."""
        from peft import PeftModel

        model = self.model if model is None else model
        if isinstance(model, PeftModel):
            restore_lora_adapter(model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
