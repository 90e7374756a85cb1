"""Whisper with multi-head latent attention (MLA) in the converted attention blocks.

A converted block projects its key/value input `x` down once, `kv_a_proj(x) = [c ; k_kept]`, and caches only that:
the latent `c` (width `kv_lora_rank`, shared by all heads) and `kept_key_dims` uncompressed key dims per head. Keys
and values come back through the up-projections `k_b_proj` (compressed key dims) and `v_b_proj` (values):

    naive:   k = [k_kept ; k_b_proj(c)],  v = v_b_proj(c),  then ordinary attention
    absorb:  score = (q_nope W_uk) . c + q_kept . k_kept,   out = (p . c) W_uv^T + b_v

Whisper has no RoPE, so folding W_uk into the query and W_uv into the output is exact, and since each row of `p`
sums to one the value bias folds into the output as well. The absorbed path reads only the latent, which is shared
by all heads: one (B, H*T, r) x (B, r, S) matmul instead of H per-head products over full keys.

Within each head the kept key dims come first, then the compressed ones (the converter permutes `q_proj` rows to
match), so the split between them is one `torch.split`. The cache is transformers' own `EncoderDecoderCache`: a
converted layer stores the latent in the "keys" slot, shape (B, 1, S, r), and the kept key dims in the "values" slot,
shape (B, H, S, kept); beam reordering, cropping and `get_seq_length` work unchanged.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration, WhisperModel
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.whisper.modeling_whisper import (
    WhisperAttention,
    WhisperPreTrainedModel,
    eager_attention_forward,
)

try:  # loaded as remote code (a package made by transformers) or as this project's top-level module
    from .configuration_whisper_mla import WhisperMLAConfig
except ImportError:
    from configuration_whisper_mla import WhisperMLAConfig


class WhisperMLAAttention(WhisperAttention):
    """Multi-head latent attention with Whisper's interface.

    Subclasses `WhisperAttention` only so that transformers' output recorders (attentions, cross-attentions for the
    alignment heads of word timestamps) find it; it builds its own projections.
    """

    def __init__(self, config: WhisperMLAConfig, num_heads: int, is_causal: bool = False, layer_idx: int | None = None):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.d_model
        self.num_heads = num_heads
        self.head_dim = config.d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_decoder = layer_idx is not None
        self.is_causal = is_causal
        self.layer_idx = layer_idx

        self.kv_lora_rank = config.kv_lora_rank
        self.qk_kept_head_dim = config.kept_key_dims
        self.qk_nope_head_dim = self.head_dim - config.kept_key_dims
        self.k_latent_dim, self.v_latent_dim = config.mla_latent_split()
        # split SVD: the key latent is c[:k_latent_dim] and the value latent c[-v_latent_dim:]; joint: both are all of c
        self.v_latent_offset = self.kv_lora_rank - self.v_latent_dim

        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)
        self.kv_a_proj = nn.Linear(self.embed_dim, self.kv_lora_rank + num_heads * self.qk_kept_head_dim, bias=False)
        self.k_b_proj = nn.Linear(self.k_latent_dim, num_heads * self.qk_nope_head_dim, bias=False)
        self.v_b_proj = nn.Linear(self.v_latent_dim, self.embed_dim, bias=True)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)

    def compress(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds: latent (B, 1, S, r) and kept key dims (B, H, S, kept)."""
        bsz, src_len, _ = states.shape
        latent, k_kept = self.kv_a_proj(states).split([self.kv_lora_rank, self.num_heads * self.qk_kept_head_dim], -1)
        k_kept = k_kept.view(bsz, src_len, self.num_heads, self.qk_kept_head_dim).transpose(1, 2)  # (B, H, S, kept)
        return latent.unsqueeze(1), k_kept

    def expand(self, latent: torch.Tensor, k_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Naive path: full keys and values (B, H, S, head_dim) from the cached latent and kept dims."""
        bsz, _, src_len, _ = latent.shape
        k_nope = self.k_b_proj(latent[:, 0, :, : self.k_latent_dim])
        k_nope = k_nope.view(bsz, src_len, self.num_heads, self.qk_nope_head_dim).transpose(1, 2)  # (B, H, S, nope)
        value = self.v_b_proj(latent[:, 0, :, self.v_latent_offset :])
        value = value.view(bsz, src_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, head_dim)
        return torch.cat([k_kept, k_nope], dim=-1), value

    def absorbed_attention(
        self, query: torch.Tensor, latent: torch.Tensor, k_kept: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention computed directly over the latent. query: (B, H, T, head_dim), already scaled.

        Returns the output (B, T, H, head_dim) and the attention probabilities (B, H, T, S).
        """
        bsz, heads, tgt_len, _ = query.shape
        src_len = latent.shape[2]
        q_kept, q_nope = query.split([self.qk_kept_head_dim, self.qk_nope_head_dim], dim=-1)
        w_uk = self.k_b_proj.weight.view(heads, self.qk_nope_head_dim, self.k_latent_dim)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r_k)
        c_k = latent[:, 0, :, : self.k_latent_dim]  # (B, S, r_k), a view: the cached latent is never copied
        # Scores of the kept dims first (a fresh contiguous tensor), then the latent's scores accumulated onto them in
        # place: one (B, H*T, r_k) x (B, r_k, S) product for all heads, and no second (B, H, T, S) temporary.
        scores = q_kept @ k_kept.transpose(-1, -2)  # (B, H, T, S)
        scores.view(bsz, heads * tgt_len, src_len).baddbmm_(
            q_latent.reshape(bsz, heads * tgt_len, -1), c_k.transpose(1, 2)
        )
        if attention_mask is None and self.is_causal and tgt_len > 1:
            past = src_len - tgt_len
            attention_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).tril(past)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores += attention_mask
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        c_v = latent[:, 0, :, self.v_latent_offset :]  # (B, S, r_v)
        out_latent = torch.bmm(probs.view(bsz, heads * tgt_len, src_len), c_v)  # (B, H*T, r_v)
        out_latent = out_latent.view(bsz, heads, tgt_len, -1)
        w_uv = self.v_b_proj.weight.view(heads, self.head_dim, self.v_latent_dim)
        out = torch.einsum("bhtr,hdr->bthd", out_latent, w_uv)  # (B, T, H, head_dim)
        return out + self.v_b_proj.bias.view(heads, self.head_dim), probs

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        is_cross_attention = key_value_states is not None
        bsz, tgt_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states) * self.scaling  # same order as Whisper: scale before the product
        query = query.view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, head_dim)

        is_updated = False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            if is_cross_attention:
                cache.is_updated[self.layer_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache

        if is_cross_attention and cache is not None and is_updated:
            latent, k_kept = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            latent, k_kept = self.compress(key_value_states if is_cross_attention else hidden_states)
            if cache is not None:
                latent, k_kept = cache.update(latent, k_kept, self.layer_idx)

        if self.config.mla_attn_implementation == "absorb" and not self.training:
            attn_output, attn_weights = self.absorbed_attention(query, latent, k_kept, attention_mask)
        else:
            key, value = self.expand(latent, k_kept)
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=0.0 if not self.training else self.dropout,
                scaling=1.0,
                output_attentions=output_attentions,
                **kwargs,
            )
        attn_output = attn_output.reshape(bsz, tgt_len, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


def replace_attention_with_mla(model: WhisperModel, config: WhisperMLAConfig) -> None:
    """Swaps the blocks named by `config.mla_block_names()` for (freshly initialised) `WhisperMLAAttention`."""
    for name in config.mla_block_names():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        mla = WhisperMLAAttention(config, old.num_heads, is_causal=old.is_causal, layer_idx=old.layer_idx)
        setattr(parent, attr, mla)


class WhisperMLAPreTrainedModel(WhisperPreTrainedModel):
    config_class = WhisperMLAConfig
    config: WhisperMLAConfig
    _supports_flash_attn = False
    _supports_flex_attn = False


class WhisperMLAModel(WhisperMLAPreTrainedModel, WhisperModel):
    def __init__(self, config: WhisperMLAConfig):
        WhisperModel.__init__(self, config)
        replace_attention_with_mla(self, config)
        self.post_init()


class WhisperMLAForConditionalGeneration(WhisperMLAPreTrainedModel, WhisperForConditionalGeneration):
    def __init__(self, config: WhisperMLAConfig):
        WhisperMLAPreTrainedModel.__init__(self, config)
        self.model = WhisperMLAModel(config)
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.max_target_positions = config.max_target_positions
        self.post_init()

    def cache_bytes_per_token(self) -> dict[str, int]:
        """Bytes a decoder layer caches per token, summed over layers: {"self": ..., "cross": ...} in the model dtype.

        A converted block caches `kv_lora_rank + heads * kept_key_dims` values, an MHA block `2 * d_model`.
        """
        return expected_cache_bytes_per_token(self.config, self.dtype)


def expected_cache_bytes_per_token(config, dtype: torch.dtype, mha: bool = False) -> dict[str, int]:
    """Decoder cache bytes per token, summed over layers, {"self": ..., "cross": ...}, for a Whisper-MLA config, or
    for its MHA original (a Whisper config, or `mha=True`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    # by model_type, not isinstance: a checkpoint loaded as remote code has its own copy of the config class
    is_mla = getattr(config, "model_type", None) == "whisper_mla"
    converted = set(config.mla_block_names()) if is_mla and not mha else set()
    totals = {"self": 0, "cross": 0}
    for i in range(config.decoder_layers):
        for kind, attr in (("self", "self_attn"), ("cross", "encoder_attn")):
            name = f"decoder.layers.{i}.{attr}"
            values = config.mla_cache_values_per_token(name) if name in converted else 2 * config.d_model
            totals[kind] += values * itemsize
    return totals


def cache_nbytes(cache: EncoderDecoderCache) -> dict[str, int]:
    """Bytes actually held by a generation cache: {"self": ..., "cross": ...}, summed over layers' tensors."""
    totals = {}
    for kind, sub_cache in (("self", cache.self_attention_cache), ("cross", cache.cross_attention_cache)):
        totals[kind] = sum(
            t.numel() * t.element_size()
            for layer in sub_cache.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )
    return totals


__all__ = [
    "WhisperMLAAttention",
    "WhisperMLAModel",
    "WhisperMLAForConditionalGeneration",
    "cache_nbytes",
    "expected_cache_bytes_per_token",
]
