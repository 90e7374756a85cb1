#!/usr/bin/env bash
# What fits in GPU memory (issue 33): the largest batch of 30 s utterances that MHA, the exact MLA default, its int8
# cache and the -93% layout decode within the GPU's free memory (minus 1 GiB), then the throughput at each limit in
# paired rounds. The same command as the CPU runs of docs/capacity.md with --device cuda: peak memory is
# torch.cuda.max_memory_allocated, each try's allocator is capped at the budget (an over-budget try fails with an
# out-of-memory error in its own process), attention runs on SDPA.
#
#   bash benchmarks/gpu_capacity.sh [OUTPUT_DIR] [BUDGET]
#   # defaults: outputs/capacity_gpu, the GPU's free memory minus 1 GiB (pass e.g. 40GiB to compare two GPUs)
#
# Then copy OUTPUT_DIR/*/capacity.md into docs/capacity.md ("GPU") and OUTPUT_DIR/*/capacity.png to
# docs/benchmark/capacity_gpu_*.png.
set -euo pipefail
OUT=${1:-outputs/capacity_gpu}
BUDGET=${2:-}
budget_args=()
if [ -n "$BUDGET" ]; then budget_args=(--memory_budget "$BUDGET"); fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv

# large-v3 shapes, bfloat16, 5 beams, T=100 (target: MLA's largest batch >= 10x MHA's)
python run_benchmark.py --find_max_batch --device cuda --dtype bfloat16 --size large-v3 --num_beams 5 \
    --new_tokens 100 --decode_steps 3 --throughput_rounds 3 --output_dir "$OUT/large-v3_bf16" --overwrite_output_dir \
    "${budget_args[@]}"
# whisper-small shapes, float16, greedy and 5 beams, T=100
python run_benchmark.py --find_max_batch --device cuda --dtype float16 --size small --num_beams 1 5 \
    --new_tokens 100 --decode_steps 3 --throughput_rounds 3 --output_dir "$OUT/small_fp16" --overwrite_output_dir \
    "${budget_args[@]}"
