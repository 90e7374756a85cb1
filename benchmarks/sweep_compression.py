"""WER without training at several MLA settings on real speech: how the converter's defaults were chosen.

    python benchmarks/sweep_compression.py --output_dir outputs/sweep --kv_lora_ranks 384 192 128 96 48

Converts the real Whisper tiny.en (imported from its PyPI package) at each setting, calibrated on the real_train
manifest (never real_eval), and reports normalised WER on the held-out real_eval manifest.
"""

import json
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoProcessor, HfArgumentParser, WhisperForConditionalGeneration  # noqa: E402

from audio_data import load_speech_dataset  # noqa: E402
from convert_whisper_to_mla import convert_whisper_to_mla, load_calibration_audio  # noqa: E402
from import_ctranslate2 import ensure_packaged_model  # noqa: E402
from make_speech_data import ensure_speech_data  # noqa: E402
from modeling_whisper_mla import expected_cache_bytes_per_token  # noqa: E402
from run_eval import evaluate_model  # noqa: E402


@dataclass
class SweepArguments:
    output_dir: str = field(default="outputs/sweep")
    model: str = field(default="tiny.en", metadata={"help": "Packaged model: tiny.en or base."})
    kv_lora_ranks: list[int] = field(default_factory=lambda: [384, 192, 128, 96, 64, 48])
    kept_key_dims: list[int] = field(default_factory=lambda: [4])
    key_selections: list[str] = field(default_factory=lambda: ["uniform"])
    activation_aware: list[bool] = field(default_factory=lambda: [True])
    calibration: str = field(default="real_train", metadata={"help": "Manifest name: real_train or synthetic_train."})
    calibration_samples: int = field(default=64)
    max_eval_samples: int | None = field(default=None)
    speech_dir: str | None = field(default=None, metadata={"help": "Use manifests already built there."})


def write_rows(args: SweepArguments, rows: list[dict]) -> None:
    with open(os.path.join(args.output_dir, "sweep.json"), "w") as f:
        json.dump({"model": args.model, "calibration": args.calibration, "rows": rows}, f, indent=2)


def main():
    (args,) = HfArgumentParser(SweepArguments).parse_args_into_dataclasses()
    os.makedirs(args.output_dir, exist_ok=True)
    model_dir = ensure_packaged_model(args.model)
    manifests = ensure_speech_data() if args.speech_dir is None else {
        name: os.path.join(args.speech_dir, f"{name}.json") for name in ("real_eval", "real_train", "synthetic_train")
    }
    processor = AutoProcessor.from_pretrained(model_dir)
    mha = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    eval_set = list(load_speech_dataset(str(manifests["real_eval"]), max_samples=args.max_eval_samples))
    calibration = load_calibration_audio(str(manifests[args.calibration]), args.calibration_samples)
    mha_bytes = sum(expected_cache_bytes_per_token(mha.config, mha.dtype).values())

    rows = [{"setting": "MHA", "wer": evaluate_model(mha, processor, eval_set)["wer"], "cache_reduction_%": 0.0}]
    print(rows[-1], flush=True)
    for rank in args.kv_lora_ranks:
        for kept in args.kept_key_dims:
            for selection in args.key_selections:
                for aware in args.activation_aware:
                    mla = convert_whisper_to_mla(
                        mha, kv_lora_rank=rank, kept_key_dims=kept, key_selection=selection,
                        activation_aware=aware, calibration_audio=calibration,
                        feature_extractor=processor.feature_extractor,
                    )
                    mla_bytes = sum(expected_cache_bytes_per_token(mla.config, mla.dtype).values())
                    rows.append({
                        "setting": f"r={rank} kept={kept} {selection} {'aware' if aware else 'plain'}-SVD",
                        "kv_lora_rank": rank, "kept_key_dims": kept, "key_selection": selection,
                        "activation_aware": aware,
                        "wer": evaluate_model(mla, processor, eval_set)["wer"],
                        "cache_reduction_%": round(100 * (1 - mla_bytes / mha_bytes), 1),
                    })
                    print(rows[-1], flush=True)
                    write_rows(args, rows)  # after every setting: a long sweep can be stopped early
    print("| setting | cache reduction | WER (real_eval) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['cache_reduction_%']}% | {row['wer']:.2f} |")


if __name__ == "__main__":
    main()
