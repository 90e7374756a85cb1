"""run_eval.py: the CLI end to end (model + baseline), WER against hand-counted edits, and bad inputs."""

import json
import time

import jiwer
import numpy as np
import pytest
import torch

import run_eval
from helpers import write_clips, write_manifest
from whisper_mla import transcription
from whisper_mla.audio import SpeechDataError, load_speech_dataset


KV_LORA_RANK, KEPT_KEY_DIMS = 8, 2  # of conftest's tiny_checkpoint_dirs
TEXTS = ["hello world", "the cat sat on the mat", "testing one two three"]
REQUIRED_KEYS = {"model", "num_samples", "num_skipped", "wer", "wer_ortho", "cache_bytes_per_token",
                 "cache_bytes_per_30s_utterance", "cache_bytes_per_30s_utterance_definition", "decode_tokens_per_s"}


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    """Three tones at 22.05 kHz (resampled to 16 kHz by whisper_mla.audio) with TEXTS as transcripts, and a manifest
    of them."""
    folder = tmp_path_factory.mktemp("speech")
    write_clips(folder, TEXTS, sampling_rate=22050)
    return folder


def cli(model_dir, data, output_dir, *extra) -> dict:
    return run_eval.main(["--model_name_or_path", model_dir, "--data", str(data), "--output_dir", str(output_dir),
                          "--batch_size", "2", "--max_new_tokens", "4", "--device", "cpu", *extra])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------- end to end


def test_cli_with_baseline(tiny_checkpoint_dirs, speech_dir, tmp_path, tiny_mha):
    """Both models' transcripts and token counts are what they decode, and the cache figures are the analytic ones."""
    mha_dir, mla_dir = tiny_checkpoint_dirs
    cli(mla_dir, speech_dir / "manifest.json", tmp_path, "--baseline_model", mha_dir)

    results = json.loads((tmp_path / "results.json").read_text())
    assert REQUIRED_KEYS <= set(results) and REQUIRED_KEYS <= set(results["baseline"])
    assert results["model"] == mla_dir and results["baseline"]["model"] == mha_dir
    assert results["num_samples"] == results["baseline"]["num_samples"] == len(TEXTS)
    assert results["num_skipped"] == 0 and results["model_type"] == "whisper_mla"

    # Analytic float32 cache sizes, per decoder layer and token: MLA caches the latent plus the kept key dims of
    # every head in self and in cross attention; MHA caches keys and values (2 * d_model) in both.
    config, itemsize = tiny_mha.config, 4
    mla_per_token = config.decoder_layers * 2 * (KV_LORA_RANK + config.decoder_attention_heads * KEPT_KEY_DIMS)
    mha_per_token = config.decoder_layers * 2 * 2 * config.d_model
    assert results["cache_bytes_per_token"] == mla_per_token * itemsize
    assert results["baseline"]["cache_bytes_per_token"] == mha_per_token * itemsize
    self_bytes = cross_bytes = mla_per_token // 2 * itemsize  # MLA self and cross blocks cache the same per token
    assert results["cache_bytes_per_30s_utterance"] == cross_bytes * config.max_source_positions + self_bytes * (
        config.max_target_positions
    )
    assert results["cache_reduction_percent"] == pytest.approx(100 * (1 - mla_per_token / mha_per_token))
    for name, result in (("model", results), ("baseline", results["baseline"])):
        assert result["decode_tokens_per_s"] == pytest.approx(result["generated_tokens"] / result["generate_seconds"])
        assert result["generated_tokens"] == expected_generation(result["model"], speech_dir)[1], name

    table = results["comparison_table"].splitlines()
    assert len(table) == 4 and mla_dir in table[2] and mha_dir in table[3]

    for name, model_dir in (("predictions.jsonl", mla_dir), ("baseline_predictions.jsonl", mha_dir)):
        predictions = read_jsonl(tmp_path / name)
        assert [p["id"] for p in predictions] == ["clip0", "clip1", "clip2"]
        assert [p["reference"] for p in predictions] == TEXTS
        assert [p["hypothesis"] for p in predictions] == expected_generation(model_dir, speech_dir)[0]
        assert {"reference_normalized", "hypothesis_normalized"} <= set(predictions[0])


def expected_generation(model_dir, speech_dir) -> tuple[list[str], int]:
    """(transcripts, text and timestamp tokens) of the CLI's decoding, redone here: greedy, 4 new tokens, batches of
    2 (the batch size the CLI ran with, so that the floats are the same)."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    model = AutoModelForSpeechSeq2Seq.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    audios = [example["audio"] for example in load_speech_dataset(speech_dir / "manifest.json")]
    special = set(processor.tokenizer.all_special_ids)
    texts, num_tokens = [], 0
    for start in range(0, len(audios), 2):
        features = processor.feature_extractor(audios[start : start + 2], sampling_rate=16000,
                                               return_tensors="pt").input_features
        with torch.no_grad():
            sequences = model.generate(features, max_new_tokens=4, num_beams=1)
        num_tokens += sum(token not in special for token in sequences.flatten().tolist())
        texts += [text.strip() for text in processor.batch_decode(sequences, skip_special_tokens=True)]
    assert num_tokens > 0  # the random model does say something, so the comparisons above can fail
    return texts, num_tokens


def test_cli_refuses_existing_results(tiny_checkpoint_dirs, speech_dir, tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        cli("model-never-loaded", speech_dir / "manifest.json", tmp_path)
    results = cli(tiny_checkpoint_dirs[1], speech_dir / "manifest.json", tmp_path, "--overwrite_output_dir", "--max_samples",
                  "2", "--num_beams", "2")
    assert results["num_samples"] == 2 and "baseline" not in results
    assert len(read_jsonl(tmp_path / "predictions.jsonl")) == 2


def test_int8_cache_flag(tiny_checkpoint_dirs, speech_dir, tmp_path, tiny_mha):
    mha_dir, mla_dir = tiny_checkpoint_dirs
    results = cli(mla_dir, speech_dir / "manifest.json", tmp_path, "--mla_cache_quantization", "int8",
                  "--baseline_model", mha_dir)
    # int8 latent + kept dims and two float32 scales per token, self and cross, every decoder layer
    config = tiny_mha.config
    int8_per_token = config.decoder_layers * 2 * (KV_LORA_RANK + config.decoder_attention_heads * KEPT_KEY_DIMS + 8)
    assert results["cache_bytes_per_token"] == int8_per_token
    assert results["baseline"]["cache_bytes_per_token"] == config.decoder_layers * 2 * 2 * config.d_model * 4
    with pytest.raises(ValueError, match="applies to Whisper-MLA checkpoints.*'whisper'"):
        cli(mha_dir, speech_dir / "manifest.json", tmp_path / "mha", "--mla_cache_quantization", "int8")


# --------------------------------------------------------------------------------------------- WER


def test_wer_is_corpus_edits_over_reference_words(monkeypatch, tiny_mha, tiny_processor):
    references = ["The cat sat on the mat.", "Hello world"]
    hypotheses = ["the cat sat on mat", "Hello, there world!"]
    # Normalised: one deletion ("the") + one insertion ("there") over 6 + 2 reference words.
    # Raw: The->the, mat.->mat, -the | Hello->Hello,, +there, world->world!: 3 + 3 edits over 8 words.
    monkeypatch.setattr(transcription, "transcribe", lambda *args, **kwargs: (hypotheses, 7, 2.0))
    dataset = [{"id": str(i), "audio": np.zeros(16000, np.float32), "text": text} for i, text in enumerate(references)]

    results = transcription.evaluate_model(tiny_mha, tiny_processor, dataset)

    assert results["wer"] == 100 * 2 / 8
    assert results["wer_ortho"] == 100 * 6 / 8
    assert results["wer_ortho"] == pytest.approx(100 * jiwer.wer(references, hypotheses))
    assert results["decode_tokens_per_s"] == 3.5
    assert [p["hypothesis_normalized"] for p in results["predictions"]] == ["the cat sat on mat", "hello there world"]


def test_batch_with_a_clip_over_30s_uses_long_form(tiny_mha, tiny_processor, monkeypatch):
    """A batch holding a 35 s clip goes to generate() whole (3500 frames, not cut to 30 s) with its attention mask and
    timestamps, which Whisper's sequential long-form decoding needs; a batch of short clips keeps the 30 s window.
    The counts are those of what generate() returned."""
    calls, generate = [], tiny_mha.generate

    def spy(features, **kwargs):
        sequences = generate(features, **kwargs)
        calls.append((features.shape, kwargs, sequences))
        return sequences

    monkeypatch.setattr(tiny_mha, "generate", spy)
    clips = [np.zeros(16000 * 35, np.float32), np.zeros(16000, np.float32)]
    start = time.perf_counter()
    hypotheses, num_tokens, seconds = transcription.transcribe(tiny_mha, tiny_processor, clips, batch_size=2,
                                                               generate_kwargs={"max_new_tokens": 4})
    elapsed = time.perf_counter() - start
    (shape, kwargs, sequences), = calls
    assert tuple(shape) == (2, 80, 3500)
    assert kwargs["return_timestamps"] is True and kwargs["attention_mask"].sum(-1).tolist() == [3500, 100]
    special = set(tiny_processor.tokenizer.all_special_ids)
    assert num_tokens == sum(token not in special for token in sequences.flatten().tolist())
    assert hypotheses == [t.strip() for t in tiny_processor.batch_decode(sequences, skip_special_tokens=True)]
    assert 0 < seconds <= elapsed

    calls.clear()
    transcription.transcribe(tiny_mha, tiny_processor, clips[1:], generate_kwargs={"max_new_tokens": 4})
    (shape, kwargs, _), = calls
    assert tuple(shape) == (1, 80, 3000) and "attention_mask" not in kwargs and "return_timestamps" not in kwargs


def test_english_only_model_refuses_other_languages(tiny_mha):
    assert "language" not in transcription.build_generate_kwargs(tiny_mha, language="English", task="transcribe")
    with pytest.raises(ValueError, match="English-only"):
        transcription.build_generate_kwargs(tiny_mha, language="fr")
    with pytest.raises(ValueError, match="English-only"):
        transcription.build_generate_kwargs(tiny_mha, task="translate")


# --------------------------------------------------------------------------------------------- bad inputs


def test_missing_audio_names_the_file(tiny_checkpoint_dirs, speech_dir, tmp_path):
    manifest = write_manifest(tmp_path / "manifest.json", [
        {"path": str(speech_dir / "clip0.wav"), "text": "hello world"}, {"path": "nowhere.wav", "text": "lost"}])
    with pytest.raises(SpeechDataError, match=r"nowhere\.wav.*skip_bad"):
        cli(tiny_checkpoint_dirs[1], manifest, tmp_path / "out")


def test_invalid_json_manifest(tiny_checkpoint_dirs, tmp_path):
    (tmp_path / "broken.json").write_text('{"annotation": [')
    with pytest.raises(SpeechDataError, match=r"broken\.json is not valid JSON"):
        cli(tiny_checkpoint_dirs[1], tmp_path / "broken.json", tmp_path / "out")


def test_not_a_whisper_checkpoint(speech_dir, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="Expected a Whisper or Whisper-MLA checkpoint"):
        cli(str(tmp_path / "bert"), speech_dir / "manifest.json", tmp_path / "out")


def test_skip_bad_samples_are_counted(tiny_checkpoint_dirs, speech_dir, tmp_path):
    manifest = write_manifest(tmp_path / "manifest.json", [
        {"path": str(speech_dir / "clip0.wav"), "text": "hello world"},
        {"path": "nowhere.wav", "text": "lost"},
        {"path": str(speech_dir / "clip1.wav"), "text": "  "},
        {"path": str(speech_dir / "clip2.wav"), "text": TEXTS[2]},
    ])
    results = cli(tiny_checkpoint_dirs[1], manifest, tmp_path / "out", "--skip_bad_samples")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["num_samples"] == results["num_samples"] == 2
    assert saved["num_skipped"] == 2 and len(saved["skipped"]) == 2
    assert "nowhere.wav" in saved["skipped"][0] and "entry 2" in saved["skipped"][1]
    assert len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == 2


# --------------------------------------------------------------------------------------------- real weights


@pytest.mark.real_weights
def test_real_tiny_en_on_human_speech(tiny_en_dir, real_speech, tmp_path):
    results = run_eval.main(["--model_name_or_path", tiny_en_dir, "--data", real_speech["real_eval"], "--output_dir",
                             str(tmp_path), "--max_samples", "5", "--batch_size", "5", "--device", "cpu"])
    assert results["num_samples"] == 5
    assert results["wer"] < 15, (tmp_path / "predictions.jsonl").read_text()
    # tiny.en: 4 decoder layers, d_model 384, float32; MHA caches keys and values in self and cross attention.
    assert results["cache_bytes_per_token"] == 4 * 2 * 2 * 384 * 4
