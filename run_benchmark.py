"""Benchmark Whisper (MHA) against Whisper-MLA side by side: decoder cache bytes, peak memory and decode speed.

One run measures MHA, MLA with the naive path and MLA with the absorbed path under the same conditions (30 s of
random log-mel audio, a forced number of generated tokens, greedy and beam search), each setting in a fresh
subprocess so that its peak memory is its own.

    python run_benchmark.py --size small --output_dir outputs/benchmark --batch_sizes 1 16 --new_tokens 64
    python run_benchmark.py --model_name_or_path openai/whisper-small --output_dir outputs/benchmark
    python run_benchmark.py --model_name_or_path openai/whisper-small --mla_model_name_or_path MLA_CKPT \
        --output_dir outputs/benchmark

Writes OUTPUT_DIR/results.json (one record per setting), results.md (MLA/MHA ratios) and PNG plots.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSpeechSeq2Seq,
    AutoProcessor,
    HfArgumentParser,
    LogitsProcessor,
    LogitsProcessorList,
    WhisperConfig,
    WhisperForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from convert_whisper_to_mla import MLAArguments, convert_whisper_to_mla, load_calibration_audio
from modeling_whisper_mla import WhisperMLAForConditionalGeneration, cache_nbytes


# Shapes of OpenAI's checkpoints (random weights stand in for the real ones: speed and memory depend on shapes only).
_OPENAI = dict(vocab_size=51865, num_mel_bins=80, decoder_start_token_id=50258, eos_token_id=50257,
               pad_token_id=50257, bos_token_id=50257, max_source_positions=1500, max_target_positions=448)
SIZES = {
    "tiny": dict(_OPENAI, d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                 decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536),
    "base": dict(_OPENAI, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                 decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048),
    "small": dict(_OPENAI, d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    "medium": dict(_OPENAI, d_model=1024, encoder_layers=24, decoder_layers=24, encoder_attention_heads=16,
                   decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096),
    "large-v3": dict(_OPENAI, vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32,
                     decoder_layers=32, encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
                     decoder_ffn_dim=5120),
    # For tests: seconds on a CPU. Needs --kv_lora_rank <= 64.
    "test-tiny": dict(vocab_size=256, num_mel_bins=80, decoder_start_token_id=1, eos_token_id=2, pad_token_id=2,
                      bos_token_id=2, max_source_positions=1500, max_target_positions=448, d_model=64,
                      encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                      encoder_ffn_dim=128, decoder_ffn_dim=128, begin_suppress_tokens=None, suppress_tokens=None),
}
ATTENTIONS = ("mha", "mla-naive", "mla-absorbed", "mla-absorbed-int8")
MLA_VARIANTS = {  # config settings of each measured MLA variant
    "mla-naive": dict(mla_attn_implementation="naive", mla_cache_quantization=None),
    "mla-absorbed": dict(mla_attn_implementation="absorb", mla_cache_quantization=None),
    "mla-absorbed-int8": dict(mla_attn_implementation="absorb", mla_cache_quantization="int8"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUDIO_FRAMES = 3000  # 30 s of log-mel frames, the only input length Whisper's encoder takes
MIB = 2**20


@dataclass
class BenchmarkArguments:
    output_dir: str = field(metadata={"help": "Where results.json, results.md and the plots are written."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A transformers Whisper checkpoint (MHA); converted to MLA on the fly."}
    )
    mla_model_name_or_path: str | None = field(
        default=None, metadata={"help": "An existing Whisper-MLA checkpoint (trust_remote_code) instead of converting."}
    )
    size: str | None = field(
        default=None,
        metadata={"help": "Random weights with the shapes of OpenAI's model of this size, instead of a checkpoint.",
                  "choices": list(SIZES)},
    )
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 16, 64], metadata={"help": "Batch sizes."})
    new_tokens: list[int] = field(
        default_factory=lambda: [32, 128, 448],
        metadata={"help": "Generated tokens per sequence (forced; capped at max_target_positions minus the prompt)."},
    )
    num_beams: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "1 is greedy, >1 beam search."})
    attentions: list[str] = field(
        default_factory=lambda: list(ATTENTIONS),
        metadata={"help": "What is measured; ratios need mha.", "choices": list(ATTENTIONS)},
    )
    repeats: int = field(default=3, metadata={"help": "Timed generations per setting (after one warm-up); medians."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(
        default="auto",
        metadata={"help": "auto: float32 on CPU, float16 on GPU.", "choices": ["auto", *DTYPES]},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Kernel of MHA and of the naive MLA path.", "choices": ["sdpa", "eager"]}
    )
    share_cross_latent_across_beams: bool = field(
        default=True,
        metadata={"help": "Beam search caches one cross-attention latent per utterance (False: one per beam)."},
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads of each measurement (default: torch's choice)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of random weights and random audio features."})


@dataclass
class BenchmarkMLAArguments(MLAArguments):
    """The converter's settings, defaulting to the original Whisper_MLA setting whose cache the targets are set for."""

    kv_lora_rank: int = field(
        default=96, metadata={"help": "Latent width cached per token and converted block (Whisper_MLA: 96)."}
    )


# --------------------------------------------------------------------------------------------- models


def validate_arguments(args: BenchmarkArguments, mla_args: MLAArguments) -> None:
    """Fails early, naming what was expected; resolves dtype "auto"."""
    if (args.model_name_or_path is None) == (args.size is None):
        raise ValueError(
            f"Expected exactly one of --model_name_or_path or --size, but found model_name_or_path="
            f"{args.model_name_or_path!r} and size={args.size!r}; pass a checkpoint or e.g. --size small."
        )
    if args.mla_model_name_or_path is not None and args.model_name_or_path is None:
        raise ValueError(
            "--mla_model_name_or_path is compared against its MHA original, but found no --model_name_or_path; "
            "pass the MHA checkpoint it was converted from."
        )
    if mla_args.calibration_data is not None and args.size is not None:
        raise ValueError(
            f"--calibration_data calibrates real weights, but found random ones (--size {args.size}); pass "
            "--model_name_or_path or drop --calibration_data."
        )
    if min(args.new_tokens) < 2 or min(args.batch_sizes) < 1 or min(args.num_beams) < 1 or args.repeats < 1:
        raise ValueError(
            f"Expected new_tokens >= 2 (decode speed is timed over the steps after the first), batch_sizes, num_beams "
            f"and repeats >= 1, but found new_tokens={args.new_tokens}, batch_sizes={args.batch_sizes}, "
            f"num_beams={args.num_beams}, repeats={args.repeats}; raise them."
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"Expected a GPU for --device {args.device}, but found none; pass --device cpu.")
    if args.dtype == "auto":
        args.dtype = "float32" if args.device == "cpu" else "float16"


def load_models(args: BenchmarkArguments, mla_args: MLAArguments):
    """(MHA model, MLA model, display name) in float32 on the CPU, from a checkpoint or from a size."""
    if args.size is not None:
        torch.manual_seed(args.seed)
        mha = WhisperForConditionalGeneration(WhisperConfig(**SIZES[args.size])).eval()
        name = f"whisper-{args.size} (random weights)"
    else:
        mha = WhisperForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()
        name = args.model_name_or_path
    if args.mla_model_name_or_path is not None:
        mla = AutoModelForSpeechSeq2Seq.from_pretrained(
            args.mla_model_name_or_path, trust_remote_code=True, dtype=torch.float32
        ).eval()
        return mha, mla, f"{name} vs {args.mla_model_name_or_path}"
    audios, feature_extractor = None, None
    if mla_args.calibration_data is not None:
        audios = load_calibration_audio(mla_args.calibration_data, mla_args.calibration_samples)
        feature_extractor = AutoProcessor.from_pretrained(args.model_name_or_path).feature_extractor
    mla = convert_whisper_to_mla(mha, mla_args, calibration_audio=audios, feature_extractor=feature_extractor)
    return mha, mla, name


def generation_kwargs(model, new_tokens: int, num_beams: int) -> dict:
    """Exactly `new_tokens` generated tokens (eos suppressed until then); no timestamps, no language detection."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False,
                  return_timestamps=False)
    if getattr(model.generation_config, "is_multilingual", False):
        kwargs.update(language="en", task="transcribe")
    return kwargs


def prompt_length(model) -> int:
    """Decoder prompt tokens Whisper's generate puts before the generated ones (start, language, task, ...)."""
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    features = torch.zeros(1, model.config.num_mel_bins, AUDIO_FRAMES, dtype=model.dtype)
    with torch.inference_mode():
        model.generate(features, cache=cache, **generation_kwargs(model, 1, 1))
    return cache.get_seq_length()  # prompt + generated - 1: the last token is never fed back


# --------------------------------------------------------------------------------------------- worker


class StepTimer(LogitsProcessor):
    """Records when each decoding step's logits are ready; it changes no scores."""

    def __init__(self, synchronize: bool):
        self.synchronize = synchronize
        self.times = []

    def __call__(self, input_ids, scores):
        if self.synchronize:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def timed_generate(model, encoder_hidden, new_tokens: int, num_beams: int) -> tuple[float, float, dict, int]:
    """(first step seconds, seconds of the `new_tokens - 1` steps after it, cache bytes, cached tokens per sequence).

    Generation starts from precomputed encoder states, so repeats do not rerun the encoder. The cache is passed in
    rather than read from `return_dict_in_generate`, which would copy it per sample; it is freed on return.
    """
    timer = StepTimer(synchronize=encoder_hidden.is_cuda)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    start = now(encoder_hidden.is_cuda)
    # a fresh BaseModelOutput each time: beam search expands it in place
    model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), cache=cache,
                   logits_processor=LogitsProcessorList([timer]), **generation_kwargs(model, new_tokens, num_beams))
    if len(timer.times) != new_tokens:
        raise RuntimeError(f"Expected {new_tokens} decoding steps, but found {len(timer.times)}.")
    return timer.times[0] - start, timer.times[-1] - timer.times[0], cache_nbytes(cache), cache.get_seq_length()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. Linux's VmHWM rather than ru_maxrss, which after fork + exec also holds
    the parent's peak (here: the main process with both models)."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_worker(setting: dict) -> dict:
    """Measures one setting in this (fresh) process; the result is written to setting["result_file"]."""
    transformers.logging.set_verbosity_error()
    device, dtype = torch.device(setting["device"]), DTYPES[setting["dtype"]]
    if setting["num_threads"] is not None:
        torch.set_num_threads(setting["num_threads"])
    attention, batch, beams, new_tokens = (setting[k] for k in ("attention", "batch_size", "num_beams", "new_tokens"))
    model_class = WhisperForConditionalGeneration if attention == "mha" else WhisperMLAForConditionalGeneration
    model = model_class.from_pretrained(setting["model_dir"], dtype=dtype,
                                        attn_implementation=setting["attn_implementation"]).to(device).eval()
    if attention != "mha":
        for key, value in dict(MLA_VARIANTS[attention], share_cross_latent_across_beams=setting["share"]).items():
            setattr(model.config, key, value)
    generator = torch.Generator().manual_seed(setting["seed"])
    features = torch.randn(batch, model.config.num_mel_bins, AUDIO_FRAMES, generator=generator).to(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with torch.inference_mode():
        model.model.encoder(features[:1])  # warm-up; batch 1 initialises the same kernels
        start = now(device.type == "cuda")
        encoder_hidden = model.model.encoder(features).last_hidden_state  # once: it is the same for every repeat
        encoder_s = now(device.type == "cuda") - start
        timed_generate(model, encoder_hidden, 2, beams)  # warm-up of the decoder at this batch size
        runs = [timed_generate(model, encoder_hidden, new_tokens, beams) for _ in range(setting["repeats"])]
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:  # includes the weights and the Python/torch runtime
        peak, peak_kind = peak_rss_bytes(), "process peak RSS"

    _, _, nbytes, seq_len = runs[-1]
    sequences = batch * beams
    value_bytes = sequences * model.config.decoder_layers * encoder_hidden.element_size()  # one value, every layer
    decode_s = statistics.median(r[1] for r in runs)
    result = dict(
        attention=attention, batch_size=batch, num_beams=beams, new_tokens=new_tokens,
        prompt_tokens=seq_len - new_tokens + 1, cache_sequences=sequences, cache_bytes=nbytes["self"] + nbytes["cross"],
        cache_bytes_self=nbytes["self"], cache_bytes_cross=nbytes["cross"],
        values_per_token_per_layer_self=nbytes["self"] / (value_bytes * seq_len),
        values_per_token_per_layer_cross=nbytes["cross"] / (value_bytes * encoder_hidden.shape[1]),
        peak_memory_bytes=peak, peak_memory_kind=peak_kind,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        encoder_s=encoder_s, first_step_s=statistics.median(r[0] for r in runs),
        decode_tokens_per_s=batch * (new_tokens - 1) / decode_s,  # returned tokens: batch per step, beams or not
        decode_step_ms=1000 * decode_s / (new_tokens - 1),
        attn_implementation=model.config._attn_implementation, num_threads=torch.get_num_threads(),
    )
    with open(setting["result_file"], "w") as f:
        json.dump(result, f)
    return result


def measure_in_subprocess(setting: dict) -> dict:
    """Runs `run_worker` in a fresh interpreter; an out-of-memory or crash becomes an `error` record."""
    with tempfile.TemporaryDirectory() as tmp:
        setting = dict(setting, result_file=os.path.join(tmp, "result.json"))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(setting)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(setting["result_file"]):
            keys = ("attention", "batch_size", "num_beams", "new_tokens")
            return {**{k: setting[k] for k in keys}, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
        with open(setting["result_file"]) as f:
            return json.load(f)


# --------------------------------------------------------------------------------------------- reports


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} CPUs)"


def fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + unit


def get(record: dict, key: str, scale: float = 1.0):
    """record[key] / scale, or None where the measurement is missing or failed."""
    return record[key] / scale if record.get(key) is not None else None


def ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def encoder_first_step_s(record: dict):
    return record["encoder_s"] + record["first_step_s"] if "encoder_s" in record else None


def ratio_cells(mha: dict, naive: dict, absorbed: dict, int8: dict) -> list[str]:
    """Markdown cells of one setting: MHA and MLA values and their MLA/MHA ratios."""

    def reduction(record):
        cache_ratio = ratio(get(record, "cache_bytes"), get(mha, "cache_bytes"))
        return fmt(None if cache_ratio is None else 100 * (1 - cache_ratio), ".1f", "%")

    return [
        fmt(get(mha, "cache_bytes", MIB), ".1f"), fmt(get(absorbed, "cache_bytes", MIB), ".1f"),
        reduction(absorbed), reduction(int8),
        fmt(get(mha, "peak_memory_bytes", MIB), ".0f"), fmt(get(absorbed, "peak_memory_bytes", MIB), ".0f"),
        *(fmt(ratio(get(r, "peak_memory_bytes"), get(mha, "peak_memory_bytes")), ".2f") for r in (absorbed, naive, int8)),
        *(fmt(get(r, "decode_tokens_per_s"), ".1f") for r in (mha, absorbed)),
        *(fmt(ratio(get(r, "decode_tokens_per_s"), get(mha, "decode_tokens_per_s")), ".2f", "x")
          for r in (absorbed, naive, int8)),
        fmt(ratio(encoder_first_step_s(absorbed), encoder_first_step_s(mha)), ".2f"),
    ]


def markdown_report(records: list[dict], header: dict) -> str:
    """A table of MLA/MHA ratios per (batch, beams, new tokens), then every record."""
    by_key = {(r["batch_size"], r["num_beams"], r["new_tokens"], r["attention"]): r for r in records}
    lines = [
        "# Whisper MHA vs MLA benchmark", "", *(f"- {k}: {v}" for k, v in header.items()), "",
        "Cache: bytes the decoder cache holds after generation (self + cross attention, all layers; beam search keeps "
        "batch x beams sequences). Peak: peak memory of a fresh process per setting, weights included. tok/s: "
        "returned tokens per second over the decoding steps after the first. enc+1st: encoder pass plus first "
        "decoding step. abs: MLA, absorbed path; naive: MLA, latent expanded to keys and values; int8: absorbed "
        "path with the int8 latent cache.", "",
        "| batch | beams | new tokens | cache MHA MiB | cache abs MiB | cache reduction abs | cache reduction int8 "
        "| peak MHA MiB | peak abs MiB | peak abs/MHA | peak naive/MHA | peak int8/MHA | tok/s MHA | tok/s abs "
        "| tok/s abs/MHA | tok/s naive/MHA | tok/s int8/MHA | enc+1st abs/MHA |",
        "|" + "---|" * 18,
    ]
    for batch, beams, new_tokens in sorted({k[:3] for k in by_key}, key=lambda k: (k[1], k[2], k[0])):
        mha, naive, absorbed, int8 = (by_key.get((batch, beams, new_tokens, a), {}) for a in ATTENTIONS)
        cells = [str(batch), str(beams), str(new_tokens), *ratio_cells(mha, naive, absorbed, int8)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## All records", "",
              "| attention | batch | beams | new tokens | cache self B | cache cross B | values/token/layer self, "
              "cross | peak MiB | encoder s | first step s | decode step ms | tok/s |", "|" + "---|" * 12]
    for r in records:
        if "error" in r:
            reason = r["error"].strip().splitlines()[-1][:100] if r["error"].strip() else "no output"
            lines.append(f"| {r['attention']} | {r['batch_size']} | {r['num_beams']} | {r['new_tokens']} | "
                         f"failed: {reason} |" + " |" * 7)
            continue
        lines.append(
            f"| {r['attention']} | {r['batch_size']} | {r['num_beams']} | {r['new_tokens']} | {r['cache_bytes_self']} "
            f"| {r['cache_bytes_cross']} | {r['values_per_token_per_layer_self']:g}, "
            f"{r['values_per_token_per_layer_cross']:g} | {r['peak_memory_bytes'] / MIB:.0f} | {r['encoder_s']:.2f} "
            f"| {r['first_step_s']:.3f} | {r['decode_step_ms']:.1f} | {r['decode_tokens_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_versus_batch_size(records: list[dict], metric: str, ylabel: str, path: str, scale: float = 1.0) -> None:
    """One panel per new-token count; a line per attention (colour) and beam count (line style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    if not ok:
        return
    new_tokens = sorted({r["new_tokens"] for r in ok})
    batch_sizes = sorted({r["batch_size"] for r in ok})
    fig, axes = plt.subplots(1, len(new_tokens), figsize=(5 * len(new_tokens), 4.4), squeeze=False)
    fig.suptitle(f"{ok[0]['model']}, {ok[0]['dtype']}, {ok[0]['device_name']}", fontsize=9)
    for ax, n in zip(axes[0], new_tokens):
        for color, attention in zip(("tab:gray", "tab:orange", "tab:blue", "tab:green"), ATTENTIONS):
            for style, beams in zip(("-", "--", ":", "-."), sorted({r["num_beams"] for r in ok})):
                points = sorted((r["batch_size"], r[metric] / scale) for r in ok
                                if (r["attention"], r["num_beams"], r["new_tokens"]) == (attention, beams, n))
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=color, label=f"{attention}, beams={beams}")
        ax.set(xscale="log", xlabel="batch size", ylabel=ylabel, title=f"{n} new tokens")
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def prepare_models(args: BenchmarkArguments, mla_args: MLAArguments, model_dir: str):
    """Saves the MHA and MLA models under model_dir/{mha,mla} in the benchmark dtype, so that each worker loads only
    the one it measures; returns (display name, MLA config, decoder prompt length). The models are freed on return."""
    mha, mla, name = load_models(args, mla_args)
    prompt = prompt_length(mha)
    for kind, model in (("mha", mha), ("mla", mla)):
        model.to(DTYPES[args.dtype]).save_pretrained(os.path.join(model_dir, kind))
    return name, mla.config, prompt


def write_reports(records: list[dict], header: dict, output_dir: str) -> None:
    """results.json, results.md and the plots."""
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown_report(records, header))
    for metric, label, name, scale in (
        ("peak_memory_bytes", "peak memory (MiB)", "memory_vs_batch_size.png", MIB),
        ("cache_bytes", "decoder cache (MiB)", "cache_vs_batch_size.png", MIB),
        ("decode_tokens_per_s", "decode tokens/s", "tokens_per_s_vs_batch_size.png", 1.0),
    ):
        plot_versus_batch_size(records, metric, label, os.path.join(output_dir, name), scale=scale)


def main():
    parser = HfArgumentParser((BenchmarkArguments, BenchmarkMLAArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        args, mla_args = parser.parse_json_file(sys.argv[1])
    else:
        args, mla_args = parser.parse_args_into_dataclasses()

    # 1. Check the arguments before any expensive work.
    validate_arguments(args, mla_args)
    os.makedirs(args.output_dir, exist_ok=True)
    transformers.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as model_dir:
        # 2. Load (or build) the MHA model, convert it to MLA (or load that too) and save both for the workers.
        model_name, mla_config, prompt = prepare_models(args, mla_args, model_dir)

        # 3. The grid, with generated lengths capped at what max_target_positions leaves after the prompt.
        new_tokens = sorted({min(n, mla_config.max_target_positions - prompt) for n in args.new_tokens})
        settings = [
            dict(model_dir=os.path.join(model_dir, "mha" if attention == "mha" else "mla"), attention=attention,
                 batch_size=batch, num_beams=beams, new_tokens=n, repeats=args.repeats, device=args.device,
                 dtype=args.dtype, attn_implementation=args.attn_implementation, num_threads=args.num_threads,
                 share=args.share_cross_latent_across_beams, seed=args.seed)
            for beams in args.num_beams for n in new_tokens for batch in args.batch_sizes
            for attention in args.attentions
        ]

        # 4. Measure every setting in a fresh process; partial results are saved as they come.
        common = dict(model=model_name, device=args.device, device_name=machine_description(args.device),
                      dtype=args.dtype, kv_lora_rank=mla_config.kv_lora_rank, kept_key_dims=mla_config.kept_key_dims,
                      mla_targets=mla_config.mla_targets, torch_version=torch.__version__,
                      transformers_version=transformers.__version__)
        records = []
        for setting in (progress := tqdm(settings, desc="benchmark", unit="setting")):
            progress.set_postfix_str(f"{setting['attention']} b={setting['batch_size']} beams={setting['num_beams']} "
                                     f"n={setting['new_tokens']}")
            records.append({**common, **measure_in_subprocess(setting)})
            with open(os.path.join(args.output_dir, "results.json"), "w") as f:
                json.dump(records, f, indent=1)

    # 5. Report: results.json, the Markdown table of MLA/MHA ratios, the plots.
    threads = "/".join(sorted({str(r["num_threads"]) for r in records if "num_threads" in r}))
    header = {
        "command": f"`python run_benchmark.py {' '.join(sys.argv[1:])}`",
        "model": model_name,
        "device": f"{args.device}: {common['device_name']}" + (f", torch threads: {threads}" if threads else ""),
        "dtype": args.dtype,
        "attention kernel (MHA, naive MLA)": args.attn_implementation,
        "MLA": f"{', '.join(mla_config.mla_targets)}; kv_lora_rank {mla_config.kv_lora_rank}, "
               f"kept_key_dims {mla_config.kept_key_dims}; beams share the cross latent: "
               f"{args.share_cross_latent_across_beams}",
        "input": f"30 s of random log-mel features, {prompt}-token decoder prompt, forced generated length",
        "timing": f"medians of {args.repeats} generations after a warm-up; encoder timed once per setting",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }
    write_reports(records, header, args.output_dir)
    failed = sum("error" in r for r in records)
    print(f"Wrote {len(records)} records ({failed} failed) to {args.output_dir}: results.json, results.md, plots.")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":  # hidden: one setting, measured in this process
        run_worker(json.loads(sys.argv[2]))
    else:
        main()
