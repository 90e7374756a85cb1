"""Long-form training samples (--concatenate_to_seconds): consecutive utterances of one speaker joined with short
silences into samples of up to S seconds, their transcripts joined with spaces; with --concatenate_timestamps the
labels carry Whisper's timestamp tokens, `<|start|> text<|end|>` per utterance, so that timestamped (long-form)
decoding is trained. The original Whisper_MLA lists this as a to-do.

Utterances are grouped by the speaker: the manifest entry's `speaker` (our real sets) or `voice` (our synthetic set)
field, else the clip's folder (LibriSpeech ids SPEAKER-CHAPTER-UTT: speaker and chapter). Within a group they keep
the order of the data and are packed greedily: an utterance joins the current sample while the sample stays within
S seconds. Lazily loaded clips stay lazy: a joined sample is a `JoinedAudio`, decoded when a step reads it.
"""

import posixpath
import re
from dataclasses import dataclass

import numpy as np

from whisper_mla.audio import SAMPLING_RATE, LazyAudio, as_waveform


WHISPER_WINDOW_SECONDS = 30.0  # the longest sample: Whisper's input window, and its last timestamp token <|30.00|>
TIME_PRECISION = 0.02  # Whisper's timestamp grid
GAP_SECONDS = (0.1, 0.5)  # silence between joined utterances, drawn uniformly with --seed
LIBRISPEECH_ID = re.compile(r"^(\d+-\d+)-\d+$")  # SPEAKER-CHAPTER-UTTERANCE: the folder SPEAKER/CHAPTER


@dataclass(frozen=True)
class JoinedAudio(LazyAudio):
    """A joined sample decoded only when read: its parts (waveforms or `LazyAudio`) with silences between them.

    Each part is cut or zero-padded to the length the join was planned with (a lazily loaded clip's header length can
    differ from its decoded length by a sample after resampling), so the segment boundaries hold exactly.
    """

    parts: tuple = ()  # waveforms or LazyAudio, in order
    lengths: tuple = ()  # planned samples of each part
    gaps: tuple = ()  # silence samples before parts[1:]

    def load(self) -> np.ndarray:
        pieces = []
        for index, (part, length) in enumerate(zip(self.parts, self.lengths)):
            if index:
                pieces.append(np.zeros(self.gaps[index - 1], np.float32))
            wave = as_waveform(part)[:length]
            pieces.append(np.pad(wave, (0, length - len(wave))).astype(np.float32, copy=False))
        return np.concatenate(pieces)


def speaker_keys(examples: list[dict]) -> list[tuple]:
    """The group of each example: (its source, the manifest's speaker or voice field, else the clip's folder, its
    --speed_perturbation speed).

    Args:
        examples: dicts with "id" and "source" (the --train_data entry they came from), as `load_clips` returns.

    Returns:
        one hashable key per example.
    """
    keys = []
    for example in examples:
        source, speaker = example["source"], example.get("speaker")
        if speaker is None:
            match = LIBRISPEECH_ID.match(example["id"])
            speaker = match.group(1) if match else posixpath.dirname(example["id"])
        keys.append((source, speaker, example.get("speed", 1.0)))  # a speed-perturbed copy is a speaker of its own
    return keys


def plan_joins(lengths: list[int], keys: list, max_samples: int, rng: np.random.Generator) -> list[tuple]:
    """Which utterances make each sample: consecutive utterances of one key, packed greedily up to `max_samples`.

    Args:
        lengths: samples of each utterance (each at most `max_samples`).
        keys: the group of each utterance (`speaker_keys`).
        max_samples: the longest sample.
        rng: draws the silences (one per attempted join).

    Returns:
        `(indices, gaps)` per sample, ordered by its first utterance: utterance indices in data order, and the
        silence (in samples) before each but the first.
    """
    groups = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    low, high = (round(s * SAMPLING_RATE) for s in GAP_SECONDS)
    samples = []
    for indices in groups.values():
        current, gaps, total = [indices[0]], [], lengths[indices[0]]
        for index in indices[1:]:
            gap = int(rng.integers(low, high + 1))
            if total + gap + lengths[index] <= max_samples:
                current.append(index)
                gaps.append(gap)
                total += gap + lengths[index]
            else:
                samples.append((current, gaps))
                current, gaps, total = [index], [], lengths[index]
        samples.append((current, gaps))
    return sorted(samples, key=lambda sample: sample[0][0])


def concatenate_examples(examples: list[dict], max_seconds: float, seed: int) -> tuple[list[dict], dict]:
    """Joins consecutive utterances of each speaker into samples of at most `max_seconds` (see the module docstring).

    Args:
        examples: `load_clips` examples ({"id", "audio", "text", "source"}), none longer than `max_seconds`.
        max_seconds: the longest sample, at most 30 s.
        seed: draws the silences between utterances.

    Returns:
        (joined examples, report). A joined example has "id" (the parts' ids joined by "+"), "parts" (their ids),
        "audio" (a waveform, or a `JoinedAudio` when any part was loaded lazily), "text" (the transcripts joined with
        spaces, or None without transcripts) and "segments": one (start seconds, end seconds, transcript) per part.
        The report holds train_joined_samples, train_joined_utterances and train_joined_mean_seconds.
    """
    if max_seconds > WHISPER_WINDOW_SECONDS:
        raise ValueError(f"--concatenate_to_seconds expects at most {WHISPER_WINDOW_SECONDS:g} s (Whisper's window), "
                         f"but found {max_seconds}; pass a value up to {WHISPER_WINDOW_SECONDS:g}.")
    max_samples = int(max_seconds * SAMPLING_RATE)
    lengths = [len(e["audio"]) for e in examples]
    too_long = [e["id"] for e, n in zip(examples, lengths) if n > max_samples]
    if too_long:
        raise ValueError(f"concatenate_examples expects utterances of at most {max_seconds} s, but found "
                         f"{len(too_long)} longer ({too_long[:3]}); drop them first (drop_long_clips).")
    plan = plan_joins(lengths, speaker_keys(examples), max_samples, np.random.default_rng(seed))
    joined = []
    for indices, gaps in plan:
        parts = [examples[i] for i in indices]
        starts = np.cumsum([0] + [lengths[i] + gap for i, gap in zip(indices, gaps)]).tolist()
        segments = [(start / SAMPLING_RATE, (start + lengths[i]) / SAMPLING_RATE, part["text"])
                    for start, i, part in zip(starts, indices, parts)]
        audio = JoinedAudio(None, None, starts[-1] + lengths[indices[-1]], parts=tuple(p["audio"] for p in parts),
                            lengths=tuple(lengths[i] for i in indices), gaps=tuple(gaps))
        if not any(isinstance(p["audio"], LazyAudio) for p in parts):
            audio = audio.load()  # read in full anyway: join now
        texts = [p["text"] for p in parts]
        joined.append({
            "id": "+".join(p["id"] for p in parts), "parts": [p["id"] for p in parts], "audio": audio,
            "text": None if any(t is None for t in texts) else " ".join(t.strip() for t in texts),
            "segments": segments, "source": parts[0]["source"],
        })
    seconds = [len(e["audio"]) / SAMPLING_RATE for e in joined]
    report = {"train_joined_samples": len(joined), "train_joined_utterances": len(examples),
              "train_joined_mean_seconds": round(float(np.mean(seconds)), 3) if seconds else 0.0}
    return joined, report


def timestamp_prefix(tokenizer) -> list[int]:
    """The tokenizer's prompt without <|notimestamps|>: <|startoftranscript|> (language, task)."""
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    return [t for t in tokenizer.prefix_tokens if t != no_timestamps]


def timestamp_token(tokenizer, seconds: float) -> int:
    """The id of <|t|>, t = `seconds` rounded to the 0.02 s grid (at most <|30.00|>)."""
    ids = tokenizer.timestamp_ids()
    return ids[min(round(seconds / TIME_PRECISION), len(ids) - 1)]


def timestamp_label_ids(segments: list[tuple], tokenizer, do_lower_case: bool = False) -> list[int]:
    """Label ids of a joined sample with timestamps, as Whisper was trained on them:
    `<|startoftranscript|> <|t0|> text0<|t1|><|t2|> text1<|t3|> ... <|endoftext|>`.

    Args:
        segments: (start seconds, end seconds, transcript) per utterance.
        tokenizer: a WhisperTokenizer (its language and task are kept in the prompt).
        do_lower_case: lower-case the transcripts first.

    Returns:
        a list of token ids.
    """
    ids = timestamp_prefix(tokenizer)
    for start, end, text in segments:
        text = text.strip().lower() if do_lower_case else text.strip()
        ids += [timestamp_token(tokenizer, start), *tokenizer(" " + text, add_special_tokens=False).input_ids,
                timestamp_token(tokenizer, end)]
    return ids + [tokenizer.eos_token_id]


def first_window(sequence: list[int], timestamp_begin: int, eos_token_id: int) -> list[int]:
    """A teacher's timestamped transcript up to where its timestamps go back (generate moved on to a second pass over
    the window and counts from 0 again), ended with <|endoftext|> when it ends on a timestamp (generate returns
    timestamped transcripts without it); a transcript cut by the length limit stays open."""
    last = -1
    for position, token in enumerate(sequence):
        if token == eos_token_id:
            return sequence[: position + 1]
        if token >= timestamp_begin:
            if token < last:
                sequence = sequence[:position]
                break
            last = token
    if sequence and sequence[-1] >= timestamp_begin:
        sequence = sequence + [eos_token_id]
    return sequence
