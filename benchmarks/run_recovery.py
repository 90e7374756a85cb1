"""A recovery recipe from its config file: convert real Whisper tiny.en to a lossy MLA setting, distil it back towards
its MHA original (label-free: the teacher's own transcripts), score every arm on held-out speech, write the table.

    python benchmarks/run_recovery.py configs/recovery-tiny-en-93.yaml          # -93.2% of the cache at MHA's WER
    python benchmarks/run_recovery.py configs/recovery-tiny-en-90.yaml          # the per-layer -90.6% recipe
    python benchmarks/run_recovery.py configs/recovery-tiny-en-93.yaml --long_steps 50 --output_dir outputs/try

A config is a YAML file of `RecoveryArguments` (flags after it override its values). The stages:
1. the model (the packaged tiny.en) and the speech data (real and synthetic training clips, held-out eval sets);
2. the training/calibration manifest (`mixed`: real_train and synthetic_train alternating, never an eval set);
3. the conversion (`convert_whisper_to_mla.py`, calibrated once) into OUTPUT_DIR/init: where every arm starts;
4. the arms, side by side, one CPU thread each (`run_finetune.py`): `mla-svd` (the recipe: the SVD initialisation)
   and `mla-random` (the same with the MLA projections redrawn, `--mla_from_scratch`: what the SVD init is worth);
   each a short-clip stage (`steps` > 0) and/or a long-form stage (`long_steps` > 0: samples joining consecutive
   utterances of one voice up to 30 s, with timestamps, at half the learning rate). The MHA control of a label-free
   run is the MHA original itself (distilled from itself, its loss is 0 from the first step);
5. evaluation (`run_eval.py`) of MHA, the SVD init and each arm on `eval_sets`, with each of `eval_cache`;
6. the report (`benchmarks/recovery_report.py`): OUTPUT_DIR/results.md and results.json.

A stage whose output folder already holds a finished model (config.json, written last) or results is reused, so an
interrupted run goes on where it stopped. The teacher's transcripts are kept in OUTPUT_DIR/pseudo_labels.json.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import yaml
from transformers import HfArgumentParser


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {"mla-svd": [], "mla-random": ["--mla_from_scratch"]}  # arm -> its first stage's extra run_finetune flags


@dataclass
class RecoveryArguments:
    """One recovery recipe. The defaults are the issue-11 run of -93.2% (self latents of 120, a shared cross latent of
    192); the configs in configs/recovery-*.yaml name what they reproduce."""

    output_dir: str = field(default="outputs/recovery93", metadata={"help": "Where every stage writes."})
    packaged_model: str = field(default="tiny.en", metadata={"help": "The packaged real Whisper to convert.",
                                                             "choices": ["tiny.en", "base"]})
    # conversion
    kv_lora_rank: int = field(default=120, metadata={"help": "Self-attention latent width (--kv_lora_rank)."})
    kv_lora_rank_allocation: str = field(default="uniform", metadata={"help": "uniform or spectrum.",
                                                                      "choices": ["uniform", "spectrum"]})
    kept_key_dims: int = field(default=0, metadata={"help": "Key dims per head kept uncompressed (2-norm)."})
    cross_attention_latent: str = field(default="shared", metadata={"help": "shared or per_layer.",
                                                                    "choices": ["shared", "per_layer"]})
    cross_kv_lora_rank: int = field(default=192, metadata={"help": "Width of the shared cross latent; 384 (d_model) "
                                                           "for the encoder output itself."})
    cross_latent_stride: int = field(default=1, metadata={"help": "Encoder frames per cached frame of the shared "
                                                          "cross latent (their mean)."})
    output_aware: list[str] = field(default_factory=list, metadata={"help": "Kinds of blocks converted "
                                                                    "output-aware, e.g. decoder_self."})
    calibration_samples: int = field(default=256, metadata={"help": "Calibration clips of the training manifest."})
    # training
    train_data: list[str] = field(default_factory=lambda: ["mixed"], metadata={
        "help": "Training audio: `mixed` (real_train and synthetic_train alternating), or speech-set names "
        "(real_train, synthetic_train) or manifest paths. Calibration reads the mixed manifest either way."})
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={
        "help": "Arms to train: mla-svd (the recipe), mla-random (--mla_from_scratch, the control)."})
    trainable: str = field(default="mla_self", metadata={"help": "run_finetune.py --trainable: mla_self or mla."})
    distill_alpha: float = field(default=0.0, metadata={"help": "Weight of the label loss (0: label-free KL only)."})
    steps: int = field(default=500, metadata={"help": "Short-clip steps; 0: no short-clip stage."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Short-clip learning rate; the long-form stage "
                                                         "trains at half of it."})
    num_decay_steps: int | None = field(default=None, metadata={"help": "Steps of the 1-sqrt decay at the end of "
                                                                "each stage; default a third of its steps."})
    max_train_samples: int = field(default=544, metadata={"help": "Clips of the short-clip stage."})
    max_train_minutes: float | None = field(default=None, metadata={"help": "Cap on each stage's training time."})
    long_steps: int = field(default=0, metadata={"help": "Steps of the long-form stage; 0: none."})
    speed_perturbation: list[float] = field(default_factory=list, metadata={
        "help": "The long-form stage also joins copies of the clips at these speeds, e.g. 0.9 1.1."})
    save_steps: int = field(default=200)
    save_total_limit: int = field(default=1)
    # evaluation and report
    eval_sets: list[str] = field(default_factory=lambda: ["multi_eval", "multi_eval_long", "real_eval"],
                                 metadata={"help": "Held-out speech sets every arm is scored on."})
    eval_models: list[str] = field(default_factory=lambda: ["mha", "init", "arms"], metadata={
        "help": "What is scored: mha (the original), init (the converted start), arms (every arm's stages)."})
    eval_cache: list[str] = field(default_factory=lambda: ["float"], metadata={
        "help": "Cache precisions each model is scored with: float, int8 (eval-ARM-SET and eval-ARM-SET-int8)."})
    report: bool = field(default=True, metadata={"help": "Write the table (benchmarks/recovery_report.py)."})

    def __post_init__(self):
        if self.steps <= 0 and self.long_steps <= 0:
            raise ValueError("Expected steps (short-clip) or long_steps (long-form) above 0, but found both 0: nothing "
                             "would train; give one of them a number of steps.")
        unknown = sorted(set(self.arms) - set(ARMS)) + sorted(set(self.eval_cache) - {"float", "int8"}) + \
            sorted(set(self.eval_models) - {"mha", "init", "arms"})
        if unknown:
            raise ValueError(f"Expected arms among {list(ARMS)}, eval_cache among float/int8 and eval_models among "
                             f"mha/init/arms, but found {unknown}; fix the config.")


def parse_arguments(argv: list[str]) -> RecoveryArguments:
    """A YAML config (first argument) read through HfArgumentParser, whose values later flags override."""
    parser = HfArgumentParser(RecoveryArguments)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        if len(argv) == 1:
            (args,) = parser.parse_yaml_file(argv[0], allow_extra_keys=False)
            return args
        with open(argv[0], encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        unknown = sorted(set(config) - {f.name for f in fields(RecoveryArguments)})
        if unknown:
            raise ValueError(f"{argv[0]} sets unknown arguments {unknown}; expected names of RecoveryArguments (see "
                             "--help); fix the spelling or remove them.")
        parser.set_defaults(**config)
        argv = argv[1:]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def run(command: list[str], log: str | None = None, threads: int | None = None) -> None:
    """Runs one stage (a script of this repository) from the repository root; its output goes to `log` if given."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    print("+", " ".join(command), f"> {log}" if log else "", flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as out:
        result = subprocess.run([sys.executable] + command, cwd=ROOT, env=env, stdout=out if log else None,
                                stderr=subprocess.STDOUT if log else None)
    if result.returncode != 0:
        raise RuntimeError(f"Expected `{' '.join(command[:1])}` to finish, but it exited with {result.returncode}"
                           + (f"; see {log}." if log else "."))


def conversion_command(args: RecoveryArguments, model: str, manifest: str) -> list[str]:
    command = ["convert_whisper_to_mla.py", "--model_name_or_path", model, "--output_dir", f"{args.output_dir}/init",
               "--overwrite_output_dir", "--kv_lora_rank", str(args.kv_lora_rank),
               "--kv_lora_rank_allocation", args.kv_lora_rank_allocation, "--kept_key_dims", str(args.kept_key_dims),
               "--key_selection", "2-norm", "--svd_method", "joint",
               "--cross_attention_latent", args.cross_attention_latent,
               "--calibration_data", manifest, "--calibration_samples", str(args.calibration_samples)]
    if args.cross_attention_latent == "shared":
        command += ["--cross_kv_lora_rank", str(args.cross_kv_lora_rank),
                    "--cross_latent_stride", str(args.cross_latent_stride)]
    return command + (["--output_aware", *args.output_aware] if args.output_aware else [])


def finetune_command(args: RecoveryArguments, start: str, output: str, steps: int, learning_rate: float,
                     teacher: str, train_data: list[str], extra: list[str]) -> list[str]:
    """One distillation stage of `steps` steps from `start` into `output` (a warmup-stable-decay schedule)."""
    decay = args.num_decay_steps if args.num_decay_steps is not None else steps // 3
    command = ["run_finetune.py", "--model_name_or_path", start, "--teacher_model_name_or_path", teacher, *extra,
               "--distill", "--distill_alpha", str(args.distill_alpha), "--trainable", args.trainable,
               "--train_data", *train_data, "--pseudo_label_batch_size", "16",
               "--pseudo_label_cache", f"{args.output_dir}/pseudo_labels.json",
               "--output_dir", output, "--overwrite_output_dir", "--use_cpu", "--seed", "0",
               "--per_device_train_batch_size", "8", "--learning_rate", f"{learning_rate:g}", "--adam_beta2", "0.95",
               "--lr_scheduler_type", "warmup_stable_decay",
               "--lr_scheduler_kwargs", f'{{"num_decay_steps": {decay}, "decay_type": "1-sqrt"}}',
               "--warmup_steps", "20", "--max_steps", str(steps), "--logging_steps", "10",
               "--save_strategy", "steps", "--save_steps", str(args.save_steps),
               "--save_total_limit", str(args.save_total_limit), "--report_to", "none", "--disable_tqdm", "true"]
    return command + (["--max_train_minutes", f"{args.max_train_minutes:g}"] if args.max_train_minutes else [])


def arm_stages(args: RecoveryArguments, arm: str) -> list[tuple[str, str, int, float, list[str]]]:
    """(start, output, steps, learning rate, extra flags) of an arm's stages: short clips (steps > 0), then long-form
    (long_steps > 0); the arm's own flags (e.g. --mla_from_scratch) go to its first stage only."""
    out, stages, start, extra = args.output_dir, [], f"{args.output_dir}/init", list(ARMS[arm])
    if args.steps > 0:
        output = f"{out}/{arm}-short" if args.long_steps > 0 else f"{out}/{arm}"
        stages.append((start, output, args.steps, args.learning_rate,
                       extra + ["--max_train_samples", str(args.max_train_samples), "--max_label_length", "128"]))
        start, extra = output, []
    if args.long_steps > 0:
        speeds = ["--speed_perturbation", *map(str, args.speed_perturbation)] if args.speed_perturbation else []
        stages.append((start, f"{out}/{arm}", args.long_steps, args.learning_rate / 2,
                       extra + ["--concatenate_to_seconds", "30", "--concatenate_timestamps",
                                "--max_label_length", "256"] + speeds))
    return stages


def train_arm(args: RecoveryArguments, arm: str, teacher: str, train_data: list[str]) -> None:
    for start, output, steps, learning_rate, extra in arm_stages(args, arm):
        if os.path.isfile(os.path.join(ROOT, output, "config.json")):
            print(f"reusing {output}")
            continue
        run(finetune_command(args, start, output, steps, learning_rate, teacher, train_data, extra),
            log=os.path.join(ROOT, f"{output}.log"), threads=1)


def scored_models(args: RecoveryArguments, mha: str) -> dict[str, str]:
    """{arm name in the report: model folder} of what is evaluated, in the report's order."""
    models = {"mha": mha} if "mha" in args.eval_models else {}
    if "init" in args.eval_models:
        models["init"] = f"{args.output_dir}/init"
    if "arms" in args.eval_models:
        for arm in args.arms:
            models |= {os.path.basename(stage[1]): stage[1] for stage in arm_stages(args, arm)}
    return models


def report_command(args: RecoveryArguments) -> list[str]:
    return ["benchmarks/recovery_report.py", "--output_dir", args.output_dir, "--steps", str(args.steps),
            "--learning_rate", f"{args.learning_rate:g}", "--self_rank", str(args.kv_lora_rank),
            "--trainable", args.trainable, "--allocation", args.kv_lora_rank_allocation,
            "--kept", str(args.kept_key_dims), "--long_steps", str(args.long_steps),
            "--speeds", " ".join(map(str, args.speed_perturbation)), "--output_aware", " ".join(args.output_aware),
            "--cross_rank", str(args.cross_kv_lora_rank), "--cross_stride", str(args.cross_latent_stride)]


def main(argv: list[str] | None = None):
    args = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    from whisper_mla.packaged_models import ensure_packaged_model
    from whisper_mla.speech_data import ensure_speech_data

    # 1. The model and the speech data (built once, reused from the cache).
    os.makedirs(os.path.join(ROOT, args.output_dir), exist_ok=True)
    teacher = ensure_packaged_model(args.packaged_model)
    speech = ensure_speech_data()
    # 2. Calibration (and by default training) audio: real and synthetic training clips, alternating.
    manifest = f"{args.output_dir}/train.json"
    run(["benchmarks/mixed_train_manifest.py", manifest])
    train_data = [manifest if name == "mixed" else speech.get(name, name) for name in args.train_data]
    # 3. The converted model every arm starts from.
    if not os.path.isfile(os.path.join(ROOT, args.output_dir, "init", "config.json")):
        run(conversion_command(args, teacher, manifest))
    # 4. The arms, side by side.
    with ThreadPoolExecutor(max_workers=len(args.arms)) as pool:
        for future in [pool.submit(train_arm, args, arm, teacher, train_data) for arm in args.arms]:
            future.result()
    # 5. Evaluation of every finished model.
    for name, model in scored_models(args, teacher).items():
        if not os.path.isfile(os.path.join(ROOT, model, "config.json")):  # an absolute `model` stays as it is
            print(f"not scored: {name} has no finished model (the report shows it as -)")
            continue
        for set_name in args.eval_sets:
            for cache in args.eval_cache:
                output = f"{args.output_dir}/eval-{name}-{set_name}" + ("-int8" if cache == "int8" else "")
                if os.path.isfile(os.path.join(ROOT, output, "results.json")):
                    continue
                run(["run_eval.py", "--model_name_or_path", model, "--data", speech[set_name], "--output_dir",
                     output, "--overwrite_output_dir", "--batch_size", "8"]
                    + (["--mla_cache_quantization", "int8"] if cache == "int8" else []),
                    log=os.path.join(ROOT, f"{output}.log"))
    # 6. The table.
    if args.report:
        run(report_command(args))


if __name__ == "__main__":
    main()
