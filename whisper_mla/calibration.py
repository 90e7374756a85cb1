"""Calibration statistics for the MHA -> MLA conversion: run the MHA model on untranscribed audio and accumulate, per
attention block, what the (activation-aware) factorisation reads: the Gram matrix and mean of the block's key/value
inputs, the mean |q| and |k| per dim (2-norm key selection), the queries' second moment (output-aware fitting) and,
for cross-attention, the encoder frames weighted by the attention they receive.

Its siblings: `whisper_mla.factorisation` fits the low-rank projections from these statistics, and
`whisper_mla.conversion` (`convert_whisper_to_mla`) runs both.
"""

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import WhisperForConditionalGeneration

from configuration_whisper_mla import WhisperMLAConfig


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


def calibrated_blocks(config: WhisperMLAConfig) -> list[str]:
    """Blocks whose statistics conversion needs: every converted block (the cross blocks that share one latent all
    read the same encoder output, but each attends to it in its own way)."""
    return config.mla_block_names()


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
