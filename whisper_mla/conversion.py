"""Convert a transformers Whisper checkpoint (MHA) into a Whisper-MLA checkpoint.

For every converted block: choose `kept_key_dims` key dims per head (uniform, or by the 2-norm score
mean|q_i| * mean|k_i| on calibration audio), and factorise the remaining key rows together with the value rows
(joint SVD; or each on its own, split SVD) into a down-projection to the cached latent and up-projections. With
calibration audio the SVD is activation-aware: it minimises the error on the block's real inputs X by factorising
W C^(1/2), where C = X^T X / n, instead of W.

    from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla, load_calibration_audio
    audio = load_calibration_audio("real_train.json", max_samples=64)
    mla = convert_whisper_to_mla(whisper, MLAArguments(), calibration_audio=audio, feature_extractor=fe)

`convert_whisper_to_mla.py` is the command line around it; `whisper_mla.hub` saves and pushes the result.
"""

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    WhisperForConditionalGeneration,
)

from configuration_whisper_mla import WhisperMLAConfig
from whisper_mla.arguments import check_number
from modeling_whisper_mla import (
    WhisperMLAForConditionalGeneration,
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


# --------------------------------------------------------------------------------------------- calibration


def load_calibration_audio(data: str, max_samples: int) -> list[np.ndarray]:
    """16 kHz waveforms from any source `whisper_mla.audio.load_speech_dataset` reads; transcripts are not needed."""
    from whisper_mla.audio import load_speech_dataset

    return [example["audio"] for example in load_speech_dataset(data, max_samples=max_samples, require_text=False)]


class _BlockStatistics:
    """Running sums over calibration tokens for one attention block (float64).

    `token_mask` (B, T), set per batch, marks the decoder positions that are real tokens: padding after a clip's end
    of text is left out. Encoder outputs (the cross-attention keys' inputs, 1500 frames) are all counted in
    `input_gram`; cross blocks also sum `attended_gram`, the frames weighted by the attention they receive.
    """

    def __init__(self, dim: int):
        self.input_gram = torch.zeros(dim, dim, dtype=torch.float64)  # sum of x x^T over the block's key/value inputs
        self.input_sum = torch.zeros(dim, dtype=torch.float64)  # sum of x
        self.num_inputs = 0
        self.query_gram = torch.zeros(dim, dim, dtype=torch.float64)  # sum of q q^T (q_proj's output, unscaled)
        self.query_abs = torch.zeros(dim, dtype=torch.float64)  # sum of |q| per query dim
        self.num_queries = 0
        self.key_abs = torch.zeros(dim, dtype=torch.float64)
        self.num_keys = 0
        self.num_clips = 0
        self.token_mask = None
        self.attended_gram = torch.zeros(dim, dim, dtype=torch.float64)  # sum over clips of sum_f w_f x_f x_f^T
        self.attended_sum = torch.zeros(dim, dtype=torch.float64)  # sum over clips of sum_f w_f x_f
        self.num_attended_clips = 0

    def _rows(self, states: torch.Tensor) -> torch.Tensor:
        """(N, D) float64 rows of (B, T, D) states, without padded decoder positions."""
        if self.token_mask is not None and states.shape[:2] == self.token_mask.shape:
            states = states[self.token_mask]
        return states.reshape(-1, states.shape[-1]).double()

    def add_keys(self, inputs: torch.Tensor, keys: torch.Tensor):
        x, k = self._rows(inputs), self._rows(keys)
        self.input_gram += (x.T @ x).cpu()  # sums on the model's device, kept on the CPU
        self.input_sum += x.sum(0).cpu()
        self.num_inputs += x.shape[0]
        self.key_abs += k.abs().sum(0).cpu()
        self.num_keys += x.shape[0]

    def add_queries(self, queries: torch.Tensor):
        q = self._rows(queries)
        self.query_abs += q.abs().sum(0).cpu()
        self.query_gram += (q.T @ q).cpu()
        self.num_queries += q.shape[0]

    def add_attended_inputs(self, inputs: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, heads: int,
                            scaling: float):
        """Cross-attention: weighs each clip's encoder frames by the attention they receive, averaged over heads and
        the decoder positions it reads, so the weights of a clip sum to 1: an error on a frame matters as much as the
        decoder reads it (inputs, keys (B, F, D); queries (B, T, D) as q_proj returns them). Not used for
        self-attention: weighted so, its latents lost (tiny.en, self 96: 77.1 WER on multi_eval, 36.8 uniform)."""
        batch, frames, dim = keys.shape
        mask = self.token_mask if self.token_mask is not None else queries.new_ones(queries.shape[:2], dtype=bool)
        q = queries.float().view(batch, -1, heads, dim // heads).transpose(1, 2) * scaling  # (B, H, T, hd)
        k = keys.float().view(batch, frames, heads, dim // heads).transpose(1, 2)  # (B, H, F, hd)
        weights = q.new_zeros(batch, frames)
        for h in range(heads):  # one head at a time: (B, T, F) probabilities, not (B, H, T, F)
            probs = torch.softmax(q[:, h] @ k[:, h].transpose(1, 2), dim=-1)  # (B, T, F)
            weights += (probs * mask[..., None]).sum(1)
        weights = (weights / weights.sum(-1, keepdim=True)).double()  # (B, F), each row sums to 1
        x = inputs.double()
        self.attended_gram += torch.einsum("bf,bfi,bfj->ij", weights, x, x).cpu()
        self.attended_sum += torch.einsum("bf,bfi->i", weights, x).cpu()
        self.num_attended_clips += batch


def _attach_statistics_hooks(model, stats: dict[str, _BlockStatistics]) -> list:
    hooks = []
    for name, block_stats in stats.items():
        block = model.model.get_submodule(name)
        seen = {}  # this forward pass's q_proj output and k_proj input/output, for the block's own hook

        def keys_hook(module, inputs, keys, s=block_stats, seen=seen):
            s.add_keys(inputs[0], keys)
            seen.update(inputs=inputs[0], keys=keys)

        def queries_hook(module, inputs, queries, s=block_stats, seen=seen):
            s.add_queries(queries)
            seen["queries"] = queries

        hooks.append(block.k_proj.register_forward_hook(keys_hook))
        hooks.append(block.q_proj.register_forward_hook(queries_hook))
        if name.endswith("encoder_attn"):
            def block_hook(module, inputs, output, s=block_stats, seen=seen):
                s.add_attended_inputs(seen["inputs"], seen["queries"], seen["keys"], module.num_heads,
                                      module.scaling)
                seen.clear()

            hooks.append(block.register_forward_hook(block_hook))
    return hooks


def decoder_input_mask(sequences: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) True before each row's first end of text: the tokens the decoder reads at inference (the prompt and the
    transcript). Generation pads finished rows with end of text (Whisper's pad token); neither is ever read."""
    is_eos = sequences.eq(eos_token_id)
    return is_eos.cumsum(-1).eq(0)


@torch.no_grad()
def collect_calibration_statistics(
    model: WhisperForConditionalGeneration,
    feature_extractor,
    audios: list[np.ndarray],
    block_names: list[str],
    batch_size: int = 16,
) -> dict[str, _BlockStatistics]:
    """Runs the MHA model on the clips, `batch_size` at a time, and accumulates per block the key/value input Gram
    matrix and mean |q|, |k|; for cross-attention blocks also the Gram of the encoder frames weighted by the attention
    they receive.

    The decoder is teacher-forced on the model's own greedy decode, prompt included (what it reads at inference), so
    no labels are needed; cross-attention keys come from the encoder output, as at inference.
    """
    if not audios:
        raise ValueError("Calibration expects at least one audio clip, but found none; check --calibration_data.")
    stats = {name: _BlockStatistics(model.config.d_model) for name in block_names}
    model.eval()
    progress = tqdm(total=len(audios), desc="calibration", unit="clip")
    for start in range(0, len(audios), batch_size):
        batch = audios[start : start + batch_size]
        features = feature_extractor(batch, sampling_rate=16000, return_tensors="pt").input_features
        features = features.to(model.device, model.dtype)  # (B, n_mels, 3000)
        tokens = model.generate(features, max_new_tokens=min(128, model.config.max_target_positions // 2),
                                return_dict_in_generate=True).sequences  # (B, T): prompt, transcript, end of text
        mask = decoder_input_mask(tokens, model.generation_config.eos_token_id)
        for block_stats in stats.values():
            block_stats.token_mask = mask
        hooks = _attach_statistics_hooks(model, stats)
        try:
            model(input_features=features, decoder_input_ids=tokens, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for block_stats in stats.values():
            block_stats.num_clips += len(batch)
        progress.update(len(batch))
    progress.close()
    for block_stats in stats.values():
        block_stats.token_mask = None
    return stats


def block_kind(name: str) -> str:
    """The `mla_targets` kind of block `name`: encoder_self, decoder_self or decoder_cross."""
    return "decoder_cross" if name.endswith("encoder_attn") else name.split(".")[0] + "_self"


def is_exact(config: WhisperMLAConfig, block_name: str) -> bool:
    """Whether a block's factorisation is exact whatever its inputs (full-rank latent)."""
    if config.is_shared_cross_block(block_name):
        return config.shared_cross_rank() == config.d_model
    heads, head_dim = config.mla_num_heads(block_name), config.mla_head_dim(block_name)
    compressed = heads * (head_dim - config.mla_kept_key_dims(block_name))
    key_rank, value_rank = config.mla_latent_split(block_name)
    if config.svd_method == "joint":
        return key_rank >= min(config.d_model, compressed + config.d_model)
    return key_rank >= min(config.d_model, compressed) and value_rank >= config.d_model


def check_calibration_statistics(stats: dict[str, _BlockStatistics], block_names: list[str]) -> None:
    """Refuses statistics that miss a block or saw no inputs for it: its SVD would silently be the plain one."""
    for name in block_names:
        block_stats = stats.get(name)
        if block_stats is None or block_stats.num_inputs == 0 or block_stats.num_queries == 0:
            found = "no entry" if block_stats is None else (
                f"{block_stats.num_inputs} key inputs and {block_stats.num_queries} queries")
            raise ValueError(
                f"Calibration expects statistics for every converted block, but found {found} for {name}; collect "
                "them with collect_calibration_statistics(model, ..., block_names=calibrated_blocks(config)) on at "
                "least one clip that the model transcribes."
            )


# --------------------------------------------------------------------------------------------- factorisation


def calibrated_blocks(config: WhisperMLAConfig) -> list[str]:
    """Blocks whose statistics conversion needs: every converted block (the cross blocks that share one latent all
    read the same encoder output, but each attends to it in its own way)."""
    return config.mla_block_names()


def select_kept_key_dims(config: WhisperMLAConfig, stats: dict[str, _BlockStatistics] | None) -> dict:
    """Per block and head, the kept key dims: uniform, or the top mean|q_i| * mean|k_i| (sorted ascending)."""
    if config.key_selection == "uniform" or config.kept_key_dims == 0:
        return copy.deepcopy(config.kept_key_indices)  # the config's default is uniform
    if stats is None:
        raise ValueError(
            "key_selection='2-norm' expects calibration audio to score key dims, but found none; pass "
            "--calibration_data (or calibration_audio=...) or use --key_selection uniform."
        )
    indices = copy.deepcopy(config.kept_key_indices)
    for name in config.mla_block_names():
        if config.mla_kept_key_dims(name) == 0:  # a shared cross latent keeps no key dims
            continue
        s, heads = stats[name], config.mla_num_heads(name)
        score = (s.query_abs / s.num_queries) * (s.key_abs / s.num_keys)  # (D,)
        top = score.view(heads, -1).topk(config.kept_key_dims, dim=-1).indices  # (H, kept)
        indices[name] = [sorted(int(i) for i in head) for head in top]
    return indices


def matrix_sqrt(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^(1/2), G^(-1/2)) of a symmetric positive semi-definite matrix, damped for stability."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    eigvals, eigvecs = torch.linalg.eigh(gram + 1e-6 * gram.diagonal().mean().clamp_min(1e-12) * eye)
    eigvals = eigvals.clamp_min(eigvals.max() * 1e-10)
    return (eigvecs * eigvals.sqrt()) @ eigvecs.T, (eigvecs * eigvals.rsqrt()) @ eigvecs.T


def input_covariance(stats: list[_BlockStatistics], attention_weighted: bool = False) -> torch.Tensor:
    """The second moment C of the inputs of one block, or the mean over several cross blocks that share one latent
    (every layer's reading counts alike): all the inputs the statistics saw (every token the decoder reads; every
    encoder frame), or, `attention_weighted` (cross blocks), the encoder frames weighted by the attention they
    receive."""
    if not attention_weighted:
        return sum(s.input_gram / max(s.num_inputs, 1) for s in stats) / len(stats)
    if not all(s.num_attended_clips for s in stats):
        raise ValueError(
            "Attention-weighted cross-attention calibration expects statistics collected on cross blocks, but found "
            "none for at least one block; collect them with collect_calibration_statistics(...) on the converted "
            "cross blocks, or pass cross_frame_weighting='uniform'."
        )
    return sum(s.attended_gram / s.num_attended_clips for s in stats) / len(stats)


def input_mean(stats: list[_BlockStatistics], attention_weighted: bool = False) -> torch.Tensor:
    """The mean of the inputs `input_covariance` takes the second moment of, weighted alike."""
    if not attention_weighted:
        return sum(s.input_sum / max(s.num_inputs, 1) for s in stats) / len(stats)
    return sum(s.attended_sum / s.num_attended_clips for s in stats) / len(stats)


@dataclass
class BlockReading:
    """What output-aware factorisation knows of one block's inputs and queries (float64): the mean and centered
    covariance of its key/value inputs, and the second moment of its queries (q_proj's output, unscaled)."""

    mean: torch.Tensor  # (D,)
    covariance: torch.Tensor  # (D, D), centered
    query_gram: torch.Tensor  # (D, D)

    @classmethod
    def from_statistics(cls, stats: _BlockStatistics, attention_weighted: bool) -> "BlockReading":
        second_moment = input_covariance([stats], attention_weighted)  # refuses missing attention statistics
        mean = input_mean([stats], attention_weighted)
        return cls(mean, second_moment - torch.outer(mean, mean), stats.query_gram / max(stats.num_queries, 1))


def reading_weights(w: dict, order: torch.Tensor, heads: int, n_kept: int, reading: BlockReading) -> torch.Tensor:
    """(H*nope + D, H*nope + D) block-diagonal weights of a block's stacked [compressed key rows; value rows] (`w` as
    `pop_attention_weights` returns it, key rows permuted by `order`): how an error in each row reaches the block's
    output. A head's key error e moves its logits by q . e, so its rows are weighed by the square root of the
    head's (scaled) query second moment, times the spread of the head's value outputs (a logit error matters as
    much as the outputs it mixes differ); a head's value error leaves through its columns of the output projection."""
    d_model = w["out_proj.weight"].shape[0]
    head_dim = d_model // heads
    query_gram = reading.query_gram[order][:, order] * head_dim**-1  # q scaled by head_dim^-1/2, as attention does
    key_blocks, value_blocks = [], []
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        out_h = w["out_proj.weight"][:, rows]  # (D, hd): head h's share of the output projection
        value_out = out_h @ w["v_proj.weight"][rows]  # (D, D): input -> head h's output contribution
        spread = torch.trace(value_out @ reading.covariance @ value_out.T).clamp_min(0).sqrt()
        key_blocks.append(matrix_sqrt(query_gram[rows, rows][n_kept:, n_kept:])[0] * spread)  # (nope, nope)
        value_blocks.append(matrix_sqrt(out_h.T @ out_h)[0])  # (hd, hd)
    return torch.block_diag(*key_blocks, *value_blocks)


def output_aware_low_rank(matrices: list[torch.Tensor], weights: list[torch.Tensor], readings: list[BlockReading],
                          rank: int) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """One down-projection D (rank, in) for the row-stacked `matrices` W_i (out_i, in), with up-projections U_i,
    minimising sum_i E || A_i (W_i - U_i D) (x - mean_i) ||^2 over each block's inputs x (`weights` A_i from
    `reading_weights`). Centered: an error constant over positions moves every logit of a query alike (softmax
    ignores it) and every value alike (a bias absorbs it: the returned offsets (W_i - U_i D) mean_i, (out_i,)).

    D spans the top singular directions of [A_1 W_1; ...] C^(1/2) (C: the blocks' mean centered covariance); each U_i
    is then the least-squares fit on block i's own inputs, W_i C_i D^T (D C_i D^T)^-1, which no A_i changes."""
    sqrt_cov, inv_sqrt_cov = matrix_sqrt(sum(r.covariance for r in readings) / len(readings))
    _, s, vh = torch.linalg.svd(torch.cat([a @ m for a, m in zip(weights, matrices)]) @ sqrt_cov,
                                full_matrices=False)
    down = (s[:rank].sqrt()[:, None] * vh[:rank]) @ inv_sqrt_cov  # (rank, in)
    ups, offsets = [], []
    for matrix, reading in zip(matrices, readings):
        latent_cov = down @ reading.covariance @ down.T  # (rank, rank)
        damping = 1e-9 * latent_cov.diagonal().mean() * torch.eye(rank, dtype=latent_cov.dtype)
        up = torch.linalg.solve(latent_cov + damping, down @ reading.covariance @ matrix.T).T  # (out, rank)
        ups.append(up)
        offsets.append((matrix - up @ down) @ reading.mean)
    return ups, down, offsets


def whitening(covariance: torch.Tensor | None, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^(1/2), C^(-1/2)) of the input covariance C; identities without one (plain SVD)."""
    if covariance is None:
        eye = torch.eye(dim, dtype=torch.float64)
        return eye, eye
    return matrix_sqrt(covariance)


def low_rank(matrix: torch.Tensor, rank: int, sqrt_cov, inv_sqrt_cov) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix (out, in) ~= up (out, rank) @ down (rank, in), minimising the error on whitened inputs.

    The singular values are shared evenly between the two factors, which keeps both well scaled for fine-tuning.
    """
    u, s, vh = torch.linalg.svd(matrix @ sqrt_cov, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, (root[:, None] * vh[:rank]) @ inv_sqrt_cov


def pop_attention_weights(state: dict, name: str, d_model: int) -> dict:
    """Pops block `name`'s q/k/v/out weights from `state` (float64), checking their shapes."""
    w = {key: state.pop(f"{name}.{key}").double() for key in
         ("q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight", "v_proj.bias", "out_proj.weight",
          "out_proj.bias")}
    for key, tensor in w.items():
        expected = (d_model, d_model) if key.endswith("weight") else (d_model,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name}.{key}: expected shape {expected}, found {tuple(tensor.shape)}.")
    return w


def split_key_rows(w_k: torch.Tensor, config: WhisperMLAConfig, name: str, kept: list[list[int]]):
    """(order, kept key rows (H*kept, D), compressed key rows (H*nope, D)) of block `name`'s key weight (D, D).

    Within each head: kept dims first, then the compressed ones, in order; `order` permutes q the same way, so q . k
    is unchanged."""
    heads, head_dim, d_model = config.mla_num_heads(name), config.mla_head_dim(name), config.d_model
    order = torch.tensor([
        h * head_dim + i
        for h, kept_h in enumerate(kept)
        for i in list(kept_h) + [j for j in range(head_dim) if j not in kept_h]
    ])
    n_kept = config.mla_kept_key_dims(name)
    w_k = w_k[order].view(heads, head_dim, d_model)
    return order, w_k[:, :n_kept].reshape(-1, d_model), w_k[:, n_kept:].reshape(-1, d_model)


def spectrum_ranks(state: dict, config: WhisperMLAConfig, kept: dict, covariance) -> dict[str, int]:
    """Per-block latent widths with the uniform allocation's total per kind of block (`--kv_lora_rank_allocation
    spectrum`): the singular values of each block's whitened [compressed keys; values] matrix, as shares of its
    energy, compete across the blocks of a kind, and the total width goes to the largest shares. A block whose
    spectrum decays fast (tiny.en's first decoder layer) gives width to one whose spectrum does not (its last).

    `covariance(names)` is a block's input covariance (None: plain SVD). Reads `state`, pops nothing."""
    groups = {}
    for name in config.mla_block_names():
        if not config.is_shared_cross_block(name):
            kind = name.split(".")[0] + "." + name.rsplit(".", 1)[-1]  # e.g. decoder.self_attn
            groups.setdefault(kind, []).append(name)
    ranks = {}
    for names in groups.values():
        shares = []
        for name in names:
            _, _, w_k_nope = split_key_rows(state[f"{name}.k_proj.weight"].double(), config, name, kept[name])
            stacked = torch.cat([w_k_nope, state[f"{name}.v_proj.weight"].double()])
            energy = torch.linalg.svdvals(stacked @ whitening(covariance([name]), config.d_model)[0]) ** 2
            shares.append(energy / energy.sum())
        owner = torch.cat([torch.full_like(share, i) for i, share in enumerate(shares)])
        top = owner[torch.cat(shares).argsort(descending=True)[: config.kv_lora_rank * len(names)]]
        for i, name in enumerate(names):
            ranks[name] = max(1, int((top == i).sum()))
    return ranks


def convert_attention_block(state: dict, config: WhisperMLAConfig, name: str, kept: list[list[int]],
                            covariance: torch.Tensor | None, reading: BlockReading | None = None) -> dict:
    """MLA weights of block `name` (a prefix such as "decoder.layers.0.self_attn") from its MHA weights in `state`,
    the SVD whitened by the block's input `covariance` (None: plain SVD), or, given its `reading`, output-aware
    (`output_aware_low_rank`).

    Pops q/k/v/out weights from `state`, so whatever is left afterwards was not accounted for.
    """
    d_model = config.d_model
    w = pop_attention_weights(state, name, d_model)
    order, w_k_kept, w_k_nope = split_key_rows(w["k_proj.weight"], config, name, kept)

    k_rank, v_rank = config.mla_latent_split(name)
    v_bias = w["v_proj.bias"]
    if config.svd_method == "joint":
        stacked = torch.cat([w_k_nope, w["v_proj.weight"]])  # (H*nope + D, D)
        if is_exact(config, name):  # full width: the latent is the block's input itself, no SVD
            up, down = stacked, torch.eye(d_model, dtype=stacked.dtype)
        elif reading is not None:
            weights = reading_weights(w, order, config.mla_num_heads(name), config.mla_kept_key_dims(name), reading)
            (up,), down, (offset,) = output_aware_low_rank([stacked], [weights], [reading], config.mla_rank(name))
            v_bias = v_bias + offset[w_k_nope.shape[0]:]  # a key offset moves no attention weight
        else:
            up, down = low_rank(stacked, config.mla_rank(name), *whitening(covariance, d_model))
        up_k, up_v = up.split([w_k_nope.shape[0], d_model])
    else:
        sqrt_cov, inv_sqrt_cov = whitening(covariance, d_model)
        up_k, down_k = low_rank(w_k_nope, k_rank, sqrt_cov, inv_sqrt_cov)
        up_v, down_v = low_rank(w["v_proj.weight"], v_rank, sqrt_cov, inv_sqrt_cov)
        down = torch.cat([down_k, down_v])
    return {
        f"{name}.q_proj.weight": w["q_proj.weight"][order],
        f"{name}.q_proj.bias": w["q_proj.bias"][order],
        f"{name}.kv_a_proj.weight": torch.cat([down, w_k_kept]),
        f"{name}.k_b_proj.weight": up_k,
        f"{name}.v_b_proj.weight": up_v,
        f"{name}.v_b_proj.bias": v_bias,
        f"{name}.out_proj.weight": w["out_proj.weight"],
        f"{name}.out_proj.bias": w["out_proj.bias"],
    }


def convert_shared_cross_attention(state: dict, config: WhisperMLAConfig, names: list[str],
                                   covariance: torch.Tensor | None, readings: list[BlockReading] | None = None) -> dict:
    """MLA weights of the cross-attention blocks `names` reading one shared latent, from their MHA weights.

    Every layer's cross keys and values are linear maps of the same encoder output h: stacked, M = [W_k,1; W_v,1; ...;
    W_k,L; W_v,L] (2 L d_model, d_model). At width d_model the latent is h itself: the up-projections are the
    original weights and there is no down-projection (exact). Below it, one (activation-aware) SVD of M gives the
    shared down-projection `decoder.cross_kv_a_proj` and every layer's up-projections; given each layer's
    `readings`, output-aware (`output_aware_low_rank`). Pops what it converts.
    """
    d_model, rank = config.d_model, config.shared_cross_rank()
    weights = [pop_attention_weights(state, name, d_model) for name in names]
    stacked = torch.cat([torch.cat([w["k_proj.weight"], w["v_proj.weight"]]) for w in weights])  # (2 L d, d)
    new_state = {}
    if rank < d_model and readings is not None:
        identity = torch.arange(d_model)  # a shared cross latent keeps no key dims: no permutation
        row_weights = [reading_weights(w, identity, config.decoder_attention_heads, 0, r)
                       for w, r in zip(weights, readings)]
        ups, down, offsets = output_aware_low_rank(stacked.split(2 * d_model), row_weights, readings, rank)
        up = torch.cat(ups)
        for w, offset in zip(weights, offsets):
            w["v_proj.bias"] = w["v_proj.bias"] + offset[d_model:]  # a key offset moves no attention weight
        new_state["decoder.cross_kv_a_proj.weight"] = down
    elif rank < d_model:
        sqrt_cov, inv_sqrt_cov = whitening(covariance, d_model)
        up, down = low_rank(stacked, rank, sqrt_cov, inv_sqrt_cov)  # (2 L d, r), (r, d)
        new_state["decoder.cross_kv_a_proj.weight"] = down
    else:
        up = stacked
    for name, w, up_block in zip(names, weights, up.split(2 * d_model)):
        up_k, up_v = up_block.split(d_model)  # (d, r) each
        new_state.update({
            f"{name}.q_proj.weight": w["q_proj.weight"],
            f"{name}.q_proj.bias": w["q_proj.bias"],
            f"{name}.k_b_proj.weight": up_k,
            f"{name}.v_b_proj.weight": up_v,
            f"{name}.v_b_proj.bias": w["v_proj.bias"],
            f"{name}.out_proj.weight": w["out_proj.weight"],
            f"{name}.out_proj.bias": w["out_proj.bias"],
        })
    return new_state


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
    needs_statistics = any(not is_exact(config, name) for name in config.mla_block_names()) or (
        config.key_selection == "2-norm" and any(config.mla_kept_key_dims(name) for name in config.mla_block_names()))
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
        "base_model": getattr(model.config, "_name_or_path", None) or None,
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

