"""The table of a recovery run (the last stage of `benchmarks/run_recovery.py`): every arm's WER on each eval set, its
cache per 30 s utterance against MHA's and its training minutes. Writes OUTPUT_DIR/results.md and results.json (the points
`benchmarks/sweep_compression.py --recovered` adds to the trade-off plot). An arm or eval set that was not scored
(e.g. a stage stopped for time) shows as "-" and is left out of results.json's row; the MHA row must be there.

    python benchmarks/recovery_report.py --output_dir outputs/recovery93s3 --steps 0 --long_steps 150 ...
"""

import json
import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from whisper_mla.io import write_json_atomic


EVAL_SETS = ("multi_eval", "multi_eval_long", "real_eval")


@dataclass
class ReportArguments:
    """The recovery run's settings, for the row labels (`benchmarks/run_recovery.py` passes its config's)."""

    output_dir: str = field(metadata={"help": "The recovery run's folder (eval-ARM-SET/results.json inside)."})
    steps: int = field(default=500, metadata={"help": "Short-clip steps; 0: the long-form stage alone."})
    learning_rate: float = field(default=2e-4)
    self_rank: int = field(default=120)
    trainable: str = field(default="mla_self")
    allocation: str = field(default="uniform")
    kept: int = field(default=0)
    long_steps: int = field(default=0)
    speeds: str = field(default="", metadata={"help": "Speed perturbation of the long-form stage, e.g. '0.9 1.1'."})
    output_aware: str = field(default="", metadata={"help": "Output-aware kinds, e.g. 'decoder_self'."})
    cross_rank: int = field(default=192)
    cross_stride: int = field(default=1,
                              metadata={"help": "Encoder frames per cached frame of the shared cross latent."})
    extra_voices: bool = field(default=False, metadata={"help": "Whether training also had the extra voices."})


def arm_labels(args: ReportArguments) -> dict[str, str]:
    """Row label of each arm, in table order: MHA, the SVD init, then each arm's stages."""
    mla = (f"MLA self {args.self_rank} + {args.kept} kept key dims/head"
           + (" (spectrum allocation)" if args.allocation == "spectrum" else "") + f" + shared cross {args.cross_rank}"
           + (f" over every {args.cross_stride} frames (mean)" if args.cross_stride > 1 else "")
           + (f", output-aware {' '.join(args.output_aware.split())}" if args.output_aware.strip() else ""))
    labels = {"mha": "MHA (original; the label-free MHA control is identical)", "init": f"{mla}, SVD init, no training"}
    data = " (+ extra voices)" if args.extra_voices else ""
    long = (f"{args.long_steps} steps at {args.learning_rate / 2:g} on joined 30 s samples with timestamps"
            + (f" (clips also at speeds {args.speeds})" if args.speeds.strip() else ""))
    for arm, init in (("mla-svd", "SVD init"), ("mla-random", "random MLA init")):
        distilled = f"{mla}, {init}, distilled ({args.trainable})"
        short = f"{distilled} {args.steps} steps at {args.learning_rate:g} on short clips{data}"
        if args.steps and args.long_steps:
            labels[f"{arm}-short"] = short
            labels[arm] = f"{short}, then {long}"
        else:  # one stage: short clips, or (--steps 0) joined 30 s samples only
            labels[arm] = short if args.steps else f"{distilled} {long}{data}"
    return labels


def read_results(output_dir: str, arm: str) -> dict[str, dict]:
    """{eval set: run_eval.py's results.json} of one arm, for the sets it was scored on."""
    results = {}
    for name in EVAL_SETS:
        path = os.path.join(output_dir, f"eval-{arm}-{name}", "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                results[name] = json.load(f)
    return results


def train_minutes(output_dir: str, stages: list[str]) -> float | None:
    """Training minutes of an arm's stages (Trainer's train_runtime), None unless every stage finished."""
    paths = [os.path.join(output_dir, stage, "all_results.json") for stage in stages]
    if not all(os.path.isfile(path) for path in paths):
        return None
    return sum(json.load(open(path))["train_runtime"] for path in paths) / 60


def main():
    (args,) = HfArgumentParser(ReportArguments).parse_args_into_dataclasses()
    labels = arm_labels(args)
    setting = (f"self={args.self_rank}+{args.kept},cross=shared:{args.cross_rank}"
               + (f",stride={args.cross_stride}" if args.cross_stride > 1 else ""))
    rows = ["| model | cache per 30 s utterance (T=100) | float cut | " + " | ".join(f"WER {s}" for s in EVAL_SETS)
            + " | training minutes |", "|---|---|---|" + "---|" * len(EVAL_SETS) + "---|"]
    records, mha_utterance = [], None
    for arm, label in labels.items():
        results = read_results(args.output_dir, arm)
        if mha_utterance is None and not results:
            raise ValueError(f"The report expects the MHA row's evaluations in {args.output_dir}/eval-mha-*/, but "
                             "found none; run benchmarks/run_recovery.py CONFIG with eval_models including mha (it "
                             "scores MHA first).")
        if not results:
            rows.append(f"| {label} | - | - | " + " | ".join("-" for _ in EVAL_SETS) + " | - |")
            continue
        result = next(iter(results.values()))
        cache = result["cache_bytes_per_token_split"]
        frames = result.get("cross_cache_frames_per_30s", 1500)  # fewer with a pooled shared cross latent
        if args.cross_stride > 1 and arm != "mha" and "cross_cache_frames_per_30s" not in result:
            raise ValueError(f"A pooled cross latent (--cross_stride {args.cross_stride}) expects run_eval.py results "
                             f"with cross_cache_frames_per_30s, but {args.output_dir}/eval-{arm}-*/results.json lack "
                             "it (written before that field existed); remove those eval folders and rerun the script "
                             "to score them again.")
        utterance = cache["cross"] * frames + cache["self"] * 100
        mha_utterance = mha_utterance or utterance  # the first row is MHA's
        two_stages = f"{arm}-short" in labels  # a final row counts both stages
        minutes = None if arm in ("mha", "init") else train_minutes(args.output_dir, [arm] + two_stages * [f"{arm}-short"])
        stages = ["short clips"] * bool(args.steps) + ["long-form stage"] * bool(args.long_steps)  # a final row's
        training = (None if arm in ("mha", "init") else "short clips" if arm.endswith("-short") else " + ".join(stages))
        records.append({"arm": arm, "label": label, "setting": None if arm == "mha" else setting,
                        "training": training, "cache_per_utterance": utterance,
                        "reduction_%": round(100 * (1 - utterance / mha_utterance), 1), "train_minutes": minutes,
                        **{f"wer_{name}": result["wer"] for name, result in results.items()}})
        rows.append(f"| {label} | {utterance / 2**20:.2f} MiB | {records[-1]['reduction_%']:.1f}% | "
                    + " | ".join(f"{results[name]['wer']:.2f}" if name in results else "-" for name in EVAL_SETS)
                    + f" | {'' if minutes is None else f'{minutes:.1f}'} |")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    write_json_atomic(os.path.join(args.output_dir, "results.json"), {"rows": records}, indent=2)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
