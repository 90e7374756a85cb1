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
`--pseudo_label_cache labels.json` keeps those transcripts in a JSON file for later runs: a clip whose audio, teacher
and decoding settings match one there is not transcribed again (the others are, and are added).

Paired controls, one flag each, with the data, steps and schedule of the MLA run they are compared with:
`--mha_baseline` fine-tunes the MHA model itself (no conversion; `--trainable mla` trains q/k/v/out of the blocks the
MLA run converts) and saves a plain Whisper checkpoint; `--mla_from_scratch` converts as usual (or loads the Whisper-MLA
checkpoint given), then draws the low-rank projections afresh (what the SVD initialisation is worth).

    python run_finetune.py configs/tiny-en-cpu.yaml --mha_baseline --output_dir outputs/tiny-en-mha-control
    python run_finetune.py configs/tiny-en-cpu.yaml --mla_from_scratch --output_dir outputs/tiny-en-mla-scratch

Long-form training: `--concatenate_to_seconds 30` joins consecutive utterances of one speaker (short silences
between them) into samples of up to 30 s; `--concatenate_timestamps` labels each utterance with Whisper's timestamp
tokens (with `--distill`, the teacher is asked for them), so that timestamped long-form decoding is trained;
`--concatenate_keep_utterances` trains on the single utterances (without timestamps) beside them.
`--speed_perturbation 0.9 1.1` adds copies of every clip at those speeds (tempo and pitch: other-sounding voices).

Every `checkpoint-N` and the final `output_dir` are Whisper-MLA checkpoints that load in a fresh process with
`AutoModelForSpeechSeq2Seq.from_pretrained(path, trust_remote_code=True)`; `--resume_from_checkpoint latest`
(or a checkpoint path) continues an interrupted run to the same weights as an uninterrupted one.

Nothing is left half-done: every input (numbers, checkpoints, output folder) is checked before any work; checkpoints
load strictly; `--overwrite_output_dir` deletes the old folder as a whole when training starts (never merging into
it); the final model appears at the top of `output_dir` only once it is complete (its config.json is written last).
With `--lazy_audio_loading --skip_bad_samples` a clip whose audio turns out damaged mid-training is logged, counted
(`train_skipped_bad_during_training`) and replaced by the next readable clip.

The pieces (arguments, models, what trains, data, distillation, callbacks, checkpoints) live in
`whisper_mla.training`; this script parses the arguments and runs them in order.

Scale-out is the Trainer's own:
    torchrun --nproc_per_node 2 run_finetune.py configs/tiny-en-cpu.yaml --ddp_backend gloo     # CPU processes
    accelerate launch --num_processes 8 run_finetune.py configs/whisper-small-librispeech-2norm.yaml  # GPUs
    ... --deepspeed ds_config.json                                                              # DeepSpeed
"""

import logging
import os
import sys
from dataclasses import fields
from functools import partial

import transformers
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, set_seed

from whisper_mla.arguments import run_cli
from whisper_mla.conversion import MLAArguments
from whisper_mla.hub import copy_remote_code, model_card, push_checkpoint
from whisper_mla.io import atomic_checkpoint_files
from whisper_mla.training.arguments import DataArguments, DistillationArguments, ModelArguments, validate_arguments
from whisper_mla.training.callbacks import TimeLimitCallback, WhisperMLACheckpointCallback, make_compute_metrics
from whisper_mla.training.checkpoints import check_resume_matches, clear_output_dir, resolve_output_dir
from whisper_mla.training.data import (
    DataCollatorSpeechSeq2SeqWithPadding,
    build_eval_dataset,
    build_train_dataset,
    count_bad_clips,
)
from whisper_mla.training.controls import converted_block_names, is_mla_model, mha_control_card, save_model
from whisper_mla.training.distillation import DistillationTrainer
from whisper_mla.training.models import check_models, encoders_match, load_processor, load_student_and_teacher
from whisper_mla.training.trainable import merge_lora, restore_lora_adapter, set_trainable


logger = logging.getLogger(__name__)

ARGUMENT_CLASSES = (ModelArguments, DataArguments, DistillationArguments, MLAArguments, Seq2SeqTrainingArguments)


def parse_arguments(argv: list[str] | None = None):
    """Parses the five argument dataclasses from the command line, or from a YAML/JSON file given first, whose
    values the remaining command-line flags override (`run_finetune.py configs/x.yaml --max_steps 10`).

    Returns:
        (ModelArguments, DataArguments, DistillationArguments, MLAArguments, Seq2SeqTrainingArguments).
    """
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


def training_summary(model_args, data_args, distill_args, training_args, data_report, metrics, mla_args=None) -> str:
    """Markdown for the model card: training settings (a paired control says so first), data and eval WER."""
    args = training_args
    optim, schedule = getattr(args.optim, "value", args.optim), getattr(args.lr_scheduler_type, "value",
                                                                         args.lr_scheduler_type)
    rows = []
    targets = ", ".join(mla_args.mla_targets) if mla_args is not None else "the MLA run's --mla_targets"
    if model_args.mha_baseline:
        rows.append(("control", "MHA control (--mha_baseline): the MHA model fine-tuned without conversion"
                     + (f"; trainable mla = q/k/v/out of the blocks an MLA run converts ({targets})"
                        if model_args.trainable in ("mla", "lora") else "")
                     + (f"; trainable mla_self = q/k/v/out of the self-attention blocks an MLA run converts"
                        if model_args.trainable == "mla_self" else "")))
    if model_args.mla_from_scratch:
        rows.append(("control", f"MLA from scratch (--mla_from_scratch): low-rank projections re-initialised "
                                f"randomly (seed {args.seed}), not from the SVD"))
    rows += [
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
    ]
    if "train_speed_perturbed_copies" in data_report:
        rows.append(("speed perturbation", f"{data_report['train_speed_perturbed_copies']} copies of the clips at "
                     f"speeds {', '.join(f'{f:g}' for f in data_args.speed_perturbation)} (tempo and pitch)"))
    if "train_joined_samples" in data_report:
        rows.append(("long-form samples", f"{data_report['train_joined_utterances']} utterances joined into "
                     f"{data_report['train_joined_samples']} samples of up to {data_args.concatenate_to_seconds:g} s "
                     f"(mean {data_report['train_joined_mean_seconds']:.1f} s), "
                     + ("with timestamps" if data_args.concatenate_timestamps else "without timestamps")
                     + (", beside the single utterances" if data_args.concatenate_keep_utterances else "")))
    rows += [
        ("steps", f"{metrics.get('global_step')} (batch {args.per_device_train_batch_size} x "
                  f"{args.gradient_accumulation_steps} accumulation x {args.world_size} processes)"),
        ("optimizer", f"{optim}, lr {args.learning_rate}, betas ({args.adam_beta1}, {args.adam_beta2}), weight decay "
                      f"{args.weight_decay}"),
        ("schedule", f"{schedule} {args.lr_scheduler_kwargs or ''}, warmup {args.warmup_steps}"),
    ]
    if "eval_wer" in metrics:
        rows.append(("eval WER (normalised)", f"{metrics['eval_wer']:.2f} on {data_args.eval_data}"))
    if "eval_wer_before" in metrics:
        rows.append(("eval WER before training", f"{metrics['eval_wer_before']:.2f}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"\n## Recovery training (run_finetune.py)\n\n| setting | value |\n|---|---|\n{table}\n"


def save_and_push(trainer, model, processor, card: str) -> None:
    """The final Whisper-MLA checkpoint (the MHA control's: a plain Whisper one) with our model card in output_dir;
    with --push_to_hub, that folder is pushed (checkpoint-N folders excluded) as one commit, from process zero."""
    args = trainer.args
    if not trainer.is_world_process_zero():
        return
    # The checkpoint-N folders stay where they are; the model at the top appears complete or not at all.
    with atomic_checkpoint_files(args.output_dir) as tmp:
        save_model(model, processor, tmp, card_text=card)
    logger.info("Saved the %s checkpoint to %s", "Whisper-MLA" if is_mla_model(model) else "Whisper (MHA control)",
                args.output_dir)
    if args.push_to_hub:
        repo_id = push_checkpoint(args.output_dir, repo_id=trainer.hub_model_id or args.hub_model_id,
                                  token=args.hub_token, private=args.hub_private_repo)
        logger.info("Pushed %s to the Hub as %s", args.output_dir, repo_id)


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
    student, teacher = load_student_and_teacher(model_args, distill_args, mla_args, processor, training_args.seed)
    if resume_checkpoint is not None:
        check_resume_matches(student.config, resume_checkpoint)
    student.to(training_args.device)
    if teacher is not None:
        teacher.to(training_args.device)
    if data_args.language is not None:
        processor.tokenizer.set_prefix_tokens(language=data_args.language, task=data_args.task)
        student.generation_config.language, student.generation_config.task = data_args.language, data_args.task
    max_label_length = data_args.max_label_length or student.config.max_target_positions

    # 3. What trains (the MHA control: the blocks an MLA run converts); whether one encoder pass can serve student
    # and teacher.
    model = set_trainable(student, model_args, converted_block_names(student, mla_args))
    if resume_checkpoint is not None and model_args.trainable == "lora":
        # Checked now, before any expensive work; the Trainer restores it again when it resumes.
        restore_lora_adapter(model, resume_checkpoint)
    encoder_frozen = not any(p.requires_grad for p in student.get_encoder().parameters())
    share_encoder = encoder_frozen and (teacher is None or encoders_match(student, teacher))

    # 4. Data.
    train_dataset, data_report = build_train_dataset(data_args, distill_args, model_args, student, teacher,
                                                     processor, max_label_length, share_encoder, training_args.device,
                                                     training_args.seed)
    eval_dataset = None
    if data_args.eval_data is not None:
        eval_dataset, eval_report = build_eval_dataset(data_args, processor, max_label_length)
        data_report.update(eval_report)

    # 5. Trainer. Only now, with every input read, does --overwrite_output_dir delete the old run.
    if training_args.should_save:
        if resume_checkpoint is None and model_args.overwrite_output_dir:
            clear_output_dir(training_args.output_dir)
        os.makedirs(training_args.output_dir, exist_ok=True)
        if is_mla_model(student):
            copy_remote_code(training_args.output_dir)  # so that pushes of intermediate checkpoints carry it too
    card = model_card if is_mla_model(student) else partial(mha_control_card, base_model=model_args.model_name_or_path)
    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorSpeechSeq2SeqWithPadding(student.config.decoder_start_token_id),
        processing_class=processor,
        compute_metrics=make_compute_metrics(processor.tokenizer, data_args.language)
        if training_args.predict_with_generate else None,
        callbacks=[WhisperMLACheckpointCallback(processor, mla_args.mla_attn_implementation, card)]
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
    trainer.model = trainer.model_wrapped = model = merge_lora(model, mla_args.mla_attn_implementation)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_metrics("all", metrics)
    trainer.save_state()  # trainer_state.json: the loss and eval history

    # 7. Save the Whisper-MLA checkpoint (the MHA control's: a plain Whisper one) with its model card; push.
    summary = training_summary(model_args, data_args, distill_args, training_args, data_report, metrics, mla_args)
    save_and_push(trainer, model, processor, card(model, extra=summary))
    return metrics


if __name__ == "__main__":
    run_cli(main)
