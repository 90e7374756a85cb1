"""Benchmark Whisper (MHA) against Whisper-MLA side by side: decoder cache bytes, peak memory and decode speed,
measured in paired rounds (the method: `whisper_mla/benchmark_rounds.py`); or, with --find_max_batch, the largest
batch each layout decodes within a memory budget and the throughput at it (`whisper_mla/capacity.py`,
docs/capacity.md).

    python run_benchmark.py --size small --output_dir outputs/benchmark --batch_sizes 1 16 --new_tokens 64
    python run_benchmark.py --find_max_batch --size small --num_beams 1 5 --new_tokens 100 --memory_budget 8GiB \
        --output_dir outputs/capacity_small
    python run_benchmark.py --model_name_or_path openai/whisper-small --output_dir outputs/benchmark
    python run_benchmark.py --model_name_or_path openai/whisper-small --mla_model_name_or_path MLA_CKPT \
        --output_dir outputs/benchmark

Writes OUTPUT_DIR/results.json (run, load, records, paired ratios, rounds, warnings), results.md and PNG plots
(--find_max_batch: capacity.json, capacity.md, capacity.png), all at once at the end: an existing OUTPUT_DIR is
refused unless --overwrite_output_dir (then replaced as a whole); while the run lasts, results.json (capacity.json)
grows in a hidden `.OUTPUT_DIR.tmp-*` sibling.
"""

import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    HfArgumentParser,
)

from whisper_mla.conversion import MLAArguments
from whisper_mla.arguments import run_cli
from whisper_mla.io import atomic_output_dir, check_output_dir
from whisper_mla.benchmark import (
    ATTENTIONS,
    SIZES,
    describe_mla,
    injected_step_delay,
    prepare_models,
)
from whisper_mla.benchmark_report import (
    OUTPUT_FILES,
    describe_ratio,
    load_line,
    machine_description,
    run_warnings,
    write_reports,
)
from whisper_mla.capacity import CAPACITY_LAYOUTS, CAPACITY_OUTPUT_FILES, run_capacity
from whisper_mla.benchmark_rounds import (
    SPREAD_LIMIT,
    cpu_snapshot,
    load_between,
    measure_grid_point,
    paired_ratios,
    sample_load,
)
from whisper_mla.transcription import DTYPES


@dataclass
class BenchmarkArguments:
    output_dir: str = field(metadata={"help": "Where results.json, results.md and the plots are written."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing output_dir holding an earlier benchmark's results."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A transformers Whisper checkpoint (MHA); converted to MLA on the fly."}
    )
    mla_model_name_or_path: str | None = field(
        default=None, metadata={"help": "An existing Whisper-MLA checkpoint (trust_remote_code) instead of converting."}
    )
    size: str | None = field(
        default=None,
        metadata={"help": "Random weights with the shapes of OpenAI's model of this size, instead of a checkpoint.",
                  "choices": list(SIZES)},
    )
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 16, 64], metadata={"help": "Batch sizes."})
    new_tokens: list[int] = field(
        default_factory=lambda: [32, 128, 448],
        metadata={"help": "Generated tokens per sequence (forced; capped at max_target_positions minus the prompt)."},
    )
    num_beams: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "1 is greedy, >1 beam search."})
    attentions: list[str] | None = field(
        default=None,
        metadata={"help": "What is measured; ratios need mha. Default: all (with --mla_model_name_or_path: mha and "
                  "the variants of that checkpoint's cross-attention layout).", "choices": list(ATTENTIONS)},
    )
    rounds: int = field(
        default=5,
        metadata={"help": "Speed rounds: in each, every setting runs once (rotated order); ratios are paired within "
                  "a round and reported as median (min-max) over the rounds."},
    )
    repeats: int = field(default=1, metadata={"help": "Timed generations per setting and round (their median)."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(
        default="auto",
        metadata={"help": "auto: float32 on CPU, float16 on GPU.", "choices": ["auto", *DTYPES]},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Kernel of MHA and of the naive MLA path.", "choices": ["sdpa", "eager"]}
    )
    share_cross_latent_across_beams: bool = field(
        default=True,
        metadata={"help": "Beam search caches one cross-attention latent per utterance (False: one per beam)."},
    )
    num_threads: int = field(
        default=1,
        metadata={"help": "torch CPU threads of each worker. 1 by default: a multi-threaded step waits for its "
                  "slowest thread, so one busy core slows it unevenly; raise it on an idle machine."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of random weights and random audio features."})
    static_compile: bool = field(
        default=False,
        metadata={"help": "transformers' documented fast path for Whisper, for MHA and MLA alike: "
                  "generation_config.cache_implementation='static' and model.forward = torch.compile(model.forward, "
                  "mode='reduce-overhead', fullgraph=True); the untimed warm-up generation compiles."},
    )
    find_max_batch: bool = field(
        default=False,
        metadata={"help": "Instead of the speed grid: the largest batch of 30 s utterances each --capacity_layouts "
                  "layout decodes within --memory_budget, for each --num_beams and --new_tokens (T), each try in a "
                  "child process refused or killed before it exceeds the budget; then the decode throughput at each "
                  "layout's largest batch in paired rounds (docs/capacity.md). Random weights of the model's shapes."},
    )
    memory_budget: str | None = field(
        default=None,
        metadata={"help": "--find_max_batch: the memory a try may use, e.g. 8GiB (peak RSS on a CPU, "
                  "torch.cuda.max_memory_allocated on a GPU). Default: what is available now minus 2 GiB (CPU) or "
                  "the GPU's free memory minus 1 GiB."},
    )
    capacity_layouts: list[str] = field(
        default_factory=lambda: list(CAPACITY_LAYOUTS),
        metadata={"help": "--find_max_batch: the layouts searched (mha first for the ratios).",
                  "choices": list(CAPACITY_LAYOUTS)},
    )
    decode_steps: int = field(
        default=2,
        metadata={"help": "--find_max_batch: real generate() steps of each try, at the end of the T tokens (the cache "
                  "before them is built by the model's forward; T decodes every token for real); the steps after "
                  "the first are timed for the throughput (2 or more for it)."},
    )
    search_tolerance: float = field(
        default=0.05,
        metadata={"help": "--find_max_batch: stop once the smallest batch over the budget is within this share of the "
                  "largest within it (1 batch at least)."},
    )
    max_tries: int = field(default=8, metadata={"help": "--find_max_batch: tries per layout, beams and T at most."})
    throughput_rounds: int = field(
        default=3, metadata={"help": "--find_max_batch: paired rounds of throughput at the largest batches (0: none)."}
    )
    throughput_layouts: list[str] = field(
        default_factory=lambda: list(CAPACITY_LAYOUTS),
        metadata={"help": "--find_max_batch: the layouts whose throughput is measured.",
                  "choices": list(CAPACITY_LAYOUTS)},
    )
    resume_from: str | None = field(
        default=None,
        metadata={"help": "--find_max_batch: an earlier run's capacity.json (same shapes, dtype, device, budget and "
                  "decode steps): its largest batches are reused, not searched again (e.g. to measure the throughput "
                  "of an interrupted run)."},
    )
    encoder_batch: int = field(
        default=1,
        metadata={"help": "--find_max_batch: utterances per encoder chunk, whose peak memory and time per utterance "
                  "are measured once (the throughput's encoder share)."},
    )


def output_files(args: BenchmarkArguments) -> tuple[str, ...]:
    return CAPACITY_OUTPUT_FILES if args.find_max_batch else OUTPUT_FILES


def validate_capacity_arguments(args: BenchmarkArguments, mla_args: MLAArguments) -> None:
    """--find_max_batch measures fixed layouts of random weights: converter settings and an MLA checkpoint do not
    apply, and the search's numbers must be sane."""
    changed = [f"--{f.name}" for f in dataclasses.fields(MLAArguments)
               if getattr(mla_args, f.name) != getattr(MLAArguments(), f.name)]
    if args.static_compile:
        raise ValueError("--find_max_batch measures the dynamic cache generate() uses by default, but found "
                         "--static_compile; drop one of them (a static cache preallocates max_length tokens).")
    if changed or args.mla_model_name_or_path is not None:
        raise ValueError(
            f"--find_max_batch measures the layouts of --capacity_layouts with random weights, but found converter "
            f"settings {changed + (['--mla_model_name_or_path'] if args.mla_model_name_or_path else [])}; drop them "
            "(the layouts are whisper_mla.capacity.CAPACITY_LAYOUTS)."
        )
    if args.decode_steps < (2 if args.throughput_rounds else 1) or args.max_tries < 2 or args.encoder_batch < 1 \
            or args.throughput_rounds < 0 or not 0 <= args.search_tolerance < 1:
        raise ValueError(
            f"Expected decode_steps >= 1 (2 or more with throughput_rounds), max_tries >= 2, encoder_batch >= 1, "
            f"throughput_rounds >= 0 and 0 <= search_tolerance < 1, but found {args.decode_steps}, {args.max_tries}, "
            f"{args.encoder_batch}, {args.throughput_rounds}, {args.search_tolerance}; fix them."
        )


def validate_arguments(args: BenchmarkArguments, mla_args: MLAArguments) -> None:
    """Fails early, naming what was expected; resolves dtype "auto"."""
    check_output_dir(args.output_dir, args.overwrite_output_dir, allowed=output_files(args))
    if args.find_max_batch:
        validate_capacity_arguments(args, mla_args)
    if (args.model_name_or_path is None) == (args.size is None):
        raise ValueError(
            f"Expected exactly one of --model_name_or_path or --size, but found model_name_or_path="
            f"{args.model_name_or_path!r} and size={args.size!r}; pass a checkpoint or e.g. --size small."
        )
    if args.mla_model_name_or_path is not None and args.model_name_or_path is None:
        raise ValueError(
            "--mla_model_name_or_path is compared against its MHA original, but found no --model_name_or_path; "
            "pass the MHA checkpoint it was converted from."
        )
    if mla_args.calibration_data is not None and args.size is not None:
        raise ValueError(
            f"--calibration_data calibrates real weights, but found random ones (--size {args.size}); pass "
            "--model_name_or_path or drop --calibration_data."
        )
    if min(args.new_tokens) < 2 or min(args.batch_sizes) < 1 or min(args.num_beams) < 1 or args.repeats < 1:
        raise ValueError(
            f"Expected new_tokens >= 2 (decode speed is timed over the steps after the first), batch_sizes, num_beams "
            f"and repeats >= 1, but found new_tokens={args.new_tokens}, batch_sizes={args.batch_sizes}, "
            f"num_beams={args.num_beams}, repeats={args.repeats}; raise them."
        )
    if args.rounds < 1 or args.num_threads < 1:
        raise ValueError(
            f"Expected rounds >= 1 (3 or more for a median that ignores one disturbed round) and num_threads >= 1, "
            f"but found rounds={args.rounds}, num_threads={args.num_threads}; raise them."
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"Expected a GPU for --device {args.device}, but found none; pass --device cpu.")
    injected_step_delay("", 0)  # a malformed test hook fails here, before any work
    if args.dtype == "auto":
        args.dtype = "float32" if args.device == "cpu" else "float16"


# --------------------------------------------------------------------------------------------- main


def parse_arguments() -> tuple[BenchmarkArguments, MLAArguments]:
    """The benchmark's arguments and the converter's MLA settings (the converter's defaults)."""
    parser = HfArgumentParser((BenchmarkArguments, MLAArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(sys.argv[1])
    return parser.parse_args_into_dataclasses()


def main():
    args, mla_args = parse_arguments()

    # 1. Check the arguments before any expensive work; note the machine's load before this run adds to it.
    validate_arguments(args, mla_args)
    transformers.logging.set_verbosity_error()
    if args.find_max_batch:  # 2'. the capacity search instead of the speed grid
        with atomic_output_dir(args.output_dir, args.overwrite_output_dir, allowed=CAPACITY_OUTPUT_FILES) as out:
            run_capacity(args, out, sys.argv[1:])
        print(f"Wrote capacity.json, capacity.md and capacity.png to {args.output_dir}.")
        return
    load_before = sample_load(2.0)
    started = cpu_snapshot()

    with atomic_output_dir(args.output_dir, args.overwrite_output_dir, allowed=OUTPUT_FILES) as output_dir, \
            tempfile.TemporaryDirectory() as model_dir:
        # 2. Load (or build) the MHA model, convert it to MLA (or load that too) and save them for the workers.
        model_name, folders, mla_configs, prompt, max_new_tokens = prepare_models(args, mla_args, model_dir)
        mla = {a: describe_mla(config) for a, config in mla_configs.items()}

        # 3. The grid, with generated lengths capped at what max_target_positions leaves after the prompt.
        new_tokens = sorted({min(n, max_new_tokens) for n in args.new_tokens})
        grid = [(batch, beams, n) for beams in args.num_beams for n in new_tokens for batch in args.batch_sizes]
        common = dict(model=model_name, device=args.device, device_name=machine_description(args.device),
                      dtype=args.dtype, torch_version=torch.__version__, transformers_version=transformers.__version__)
        layouts = {}  # cross-attention layout: the variants that have it and the settings they share
        for attention, settings in mla.items():
            layouts.setdefault(json.dumps(settings), []).append(attention)
        header = {
            "command": f"`python run_benchmark.py {' '.join(sys.argv[1:])}`",
            "model": model_name,
            "device": f"{args.device}: {common['device_name']}, torch threads per worker: {args.num_threads}",
            "dtype": args.dtype,
            "attention kernel (MHA, naive MLA)": args.attn_implementation,
            "cache and forward": "static cache, forward compiled with torch.compile(mode='reduce-overhead', "
                                 "fullgraph=True) (transformers' Whisper recipe)" if args.static_compile else
                                 "dynamic cache, eager forward",
            "MLA": "; ".join(
                f"{', '.join(names)}: {', '.join(s['mla_targets'])}, kv_lora_rank {s['kv_lora_rank']}, kept_key_dims "
                f"{s['kept_key_dims']}, " + (f"one cross latent of width {s['shared_cross_rank']} for all layers"
                                             if s["shared_cross_rank"] else "a cross latent per layer")
                for settings, names in layouts.items() for s in [json.loads(settings)]
            ) + f"; beams share the cross latent: {args.share_cross_latent_across_beams}",
            "input": f"30 s of random log-mel features, {prompt}-token decoder prompt, forced generated length",
            "timing": f"{args.rounds} rounds; in each, every setting's worker runs {args.repeats} timed generation(s) "
                      "in an order rotated from round to round; ratios are paired within a round; encoder timed once "
                      "per setting",
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        }
        results = dict(header=header, run=dict(vars(args), mla=dataclasses.asdict(mla_args), command=sys.argv[1:],
                                               cpu_count=os.cpu_count(), spread_limit=SPREAD_LIMIT),
                       load=dict(before=load_before), records=[], ratios=[], rounds=[], warnings=[])

        # 4. Measure each grid point in paired rounds, a fresh worker per setting; results are saved as they come.
        with tqdm(total=len(grid) * args.rounds, desc="benchmark", unit="round") as progress:
            for batch, beams, n in grid:
                settings = [
                    dict(model_dir=folder, attention=attention,
                         batch_size=batch, num_beams=beams, new_tokens=n, repeats=args.repeats, device=args.device,
                         dtype=args.dtype, attn_implementation=args.attn_implementation,
                         num_threads=args.num_threads, share=args.share_cross_latent_across_beams, seed=args.seed,
                         static_compile=args.static_compile)
                    for attention, folder in folders.items()
                ]
                records, log = measure_grid_point(settings, args.rounds, progress)
                results["records"] += [{**common, **mla.get(r["attention"], {}), **r} for r in records]
                results["rounds"] += log
                with open(os.path.join(output_dir, "results.json"), "w") as f:
                    json.dump(results, f, indent=1)

        # 5. Ratios within rounds, the load during the run, the warnings; then results.json, results.md and plots,
        # swapped in as output_dir when the block ends.
        results["load"]["during"] = load_between(started, cpu_snapshot())
        results["ratios"] = paired_ratios(results["records"])
        results["warnings"] = run_warnings(results["ratios"], results["load"], args.num_threads, args.device)
        header["load"] = (f"before: {load_line(results['load']['before'])}; "
                          f"during: {load_line(results['load']['during'])}")
        write_reports(results, output_dir)
    for ratio in results["ratios"]:
        if ratio["metric"] != "first_step_s":
            print(describe_ratio(ratio) + ("" if ratio["steady"] else f"  <- spread {ratio['spread']:.1%}"))
    for warning in results["warnings"]:
        print(f"WARNING: {warning}")
    failed = sum("error" in r for r in results["records"])
    print(f"Wrote {len(results['records'])} records ({failed} failed) to {args.output_dir}: results.json, results.md, "
          "plots.")


if __name__ == "__main__":
    run_cli(main)
