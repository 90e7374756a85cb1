"""--speed_perturbation: copies of the training clips at other speeds (tempo and pitch), lazy or not, grouped as
speakers of their own when joined, counted in the training report."""

import copy
import json

import numpy as np
import pytest
import soundfile

from helpers import tone
from whisper_mla.conversion import convert_whisper_to_mla
from whisper_mla.training.arguments import DataArguments, DistillationArguments, ModelArguments
from whisper_mla.training.concatenate import concatenate_examples
from whisper_mla.training.data import build_train_dataset, load_clips
from whisper_mla.training.perturb import SpeedPerturbedAudio, add_speed_perturbed_copies, change_speed, check_speeds


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """6 clips of two voices (alternating), each a tone of its own pitch, 0.5-1.0 s."""
    folder = tmp_path_factory.mktemp("speed")
    entries = []
    for i in range(6):
        voice = ("a", "b")[i % 2]
        soundfile.write(folder / f"u{i}.wav", tone(300 + 50 * i, seconds=0.5 + 0.1 * i), 16000)
        entries.append({"id": f"{voice}/u{i}", "path": f"u{i}.wav", "text": f"clip {i}", "voice": voice})
    (folder / "train.json").write_text(json.dumps({"annotation": entries}))
    return str(folder / "train.json")


def clips(manifest, lazy=False):
    examples, skipped = load_clips([manifest], None, DataArguments(train_data=[manifest], lazy_audio_loading=lazy),
                                   None, require_text=True)
    assert not skipped
    return examples


def peak_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / 16000)[spectrum.argmax()])


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_change_speed_scales_tempo_and_pitch_together(factor):
    wave = tone(440, seconds=1.0)
    fast = change_speed(wave, factor)
    assert fast.dtype == np.float32 and len(fast) == round(16000 / factor)
    assert peak_hz(fast) == pytest.approx(440 * factor, abs=2)
    assert np.abs(fast).max() == pytest.approx(0.3, abs=0.02)  # the level is kept


def test_copies_per_speed_keep_transcripts_and_join_as_speakers_of_their_own(manifest):
    originals = clips(manifest)
    examples = add_speed_perturbed_copies(originals, [0.9, 1.0, 1.1, 0.9])  # 1.0 is the original; 0.9 once
    assert all(a is b for a, b in zip(examples, originals)) and len(examples) == 18
    for speed, block in ((0.9, examples[6:12]), (1.1, examples[12:])):
        for original, example in zip(originals, block):
            assert example["id"] == f"{original['id']}@speed{speed:g}" and example["speed"] == speed
            assert example["text"] == original["text"] and example["speaker"] == original["speaker"]
            assert len(example["audio"]) == round(len(original["audio"]) / speed)
            assert peak_hz(example["audio"]) == pytest.approx(peak_hz(original["audio"]) * speed, abs=5)
    joined, report = concatenate_examples(examples, 30.0, seed=0)
    assert len(joined) == 6 and report["train_joined_utterances"] == 18  # 2 voices x 3 speeds
    for sample in joined:
        speeds = {part.partition("@")[2] for part in sample["parts"]}
        voices = {part.split("/")[0] for part in sample["parts"]}
        assert len(speeds) == 1 and len(voices) == 1 and len(sample["parts"]) == 3


def test_lazy_copies_resample_when_read(manifest):
    eager = add_speed_perturbed_copies(clips(manifest), [1.1])
    lazy = add_speed_perturbed_copies(clips(manifest, lazy=True), [1.1])
    for a, b in zip(eager[6:], lazy[6:]):
        assert isinstance(b["audio"], SpeedPerturbedAudio) and len(b["audio"]) == len(a["audio"])
        np.testing.assert_array_equal(b["audio"].load(), a["audio"])


@pytest.mark.parametrize("speed", [0.5, 2.0, 3, float("nan")])
def test_speeds_far_from_one_are_refused(speed):
    with pytest.raises(ValueError, match=r"--speed_perturbation expects a number > 0.5 and < 2, but found .*0.9 1.1"):
        check_speeds([1.1, speed])


def test_the_teacher_transcribes_every_copy(tiny_mha, tiny_processor, manifest):
    data_args = DataArguments(train_data=[manifest], speed_perturbation=[0.9, 1.1])
    student = convert_whisper_to_mla(copy.deepcopy(tiny_mha), kv_lora_rank=8, kept_key_dims=2)
    dataset, report = build_train_dataset(data_args, DistillationArguments(distill=True, pseudo_label_batch_size=6),
                                          ModelArguments(trainable="mla"), student, tiny_mha, tiny_processor,
                                          max_label_length=12, share_encoder=True, device="cpu", seed=0)
    assert len(dataset) == report["train_samples"] == 18 and report["train_speed_perturbed_copies"] == 12
    assert len(dataset.labels) == 18 and dataset.encoder_states is not None
    assert not any(torch_equal(dataset.encoder_states[i], dataset.encoder_states[i + 6]) for i in range(6))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
