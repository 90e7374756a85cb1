"""The arguments of recovery training (run_finetune.py) beside `MLAArguments` and `Seq2SeqTrainingArguments`: what
trains, the data, distillation; and `validate_arguments`, the range checks made before any work."""

import os
from dataclasses import dataclass, field

from whisper_mla.arguments import check_number
from whisper_mla.training.label_cache import read_label_cache
from whisper_mla.training.perturb import check_speeds


TRAINABLE = ("all", "attention", "mla", "mla_self", "lora")


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
                  "mla (converted blocks only, the shared cross projection included); mla_self (converted "
                  "self-attention blocks only: cross-attention keeps its calibrated projections, which training on "
                  "narrow audio made worse for unseen speakers); lora (LoRA on the converted blocks' projections, merged at the end).",
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
    mha_baseline: bool = field(
        default=False,
        metadata={"help": "Paired control: fine-tune the MHA model itself, without the MHA -> MLA conversion, on the "
                  "same data, steps and schedule as the MLA run: the only fair baseline after fine-tuning. --trainable "
                  "mla then trains q/k/v/out of the blocks the MLA run converts (--mla_targets); all and attention "
                  "as usual; lora puts LoRA on those blocks' q/k/v/out. The output is a plain Whisper checkpoint "
                  "(model_type whisper) whose model card says it is the MHA control. Needs a Whisper (MHA) "
                  "--model_name_or_path; not with --mla_from_scratch or --push_to_hub."},
    )
    mla_from_scratch: bool = field(
        default=False,
        metadata={"help": "Paired control: convert as usual (same shapes and config), or load the Whisper-MLA "
                  "--model_name_or_path, then re-initialise the low-rank projections of every converted block "
                  "(kv_a_proj, k_b_proj, v_b_proj, and the shared decoder.cross_kv_a_proj; with --trainable mla_self "
                  "those of self-attention only) with the model's own init (normal with std init_std, zero biases), "
                  "drawn from --seed; q_proj, out_proj and everything else keep their weights. Measures what the "
                  "SVD initialisation is worth."},
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
    concatenate_to_seconds: float | None = field(
        default=None,
        metadata={"help": "Long-form training: join consecutive utterances of one speaker into samples of up to this "
                  "many seconds (at most 30, Whisper's window; e.g. 30) with silences of 0.1-0.5 s drawn from --seed, "
                  "transcripts joined with spaces. Speakers are the manifest's speaker or voice field, else the "
                  "clip's folder (LibriSpeech: speaker-chapter); utterances keep the order of the data. Clips longer "
                  "than this are dropped (counted as too long); --max_train_samples counts utterances before joining; "
                  "evaluation data is not joined. With --distill the teacher transcribes the joined audio."},
    )
    concatenate_timestamps: bool = field(
        default=False,
        metadata={"help": "With --concatenate_to_seconds: labels with Whisper's timestamp tokens, `<|start|> "
                  "text<|end|>` per joined utterance on the 0.02 s grid and no <|notimestamps|> in the prompt, so "
                  "that timestamped (long-form) decoding is trained; with --distill the teacher is asked for "
                  "timestamps (and decodes the audio, not precomputed encoder outputs)."},
    )
    speed_perturbation: list[float] | None = field(
        default=None,
        metadata={"help": "Also train on every clip at these speeds, e.g. 0.9 1.1 (Kaldi's 3-way speed perturbation "
                  "with the original): resampled so that tempo and pitch change together, which sounds like other "
                  "speakers. Copies keep the transcript (with --distill the teacher transcribes each), join as a "
                  "speaker of their own with --concatenate_to_seconds, and are dropped like any clip when longer "
                  "than --max_duration_in_seconds; --max_train_samples counts the original clips."},
    )
    concatenate_keep_utterances: bool = field(
        default=False,
        metadata={"help": "With --concatenate_to_seconds: train on every utterance on its own as well (labelled "
                  "without timestamps), beside the joined samples, so that short-form decoding keeps being trained."},
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
    pseudo_label_cache: str | None = field(
        default=None,
        metadata={"help": "A JSON file where the teacher's pseudo-labels are kept and reused across runs; created if "
                  "missing. A clip's labels are found by a hash of its audio, the teacher's weights and generation "
                  "config, and the decoding settings (prompt, --max_label_length, timestamps, language), so that "
                  "anything else is labelled afresh. Runs side by side may share one file."},
    )

    def __post_init__(self):
        if self.teacher_model_name_or_path is not None:
            self.teacher_model_name_or_path = os.path.expanduser(self.teacher_model_name_or_path)
        if self.pseudo_label_cache is not None:
            self.pseudo_label_cache = os.path.expanduser(self.pseudo_label_cache)
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"--distill_alpha expects a value in [0, 1], but found {self.distill_alpha}.")
        if self.distill_temperature <= 0:
            raise ValueError(f"--distill_temperature expects a positive value, but found {self.distill_temperature}.")


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
    if distill_args.pseudo_label_cache is not None:
        if not distill_args.distill:
            raise ValueError("--pseudo_label_cache expects --distill (the cache keeps the teacher's transcripts), but "
                             "found none; pass --distill, or drop --pseudo_label_cache.")
        read_label_cache(distill_args.pseudo_label_cache)  # a damaged file fails now, before any work
    check_number("--concatenate_to_seconds", data_args.concatenate_to_seconds, above=0, maximum=30, optional=True,
                 fix="pass at most 30 (Whisper's window), e.g. 30, or leave it out to train on single utterances")
    check_speeds(data_args.speed_perturbation or [])
    if data_args.concatenate_keep_utterances and data_args.concatenate_to_seconds is None:
        raise ValueError("--concatenate_keep_utterances expects --concatenate_to_seconds (the joined samples the "
                         "utterances are kept beside), but found none; pass --concatenate_to_seconds 30, or drop "
                         "--concatenate_keep_utterances.")
    if data_args.concatenate_timestamps and data_args.concatenate_to_seconds is None:
        raise ValueError("--concatenate_timestamps expects --concatenate_to_seconds (the joined samples it "
                         "timestamps), but found none; pass --concatenate_to_seconds 30, or drop "
                         "--concatenate_timestamps.")
    if model_args.mha_baseline and model_args.mla_from_scratch:
        raise ValueError("--mha_baseline and --mla_from_scratch are two separate controls (an unconverted model, and "
                         "a converted one with random low-rank projections), but found both; run them one at a time.")
    if model_args.mha_baseline and training_args.push_to_hub:
        raise ValueError("--push_to_hub expects a Whisper-MLA checkpoint (with the remote code it loads with), but "
                         "--mha_baseline saves a plain Whisper checkpoint; drop --push_to_hub and upload output_dir "
                         "with huggingface_hub's upload_folder.")
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
