"""Make a folder a loadable Whisper-MLA checkpoint: remote code, auto_map, processor, model card; push it to the Hub."""

import os
import shutil

import configuration_whisper_mla
from configuration_whisper_mla import WhisperMLAConfig
from whisper_mla.io import checkpoint_config
from modeling_whisper_mla import (
    WhisperMLAForConditionalGeneration,
    expected_cache_bytes_per_token,
    expected_cache_bytes_per_utterance,
)

REMOTE_CODE_FILES = ("configuration_whisper_mla.py", "modeling_whisper_mla.py", "pipeline_whisper_mla.py")
HERE = os.path.dirname(os.path.abspath(configuration_whisper_mla.__file__))  # where the remote-code files are installed


# --------------------------------------------------------------------------------------------- saving


def copy_remote_code(output_dir: str) -> None:
    """Copies the files a fresh process needs to load the checkpoint with trust_remote_code=True."""
    for filename in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(HERE, filename), os.path.join(output_dir, filename))


def register_remote_code(config: WhisperMLAConfig) -> None:
    """Fills `auto_map` and `custom_pipelines` so AutoConfig/AutoModel*/pipeline resolve the shipped code."""
    config.auto_map = {
        "AutoConfig": "configuration_whisper_mla.WhisperMLAConfig",
        "AutoModel": "modeling_whisper_mla.WhisperMLAModel",
        "AutoModelForSpeechSeq2Seq": "modeling_whisper_mla.WhisperMLAForConditionalGeneration",
    }
    config.custom_pipelines = {
        "automatic-speech-recognition": {
            "impl": "pipeline_whisper_mla.WhisperMLAPipeline",
            "pt": ["AutoModelForSpeechSeq2Seq"],
            "type": "multimodal",
        }
    }


def save_mla_checkpoint(model: WhisperMLAForConditionalGeneration, processor, output_dir: str, card_text=None) -> None:
    """Writes weights (safetensors), config with auto_map, remote code, processor, generation config, model card."""
    register_remote_code(model.config)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    copy_remote_code(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(card_text if card_text is not None else model_card(model))


def push_checkpoint(folder: str, repo_id: str | None = None, token: str | None = None, private: bool | None = None,
                    commit_message: str = "Upload Whisper-MLA checkpoint") -> str:
    """Pushes a saved Whisper-MLA checkpoint folder (see `save_mla_checkpoint`) to the Hub as one commit.

    The folder is checked first, before any request: a repo without the remote-code files or the config's
    `auto_map` would not load with `trust_remote_code=True`. `checkpoint-*` folders, TensorBoard `runs/` and
    partial downloads are left out.

    Args:
        folder: the checkpoint folder: config.json with `auto_map`, the weights (model.safetensors or its index),
            and the remote-code files.
        repo_id: "user/name" or "name" (in the token's namespace); default: the folder's name.
        token, private: as `huggingface_hub.HfApi.create_repo` (default token: HF_TOKEN or the saved login).
        commit_message: the commit's title.

    Returns:
        the repo id pushed to ("user/name").
    """
    from huggingface_hub import HfApi

    check_checkpoint_folder(folder)
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message,
                      # training leftovers: intermediate checkpoints, logs, and training_args.bin (a pickle)
                      ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.partial*", "*.bin"])
    return repo_id


def check_checkpoint_folder(folder: str) -> None:
    """Raises unless `folder` holds what loading it with `trust_remote_code=True` needs.

    Raises:
        FileNotFoundError: the folder, config.json, the weights or a remote-code file is missing.
        ValueError: config.json has no `auto_map` entry for AutoModelForSpeechSeq2Seq.
    """
    fix = "save it with whisper_mla.hub.save_mla_checkpoint (convert_whisper_to_mla.py and run_finetune.py do) first"
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Expected a saved Whisper-MLA checkpoint folder, but no folder exists at {folder}.")
    expected = {name: [name] for name in ("config.json", *REMOTE_CODE_FILES)}
    expected["model.safetensors"] = ["model.safetensors", "model.safetensors.index.json"]
    missing = [name for name, options in expected.items()
               if not any(os.path.isfile(os.path.join(folder, option)) for option in options)]
    if missing:
        raise FileNotFoundError(
            f"Expected a saved Whisper-MLA checkpoint in {folder} ({', '.join(expected)}), but found no "
            f"{', '.join(missing)}; {fix}."
        )
    auto_map = checkpoint_config(folder).get("auto_map") or {}
    if "AutoModelForSpeechSeq2Seq" not in auto_map:
        raise ValueError(
            f"Expected {folder}/config.json to map AutoModelForSpeechSeq2Seq to the shipped modeling code in its "
            f"auto_map, but found auto_map={auto_map}; {fix}."
        )


def model_card(model: WhisperMLAForConditionalGeneration, extra: str = "") -> str:
    """A Hub model card (metadata + MLA settings + cache reduction) built with huggingface_hub's ModelCard."""
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    mla = expected_cache_bytes_per_token(config, model.dtype)
    mha = expected_cache_bytes_per_token(config, model.dtype, mha=True)
    reduction = 100 * (1 - sum(mla.values()) / sum(mha.values()))
    base = (config.mla_conversion or {}).get("base_model")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="automatic-speech-recognition",
        base_model=base if base and not os.path.isdir(base) else None,
        tags=["whisper", "whisper-mla", "multi-head-latent-attention"],
    )
    if config.shares_cross_latent_across_layers():
        width = config.shared_cross_rank()
        per = (f"per {config.cross_latent_stride} encoder frames" if config.cross_latent_stride > 1
               else "per encoder frame")
        cross = (f"Cross-attention reads ONE latent of {width} values {per}, cached once for all "
                 f"{config.decoder_layers} decoder layers" + (
                     "." if width < config.d_model else " (the encoder output itself, pooled over time)."
                     if config.cross_latent_stride > 1 else " (the encoder output itself: exact)."))
        if config.cross_latent_stride > 1:
            cross += (f" It holds one latent per {config.cross_latent_stride} encoder frames "
                      f"({config.cross_latent_pooling}), {config.cross_latent_frames(config.max_source_positions)} for "
                      "a 30 s window.")
    else:
        cross = "Each converted cross-attention block caches its own latent."
    widths = (f"one latent of {config.kv_lora_rank} values per token" if not config.kv_lora_ranks else
              "one latent per token (widths per block: " + ", ".join(
                  f"{name} {config.mla_rank(name)}" for name in config.mla_block_names()
                  if not config.is_shared_cross_block(name)) + ")")
    utterance = {name: expected_cache_bytes_per_utterance(config, model.dtype, 100, mha=name == "mha")
                 for name in ("mha", "mla")}
    body = f"""
# Whisper-MLA

This checkpoint is {base or 'a Whisper model'} with DeepSeek-style multi-head latent attention (MLA) in
{', '.join(config.mla_targets)} attention: a converted block caches {widths} plus {config.kept_key_dims}
uncompressed key dims per head, instead of full keys and values. {cross}

| setting | value |
|---|---|
| converted blocks | {', '.join(config.mla_targets)} |
| kv_lora_rank | {config.kv_lora_rank}{' (per block: see above)' if config.kv_lora_ranks else ''} |
| cross-attention latent | {config.cross_attention_latent}{f' (width {config.shared_cross_rank()})' if config.shares_cross_latent_across_layers() else ''} |
| kept key dims per head | {config.kept_key_dims} ({config.key_selection}) |
| SVD | {config.svd_method}, activation-aware: {(config.mla_conversion or {}).get('activation_aware')}, output-aware: {', '.join((config.mla_conversion or {}).get('output_aware', [])) or 'none'} |
| decode path | {config.mla_attn_implementation} |
| decoder cache bytes per decoder token + per encoder frame ({model.dtype}) | {sum(mla.values())} (MHA: {sum(mha.values())}) |
| cache reduction per token | {reduction:.1f}% |
| decoder cache of a 30 s utterance with 100 tokens | {utterance['mla'] / 2**20:.2f} MiB (MHA: {utterance['mha'] / 2**20:.2f} MiB, -{100 * (1 - utterance['mla'] / utterance['mha']):.1f}%) |

```python
from transformers import pipeline
asr = pipeline("automatic-speech-recognition", model="PATH_OR_REPO", trust_remote_code=True)
```
{extra}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))

