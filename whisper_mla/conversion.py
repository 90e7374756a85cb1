"""Convert a transformers Whisper checkpoint (MHA) into a Whisper-MLA checkpoint.

For every converted block: choose `kept_key_dims` key dims per head (uniform, or by the 2-norm score
mean|q_i| * mean|k_i| on calibration audio), and factorise the remaining key rows together with the value rows
(joint SVD; or each on its own, split SVD) into a down-projection to the cached latent and up-projections. With
calibration audio the SVD is activation-aware: it minimises the error on the block's real inputs X by factorising
W C^(1/2), where C = X^T X / n, instead of W.

    from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla, load_calibration_audio
    audio = load_calibration_audio("real_train.json", max_samples=64)
    mla = convert_whisper_to_mla(whisper, MLAArguments(), calibration_audio=audio, feature_extractor=fe)

The work is split along its seams: `whisper_mla.calibration` collects the statistics, `whisper_mla.factorisation`
fits the projections, this module holds the settings (`MLAArguments`) and runs both; it re-exports their public
names, so `from whisper_mla.conversion import ...` reaches all of them. `convert_whisper_to_mla.py` is the command
line around it; `whisper_mla.hub` saves and pushes the result.
"""

import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import WhisperForConditionalGeneration

from configuration_whisper_mla import WhisperMLAConfig
from modeling_whisper_mla import WhisperMLAForConditionalGeneration
from whisper_mla.arguments import check_number
from whisper_mla.calibration import (  # noqa: F401 (re-exported)
    _BlockStatistics,
    calibrated_blocks,
    check_calibration_statistics,
    collect_calibration_statistics,
    decoder_input_mask,
    input_covariance,
    input_mean,
    load_calibration_audio,
)
from whisper_mla.factorisation import (  # noqa: F401 (re-exported)
    BlockReading,
    block_kind,
    convert_attention_block,
    convert_shared_cross_attention,
    is_exact,
    low_rank,
    matrix_sqrt,
    output_aware_low_rank,
    select_kept_key_dims,
    spectrum_ranks,
    whitening,
)


logger = logging.getLogger(__name__)


@dataclass
class MLAArguments:
    """MLA settings of a conversion, shared by every script that converts. The defaults are WhisperMLAConfig's: one
    default per setting, defined there."""

    kv_lora_rank: int | None = field(
        default=WhisperMLAConfig.kv_lora_rank,
        metadata={"help": "Latent width cached per token by each converted self-attention block (and by each cross "
                  "block with --cross_attention_latent per_layer). Default d_model: the latent is the block's input "
                  "itself, exact (the same transcripts as the original, no calibration needed), with the shared "
                  "cross latent -85.2%% of tiny.en's cache of a 30 s utterance, -89.1%% of base's, -93.0%% of small's. "
                  "Narrower is lossy: on real tiny.en 256 cost +2.1 WER on long recordings of unseen speakers, 320 "
                  "held; base needs more than 384 (README). The original Whisper_MLA setting, 96 with 4 kept dims, "
                  "needs recovery training (run_finetune.py)."},
    )
    kv_lora_rank_allocation: str = field(
        default="uniform",
        metadata={"help": "uniform (default): every block with a latent of its own gets --kv_lora_rank. spectrum: the "
                  "same total width per kind of block (decoder self-attention, per-layer cross-attention, encoder), "
                  "shared out by the singular values of each block's (activation-aware) key/value matrix: a width "
                  "goes where it keeps the largest share of a block's energy (at least 1 each). Written to "
                  "config.kv_lora_ranks. Measured worse than uniform on real tiny.en (4 x 96, no training: 114.1 "
                  "WER on unseen speakers against 41.0; README, 'Spending that self-attention budget').",
                  "choices": ["uniform", "spectrum"]},
    )
    kept_key_dims: int | None = field(
        default=WhisperMLAConfig.kept_key_dims,
        metadata={"help": "Uncompressed key dims per head. Default: 0 at full width with joint SVD (the latent "
                  "holds every key dim), 4 otherwise; at 120 values per token on real tiny.en, 0 measured better "
                  "(README)."},
    )
    key_selection: str = field(
        default=WhisperMLAConfig.key_selection,
        metadata={"help": "How kept key dims are chosen.", "choices": ["uniform", "2-norm"]},
    )
    svd_method: str = field(
        default=WhisperMLAConfig.svd_method, metadata={"help": "SVD variant.", "choices": ["joint", "split"]}
    )
    mla_targets: list[str] = field(
        default_factory=lambda: list(WhisperMLAConfig.mla_targets),
        metadata={"help": "Converted blocks: any of encoder_self, decoder_self, decoder_cross."},
    )
    cross_attention_latent: str = field(
        default=WhisperMLAConfig.cross_attention_latent,
        metadata={"help": "shared (default): one latent of width --cross_kv_lora_rank serves every decoder layer's "
                  "cross-attention (the encoder output itself at d_model: exact, -87.5%% of tiny.en's cross cache, "
                  "-95.8%% of small's). per_layer: each cross block caches its own kv_lora_rank latent (lossy below "
                  "d_model: at 192 it cost tiny.en +3 WER on unseen speakers).", "choices": ["per_layer", "shared"]},
    )
    cross_kv_lora_rank: int | None = field(
        default=WhisperMLAConfig.cross_kv_lora_rank,
        metadata={"help": "Width of the shared cross-attention latent; default d_model (exact, no down-projection). "
                  "Below d_model one activation-aware SVD over all layers' cross keys and values gives the shared "
                  "down-projection."},
    )
    cross_latent_stride: int = field(
        default=WhisperMLAConfig.cross_latent_stride,
        metadata={"help": "With the shared cross latent, cache one latent per this many encoder frames (pooled by "
                  "--cross_latent_pooling): the cross cache shrinks by that factor at any width; lossy, no calibration. On "
                  "real tiny.en, 3 with --kv_lora_rank 352 --kept_key_dims 0 --output_aware decoder_self (-93.2%% of "
                  "the cache) scored 9.33 / 10.87 WER on unseen speakers' short clips / long recordings (MHA 9.52 / "
                  "9.38), 8.76 / 9.17 after 8.5 min of long-form distillation; 4 cost +3.4 / +8.1 untrained (README)."},
    )
    cross_latent_pooling: str = field(
        default=WhisperMLAConfig.cross_latent_pooling,
        metadata={"help": "How --cross_latent_stride frames become one: mean (default) or subsample (the first).",
                  "choices": ["mean", "subsample"]},
    )
    mla_attn_implementation: str = field(
        default=WhisperMLAConfig.mla_attn_implementation,
        metadata={"help": "Decode path.", "choices": ["absorb", "naive"]},
    )
    mla_cache_quantization: str | None = field(
        default=WhisperMLAConfig.mla_cache_quantization,
        metadata={"help": "int8: quantise the cached latent and kept key dims (per-token absmax scales). Default: "
                          "the model dtype.", "choices": ["int8"]},
    )
    calibration_data: str | None = field(
        default=None,
        metadata={"help": "Audio for calibration: a folder of audio files, a LibriSpeech-layout folder, a JSON "
                  "manifest, or a datasets dataset (save_to_disk folder or Hub id)."},
    )
    calibration_samples: int = field(default=64, metadata={"help": "Clips used for calibration at most."})
    calibration_batch_size: int = field(default=16, metadata={"help": "Calibration clips per forward pass."})
    activation_aware: bool | None = field(
        default=None, metadata={"help": "Whitened (activation-aware) SVD. Default: on iff calibration data is given."}
    )
    cross_frame_weighting: str = field(
        default="attention",
        metadata={"help": "How the activation-aware SVD of cross-attention weighs the 1500 encoder frames: attention "
                  "(default: by the cross-attention each frame receives from the decoder, so the padding after a "
                  "short clip, most frames, barely counts) or uniform (every frame alike). On real tiny.en, a shared "
                  "cross latent of 192 scored 11.05 WER on unseen speakers with attention and 83.24 with uniform "
                  "(MHA 9.52).", "choices": ["attention", "uniform"]},
    )
    output_aware: list[str] = field(
        default_factory=list,
        metadata={"help": "Kinds of blocks (any of encoder_self, decoder_self, decoder_cross) whose lossy latents are "
                  "fitted to what the block makes of its keys and values, not to the keys and values alone: key "
                  "errors weighed by the queries that read them, value errors by the output projection they leave "
                  "through, errors constant over positions dropped or folded into the value bias (centered inputs). "
                  "Needs calibration audio and --svd_method joint. On real tiny.en (no training, unseen speakers, "
                  "MHA 9.52): decoder self-attention latents of 120 scored 8.95 output-aware against 11.24, a shared "
                  "cross latent of 192 16.00 against 12.00 (README)."},
    )

    def __post_init__(self):
        check_number("--calibration_samples", self.calibration_samples, minimum=1)
        check_number("--calibration_batch_size", self.calibration_batch_size, minimum=1)
        if self.kv_lora_rank_allocation not in ("uniform", "spectrum"):
            raise ValueError(f"--kv_lora_rank_allocation expects uniform or spectrum, but found "
                             f"{self.kv_lora_rank_allocation!r}; pick one.")
        if self.kv_lora_rank_allocation == "spectrum" and self.svd_method != "joint":
            raise ValueError("--kv_lora_rank_allocation spectrum expects --svd_method joint (one latent per block), but "
                             f"found {self.svd_method!r}; use joint, or the uniform allocation.")
        unknown = sorted(set(self.output_aware) - {"encoder_self", "decoder_self", "decoder_cross"})
        if unknown:
            raise ValueError(f"--output_aware expects kinds of blocks among encoder_self, decoder_self and "
                             f"decoder_cross, but found {unknown}; e.g. --output_aware decoder_self.")
        if self.output_aware and (self.svd_method != "joint" or self.activation_aware is False):
            raise ValueError("--output_aware expects --svd_method joint with activation-aware SVD, but found "
                             f"svd_method={self.svd_method!r}, activation_aware={self.activation_aware}; use joint "
                             "and leave --activation_aware on, or drop --output_aware.")
        if self.cross_frame_weighting not in ("attention", "uniform"):
            raise ValueError(f"--cross_frame_weighting expects attention or uniform, but found "
                             f"{self.cross_frame_weighting!r}; pick one.")


def calibration_changes_weights(config: WhisperMLAConfig) -> bool:
    """Whether calibration statistics can change any weight of this conversion: a lossy (narrower than exact)
    factorisation, or kept key dims chosen by their 2-norm score. False for the defaults (exact)."""
    names = config.mla_block_names()
    return any(not is_exact(config, name) for name in names) or (
        config.key_selection == "2-norm" and any(config.mla_kept_key_dims(name) for name in names))


def needs_calibration(whisper_config, mla_args: "MLAArguments") -> bool:
    """Whether converting a Whisper model with this `whisper_config` and these settings reads calibration audio:
    scripts ask this before preparing any audio, so that a setting that needs none (the exact default) costs none.

    Args:
        whisper_config: the MHA model's `WhisperConfig`.
        mla_args: the conversion settings.

    Returns:
        True when some weight depends on calibration statistics (activation-aware or output-aware SVD of a lossy
        block, or 2-norm key selection), else False.
    """
    config = mla_config_from_whisper(whisper_config, mla_args)
    uses_statistics = mla_args.activation_aware is not False or bool(mla_args.output_aware) or \
        config.key_selection == "2-norm"
    return uses_statistics and calibration_changes_weights(config)


def source_description(model) -> dict:
    """Where a converted model came from, without local paths (a config.json goes to the Hub with the checkpoint).

    Returns:
        {"base_model": the Hub id} when the model was loaded from the Hub; for a local folder {"base_model": None,
        "base_model_local": "<folder name> (local folder, weights sha256 <16 hex digits>)"}, the digest taken over
        the weights as loaded (names, dtypes, shapes and bytes), so two folders with the same weights match;
        {"base_model": None} for a model built in memory.
    """
    name = getattr(model.config, "_name_or_path", None) or None
    if name is None:
        return {"base_model": None}
    is_hub_id = not os.path.exists(name) and not os.path.isabs(name) and name.count("/") <= 1 and \
        not name.startswith(".")
    if is_hub_id:
        return {"base_model": name}
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    folder = os.path.basename(os.path.normpath(name))
    return {"base_model": None, "base_model_local": f"{folder} (local folder, weights sha256 {digest.hexdigest()[:16]})"}


def mla_config_from_whisper(whisper_config, mla_args: MLAArguments, kept_key_indices=None, provenance=None,
                            kv_lora_ranks=None):
    """A WhisperMLAConfig with the Whisper config's hyperparameters and the MLA settings (per-block widths
    `kv_lora_ranks` from the spectrum allocation, if any)."""
    cross_layout = mla_args.cross_attention_latent
    if "decoder_cross" not in mla_args.mla_targets and mla_args.cross_kv_lora_rank is None:
        cross_layout = "per_layer"  # no cross block is converted: the (default) shared layout does not apply
    base = whisper_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "custom_pipelines"):
        base.pop(key, None)
    return WhisperMLAConfig(
        **base,
        mla_targets=list(mla_args.mla_targets),
        kv_lora_rank=mla_args.kv_lora_rank,
        kept_key_dims=mla_args.kept_key_dims,
        key_selection=mla_args.key_selection,
        svd_method=mla_args.svd_method,
        cross_attention_latent=cross_layout,
        cross_kv_lora_rank=mla_args.cross_kv_lora_rank,
        cross_latent_stride=mla_args.cross_latent_stride,
        cross_latent_pooling=mla_args.cross_latent_pooling,
        mla_attn_implementation=mla_args.mla_attn_implementation,
        mla_cache_quantization=mla_args.mla_cache_quantization,
        kept_key_indices=kept_key_indices,
        kv_lora_ranks=kv_lora_ranks,
        mla_conversion=provenance,
    )


@torch.no_grad()
def convert_whisper_to_mla(
    model: WhisperForConditionalGeneration,
    mla_args: MLAArguments | None = None,
    calibration_audio: list[np.ndarray] | None = None,
    feature_extractor=None,
    calibration_statistics: dict | None = None,
    **mla_kwargs,
) -> WhisperMLAForConditionalGeneration:
    """Converts a loaded Whisper model into a Whisper-MLA model (a new model; the input is left untouched).

    Args:
        model: a transformers `WhisperForConditionalGeneration` (MHA).
        mla_args: the MLA settings; or pass them as keyword arguments (`kv_lora_rank=96, kept_key_dims=4, ...`).
        calibration_audio: 16 kHz waveforms for 2-norm key selection and activation-aware SVD.
        feature_extractor: Whisper's feature extractor, needed with calibration audio.
        calibration_statistics: what `collect_calibration_statistics` returned for this model and the blocks to
            convert; lets several conversions share one calibration pass (instead of calibration_audio).

    Returns:
        `WhisperMLAForConditionalGeneration` in the input model's dtype, with its generation config.
    """
    if not isinstance(model, WhisperForConditionalGeneration) or isinstance(model, WhisperMLAForConditionalGeneration):
        raise ValueError(
            f"convert_whisper_to_mla expects a transformers WhisperForConditionalGeneration (MHA), but found "
            f"{type(model).__name__}; load it with WhisperForConditionalGeneration.from_pretrained(...)."
        )
    mla_args = mla_args or MLAArguments(**mla_kwargs)
    config = mla_config_from_whisper(model.config, mla_args)  # validates the settings before any work
    calibrated = calibration_audio is not None or calibration_statistics is not None
    activation_aware = mla_args.activation_aware
    if activation_aware is None:
        activation_aware = calibrated
    needs_statistics = calibration_changes_weights(config)
    if (activation_aware or mla_args.output_aware or config.key_selection == "2-norm") and not calibrated and \
            needs_statistics:
        raise ValueError(
            "Activation-aware (and output-aware) SVD and 2-norm key selection expect calibration audio, but found none; "
            "pass calibration_audio (--calibration_data) or use activation_aware=False, no output_aware kinds and "
            "key_selection='uniform'."
        )
    if not needs_statistics:  # e.g. the defaults: minutes of calibration that change no weight
        if calibrated:
            pooled = (f" (the shared cross latent pooled over {config.cross_latent_stride} frames is not exact, but "
                      "its pooling needs no calibration)" if config.cross_latent_stride > 1 else "")
            logger.info("Every converted block's factorisation is exact at these settings (full-width latents, uniform "
                        f"kept dims){pooled}: the calibration audio is not needed and is not used.")
        calibration_audio = calibration_statistics = None
        activation_aware = False
    stats = calibration_statistics
    if stats is None and calibration_audio is not None:
        if feature_extractor is None:
            raise ValueError("Calibration audio needs Whisper's feature extractor; pass feature_extractor=...")
        stats = collect_calibration_statistics(model, feature_extractor, calibration_audio, calibrated_blocks(config),
                                               batch_size=mla_args.calibration_batch_size)
    if stats is not None:
        check_calibration_statistics(stats, calibrated_blocks(config))
    elif any(not is_exact(config, name) for name in config.mla_block_names()):
        logger.warning(
            "Converting without calibration audio: the SVD is fitted to the weights alone, not to the activations. "
            "Measured on real tiny.en (per-layer latents of 192, the previous default): 81.7 WER on 5-minute "
            "recordings where the original scores 5.4. Pass calibration_audio (--calibration_data, any untranscribed "
            "speech) unless every converted block is at full rank."
        )

    kept = select_kept_key_dims(config, stats)
    provenance = {
        **source_description(model),
        "activation_aware": bool(activation_aware),
        "calibration_clips": stats[calibrated_blocks(config)[0]].num_clips if stats else 0,
    }
    if activation_aware and "decoder_cross" in config.mla_targets:
        provenance["cross_frame_weighting"] = mla_args.cross_frame_weighting
    output_aware = sorted(set(mla_args.output_aware) & set(config.mla_targets))
    if activation_aware and output_aware:
        provenance["output_aware"] = output_aware
    config = mla_config_from_whisper(model.config, mla_args, kept_key_indices=kept, provenance=provenance)

    state = {k.removeprefix("model."): v for k, v in model.state_dict().items() if k.startswith("model.")}
    new_state = {}
    shared_cross = [name for name in config.mla_block_names() if config.is_shared_cross_block(name)]
    def attention_weighted(names):  # cross blocks weigh the encoder frames by the attention they receive
        return mla_args.cross_frame_weighting == "attention" and block_kind(names[0]) == "decoder_cross"

    def covariance(names):
        if stats is None or not activation_aware:
            return None
        return input_covariance([stats[name] for name in names], attention_weighted(names))

    def readings(names):
        if stats is None or not activation_aware or block_kind(names[0]) not in output_aware:
            return None
        return [BlockReading.from_statistics(stats[name], attention_weighted(names)) for name in names]

    if mla_args.kv_lora_rank_allocation == "spectrum":
        provenance["kv_lora_rank_allocation"] = "spectrum"
        config = mla_config_from_whisper(model.config, mla_args, kept_key_indices=kept, provenance=provenance,
                                         kv_lora_ranks=spectrum_ranks(state, config, kept, covariance))

    for name in tqdm(config.mla_block_names(), desc="factorising", unit="block", leave=False):
        if name not in shared_cross:
            reading = readings([name])
            new_state.update(convert_attention_block(state, config, name, kept[name], covariance([name]),
                                                     reading[0] if reading else None))
    if shared_cross:  # one SVD for all: every layer's attention weighs the encoder frames
        new_state.update(convert_shared_cross_attention(state, config, shared_cross, covariance(shared_cross),
                                                        readings(shared_cross)))
    new_state.update(state)  # every other weight is carried over unchanged

    mla_model = WhisperMLAForConditionalGeneration(config).to(model.dtype)
    mla_model.set_attn_implementation(model.config._attn_implementation)  # the kernel the original was loaded with
    expected = {k.removeprefix("model."): v for k, v in mla_model.state_dict().items() if k.startswith("model.")}
    missing, unexpected = sorted(set(expected) - set(new_state)), sorted(set(new_state) - set(expected))
    if missing or unexpected:
        raise RuntimeError(f"Conversion does not account for every weight: missing {missing}, unexpected {unexpected}.")
    for key, tensor in new_state.items():
        if tensor.shape != expected[key].shape:
            raise RuntimeError(f"{key}: expected shape {tuple(expected[key].shape)}, found {tuple(tensor.shape)}.")
    mla_model.model.load_state_dict({k: v.to(model.dtype) for k, v in new_state.items()}, strict=True)
    mla_model.proj_out.weight = mla_model.model.decoder.embed_tokens.weight  # Whisper ties the output projection
    mla_model.generation_config = copy.deepcopy(model.generation_config)
    return mla_model.to(model.device).eval()

