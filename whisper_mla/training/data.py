"""Training and evaluation data of recovery training: clips loaded and filtered (and joined into long-form samples,
see `whisper_mla.training.concatenate`), transcripts tokenised or replaced by the teacher's greedy transcripts
(pseudo-labels), encoder outputs precomputed, the dataset and its collator."""

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from whisper_mla.audio import SAMPLING_RATE, SpeechDataError, as_waveform, drop_undecodable, load_speech_dataset
from whisper_mla.training.arguments import DataArguments
from whisper_mla.training.concatenate import (
    concatenate_examples,
    first_window,
    timestamp_label_ids,
    timestamp_prefix,
    timestamp_token,
)
from whisper_mla.training.label_cache import PseudoLabelCache
from whisper_mla.training.perturb import add_speed_perturbed_copies


logger = logging.getLogger(__name__)


def load_clips(sources: list[str], split, data_args: DataArguments, max_samples, require_text: bool):
    """Decoded examples of every source, concatenated, and the messages of the rows skipped as bad. Each example
    also names its "source" (the entry of `sources` it came from)."""
    examples, skipped = [], []
    for source in sources:
        remaining = None if max_samples is None else max_samples - len(examples)
        if remaining is not None and remaining <= 0:
            break
        dataset = load_speech_dataset(
            source, split=split, audio_column=data_args.audio_column_name, text_column=data_args.text_column_name,
            max_samples=remaining, skip_bad=data_args.skip_bad_samples, require_text=require_text,
            config_name=data_args.dataset_config_name, lazy=data_args.lazy_audio_loading,
        )
        examples += [{**example, "source": source} for example in dataset.examples]
        skipped += dataset.skipped
    return examples, skipped


def drop_long_clips(examples: list[dict], max_seconds: float) -> tuple[list[dict], int]:
    """Returns (the examples of at most `max_seconds`, number dropped): Whisper sees 30 s windows."""
    kept = [e for e in examples if len(e["audio"]) <= max_seconds * SAMPLING_RATE]
    return kept, len(examples) - len(kept)


def tokenize_transcripts(examples, tokenizer, max_label_length: int, do_lower_case: bool, timestamps: bool = False):
    """Label ids `<|startoftranscript|> <prefix> text <|endoftext|>` per example; drops too-long ones. With
    `timestamps`, joined examples' labels carry timestamp tokens around each segment (`timestamp_label_ids`).

    Returns (examples kept, their label ids, number dropped).
    """
    kept, labels = [], []
    for example in examples:
        if timestamps:
            ids = timestamp_label_ids(example["segments"], tokenizer, do_lower_case)
        else:
            ids = tokenizer(example["text"].lower() if do_lower_case else example["text"]).input_ids
        if len(ids) <= max_label_length:
            kept.append(example)
            labels.append(ids)
    return kept, labels, len(examples) - len(kept)


def pseudo_label_ids(sequence: list[int], prefix: list[int], eos_token_id: int,
                     timestamp_begin: int | None = None) -> list[int]:
    """Label ids from one generated sequence: the tokenizer's prefix, the text up to and including the first
    end-of-text (padding after it dropped). Whisper's generate may or may not return the prompt; both work. A
    timestamped transcript (`timestamp_begin`: the id of <|0.00|>) is kept up to where its timestamps go back and
    ends with end-of-text (see `concatenate.first_window`)."""
    if sequence[: len(prefix)] == prefix:
        sequence = sequence[len(prefix):]
    if eos_token_id in sequence:
        sequence = sequence[: sequence.index(eos_token_id) + 1]
    if timestamp_begin is not None:
        sequence = first_window(list(sequence), timestamp_begin, eos_token_id)
    return list(prefix) + list(sequence)


@torch.no_grad()
def precompute_targets(audios, feature_extractor, encoder=None, teacher=None, batch_size=16, prefix=None,
                       generate_kwargs=None, device="cpu", timestamp_begin=None, cache=None):
    """One pass over the training clips, in batches: the encoder outputs (if `encoder` is given) and the teacher's
    greedy transcripts as label ids (if `teacher` is given). The teacher decodes from the precomputed encoder
    outputs when there are any, so the encoder runs once per clip; except for timestamped transcripts
    (`timestamp_begin` given, see `pseudo_label_ids`), where generate may take a second pass over part of the
    features, which encoder outputs of the whole window cannot serve.

    With `cache` (a `PseudoLabelCache`), the teacher transcribes only the clips whose labels the cache lacks, and
    adds those. They go first, so that they fill whole batches; the cached ones follow only for their encoder outputs.

    Returns (encoder outputs: list of (frames, d_model) CPU tensors, or None; pseudo-labels: list of id lists or
    None), both in the order of `audios`.
    """
    generate_kwargs = generate_kwargs or {}
    states = [None] * len(audios) if encoder is not None else None
    labels = [None] * len(audios) if teacher is not None else None
    keys, todo = [], range(len(audios))  # todo: the clips the teacher transcribes
    if teacher is not None and cache is not None:
        settings = {"prefix": list(prefix), "generate_kwargs": generate_kwargs, "timestamp_begin": timestamp_begin,
                    "feature_extractor": feature_extractor.to_dict()}
        keys = [cache.key(as_waveform(audio), settings) for audio in audios]  # decodes lazily loaded clips once more
        for index, key in enumerate(keys):
            labels[index] = cache.entries.get(key)
        todo = [index for index, ids in enumerate(labels) if ids is None]
    cached = sorted(set(range(len(audios))) - set(todo))
    order = list(todo) + (cached if encoder is not None else [])  # the cached clips only for their encoder outputs
    desc = "pseudo-labelling" if teacher is not None else "encoding"
    dtype = next((encoder if encoder is not None else teacher).parameters()).dtype
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        indices = order[start : start + batch_size]
        batch = [as_waveform(audios[i]) for i in indices]
        features = feature_extractor(batch, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
        features = features.to(device, dtype)  # (B, n_mels, 3000)
        hidden = encoder(features).last_hidden_state if encoder is not None else None  # (B, frames, d_model)
        if states is not None:
            for index, state in zip(indices, hidden.cpu().unbind(0)):
                states[index] = state
        num_new = sum(labels[i] is None for i in indices) if teacher is not None else 0  # they lead the batch
        if num_new:
            inputs = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden[:num_new])} \
                if hidden is not None and timestamp_begin is None else {"input_features": features[:num_new]}
            sequences = teacher.generate(**inputs, **generate_kwargs, num_beams=1, do_sample=False)
            for index, sequence in zip(indices, sequences.tolist()):
                labels[index] = pseudo_label_ids(sequence, prefix, teacher.config.eos_token_id, timestamp_begin)
    if keys:
        logger.info("Pseudo-labels: %d of %d reused from %s, %d made by the teacher.", len(cached),
                    len(audios), cache.path, len(todo))
        if todo:
            cache.add({keys[index]: labels[index] for index in todo})
    return states, labels


class SpeechSeq2SeqDataset(torch.utils.data.Dataset):
    """Items `{"input_features" | "encoder_hidden_states", "labels"}`; features are computed when an item is read.

    Lazily loaded clips are decoded here, mid-training, where one with a valid header but a damaged body fails. That
    stops training with an error naming the clip and --skip_bad_samples; with `skip_bad` the clip is logged once,
    flagged, and the next readable clip (with its labels) is returned in its place, so batches keep their size and a
    resumed run sees the same batches. The flags live in shared memory, so DataLoader worker processes report theirs.
    """

    def __init__(self, audios, labels, feature_extractor, encoder_states=None, skip_bad=False):
        self.audios, self.labels, self.feature_extractor = audios, labels, feature_extractor
        self.encoder_states = encoder_states
        self.bad = torch.zeros(len(labels), dtype=torch.bool).share_memory_() if skip_bad else None

    def __len__(self):
        return len(self.labels)

    @property
    def num_bad(self) -> int:
        """Clips this process (and its DataLoader workers) found undecodable and skipped."""
        return 0 if self.bad is None else int(self.bad.sum())

    def __getitem__(self, index):
        if self.encoder_states is not None:
            return {"labels": self.labels[index], "encoder_hidden_states": self.encoder_states[index]}
        index, audio = self._read(index)
        features = self.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="np")
        return {"labels": self.labels[index], "input_features": features.input_features[0]}  # (n_mels, 3000)

    def _read(self, index: int) -> tuple[int, np.ndarray]:
        """(index, waveform) of the clip at `index`, or with skip_bad of the next clip that decodes."""
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if self.bad is not None and self.bad[i]:
                continue
            try:
                return i, as_waveform(self.audios[i])  # decoded here when the data was loaded lazily
            except SpeechDataError as err:
                if self.bad is None:
                    raise SpeechDataError(
                        f"{err} (With --lazy_audio_loading a clip is decoded only when a training step reads it; pass "
                        "--skip_bad_samples to log, count and skip such clips instead of stopping.)"
                    ) from err
                self.bad[i] = True
                logger.warning("Skipping a training clip that does not decode (the next readable clip takes its "
                               "place): %s", err)
        raise SpeechDataError(f"None of the {len(self)} training clips decodes; check the training data.")


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """Stacks input features (or precomputed encoder outputs) and right-pads labels with -100.

    Padding is found from the label lengths (an attention mask), never from token ids: Whisper's pad token is its
    end-of-text token, which must stay a target. A leading `<|startoftranscript|>` is dropped when every row has it,
    because the model prepends the decoder start token again when it builds `decoder_input_ids` from the labels.
    """

    decoder_start_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in ("input_features", "encoder_hidden_states"):
            if key in features[0]:
                batch[key] = torch.stack([torch.as_tensor(f[key]) for f in features])
        lengths = torch.tensor([len(f["labels"]) for f in features])
        attention_mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (B, T)
        labels = torch.full(attention_mask.shape, -100, dtype=torch.long)
        labels[attention_mask] = torch.cat([torch.as_tensor(f["labels"], dtype=torch.long) for f in features])
        if (labels[:, 0] == self.decoder_start_token_id).all():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def fits_in_memory(num_clips: int, config, fraction: float = 0.5) -> bool:
    """Whether `num_clips` precomputed encoder outputs (float32) take less than `fraction` of the machine's RAM."""
    needed = num_clips * config.max_source_positions * config.d_model * 4
    return needed < fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_train_dataset(data_args, distill_args, model_args, student, teacher, processor, max_label_length,
                        share_encoder: bool, device, seed: int = 0):
    """Training clips with their targets: tokenised transcripts, or with --distill the teacher's greedy transcripts
    (made once, batched; with --pseudo_label_cache kept for later runs). When the encoder is shared and frozen, its
    outputs are computed here once per clip. With --speed_perturbation copies of the clips at other speeds are added
    first; with --concatenate_to_seconds the clips are then joined into long-form samples (with
    --concatenate_timestamps, labelled or transcribed with timestamps), and --concatenate_keep_utterances trains on the
    single utterances too (without timestamps).

    Args:
        data_args, distill_args, model_args: the script's arguments (sources, limits, --distill, precomputing).
        student: the Whisper-MLA model (or the MHA control); its encoder computes the precomputed outputs.
        teacher: the frozen teacher that transcribes the clips with --distill, else None.
        processor: feature extractor and tokenizer (with the run's prefix tokens).
        max_label_length: the longest label in tokens, prompt included.
        share_encoder: the student's encoder is frozen and equals the teacher's (see `DistillationTrainer`).
        device: where the encoder and teacher run.
        seed: draws the silences between joined utterances.

    Returns:
        (a `SpeechSeq2SeqDataset`, a report of how many clips were used, skipped, dropped and joined).
    """
    examples, skipped = load_clips(data_args.train_data, data_args.train_split, data_args,
                                   data_args.max_train_samples, require_text=not distill_args.distill)
    for message in skipped:
        logger.warning("Skipped: %s", message)
    perturbed_report = {}
    if data_args.speed_perturbation:
        num_clips = len(examples)
        examples = add_speed_perturbed_copies(examples, data_args.speed_perturbation)
        perturbed_report = {"train_speed_perturbed_copies": len(examples) - num_clips}
        logger.info("Speed perturbation %s: %d clips -> %d.", data_args.speed_perturbation, num_clips, len(examples))
    max_seconds = data_args.max_duration_in_seconds
    if data_args.concatenate_to_seconds is not None:
        max_seconds = min(max_seconds, data_args.concatenate_to_seconds)  # no joined sample is longer either
    examples, dropped_long = drop_long_clips(examples, max_seconds)
    precompute = share_encoder and model_args.precompute_encoder_outputs
    if precompute or teacher is not None:
        # Every clip is decoded up front for the encoder outputs or the teacher's transcripts anyway (an extra
        # decode is cheap next to that): find lazily loaded clips that do not decode before any of it.
        examples, undecodable = drop_undecodable(examples, data_args.skip_bad_samples)
        skipped += undecodable
    joined_report, groups = {}, [(examples, False)]  # (examples, labelled with timestamps)
    if data_args.concatenate_to_seconds is not None and examples:
        joined, joined_report = concatenate_examples(examples, data_args.concatenate_to_seconds, seed)
        logger.info("Joined %d utterances into %d samples of %.1f s on average (at most %g s).",
                    joined_report["train_joined_utterances"], joined_report["train_joined_samples"],
                    joined_report["train_joined_mean_seconds"], data_args.concatenate_to_seconds)
        groups = [(joined, data_args.concatenate_timestamps)]
        if data_args.concatenate_keep_utterances:
            groups.insert(0, (examples, False))
    num_samples = sum(len(group) for group, _ in groups)
    if precompute and not fits_in_memory(num_samples, student.config):
        logger.warning("Encoder outputs of %d samples would not fit in memory; the encoder runs every step instead.",
                       num_samples)
        precompute = False
    cache = None
    if teacher is not None and distill_args.pseudo_label_cache is not None:
        cache = PseudoLabelCache(distill_args.pseudo_label_cache, teacher)
    audios, labels, states, dropped_labels = [], [], [] if precompute else None, 0
    for group, timestamps in groups:
        group_audios, group_labels, group_states, dropped = make_targets(
            group, timestamps, data_args, distill_args, student, teacher, processor, max_label_length, precompute,
            device, cache)
        audios, labels, dropped_labels = audios + group_audios, labels + group_labels, dropped_labels + dropped
        if precompute:
            states += group_states
    if not labels:
        raise ValueError(f"Found no usable training clips in {data_args.train_data} ({len(skipped)} bad, "
                         f"{dropped_long} longer than {max_seconds} s, {dropped_labels} with transcripts over "
                         "max_label_length); check the data and those limits.")
    dataset = SpeechSeq2SeqDataset(None if precompute else audios, labels, processor.feature_extractor, states,
                                   skip_bad=data_args.skip_bad_samples)
    report = {"train_samples": len(dataset), "train_skipped_bad": len(skipped), "train_dropped_long": dropped_long,
              "train_dropped_long_labels": dropped_labels, **perturbed_report, **joined_report}
    logger.info("Training clips: %s", report)
    return dataset, report


def make_targets(examples, timestamps, data_args, distill_args, student, teacher, processor, max_label_length,
                 precompute, device, cache=None):
    """The targets of one group of training samples, all with timestamped labels or all without: tokenised
    transcripts, or with --distill the teacher's greedy transcripts (those in `cache`, a `PseudoLabelCache`, reused);
    and the encoder outputs when `precompute`.

    Returns (audios, label ids, encoder outputs or None, number of transcripts dropped as too long).
    """
    labels, dropped = [], 0
    if not distill_args.distill:
        examples, labels, dropped = tokenize_transcripts(examples, processor.tokenizer, max_label_length,
                                                         data_args.do_lower_case, timestamps)
    audios, states = [e["audio"] for e in examples], None
    if audios and (precompute or teacher is not None):
        tokenizer = processor.tokenizer
        prefix = timestamp_prefix(tokenizer) if timestamps else tokenizer.prefix_tokens
        generate_kwargs = {"max_new_tokens": max_label_length - len(prefix)}
        if data_args.language is not None:
            generate_kwargs.update(language=data_args.language, task=data_args.task)
        if timestamps:  # generate drops the final <|endoftext|> of timestamped transcripts: room to put it back
            generate_kwargs.update(return_timestamps=True, max_new_tokens=generate_kwargs["max_new_tokens"] - 1)
        student.eval()
        states, pseudo_labels = precompute_targets(
            audios, processor.feature_extractor, encoder=student.get_encoder() if precompute else None,
            teacher=teacher, batch_size=distill_args.pseudo_label_batch_size, prefix=prefix,
            generate_kwargs=generate_kwargs, device=device,
            timestamp_begin=timestamp_token(tokenizer, 0.0) if timestamps else None, cache=cache,
        )
        if pseudo_labels is not None:
            labels = pseudo_labels
            for ids in pseudo_labels[:3]:
                logger.info("Pseudo-label: %r", tokenizer.decode(ids, skip_special_tokens=not timestamps,
                                                                 decode_with_timestamps=timestamps))
    return audios, labels, states, dropped


def build_eval_dataset(data_args, processor, max_label_length):
    """Evaluation clips with tokenised transcripts; returns (dataset, report)."""
    examples, skipped = load_clips([data_args.eval_data], data_args.eval_split, data_args,
                                   data_args.max_eval_samples, require_text=True)
    # Evaluating on a substitute for a damaged clip would change the eval set: damaged clips go before training.
    examples, undecodable = drop_undecodable(examples, data_args.skip_bad_samples)
    skipped += undecodable
    examples, _ = drop_long_clips(examples, data_args.max_duration_in_seconds)
    examples, labels, _ = tokenize_transcripts(examples, processor.tokenizer, max_label_length,
                                               data_args.do_lower_case)
    dataset = SpeechSeq2SeqDataset([e["audio"] for e in examples], labels, processor.feature_extractor)
    return dataset, {"eval_samples": len(dataset), "eval_skipped_bad": len(skipped)}


def count_bad_clips(dataset: SpeechSeq2SeqDataset, device) -> int:
    """Clips skipped mid-training as undecodable, over all processes (each reads its own share of the data)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dataset.num_bad
    flags = dataset.bad if dataset.bad is not None else torch.zeros(len(dataset), dtype=torch.bool)
    flags = flags.to(device, torch.int32)  # NCCL reduces only GPU tensors
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return int(flags.sum())
