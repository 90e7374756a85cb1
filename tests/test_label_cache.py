"""The pseudo-label cache of label-free distillation (--pseudo_label_cache, whisper_mla.training.label_cache): the
labels it gives back are the teacher's own, a rerun transcribes nothing, any other teacher, setting or audio misses,
runs sharing the file keep each other's labels, and a damaged file is refused and left as it was."""

import copy
import json
import os

import pytest
import torch
from transformers import Seq2SeqTrainingArguments

import helpers
import run_finetune
from whisper_mla.training.arguments import DataArguments, DistillationArguments, ModelArguments, validate_arguments
from whisper_mla.training.concatenate import timestamp_prefix, timestamp_token
from whisper_mla.training.data import build_train_dataset, precompute_targets
from whisper_mla.training.label_cache import PseudoLabelCache


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def teacher():
    """Large random weights (init_std 0.5): transcripts that differ from clip to clip, so that order shows."""
    return helpers.tiny_whisper_model(seed=0, init_std=0.5)


@pytest.fixture(scope="module")
def clips():
    """Four clips of their own pitch and length."""
    return [helpers.tone(220 + 110 * i, seconds=1.0 + 0.5 * i, noise=0.02, seed=i) for i in range(4)]


def count_generate(model) -> list[int]:
    """Wraps `model.generate`; returns the list that gets the batch size of each call."""
    sizes, generate = [], model.generate

    def counting_generate(*args, **kwargs):
        sequences = generate(*args, **kwargs)
        sizes.append(len(sequences))
        return sequences

    model.generate = counting_generate
    return sizes


def label(clips, teacher, processor, cache=None, encoder=None, timestamps=False, max_label_length=10):
    """(encoder outputs, pseudo-labels) of `clips` with make_targets' settings, in batches of 3."""
    tokenizer = processor.tokenizer
    prefix = timestamp_prefix(tokenizer) if timestamps else tokenizer.prefix_tokens
    generate_kwargs = {"max_new_tokens": max_label_length - len(prefix) - timestamps}
    if timestamps:
        generate_kwargs["return_timestamps"] = True
    return precompute_targets(clips, processor.feature_extractor, encoder=encoder, teacher=teacher, batch_size=3,
                              prefix=prefix, generate_kwargs=generate_kwargs, cache=cache,
                              timestamp_begin=timestamp_token(tokenizer, 0.0) if timestamps else None)


@pytest.mark.parametrize("precompute", [True, False], ids=["encoder-outputs", "teacher-encoder"])
def test_cached_labels_are_the_teachers_and_a_rerun_transcribes_nothing(teacher, tiny_processor, clips, tmp_path,
                                                                         precompute):
    encoder = teacher.get_encoder() if precompute else None
    states, labels = label(clips, teacher, tiny_processor, encoder=encoder)
    assert len({tuple(ids) for ids in labels}) > 1, "clips that the teacher transcribes alike show no order"
    path = str(tmp_path / "labels.json")
    transcribed = count_generate(teacher)

    for run, expected in enumerate([[3, 1], []]):  # fresh: every clip, in batches of 3; the rerun: none
        cached_states, cached_labels = label(clips, teacher, tiny_processor, PseudoLabelCache(path, teacher), encoder)
        assert transcribed == expected, run
        assert cached_labels == labels
        if precompute:  # encoder outputs are not cached: made for every clip, in the order of the clips
            assert len(cached_states) == len(clips)
            for state, cached in zip(states, cached_states):
                torch.testing.assert_close(cached, state)
        else:
            assert cached_states is None
        transcribed.clear()

    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    assert content["format"] == 1 and sorted(map(tuple, content["entries"].values())) == sorted(map(tuple, labels))
    assert sorted(os.listdir(tmp_path)) == ["labels.json", "labels.json.lock"]  # no temporary file left

    # A new clip among cached ones: only it is transcribed, and every label stays in its clip's place.
    new = helpers.tone(1000, seconds=2.0, noise=0.02, seed=9)
    _, new_labels = label([new], teacher, tiny_processor, encoder=encoder)
    transcribed.clear()
    _, mixed = label(clips[:2] + [new] + clips[2:], teacher, tiny_processor, PseudoLabelCache(path, teacher), encoder)
    assert transcribed == [1]
    assert mixed == labels[:2] + new_labels + labels[2:]


@pytest.mark.parametrize("change", ["nothing", "timestamps", "max_label_length", "teacher_weight", "audio"])
def test_another_teacher_setting_or_audio_misses(teacher, tiny_processor, clips, tmp_path, change):
    path = str(tmp_path / "labels.json")
    label(clips, teacher, tiny_processor, PseudoLabelCache(path, teacher))
    other_teacher, other_clips, settings = teacher, clips, {}
    if change == "teacher_weight":
        other_teacher = copy.deepcopy(teacher)
        with torch.no_grad():
            other_teacher.model.decoder.layers[0].fc1.weight[0, 0] += 1e-4
    elif change == "audio":  # one sample of each clip a little louder
        other_clips = [clip.copy() for clip in clips]
        for clip in other_clips:
            clip[100] += 1e-4
    elif change == "timestamps":
        settings = {"timestamps": True}
    elif change == "max_label_length":
        settings = {"max_label_length": 9}
    transcribed = count_generate(other_teacher)
    label(other_clips, other_teacher, tiny_processor, PseudoLabelCache(path, other_teacher), **settings)
    assert sum(transcribed) == (0 if change == "nothing" else len(clips))
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["entries"]
    assert len(entries) == (1 if change == "nothing" else 2) * len(clips)  # the first labels are kept beside


@pytest.mark.parametrize("content", [b"{not json", b"\x80\x81", b"", b'[1, 2]', b'{"format": 2, "entries": {}}',
                                     b'{"format": 1, "entries": {"k": "abc"}}'],
                         ids=["text", "binary", "empty", "list", "format-2", "bad-entry"])
def test_a_damaged_cache_file_explains_the_fix_and_is_left_untouched(teacher, tiny_processor, clips, tmp_path,
                                                                     content):
    path = tmp_path / "labels.json"
    path.write_bytes(content)
    message = r"--pseudo_label_cache expects a JSON file of pseudo-labels .*, but .*labels.json.*; delete it"
    with pytest.raises(ValueError, match=message):
        PseudoLabelCache(str(path), teacher)
    with pytest.raises(ValueError, match=message):  # at start-up, before any work
        validate_arguments(ModelArguments(), DataArguments(), DistillationArguments(distill=True,
                                                                                    pseudo_label_cache=str(path)),
                           Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out")))
    # Damaged while the teacher transcribes (by someone else): the new labels are not written over it either.
    fine = tmp_path / "fine.json"
    cache = PseudoLabelCache(str(fine), teacher)
    fine.write_bytes(content)
    with pytest.raises(ValueError, match=message.replace("labels.json", "fine.json")):
        label(clips[:1], teacher, tiny_processor, cache)
    assert path.read_bytes() == fine.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["fine.json", "fine.json.lock", "labels.json"]


def test_runs_sharing_a_cache_keep_each_others_labels(teacher, tiny_processor, clips, tmp_path):
    """Two runs read the file before either writes; each merges with what the other wrote meanwhile."""
    path = str(tmp_path / "shared" / "labels.json")  # the folder is made too
    first, second = PseudoLabelCache(path, teacher), PseudoLabelCache(path, teacher)
    _, labels_first = label(clips[:2], teacher, tiny_processor, first)
    _, labels_second = label(clips[2:], teacher, tiny_processor, second)
    transcribed = count_generate(teacher)
    _, labels = label(clips, teacher, tiny_processor, PseudoLabelCache(path, teacher))
    assert transcribed == [] and labels == labels_first + labels_second


def test_build_train_dataset_reuses_the_cache(teacher, tiny_processor, tmp_path):
    """--pseudo_label_cache through the data preparation of run_finetune (encoder outputs precomputed)."""
    helpers.write_clips(tmp_path / "data", ["one", "two", "three"])
    data_args = DataArguments(train_data=[str(tmp_path / "data" / "manifest.json")])
    student = copy.deepcopy(teacher)

    def build(cache):
        distill_args = DistillationArguments(distill=True, pseudo_label_batch_size=2, pseudo_label_cache=cache)
        dataset, _ = build_train_dataset(data_args, distill_args, ModelArguments(), student, teacher, tiny_processor,
                                         max_label_length=10, share_encoder=True, device="cpu")
        return dataset

    fresh = build(None)
    cache = str(tmp_path / "labels.json")
    assert build(cache).labels == fresh.labels
    transcribed = count_generate(teacher)
    again = build(cache)
    assert transcribed == [] and again.labels == fresh.labels
    for state, expected in zip(again.encoder_states, fresh.encoder_states, strict=True):
        torch.testing.assert_close(state, expected)


def test_pseudo_label_cache_argument(tmp_path):
    _, _, distill_args, _, training_args = run_finetune.parse_arguments(
        ["--pseudo_label_cache", "~/labels.json", "--output_dir", str(tmp_path), "--use_cpu"])
    assert distill_args.pseudo_label_cache == os.path.expanduser("~/labels.json")
    with pytest.raises(ValueError, match="--pseudo_label_cache expects --distill"):
        validate_arguments(ModelArguments(), DataArguments(), distill_args, training_args)
