"""Convert a transformers Whisper checkpoint (MHA) into a Whisper-MLA checkpoint.

For every converted block: choose `kept_key_dims` key dims per head (uniform, or by the 2-norm score
mean|q_i| * mean|k_i| on calibration audio), and factorise the remaining key rows together with the value rows
(joint SVD; or each on its own, split SVD) into a down-projection to the cached latent and up-projections. With
calibration audio the SVD is activation-aware: it minimises the error on the block's real inputs X by factorising
W C^(1/2), where C = X^T X / n, instead of W.

    python convert_whisper_to_mla.py --model_name_or_path openai/whisper-small --output_dir out/ \
        --kv_lora_rank 96 --kept_key_dims 4 --key_selection 2-norm --calibration_data AUDIO_SOURCE
"""

import sys
from dataclasses import dataclass, field

from transformers import (
    AutoProcessor,
    HfArgumentParser,
    WhisperForConditionalGeneration,
)

from whisper_mla.arguments import run_cli
from whisper_mla.io import atomic_output_dir, check_output_dir, checkpoint_config, from_pretrained_strict
from modeling_whisper_mla import expected_cache_bytes_per_utterance
from whisper_mla.conversion import (
    MLAArguments,
    convert_whisper_to_mla,
    load_calibration_audio,
    needs_calibration,
)
from whisper_mla.hub import push_checkpoint, save_mla_checkpoint


@dataclass
class ConversionArguments:
    model_name_or_path: str = field(metadata={"help": "A transformers Whisper checkpoint: folder or Hub id."})
    output_dir: str = field(metadata={"help": "Where the MLA checkpoint is written."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the checkpoint and its model card to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (default: output_dir's name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the saved login)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repo private."})


def main():
    parser = HfArgumentParser((ConversionArguments, MLAArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        conversion_args, mla_args = parser.parse_yaml_file(sys.argv[1]) if sys.argv[1].endswith(("yaml", "yml")) \
            else parser.parse_json_file(sys.argv[1])
    else:
        conversion_args, mla_args = parser.parse_args_into_dataclasses()

    # 1. Check every input before any expensive work: the output folder (never clobbered), the source checkpoint.
    check_output_dir(conversion_args.output_dir, conversion_args.overwrite_output_dir)
    source = conversion_args.model_name_or_path
    if checkpoint_config(source).get("model_type") == "whisper_mla":
        raise ValueError(
            f"--model_name_or_path expects a Whisper (MHA) checkpoint, but found a Whisper-MLA checkpoint at "
            f"{source!r}; convert its MHA original, or fine-tune this one with run_finetune.py."
        )
    # 2. Load the MHA model (strictly: every weight present and shaped as its config says) and its processor.
    model = from_pretrained_strict(WhisperForConditionalGeneration, source)
    processor = AutoProcessor.from_pretrained(source)
    # 3. Calibration audio, if given and if these settings read it (the exact defaults do not: it is not loaded).
    audios = None
    if mla_args.calibration_data is not None and not needs_calibration(model.config, mla_args):
        print(f"These settings are exact at every converted block: --calibration_data {mla_args.calibration_data} "
              "would change no weight, so it is not read.")
    elif mla_args.calibration_data is not None:
        audios = load_calibration_audio(mla_args.calibration_data, mla_args.calibration_samples)
    # 4. Convert, save (into a temporary sibling swapped in at the end: a killed run leaves no half-written folder).
    mla_model = convert_whisper_to_mla(model, mla_args, calibration_audio=audios,
                                       feature_extractor=processor.feature_extractor)
    with atomic_output_dir(conversion_args.output_dir, conversion_args.overwrite_output_dir) as tmp_dir:
        save_mla_checkpoint(mla_model, processor, tmp_dir)
    mla, mha = (expected_cache_bytes_per_utterance(mla_model.config, mla_model.dtype, 100, mha=m) for m in (0, 1))
    print(f"Saved Whisper-MLA checkpoint to {conversion_args.output_dir}: decoder cache of a 30 s utterance with 100 "
          f"tokens {mla / 2**20:.2f} MiB (MHA {mha / 2**20:.2f} MiB, -{100 * (1 - mla / mha):.1f}%).")
    # 5. Push.
    if conversion_args.push_to_hub:
        repo_id = push_checkpoint(conversion_args.output_dir, conversion_args.hub_model_id,
                                  token=conversion_args.hub_token, private=conversion_args.hub_private_repo)
        print(f"Pushed to the Hub: {repo_id}")

if __name__ == "__main__":
    run_cli(main)
