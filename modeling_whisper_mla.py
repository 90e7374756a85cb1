"""Whisper with multi-head latent attention (MLA) in the converted attention blocks.

A converted block projects its key/value input `x` down once, `kv_a_proj(x) = [c ; k_kept]`, and caches only that:
the latent `c` (width `kv_lora_rank`, shared by all heads) and `kept_key_dims` uncompressed key dims per head. Keys
and values come back through the up-projections `k_b_proj` (compressed key dims) and `v_b_proj` (values):

    naive:   k = [k_kept ; k_b_proj(c)],  v = v_b_proj(c),  then ordinary attention
    absorb:  score = (q_nope W_uk) . c + q_kept . k_kept,   out = (p . c) W_uv^T + b_v

Whisper has no RoPE, so folding W_uk into the query and W_uv into the output is exact, and since each row of `p`
sums to one the value bias folds into the output as well. The absorbed path reads only the latent, which is shared
by all heads: one (B, H*T, r) x (B, r, S) matmul instead of H per-head products over full keys.

Cross-attention may instead read ONE latent shared by all decoder layers (`cross_attention_latent="shared"`): every
layer's cross keys and values are linear maps of the same encoder output h, so h itself (or one down-projection of it,
`decoder.cross_kv_a_proj`) is a latent for all of them. It is cached once, in the cross-attention slot of layer 0, and
every cross block absorbs its own up-projections exactly as above; at width d_model there is no down-projection and
the conversion is exact.

Within each head the kept key dims come first, then the compressed ones (the converter permutes `q_proj` rows to
match), so the split between them is one `torch.split`. The cache is transformers' own `EncoderDecoderCache`: a
converted layer stores the latent in the "keys" slot, shape (B, 1, S, r), and the kept key dims of all heads in the
"values" slot, shape (B, 1, S, H * kept): one "head" in both slots, so a static cache (which sizes its buffers from the
first update) holds them too; beam reordering, cropping and `get_seq_length` work unchanged.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperDecoder
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.whisper.modeling_whisper import (
    WhisperAttention,
    WhisperPreTrainedModel,
    eager_attention_forward,
)

try:  # loaded as remote code (a package made by transformers) or as this project's top-level module
    from .configuration_whisper_mla import WhisperMLAConfig
    from .pipeline_whisper_mla import WhisperMLAPipeline
except ImportError:
    from configuration_whisper_mla import WhisperMLAConfig
    from pipeline_whisper_mla import WhisperMLAPipeline


class WhisperMLAAttention(WhisperAttention):
    """Multi-head latent attention with Whisper's interface.

    Subclasses `WhisperAttention` only so that transformers' output recorders (attentions, cross-attentions for the
    alignment heads of word timestamps) find it; it builds its own projections.
    """

    def __init__(
        self,
        config: WhisperMLAConfig,
        num_heads: int,
        is_causal: bool = False,
        layer_idx: int | None = None,
        block_name: str = "",
    ):
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

        # a shared cross latent arrives already compressed (the decoder projects the encoder output once) and is
        # cached in layer 0's slot; the block then has no down-projection and no kept key dims
        self.shared_latent = config.is_shared_cross_block(block_name)
        self.kv_lora_rank = config.mla_rank(block_name)
        self.qk_kept_head_dim = config.mla_kept_key_dims(block_name)
        self.qk_nope_head_dim = self.head_dim - self.qk_kept_head_dim
        self.k_latent_dim, self.v_latent_dim = config.mla_latent_split(block_name)
        # split SVD: the key latent is c[:k_latent_dim] and the value latent c[-v_latent_dim:]; joint: both are all of c
        self.v_latent_offset = self.kv_lora_rank - self.v_latent_dim

        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)
        if not self.shared_latent:
            self.kv_a_proj = nn.Linear(self.embed_dim, self.kv_lora_rank + num_heads * self.qk_kept_head_dim, bias=False)
        self.k_b_proj = nn.Linear(self.k_latent_dim, num_heads * self.qk_nope_head_dim, bias=False)
        self.v_b_proj = nn.Linear(self.v_latent_dim, self.embed_dim, bias=True)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)

    def compress(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds: latent (B, 1, S, r) and the kept key dims of all heads (B, 1, S, H*kept)."""
        if self.shared_latent:  # states is the shared latent (B, S, r) itself
            return states.unsqueeze(1), states[..., :0].unsqueeze(1)
        latent, k_kept = self.kv_a_proj(states).split([self.kv_lora_rank, self.num_heads * self.qk_kept_head_dim], -1)
        return latent.unsqueeze(1), k_kept.unsqueeze(1)

    def split_heads(self, k_kept: torch.Tensor) -> torch.Tensor:
        """Cached kept key dims (B, 1, S, H*kept) -> per head (B, H, S, kept), a view."""
        bsz, _, src_len, _ = k_kept.shape
        return k_kept.view(bsz, src_len, self.num_heads, self.qk_kept_head_dim).transpose(1, 2)

    def expand(self, latent: torch.Tensor, k_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Naive path: full keys and values (B, H, S, head_dim) from the cached latent and kept dims."""
        bsz, _, src_len, _ = latent.shape
        k_kept = self.split_heads(k_kept)  # (B, H, S, kept)
        k_nope = self.k_b_proj(latent[:, 0, :, : self.k_latent_dim])
        k_nope = k_nope.view(bsz, src_len, self.num_heads, self.qk_nope_head_dim).transpose(1, 2)  # (B, H, S, nope)
        value = self.v_b_proj(latent[:, 0, :, self.v_latent_offset :])
        value = value.view(bsz, src_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, head_dim)
        return torch.cat([k_kept, k_nope], dim=-1), value

    def pack_int8(self, latent: torch.Tensor, k_kept: torch.Tensor) -> torch.Tensor:
        """The int8 cache entry: (B, 1, S, r + H*kept + 8), the latent and the kept dims each quantised with one
        absmax scale per token; the two float32 scales ride along as their raw bytes, so one tensor holds it all."""
        bsz, _, src_len, _ = latent.shape
        quantized, scales = [], []
        for part in (latent, k_kept):
            part = part.float()
            if part.shape[-1]:
                scale = part.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127  # (B, 1, S, 1)
            else:  # kept_key_dims=0: nothing to scale
                scale = part.new_ones(bsz, 1, src_len, 1)
            quantized.append(torch.round(part / scale).to(torch.int8))
            scales.append(scale)
        scale_bytes = torch.cat(scales, -1).view(torch.int8)  # (B, 1, S, 2) float32 -> (B, 1, S, 8) int8
        return torch.cat([*quantized, scale_bytes], -1)

    def unpack_int8(self, packed: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of `pack_int8`: latent (B, 1, S, r) and kept key dims (B, 1, S, H*kept) in `dtype`."""
        width = packed.shape[-1]
        values, scale_bytes = packed.split([width - 8, 8], -1)
        scales = scale_bytes.contiguous().view(torch.float32).to(dtype)  # (B, 1, S, 2)
        # one float copy of the entry, scaled in place: a second would double the transient of a large batch
        latent, kept = values.to(dtype).split([self.kv_lora_rank, width - 8 - self.kv_lora_rank], -1)
        return latent.mul_(scales[..., :1]), kept.mul_(scales[..., 1:])  # (B, 1, S, r), (B, 1, S, H*kept)

    def absorbed_attention(
        self,
        query: torch.Tensor,
        latent: torch.Tensor,
        k_kept: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention computed directly over the latent. query: (B, H, T, head_dim), already scaled.

        The latent may hold one entry per group of `B // latent.shape[0]` consecutive queries (the beams of one
        utterance sharing its cross-attention latent). Returns the output (B, T, H, head_dim) and, when asked for,
        the attention probabilities (B, H, T, S).
        """
        bsz, heads, tgt_len, _ = query.shape
        kv_bsz, _, src_len, _ = latent.shape
        group = bsz // kv_bsz  # queries (beams) per latent entry
        rows = group * heads * tgt_len  # query rows per latent entry
        q_kept, q_nope = query.split([self.qk_kept_head_dim, self.qk_nope_head_dim], dim=-1)
        w_uk = self.k_b_proj.weight.view(heads, self.qk_nope_head_dim, self.k_latent_dim)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk).reshape(kv_bsz, rows, -1)  # (B', G*H*T, r_k)
        c_k = latent[:, 0, :, : self.k_latent_dim]  # (B', S, r_k), a view: the cached latent is never copied
        c_v = latent[:, 0, :, self.v_latent_offset :]  # (B', S, r_v)
        # Scores of the kept dims first (a fresh contiguous tensor); the latent's part is accumulated onto them.
        q_kept = q_kept.reshape(kv_bsz, group, heads, tgt_len, self.qk_kept_head_dim)  # (B', G, H, T, kept)
        k_kept = self.split_heads(k_kept).unsqueeze(1)  # (B', 1, H, S, kept)
        scores = (q_kept @ k_kept.transpose(-1, -2)).view(kv_bsz, rows, src_len)  # (B', G*H*T, S)
        if attention_mask is None and self.is_causal and tgt_len > 1:
            # what SDPA's is_causal does when transformers passes no mask: aligned top-left (a prefill from position
            # 0, into a dynamic cache of T rows or a static one of max_cache_len rows)
            attention_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).tril()
        if attention_mask is not None:  # (B, 1, T, S) or (T, S), broadcast over a (B, H, T, S) view of the scores
            scores_bhts = scores.view(bsz, heads, tgt_len, src_len)
            if attention_mask.dtype == torch.bool:
                scores_bhts.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores_bhts += attention_mask
        if output_attentions:
            # one (B', G*H*T, r_k) x (B', r_k, S) product for all heads, accumulated in place
            scores.baddbmm_(q_latent, c_k.transpose(1, 2))
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            out_latent = torch.bmm(probs, c_v)  # (B', G*H*T, r_v)
            probs = probs.view(bsz, heads, tgt_len, src_len)
        else:
            # the same attention as one SDPA call over a single "head" whose keys are the latent, with the kept-dim
            # scores as an additive mask: the fused kernel reads the latent once for scores and output
            out_latent = nn.functional.scaled_dot_product_attention(
                q_latent.unsqueeze(1), c_k.unsqueeze(1), c_v.unsqueeze(1), attn_mask=scores.unsqueeze(1), scale=1.0
            ).squeeze(1)  # (B', G*H*T, r_v)
            probs = None
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

        cache_idx = 0 if self.shared_latent else self.layer_idx  # one shared cross latent, in layer 0's slot
        is_updated = False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(cache_idx)
            if is_cross_attention:
                cache.is_updated[cache_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache

        int8_cache = self.config.mla_cache_quantization == "int8" and cache is not None
        if is_cross_attention and cache is not None and is_updated:
            latent, k_kept = cache.layers[cache_idx].keys, cache.layers[cache_idx].values
            if cache_idx != self.layer_idx:
                alias_cache_layer(cache, self.layer_idx, cache_idx)
            src_len = key_value_states.shape[1]  # the frames cached (the decoder passes a pooled length)
        else:
            latent, k_kept = self.compress(key_value_states if is_cross_attention else hidden_states)
            src_len = latent.shape[2]
            if int8_cache:  # the cache holds one packed int8 tensor in the keys slot and an empty values slot
                packed = self.pack_int8(latent, k_kept)
                latent, k_kept = cache.update(packed, packed[..., :0], cache_idx)
            elif cache is not None:
                latent, k_kept = cache.update(latent, k_kept, cache_idx)
        if is_cross_attention:  # a static cache holds as many rows as the encoder has frames, a pooled latent fewer
            latent, k_kept = latent[:, :, :src_len], k_kept[:, :, :src_len]
        if int8_cache:
            latent, k_kept = self.unpack_int8(latent, query.dtype)

        if self.config.mla_attn_implementation == "absorb" and not self.training:
            attn_output, attn_weights = self.absorbed_attention(
                query, latent, k_kept, attention_mask, output_attentions=output_attentions
            )
        else:
            group = bsz // latent.shape[0]  # > 1: a cross-attention latent shared by the beams of each utterance
            if group > 1:
                latent, k_kept = latent.repeat_interleave(group, dim=0), k_kept.repeat_interleave(group, dim=0)
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


def alias_cache_layer(cache: Cache, layer_idx: int, source_idx: int) -> None:
    """Points cache layer `layer_idx` at layer `source_idx`'s tensors (no copy): every layer of a shared cross latent
    then holds the same storage, so per-layer cache consumers (Whisper's output splitting, beam reorder) see it.

    The layer takes the source's whole state (tensors, dtype, device, and a static layer's sizes and fill count), not
    `lazy_initialization`, which would allocate a static layer's full buffers only to drop them."""
    while len(cache.layers) <= layer_idx and cache.layer_class_to_replicate is not None:  # as `Cache.update` does
        cache.layers.append(cache.layer_class_to_replicate())
    layer, source = cache.layers[layer_idx], cache.layers[source_idx]
    if layer.keys is source.keys:
        return
    if type(layer) is not type(source):
        raise TypeError(f"A shared cross latent aliases cache layers of one kind, but found {type(layer).__name__} "
                        f"(layer {layer_idx}) and {type(source).__name__} (layer {source_idx}).")
    vars(layer).update(vars(source))


def replace_attention_with_mla(model: WhisperModel, config: WhisperMLAConfig) -> None:
    """Swaps the blocks named by `config.mla_block_names()` for (freshly initialised) `WhisperMLAAttention`."""
    for name in config.mla_block_names():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        mla = WhisperMLAAttention(config, old.num_heads, is_causal=old.is_causal, layer_idx=old.layer_idx,
                                  block_name=name)
        setattr(parent, attr, mla)


def pool_frames(states: torch.Tensor, stride: int, pooling: str) -> torch.Tensor:
    """One frame per `stride` frames of (B, S, D) `states`: their mean ("mean"; a last, shorter group is averaged over
    the frames it has) or the first of each group ("subsample"). Returns (B, ceil(S / stride), D)."""
    if pooling == "subsample":
        return states[:, ::stride]
    pooled = nn.functional.avg_pool1d(states.transpose(1, 2), stride, stride, ceil_mode=True)  # (B, D, S')
    return pooled.transpose(1, 2)


class WhisperMLADecoder(WhisperDecoder):
    """Whisper's decoder; with a shared cross-attention latent it pools the encoder output over time
    (`cross_latent_stride`, if above 1) and, narrower than d_model, projects it down (`cross_kv_a_proj`) once before
    the layers read it, and not at all once the latent is cached."""

    def __init__(self, config: WhisperMLAConfig):
        super().__init__(config)
        rank = config.shared_cross_rank()
        self.cross_kv_a_proj = None
        if config.shares_cross_latent_across_layers() and rank < config.d_model:
            self.cross_kv_a_proj = nn.Linear(config.d_model, rank, bias=False)

    def forward(self, *args, encoder_hidden_states=None, cache=None, **kwargs):
        cross_cached = isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(0)
        if encoder_hidden_states is not None and cross_cached and self.config.cross_latent_stride > 1:
            # the blocks read the cached latent; its frame count, from this view's length, bounds a static cache's rows
            frames = self.config.cross_latent_frames(encoder_hidden_states.shape[1])
            encoder_hidden_states = encoder_hidden_states[:, :frames]
        elif encoder_hidden_states is not None and not cross_cached:
            if self.config.cross_latent_stride > 1:
                encoder_hidden_states = pool_frames(
                    encoder_hidden_states, self.config.cross_latent_stride, self.config.cross_latent_pooling
                )  # (B, S, d_model) -> (B, ceil(S / stride), d_model)
            if self.cross_kv_a_proj is not None:
                encoder_hidden_states = self.cross_kv_a_proj(encoder_hidden_states)  # (B, S', d_model) -> (B, S', r)
        return super().forward(*args, encoder_hidden_states=encoder_hidden_states, cache=cache, **kwargs)


class WhisperMLAPreTrainedModel(WhisperPreTrainedModel):
    config_class = WhisperMLAConfig
    config: WhisperMLAConfig
    _supports_flash_attn = False
    _supports_flex_attn = False


class WhisperMLAModel(WhisperMLAPreTrainedModel, WhisperModel):
    def __init__(self, config: WhisperMLAConfig):
        config.check_mla_settings()  # settings may have been changed after the config was built (from_pretrained)
        WhisperModel.__init__(self, config)
        self.decoder = WhisperMLADecoder(config)
        replace_attention_with_mla(self, config)
        self.post_init()

    def forward(self, input_features=None, *args, decoder_input_ids=None, decoder_inputs_embeds=None, **kwargs):
        """Whisper's forward. Called with audio but no decoder input (no `decoder_input_ids` or
        `decoder_inputs_embeds`; labels become decoder_input_ids before this) it refuses by name: that is how
        transformers' ASR pipeline calls a model it takes for CTC. (Here and not in the head's forward, whose
        signature `generate` reads to validate its kwargs.)"""
        if input_features is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "WhisperMLAForConditionalGeneration expects decoder_input_ids, decoder_inputs_embeds or labels beside "
                "input_features (it is an encoder-decoder model), but found none: it was called as a CTC model. "
                "transformers' ASR pipeline takes Whisper's path only for model_type 'whisper', so a pipeline built "
                "from a loaded Whisper-MLA model decodes it as CTC. Fix: pass the checkpoint's folder or Hub id, "
                "pipeline('automatic-speech-recognition', model=path, trust_remote_code=True), or keep the model "
                "object and add pipeline_class=model.pipeline_class."
            )
        return super().forward(input_features, *args, decoder_input_ids=decoder_input_ids,
                               decoder_inputs_embeds=decoder_inputs_embeds, **kwargs)


class WhisperMLAForConditionalGeneration(WhisperMLAPreTrainedModel, WhisperForConditionalGeneration):
    # the ASR pipeline for a model object: pipeline("automatic-speech-recognition", model=model,
    # pipeline_class=model.pipeline_class); a folder or Hub id finds it through config.custom_pipelines
    pipeline_class = WhisperMLAPipeline

    def __init__(self, config: WhisperMLAConfig):
        WhisperMLAPreTrainedModel.__init__(self, config)
        self.model = WhisperMLAModel(config)
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.max_target_positions = config.max_target_positions
        self.post_init()

    def set_mla_runtime(self, attn_implementation: str | None = None, cache_quantization: str | None = "keep"):
        """Switches how the converted blocks run, without touching the weights: the one way to change these settings
        after loading (or pass them to `from_pretrained`). Validated like the config; returns the model.

        Args:
            attn_implementation: "absorb" (attend over the cached latent in eval mode) or "naive" (expand it to keys
                and values); None keeps the current one.
            cache_quantization: None (the model dtype) or "int8"; "keep" keeps the current one.
        """
        previous = (self.config.mla_attn_implementation, self.config.mla_cache_quantization)
        if attn_implementation is not None:
            self.config.mla_attn_implementation = attn_implementation
        if cache_quantization != "keep":
            self.config.mla_cache_quantization = cache_quantization
        try:
            self.config.check_mla_settings()
        except ValueError:
            self.config.mla_attn_implementation, self.config.mla_cache_quantization = previous
            raise
        return self

    def _prepare_decoder_input_ids_for_generation(self, batch_size, model_input_name, model_kwargs,
                                                  decoder_start_token_id, device=None):
        """Whisper's path: decoder_input_ids given to `generate` (Whisper's generate builds them from `prompt_ids`:
        `<|startofprev|> prompt <|startoftranscript|> ...`) are used as given. `GenerationMixin` skips prepending the
        decoder start token only for `model_type == "whisper"`; without this, every prompt gains a token in front."""
        decoder_input_ids = None
        if model_kwargs is not None and "decoder_input_ids" in model_kwargs:
            decoder_input_ids = model_kwargs.pop("decoder_input_ids")
        elif model_kwargs is not None and "input_ids" in model_kwargs and model_input_name != "input_ids":
            decoder_input_ids = model_kwargs.pop("input_ids")
        if decoder_input_ids is None:
            return super()._prepare_decoder_input_ids_for_generation(
                batch_size, model_input_name, model_kwargs, decoder_start_token_id, device
            )
        return decoder_input_ids, model_kwargs

    def _extract_token_timestamps(self, generate_outputs, alignment_heads, time_precision=0.02, num_frames=None,
                                  num_input_ids=None):
        """As Whisper's, for a cross latent pooled over time: each column of the cross-attention weights then spans
        `cross_latent_stride` encoder frames, so a column is `stride` times Whisper's time step, and `num_frames` (mel
        frames, two per encoder frame) is mapped to the pooled columns it covers."""
        stride = self.config.cross_latent_stride
        if stride > 1:
            time_precision = time_precision * stride
            if num_frames is not None:  # Whisper keeps num_frames // 2 columns: 2 * ceil(encoder frames / stride)
                pooled = lambda n: 2 * self.config.cross_latent_frames(n // 2)  # noqa: E731
                num_frames = pooled(num_frames) if isinstance(num_frames, (int, torch.Tensor)) else [
                    pooled(int(n)) for n in num_frames]
        return super()._extract_token_timestamps(generate_outputs, alignment_heads, time_precision=time_precision,
                                                 num_frames=num_frames, num_input_ids=num_input_ids)

    def shares_cross_latent_across_beams(self) -> bool:
        """Whether beam search caches one cross-attention latent per utterance (every cross block converted)."""
        return self.config.share_cross_latent_across_beams and "decoder_cross" in self.config.mla_targets

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """As `GenerationMixin`'s, but the encoder output stays one per utterance when the cross latent is shared:
        each cross block then caches (B, 1, S, r) for B * expand_size beams (see `absorbed_attention`)."""
        share = self.shares_cross_latent_across_beams() and expand_size > 1
        encoder_outputs = model_kwargs.pop("encoder_outputs", None) if share else None
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder and encoder_outputs is None, input_ids, **model_kwargs
        )
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        return input_ids, model_kwargs

    def _reorder_cache(self, cache: EncoderDecoderCache, beam_idx: torch.LongTensor) -> EncoderDecoderCache:
        """Beam search's reorder; a cross latent shared by the beams of an utterance (one entry per utterance) is the
        same for every beam of it, and a cross latent shared by all layers is reordered once."""
        cache.self_attention_cache.reorder_cache(beam_idx)
        cross_layers = cache.cross_attention_cache.layers
        for i, layer in enumerate(cross_layers):
            if layer.is_initialized and layer.keys.shape[0] == beam_idx.shape[0]:
                if i > 0 and self.config.shares_cross_latent_across_layers():
                    alias_cache_layer(cache.cross_attention_cache, i, 0)
                else:
                    layer.reorder_cache(beam_idx)
        return cache

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
    shared_cross = bool(converted) and config.shares_cross_latent_across_layers()
    totals = {"self": 0, "cross": 0}
    for i in range(config.decoder_layers):
        for kind, attr in (("self", "self_attn"), ("cross", "encoder_attn")):
            name = f"decoder.layers.{i}.{attr}"
            if shared_cross and kind == "cross":
                if i == 0:  # cached once for all layers
                    totals[kind] += config.mla_cache_bytes_per_token(name, itemsize)
            elif name in converted:
                totals[kind] += config.mla_cache_bytes_per_token(name, itemsize)
            else:
                totals[kind] += 2 * config.d_model * itemsize
    return totals


def expected_cache_bytes_per_utterance(config, dtype: torch.dtype, tokens: int = 100, mha: bool = False) -> int:
    """Decoder cache bytes of one utterance (batch 1, greedy): cross-attention over the encoder's frames (30 s) plus
    self-attention over `tokens` decoder tokens, summed over layers."""
    per_token = expected_cache_bytes_per_token(config, dtype, mha=mha)
    return per_token["cross"] * cross_cache_frames(config, config.max_source_positions, mha) + per_token["self"] * tokens


def cross_cache_frames(config, frames: int, mha: bool = False) -> int:
    """Cross-attention cache entries for `frames` encoder frames: fewer with a pooled shared latent
    (`cross_latent_stride`), all of them for MHA."""
    if mha or getattr(config, "model_type", None) != "whisper_mla":
        return frames
    return config.cross_latent_frames(frames)


def cache_nbytes(cache: EncoderDecoderCache) -> dict[str, int]:
    """Bytes actually held by a generation cache: {"self": ..., "cross": ...}, summed over layers' tensors; a storage
    that several layers point at is counted once."""
    totals, seen = {}, set()
    for kind, sub_cache in (("self", cache.self_attention_cache), ("cross", cache.cross_attention_cache)):
        totals[kind] = 0
        for layer in sub_cache.layers:
            if not layer.is_initialized:
                continue
            for tensor in (layer.keys, layer.values):
                storage = tensor.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    totals[kind] += storage.nbytes()
    return totals


__all__ = [
    "WhisperMLAAttention",
    "WhisperMLADecoder",
    "WhisperMLAModel",
    "WhisperMLAForConditionalGeneration",
    "cache_nbytes",
    "cross_cache_frames",
    "expected_cache_bytes_per_token",
    "expected_cache_bytes_per_utterance",
]
