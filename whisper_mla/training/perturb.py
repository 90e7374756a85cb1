"""Speed perturbation (--speed_perturbation): every training clip also appears at other speeds, Kaldi's 3-way
recipe (0.9, 1.0, 1.1) for more varied voices from the same recordings.

A clip at speed f is its waveform read as if sampled at f x 16 kHz and resampled to 16 kHz (soxr), so tempo and
pitch change together: 1/f times as long, formants shifted by f, which sounds like another speaker. The copies keep
the transcript (with --distill the teacher transcribes each copy anyway) and count as a speaker of their own when
utterances are joined (--concatenate_to_seconds). Lazily loaded clips stay lazy: a copy is a `SpeedPerturbedAudio`,
resampled when a step reads it.
"""

from dataclasses import dataclass

import numpy as np
import soxr

from whisper_mla.arguments import check_number
from whisper_mla.audio import SAMPLING_RATE, LazyAudio, as_waveform


@dataclass(frozen=True)
class SpeedPerturbedAudio(LazyAudio):
    """A clip at speed `factor`, resampled only when read; `len()` is its length after resampling."""

    clip: object = None  # a waveform or a LazyAudio
    factor: float = 1.0

    def load(self) -> np.ndarray:
        return change_speed(as_waveform(self.clip), self.factor, self.num_samples)


def check_speeds(factors: list[float]) -> None:
    """Refuses speeds outside (0.5, 2) with an expected/found/fix error."""
    for factor in factors:
        check_number("--speed_perturbation", factor, above=0.5, below=2,
                     fix="pass speeds near 1, e.g. 0.9 1.1, or leave it out to train on the clips as recorded")


def perturbed_length(num_samples: int, factor: float) -> int:
    """Samples of a clip of `num_samples` played `factor` times faster."""
    return max(1, round(num_samples / factor))


def change_speed(waveform: np.ndarray, factor: float, num_samples: int | None = None) -> np.ndarray:
    """`waveform` played `factor` times faster (tempo and pitch), cut or zero-padded to `num_samples`
    (default `perturbed_length`) so that its length is known before it is decoded."""
    num_samples = perturbed_length(len(waveform), factor) if num_samples is None else num_samples
    fast = soxr.resample(waveform, SAMPLING_RATE * factor, SAMPLING_RATE)[:num_samples]
    return np.pad(fast, (0, num_samples - len(fast))).astype(np.float32, copy=False)


def add_speed_perturbed_copies(examples: list[dict], factors: list[float]) -> list[dict]:
    """The examples followed by one copy of each at every speed in `factors` (1.0 is the original and is skipped).

    Args:
        examples: `load_clips` examples ({"id", "audio", "text", "source", ...}).
        factors: speeds, each in (0.5, 2); e.g. [0.9, 1.1].

    Returns:
        the examples, then the copies speed by speed in data order. A copy's id ends with "@speedF" and its
        "speed" field is F (`speaker_keys` groups by it); its audio is a waveform, or a `SpeedPerturbedAudio` when
        the clip was loaded lazily.
    """
    check_speeds(factors)
    copies = []
    for factor in dict.fromkeys(f for f in factors if f != 1.0):  # each speed once, in the order given
        for example in examples:
            audio = example["audio"]
            length = perturbed_length(len(audio), factor)
            if isinstance(audio, LazyAudio):
                audio = SpeedPerturbedAudio(None, None, length, audio.where, clip=audio, factor=factor)
            else:
                audio = change_speed(audio, factor, length)
            copies.append({**example, "id": f"{example['id']}@speed{factor:g}", "audio": audio, "speed": factor})
    return examples + copies
