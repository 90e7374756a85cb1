"""Recovery training of a Whisper-MLA model after the MHA -> MLA conversion; `run_finetune.py` is its command line.

    whisper_mla.training.arguments     ModelArguments, DataArguments, DistillationArguments, validate_arguments
    whisper_mla.training.models        the student (converted or loaded) and teacher, loaded strictly; checks
    whisper_mla.training.trainable     --trainable (set_trainable), LoRA merging and resuming
    whisper_mla.training.controls      the paired controls (--mha_baseline, --mla_from_scratch); saving either model
    whisper_mla.training.data          clips, labels or pseudo-labels, precomputed encoder outputs, dataset, collator
    whisper_mla.training.concatenate   long-form samples (--concatenate_to_seconds), timestamped labels
    whisper_mla.training.distillation  token_kl, distillation_loss and DistillationTrainer
    whisper_mla.training.callbacks     Whisper-MLA checkpoint-N folders, --max_train_minutes, eval WER
    whisper_mla.training.checkpoints   the output folder and the resume point, checked before any work
"""
