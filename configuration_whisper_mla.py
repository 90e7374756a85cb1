"""Whisper-MLA configuration: Whisper's hyperparameters plus the multi-head latent attention (MLA) settings."""

from huggingface_hub.dataclasses import strict
from transformers import WhisperConfig


MLA_TARGETS = ("encoder_self", "decoder_self", "decoder_cross")
KEY_SELECTIONS = ("uniform", "2-norm")
SVD_METHODS = ("joint", "split")
MLA_ATTN_IMPLEMENTATIONS = ("absorb", "naive")
MLA_CACHE_QUANTIZATIONS = (None, "int8")
CROSS_ATTENTION_LATENTS = ("per_layer", "shared")
CROSS_LATENT_POOLINGS = ("mean", "subsample")
# Uncompressed key dims per head of a latent narrower than d_model (a full-width latent holds every key dim already).
KEPT_KEY_DIMS_BELOW_FULL_RANK = 4


def uniform_kept_indices(head_dim: int, kept_key_dims: int) -> list[int]:
    """Evenly spaced key dims of one head, e.g. head_dim=64, kept=4 -> [0, 21, 42, 63]."""
    if kept_key_dims == 0:
        return []
    if kept_key_dims == 1:
        return [0]
    step = (head_dim - 1) / (kept_key_dims - 1)
    return [round(i * step) for i in range(kept_key_dims)]


@strict
class WhisperMLAConfig(WhisperConfig):
    r"""
    Configuration of a Whisper model whose attention blocks in `mla_targets` use multi-head latent attention.

    A converted block caches, per token, one latent of width `kv_lora_rank` shared by all heads plus
    `kept_key_dims` uncompressed key dims per head, instead of full keys and values.

    Args:
        mla_targets (`list[str]`, defaults to `["decoder_self", "decoder_cross"]`):
            Converted attention kinds, any of "encoder_self", "decoder_self", "decoder_cross". The encoder keeps no
            cache at inference, so converting it costs accuracy and saves no cache memory.
        kv_lora_rank (`int`, *optional*):
            Width of the cached latent per token and converted block (self-attention; cross-attention too with
            `cross_attention_latent="per_layer"`). None (the default) means `d_model`: with `svd_method="joint"` the
            latent is then the block's input itself (no SVD, exact), half of MHA's `2 * d_model` keys and values per
            token. Narrower latents are lossy and need calibration, and the width that keeps WER grows with the model
            (README, "Results"). These defaults are the converter's (`whisper_mla.conversion.MLAArguments` reads them
            from here).
        kept_key_dims (`int`, *optional*):
            Uncompressed key dims per head (DeepSeek's `qk_rope_head_dim`; Whisper has no RoPE). None (the default)
            means 0 for a full-width joint latent, which holds every key dim already, and 4 otherwise (MHA2MLA's
            kept dims; on real tiny.en at a 120-value budget, spending them on the latent instead measured better,
            README "Spending that self-attention budget", so pass `kept_key_dims=0` there).
        key_selection (`str`, defaults to `"uniform"`):
            How the kept key dims were chosen: "uniform" or "2-norm" (scored on calibration audio).
        svd_method (`str`, defaults to `"joint"`):
            "joint": one latent for compressed keys and values. "split": the first `kv_lora_rank // 2` latent
            dims serve the keys, the rest the values.
        mla_attn_implementation (`str`, defaults to `"absorb"`):
            "absorb": attend directly over the cached latent (up-projections folded into query and output) in
            eval mode. "naive": expand the latent to keys and values and use the attention interface.
        mla_cache_quantization (`str`, *optional*):
            None: the cache holds the latent and kept key dims in the model dtype. "int8": both quantised to int8
            with one float32 absmax scale each per token (`r + heads * kept + 8` bytes per token and block).
        cross_attention_latent (`str`, defaults to `"shared"`):
            How converted decoder cross-attention blocks cache the encoder output. "per_layer": each block caches its
            own latent (`kv_lora_rank` + kept key dims per frame). "shared": every layer's cross keys and values are
            linear maps of the same encoder output, so ONE latent per frame (width `cross_kv_lora_rank`, no kept
            dims) serves all layers; each block keeps its own up-projections, absorbed into its query and output.
            Checkpoints saved before this setting existed are "per_layer": add it to their config.json.
        cross_kv_lora_rank (`int`, *optional*):
            Width of the shared cross-attention latent. None means `d_model`: the latent is the encoder output itself
            (no down-projection, exact). Below `d_model` the decoder holds one down-projection `cross_kv_a_proj`.
        cross_latent_stride (`int`, defaults to 1):
            With the shared cross latent: cache one latent per `cross_latent_stride` encoder frames (1500 frames of a
            30 s window become ceil(1500 / stride)), pooled as `cross_latent_pooling` says, so the cross cache
            shrinks by that factor at any width. The encoder still sees every frame; 1 keeps them all (exact).
        cross_latent_pooling (`str`, defaults to `"mean"`):
            How `cross_latent_stride` frames become one: "mean" (their average) or "subsample" (the first of each
            group).
        kv_lora_ranks (`dict[str, int]`, *optional*):
            Per-block latent widths that override `kv_lora_rank` (e.g. {"decoder.layers.3.self_attn": 128}), for
            blocks with a latent of their own; the converter writes them with `--kv_lora_rank_allocation spectrum`.
        share_cross_latent_across_beams (`bool`, defaults to `True`):
            In beam search, cache one cross-attention latent per utterance instead of one copy per beam (applies
            when all decoder cross-attention blocks are converted).
        kept_key_indices (`dict[str, list[list[int]]]`, *optional*):
            For every converted block (e.g. "decoder.layers.0.self_attn"), the kept key dims of each head in the
            original head layout. Defaults to uniform indices.
        mla_conversion (`dict`, *optional*):
            Provenance of the conversion (base model, calibration), written by the converter; informational.
    """

    model_type = "whisper_mla"

    mla_targets: list[str] | tuple[str, ...] = ("decoder_self", "decoder_cross")
    kv_lora_rank: int | None = None
    kept_key_dims: int | None = None
    key_selection: str = "uniform"
    svd_method: str = "joint"
    mla_attn_implementation: str = "absorb"
    mla_cache_quantization: str | None = None
    cross_attention_latent: str = "shared"
    cross_kv_lora_rank: int | None = None
    cross_latent_stride: int = 1
    cross_latent_pooling: str = "mean"
    kv_lora_ranks: dict | None = None
    share_cross_latent_across_beams: bool = True
    kept_key_indices: dict | None = None
    mla_conversion: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.mla_targets = list(self.mla_targets)
        if self.kv_lora_rank is None:  # resolved here, so config.json always names the width it was built with
            self.kv_lora_rank = self.d_model
        if self.kept_key_dims is None:  # a full-width joint latent holds every key dim; a split one does not
            full_width = self.kv_lora_rank >= self.d_model and self.svd_method == "joint"
            self.kept_key_dims = 0 if full_width else KEPT_KEY_DIMS_BELOW_FULL_RANK
        self.check_mla_settings()

    def check_mla_settings(self):
        """Validates the MLA settings (kept key indices included), raising ValueError with expected/found/fix.

        Runs at construction and again when a model is built, so values set after construction (e.g. keyword
        arguments of `from_pretrained`) are checked too."""
        self._validate_mla()
        if self.kept_key_indices is None:
            self.kept_key_indices = {
                name: [
                    uniform_kept_indices(self.mla_head_dim(name), self.mla_kept_key_dims(name))
                    for _ in range(self.mla_num_heads(name))
                ]
                for name in self.mla_block_names()
            }
        self._validate_kept_key_indices()

    def mla_block_names(self) -> list[str]:
        """Module paths (relative to `WhisperModel`) of the converted attention blocks, in model order."""
        names = []
        if "encoder_self" in self.mla_targets:
            names += [f"encoder.layers.{i}.self_attn" for i in range(self.encoder_layers)]
        for i in range(self.decoder_layers):
            if "decoder_self" in self.mla_targets:
                names.append(f"decoder.layers.{i}.self_attn")
            if "decoder_cross" in self.mla_targets:
                names.append(f"decoder.layers.{i}.encoder_attn")
        return names

    def mla_num_heads(self, block_name: str) -> int:
        return self.encoder_attention_heads if block_name.startswith("encoder") else self.decoder_attention_heads

    def mla_head_dim(self, block_name: str) -> int:
        return self.d_model // self.mla_num_heads(block_name)

    def shares_cross_latent_across_layers(self) -> bool:
        """Whether the converted cross-attention blocks read one latent shared by all layers."""
        return self.cross_attention_latent == "shared" and "decoder_cross" in self.mla_targets

    def is_shared_cross_block(self, block_name: str) -> bool:
        return self.shares_cross_latent_across_layers() and block_name.endswith("encoder_attn")

    def shared_cross_rank(self) -> int:
        """Width of the shared cross-attention latent (`d_model` when `cross_kv_lora_rank` is None)."""
        return self.d_model if self.cross_kv_lora_rank is None else self.cross_kv_lora_rank

    def mla_rank(self, block_name: str) -> int:
        """Latent width a converted block reads."""
        if self.is_shared_cross_block(block_name):
            return self.shared_cross_rank()
        return (self.kv_lora_ranks or {}).get(block_name, self.kv_lora_rank)

    def mla_kept_key_dims(self, block_name: str) -> int:
        """Uncompressed key dims per head of a converted block (none for a shared cross latent)."""
        return 0 if self.is_shared_cross_block(block_name) else self.kept_key_dims

    def mla_latent_split(self, block_name: str | None = None) -> tuple[int, int]:
        """(key latent width, value latent width) of a block; both are the whole latent for joint SVD (always for a
        shared cross latent)."""
        rank = self.kv_lora_rank if block_name is None else self.mla_rank(block_name)
        if self.svd_method == "joint" or (block_name is not None and self.is_shared_cross_block(block_name)):
            return rank, rank
        return rank // 2, rank - rank // 2

    def _validate_mla(self):
        unknown = [t for t in self.mla_targets if t not in MLA_TARGETS]
        if unknown or not self.mla_targets or len(set(self.mla_targets)) != len(self.mla_targets):
            raise ValueError(
                f"`mla_targets` expects a non-empty list of distinct values from {list(MLA_TARGETS)}, but found "
                f"{self.mla_targets}; pass e.g. mla_targets=['decoder_self', 'decoder_cross']."
            )
        for name, value, allowed in (
            ("key_selection", self.key_selection, KEY_SELECTIONS),
            ("svd_method", self.svd_method, SVD_METHODS),
            ("mla_attn_implementation", self.mla_attn_implementation, MLA_ATTN_IMPLEMENTATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` expects one of {list(allowed)}, but found {value!r}; pick one of those.")
        if self.mla_cache_quantization not in MLA_CACHE_QUANTIZATIONS:
            raise ValueError(
                f"`mla_cache_quantization` expects one of {list(MLA_CACHE_QUANTIZATIONS)}, but found "
                f"{self.mla_cache_quantization!r}; pass None (model dtype) or 'int8'."
            )
        if self.cross_attention_latent not in CROSS_ATTENTION_LATENTS:
            raise ValueError(
                f"`cross_attention_latent` expects one of {list(CROSS_ATTENTION_LATENTS)}, but found "
                f"{self.cross_attention_latent!r}; pick one of those."
            )
        # Without "decoder_cross" in mla_targets the cross-attention layout has nothing to apply to: any value is valid.
        if self.cross_kv_lora_rank is not None:
            if self.cross_attention_latent != "shared":
                raise ValueError(
                    f"`cross_kv_lora_rank` is the width of the shared cross-attention latent, but found "
                    f"cross_kv_lora_rank={self.cross_kv_lora_rank} with cross_attention_latent="
                    f"{self.cross_attention_latent!r}; set cross_attention_latent='shared' or leave it None."
                )
            if not isinstance(self.cross_kv_lora_rank, int) or not 1 <= self.cross_kv_lora_rank <= self.d_model:
                raise ValueError(
                    f"`cross_kv_lora_rank` expects an int in [1, d_model={self.d_model}] ({self.d_model} or None is "
                    f"exact), but found {self.cross_kv_lora_rank!r}; pick a width in that range."
                )
        self._validate_cross_latent_stride()
        only_shared_cross = self.shares_cross_latent_across_layers() and "decoder_self" not in self.mla_targets
        for kind, heads in (("encoder", self.encoder_attention_heads), ("decoder", self.decoder_attention_heads)):
            if not any(t.startswith(kind) for t in self.mla_targets) or (kind == "decoder" and only_shared_cross):
                continue
            head_dim = self.d_model // heads
            if not 0 <= self.kept_key_dims <= head_dim:
                raise ValueError(
                    f"`kept_key_dims` expects a value in [0, head_dim={head_dim}] ({kind}: d_model={self.d_model}, "
                    f"{heads} heads), but found {self.kept_key_dims}; lower it."
                )
            self._check_rank("kv_lora_rank", self.kv_lora_rank, heads)
        self._validate_kv_lora_ranks()

    def _validate_cross_latent_stride(self):
        if self.cross_latent_pooling not in CROSS_LATENT_POOLINGS:
            raise ValueError(
                f"`cross_latent_pooling` expects one of {list(CROSS_LATENT_POOLINGS)}, but found "
                f"{self.cross_latent_pooling!r}; pick one of those."
            )
        stride = self.cross_latent_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= self.max_source_positions:
            raise ValueError(
                f"`cross_latent_stride` expects an int in [1, max_source_positions={self.max_source_positions}] (1 "
                f"caches every encoder frame), but found {stride!r}; pass e.g. 2."
            )
        if stride > 1 and not self.shares_cross_latent_across_layers():
            raise ValueError(
                f"`cross_latent_stride` pools the shared cross-attention latent, but found cross_latent_stride="
                f"{stride} with cross_attention_latent={self.cross_attention_latent!r} and mla_targets="
                f"{self.mla_targets}; use cross_attention_latent='shared' with 'decoder_cross' in mla_targets, or "
                "stride 1."
            )

    def cross_latent_frames(self, frames: int) -> int:
        """Cross-attention cache entries for `frames` encoder frames: one per `cross_latent_stride` frames."""
        return -(-frames // self.cross_latent_stride)

    def _check_rank(self, what: str, rank, heads: int):
        """Refuses a latent width that the SVD of a block with `heads` heads cannot have."""
        compressed = heads * (self.d_model // heads - self.kept_key_dims)
        if not isinstance(rank, int):
            raise ValueError(f"`{what}` expects an int latent width, but found {rank!r}; pass an int such as 96 "
                             "(or None at construction for d_model).")
        if self.svd_method == "joint":
            max_rank = min(self.d_model, compressed + self.d_model)
            if not 1 <= rank <= max_rank:
                raise ValueError(
                    f"`{what}` expects a value in [1, {max_rank}] (joint SVD of the {compressed} compressed "
                    f"key rows and {self.d_model} value rows over d_model={self.d_model} inputs), but found "
                    f"{rank!r}; pick a rank in that range ({max_rank} is exact)."
                )
        else:
            key_rank, value_rank = rank // 2, rank - rank // 2
            max_key_rank = min(self.d_model, compressed)
            if not (1 <= key_rank <= max_key_rank and 1 <= value_rank <= self.d_model):
                raise ValueError(
                    f"`{what}` with svd_method='split' is shared as key latent {key_rank} + value latent "
                    f"{value_rank}; expected key latent in [1, {max_key_rank}] and value latent in "
                    f"[1, {self.d_model}], but found {what}={rank} with kept_key_dims="
                    f"{self.kept_key_dims}; pick {what} in [2, {min(2 * max_key_rank + 1, 2 * self.d_model)}] "
                    "or use svd_method='joint'."
                )

    def _validate_kv_lora_ranks(self):
        if self.kv_lora_ranks is None:
            return
        allowed = [name for name in self.mla_block_names() if not self.is_shared_cross_block(name)]
        if not isinstance(self.kv_lora_ranks, dict) or not set(self.kv_lora_ranks) <= set(allowed):
            found = sorted(self.kv_lora_ranks) if isinstance(self.kv_lora_ranks, dict) else self.kv_lora_ranks
            raise ValueError(
                f"`kv_lora_ranks` expects a dict {{block name: latent width}} over converted blocks with a latent of "
                f"their own ({allowed}), but found {found!r}; fix the names or pass None (every block kv_lora_rank)."
            )
        for name, rank in self.kv_lora_ranks.items():
            self._check_rank(f"kv_lora_ranks[{name!r}]", rank, self.mla_num_heads(name))

    def _validate_kept_key_indices(self):
        if not isinstance(self.kept_key_indices, dict):
            raise ValueError(
                f"`kept_key_indices` expects a dict {{block name: per-head index lists}}, but found "
                f"{type(self.kept_key_indices).__name__}; pass None to use uniform indices."
            )
        expected = self.mla_block_names()
        if sorted(self.kept_key_indices) != sorted(expected):
            raise ValueError(
                f"`kept_key_indices` expects exactly the converted blocks {expected}, but found "
                f"{sorted(self.kept_key_indices)}; pass None to use uniform indices or fix the block names."
            )
        for name, per_head in self.kept_key_indices.items():
            heads, head_dim = self.mla_num_heads(name), self.mla_head_dim(name)
            shape_ok = isinstance(per_head, (list, tuple)) and len(per_head) == heads
            kept = self.mla_kept_key_dims(name)
            shape_ok = shape_ok and all(isinstance(h, (list, tuple)) and len(h) == kept for h in per_head)
            if not shape_ok:
                raise ValueError(
                    f"`kept_key_indices[{name!r}]` expects {heads} lists (one per head) of {kept} "
                    f"indices, but found {per_head!r}; pass None to use uniform indices."
                )
            for head, indices in enumerate(per_head):
                if len(set(indices)) != len(indices) or not all(
                    isinstance(i, int) and 0 <= i < head_dim for i in indices
                ):
                    raise ValueError(
                        f"`kept_key_indices[{name!r}][{head}]` expects distinct ints in [0, {head_dim}), but found "
                        f"{indices}; fix the indices or pass None to use uniform ones."
                    )

    def mla_cache_values_per_token(self, block_name: str) -> int:
        """Values cached per token by one converted block: the latent plus the kept key dims of every head. A shared
        cross latent is cached once for all layers; this counts it for every block that reads it."""
        return self.mla_rank(block_name) + self.mla_num_heads(block_name) * self.mla_kept_key_dims(block_name)

    def mla_cache_bytes_per_token(self, block_name: str, itemsize: int) -> int:
        """Bytes cached per token by one converted block, with values of `itemsize` bytes unless quantised."""
        if self.mla_cache_quantization == "int8":
            return self.mla_cache_values_per_token(block_name) + 8  # int8 values + two float32 scales
        return self.mla_cache_values_per_token(block_name) * itemsize


__all__ = ["WhisperMLAConfig"]
