"""The web demo (app.py): transcription and cache measurement on tiny random checkpoints, bad audio, and the page itself
driven in headless Chromium (Debian's `chromium` package, through Playwright), on tiny checkpoints and on the real
embedded default (tiny.en and its MLA conversion).

The real-default test saves its screenshot to $WHISPER_MLA_APP_SCREENSHOT when set: that is how docs/app.png is made
(`WHISPER_MLA_APP_SCREENSHOT=docs/app.png python -m pytest tests/test_app.py -k real_default`).
"""

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch


pytest.importorskip("gradio", reason="the web demo needs gradio: pip install -e '.[app]'")
import app  # noqa: E402
from modeling_whisper_mla import expected_cache_bytes_per_token  # noqa: E402
from whisper_mla.metrics import corpus_wer, normalize_english  # noqa: E402


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # a microphone that plays a beep, allowed without asking
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
ECHO_CLIP = "demo-echodone.flac"
TIMEOUT_MS = 300_000  # for anything the page waits for: a safety net on a loaded machine, not a speed requirement
FRAMES = 1500  # encoder frames of a 30 s window: the cross-attention cache holds one entry per frame


@pytest.fixture(scope="module")
def tiny_store(tiny_checkpoint_dirs):
    mha_dir, mla_dir = tiny_checkpoint_dirs
    store = app.ModelStore(app.AppArguments(mha_model=mha_dir, mla_model=mla_dir))
    store.prepare()
    assert store.error is None, store.error
    return store


@pytest.fixture(scope="module")
def echo():
    """(16 kHz waveform, reference transcript) of the first bundled example."""
    path, text = next(row for row in app.example_rows() if row[0].endswith(ECHO_CLIP))
    return app.read_audio(path, max_seconds=60), text


# --------------------------------------------------------------------------------------------- without a browser


def test_examples_are_small_real_16khz_clips():
    rows = app.example_rows()
    assert len(rows) == 3
    for path, text in rows:
        info = soundfile.info(path)
        assert info.samplerate == 16000 and info.channels == 1 and 2 < info.duration < 30, path
        assert os.path.getsize(path) < 200_000 and len(text.split()) >= 5
    assert "CC-BY-SA-3.0" in (app.EXAMPLES_DIR / "README.md").read_text()


def beam_transcript(asr, audio) -> str:
    """What the pipeline's model says about a clip of at most 30 s, decoded here with the app's beams."""
    features = asr.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        tokens = asr.model.generate(features, num_beams=app.NUM_BEAMS)
    return asr.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()


def test_cache_bytes_are_measured_on_the_real_cache(tiny_store, echo):
    audio, _ = echo
    start = time.perf_counter()
    mha = app.transcribe(tiny_store.mha, audio)
    wall = time.perf_counter() - start
    mla_asr = tiny_store.get_mla(None, int8=False)
    mla = app.transcribe(mla_asr, audio)
    assert mha.text == beam_transcript(tiny_store.mha, audio) != ""
    assert mla.text == beam_transcript(mla_asr, audio) != ""
    assert 0 < mha.seconds <= wall
    # what the formulas of the modeling file say one token costs, times what the measured cache holds: 5 beams,
    # `tokens` decoder positions, 1500 encoder frames (one cross latent per utterance when beams share it)
    per_token_mha = expected_cache_bytes_per_token(tiny_store.mha.model.config, torch.float32, mha=True)
    per_token_mla = expected_cache_bytes_per_token(mla_asr.model.config, torch.float32)
    assert mha.cache["self"] == per_token_mha["self"] * mha.cache["tokens"] * app.NUM_BEAMS
    assert mha.cache["cross"] == per_token_mha["cross"] * FRAMES * app.NUM_BEAMS
    cross_copies = 1 if mla_asr.model.shares_cross_latent_across_beams() else app.NUM_BEAMS
    assert mla.cache["self"] == per_token_mla["self"] * mla.cache["tokens"] * app.NUM_BEAMS
    assert mla.cache["cross"] == per_token_mla["cross"] * FRAMES * cross_copies
    assert mla.cache["cross"] < mha.cache["cross"] and mla.cache["self"] < mha.cache["self"]

    table = app.cache_table(mha, mla)
    total = mha.cache["self"] + mha.cache["cross"]
    assert f"| MHA, this utterance | {mha.cache['self']:,} B | {mha.cache['cross']:,} B | {total:,} B" in table
    assert f"| {64 * total:,} B" in table  # the batch-64 row: 64 x the measured bytes
    assert len(app.cache_chart(mha, mla).axes) == 2


def test_int8_cache_is_loaded_with_from_pretrained_and_measured(tiny_store, echo):
    audio, _ = echo
    plain, int8 = tiny_store.get_mla(None, int8=False), tiny_store.get_mla(None, int8=True)
    assert int8.model.config.mla_cache_quantization == "int8" and plain.model.config.mla_cache_quantization is None
    assert tiny_store.get_mla(None, int8=True) is int8  # kept: toggling back and forth does not reload
    float_cache, int8_cache = app.transcribe(plain, audio).cache, app.transcribe(int8, audio).cache
    assert int8_cache["cross"] < float_cache["cross"] / 2
    assert "int8 cache" in app.model_summary(int8)


def test_long_audio_is_transcribed_in_chunks(tiny_store, echo, monkeypatch):
    audio, _ = echo
    long_audio = np.concatenate([audio] * 25)  # 67 s
    model, calls = tiny_store.mha.model, []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: calls.append(args) or generate(*args, **kwargs))
    result = app.transcribe(tiny_store.mha, long_audio)
    assert len(calls) == 3  # 30 s windows with the pipeline's default overlap of 5 s at each side
    monkeypatch.undo()
    expected = tiny_store.mha(long_audio, chunk_length_s=30, generate_kwargs={"num_beams": app.NUM_BEAMS})["text"]
    assert result.text == expected.strip() != ""
    assert result.cache["tokens"] < model.generation_config.max_length  # one window's cache, not the sum
    assert "largest 30 s window" in app.stats_markdown(tiny_store.mha, result, len(long_audio) / 16000)


def test_word_timestamps(tiny_store, echo):
    audio, _ = echo
    result = app.transcribe(tiny_store.get_mla(None, int8=False), audio, word_timestamps=True)
    assert result.words and "".join(word for word, _, _ in result.words) == result.text.replace(" ", "")
    # a random model's alignment is arbitrary, but within the 30 s window and ordered
    assert all(0 <= start <= end <= 30 for _, start, end in result.words if end is not None)
    assert len(app.words_text(result).splitlines()) == len(result.words)


def test_bad_audio_gets_a_clear_message(tmp_path):
    with pytest.raises(app.AudioInputError, match="No audio: record with the microphone"):
        app.read_audio(None, 60)
    corrupt = tmp_path / "notes.wav"
    corrupt.write_bytes(b"this is not audio" * 100)
    with pytest.raises(app.AudioInputError, match="Could not read notes.wav as audio. Expected WAV, FLAC"):
        app.read_audio(str(corrupt), 60)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(app.AudioInputError, match="holds no audio samples"):
        app.read_audio(str(empty), 60)
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(app.AudioInputError, match="silent"):
        app.read_audio(str(silent), 60)
    long = tmp_path / "long.flac"
    soundfile.write(long, 0.1 * np.ones(12 * 8000, dtype=np.float32), 8000)
    with pytest.raises(app.AudioInputError, match="is 12 s long, but this demo takes at most 10 s"):
        app.read_audio(str(long), 10)
    assert app.read_audio(str(long), 20).shape == (12 * 16000,)  # resampled to 16 kHz


def test_swapped_checkpoints_are_refused(tiny_checkpoint_dirs):
    mha_dir, mla_dir = tiny_checkpoint_dirs
    with pytest.raises(ValueError, match="Expected a Whisper-MLA checkpoint .* found model_type 'whisper'"):
        app.load_asr_pipeline(mha_dir, "cpu", "float32", None, mla=True)
    with pytest.raises(ValueError, match="Expected an original Whisper checkpoint .* found model_type 'whisper_mla'"):
        app.load_asr_pipeline(mla_dir, "cpu", "float32", None, mla=False)


def test_default_conversion_is_cached_by_its_settings(tiny_checkpoint_dirs, monkeypatch, tmp_path):
    monkeypatch.setenv("WHISPER_MLA_CACHE", str(tmp_path))
    mha_dir, _ = tiny_checkpoint_dirs
    folder = app.default_conversion_dir(mha_dir, app.MLAArguments())
    assert folder.parent == tmp_path / "models" and folder.name.startswith("mha-mla-")
    assert app.default_conversion_dir(mha_dir, app.MLAArguments()) == folder
    assert app.default_conversion_dir(mha_dir, app.MLAArguments(kv_lora_rank=96)) != folder


def test_default_first_start_prepares_no_speech(tiny_checkpoint_dirs, monkeypatch, tmp_path):
    """The exact default needs no calibration: the first start converts without preparing or reading any speech;
    settings that are not exact still ask for it."""
    monkeypatch.setenv("WHISPER_MLA_CACHE", str(tmp_path))
    mha_dir, _ = tiny_checkpoint_dirs

    def refuse(*args, **kwargs):
        raise AssertionError("calibration speech was prepared")

    monkeypatch.setattr(app, "ensure_real_speech", refuse)
    monkeypatch.setattr(app, "load_calibration_audio", refuse)
    messages = []
    mha, mla = app.ensure_default_mla(mha_dir, report=messages.append)
    assert mha == mha_dir and Path(mla).parent == tmp_path / "models"
    provenance = json.loads((Path(mla) / "config.json").read_text())["mla_conversion"]
    assert provenance["calibration_clips"] == 0 and provenance["activation_aware"] is False
    assert "nothing to calibrate" in messages[-1] and not any("calibration speech" in m for m in messages)
    assert app.ensure_default_mla(mha_dir, report=messages.append) == (mha, mla)  # cached: no second conversion
    with pytest.raises(AssertionError, match="calibration speech was prepared"):
        app.ensure_default_mla(mha_dir, mla_args=app.MLAArguments(kv_lora_rank=8))


# --------------------------------------------------------------------------------------------- in Chromium


@pytest.fixture
def chromium_page():
    """A page of Debian's Chromium, headless, driven by Playwright (its own browser download is not needed)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright: pip install -e "
                                   "'.[dev]'")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("The browser tests need Debian's Chromium: `apt-get install chromium` (scripts/install.sh).")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, permissions=["microphone"])
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


@contextlib.contextmanager
def serve(store):
    """The app of `store` on localhost (the first free port from 7860), as `app.main` launches it."""
    demo = app.build_demo(store, store.args)
    app.launch(demo, store.args, prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


def wait_for_status(page, pattern: str) -> str:
    page.locator("#status").get_by_text(re.compile(pattern)).wait_for()
    return page.inner_text("#status")


def page_cache_row(page, label: str) -> list[int]:
    """The byte counts (self, cross, total) of one row of the page's cache table."""
    row = page.locator("#cache-table tr", has_text=label).inner_text()
    return [int(number.replace(",", "")) for number in re.findall(r"([\d,]+) B\b", row)]


@pytest.mark.browser
@pytest.mark.slow
def test_page_in_chromium(tiny_checkpoint_dirs, tiny_store, echo, chromium_page, tmp_path):
    from playwright.sync_api import expect

    mha_dir, mla_dir = tiny_checkpoint_dirs
    store = app.ModelStore(app.AppArguments(mha_model=mha_dir, mla_model=mla_dir))  # started once the page is up
    page = chromium_page
    with serve(store) as url:
        page.goto(url)
        assert "Preparing" in page.inner_text("#status")
        page.click("#transcribe")  # too early: the page says so instead of failing
        page.locator("[data-testid=toast-body]", has_text="Preparing").wait_for()
        store.start()
        assert "Ready: original" in wait_for_status(page, "Ready")

        # an example: its reference transcript shows, both models transcribe it, the chart and the table appear.
        # Each step below waits for a status that differs from the one before it.
        page.get_by_text(ECHO_CLIP).click()
        audio, reference = echo
        expect(page.locator("#reference textarea")).to_have_value(reference, timeout=TIMEOUT_MS)
        page.click("#transcribe")
        assert "Transcribed 2.7 s of audio with both models (5 beams)." in wait_for_status(page, "Transcribed|Error")
        mha, mla = app.transcribe(tiny_store.mha, audio), app.transcribe(tiny_store.get_mla(None, False), audio)
        assert page.locator("#mha-text textarea").input_value() == mha.text != ""
        assert page.locator("#mla-text textarea").input_value() == mla.text != ""
        assert page_cache_row(page, "MHA, this utterance") == [
            mha.cache["self"], mha.cache["cross"], mha.cache["self"] + mha.cache["cross"]]
        assert page_cache_row(page, "MLA, this utterance") == [
            mla.cache["self"], mla.cache["cross"], mla.cache["self"] + mla.cache["cross"]]
        chart = page.locator("#cache-plot img")
        assert chart.evaluate("img => img.complete && img.naturalWidth") > 500
        assert not page.locator("#mla-words").is_visible()
        page.screenshot(path=tmp_path / "app.png", full_page=True)
        assert (tmp_path / "app.png").stat().st_size > 50_000

        # word timestamps, then the int8 cache from the settings panel
        page.locator("#word-timestamps input").check()
        page.click("#transcribe")
        assert "word timestamps)" in wait_for_status(page, "word timestamps|Error")
        assert len(page.locator("#mla-words textarea").input_value().splitlines()) > 0
        page.locator("#settings").get_by_text("Settings").click()
        page.locator("#int8 input").check()
        page.click("#transcribe")
        assert "int8 MLA cache)" in wait_for_status(page, "int8|Error")
        assert "int8 cache" in page.inner_text("#mla-stats")

        # a checkpoint that does not exist, then a file that is not audio: a message in the page, no trace
        page.locator("#mla-checkpoint textarea").fill(str(tmp_path / "missing"))
        page.click("#transcribe")
        assert "missing" in wait_for_status(page, "Error")
        assert "Traceback" not in page.content()
        page.locator("#mla-checkpoint textarea").fill("")
        corrupt = tmp_path / "notes.wav"
        corrupt.write_bytes(b"this is not audio" * 100)
        page.locator("#audio button[aria-label=Clear]").click()  # the example's player gives way to the upload area
        page.locator("#audio input[type=file]").set_input_files(str(corrupt))
        page.click("#transcribe")
        assert "Could not read notes.wav as audio" in wait_for_status(page, "notes.wav|Transcribed")

        # the microphone (Chromium's fake one): the browser records, gradio uploads a WAV, both models transcribe it
        page.locator("#audio button[aria-label=Clear]").click()
        page.locator("#audio button[aria-label='Record audio']").click()
        page.locator("#audio button", has_text="Record").first.click()
        page.wait_for_timeout(2000)  # record for about 2 s
        page.locator("#audio button", has_text="Stop").first.click()
        page.locator("#audio button[aria-label=Play]").wait_for()
        page.click("#transcribe")
        status = wait_for_status(page, "Transcribed|Error: (?!Could not read notes)")
        assert float(re.search(r"Transcribed ([\d.]+) s", status).group(1)) >= 1.0
        assert page.locator("#mla-text textarea").input_value()


@pytest.mark.browser
@pytest.mark.real_weights
@pytest.mark.slow
def test_real_default_in_chromium(chromium_page, monkeypatch, tmp_path):
    """The embedded default: the packaged tiny.en and its MLA conversion (converted now: the session's cache is new)."""
    from playwright.sync_api import expect

    monkeypatch.delenv(app.ENV_MHA_MODEL, raising=False)
    monkeypatch.delenv(app.ENV_MLA_MODEL, raising=False)
    store = app.ModelStore(app.AppArguments()).start()
    page = chromium_page
    with serve(store) as url:
        page.goto(url)
        page.set_default_timeout(1_800_000)  # the first start converts tiny.en: minutes on a busy CPU
        assert "Ready: original" in wait_for_status(page, "Ready|Error")
        page.set_default_timeout(TIMEOUT_MS)
        page.get_by_text(ECHO_CLIP).click()
        expect(page.locator("#reference textarea")).to_have_value(re.compile("echo"), timeout=TIMEOUT_MS)
        page.click("#transcribe")
        wait_for_status(page, "Transcribed|Error")
        reference = page.locator("#reference textarea").input_value()
        for key in ("mha", "mla"):
            text = page.locator(f"#{key}-text textarea").input_value()
            assert corpus_wer([normalize_english(reference)], [normalize_english(text)]) <= 0.2, (key, text)
        mha_total = page_cache_row(page, "MHA, this utterance")[2]
        assert page_cache_row(page, "MLA, this utterance")[2] < mha_total / 2
        page.screenshot(path=tmp_path / "app.png", full_page=True)
        if os.environ.get("WHISPER_MLA_APP_SCREENSHOT"):
            shutil.copyfile(tmp_path / "app.png", os.environ["WHISPER_MLA_APP_SCREENSHOT"])
