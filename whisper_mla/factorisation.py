"""Low-rank factorisation of attention blocks for the MHA -> MLA conversion: kept key dims, (activation-aware,
output-aware) SVD, and the MLA weights of one block or of the cross blocks that share one latent.

Reads the statistics that `whisper_mla.calibration` collects; `whisper_mla.conversion` (`convert_whisper_to_mla`)
runs it over every converted block.
"""

import copy
from dataclasses import dataclass

import torch

from configuration_whisper_mla import WhisperMLAConfig
from whisper_mla.calibration import _BlockStatistics, input_covariance, input_mean


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
