"""Benchmark Whisper (MHA) against Whisper-MLA side by side: decoder cache bytes, peak memory and decode speed.

This module holds what is measured (model sizes, MLA variants, the checkpoints saved for the workers) and the worker:
each setting is measured in a fresh process of its own (`python -m whisper_mla.benchmark --_worker SETTING`, started
by `Worker`), so that its peak memory is its own. Its siblings: `whisper_mla.benchmark_rounds` measures the settings
in paired rounds and records the machine's load; `whisper_mla.benchmark_report` writes the warnings, results.md and
the plots.

    python run_benchmark.py --size small --output_dir outputs/benchmark --batch_sizes 1 16 --new_tokens 64
    python run_benchmark.py --model_name_or_path openai/whisper-small --output_dir outputs/benchmark
    python run_benchmark.py --model_name_or_path openai/whisper-small --mla_model_name_or_path MLA_CKPT \
        --output_dir outputs/benchmark

`run_benchmark.py` is the command line around these modules. It writes OUTPUT_DIR/results.json (run, load, records,
paired ratios, rounds, warnings), results.md and PNG plots.
"""

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from transformers import (
    AutoModelForSpeechSeq2Seq,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    WhisperConfig,
    WhisperForConditionalGeneration,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from whisper_mla.conversion import MLAArguments, convert_whisper_to_mla, load_calibration_audio
from modeling_whisper_mla import WhisperMLAForConditionalGeneration, cache_nbytes
from whisper_mla.transcription import DTYPES


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
# The measured MLA variants, one entry each. `conversion`: the MLAArguments fields the variant fixes (the run's
# arguments give the rest; variants fixing the same fields share one converted checkpoint, and a given MLA checkpoint
# serves the variants whose fields its config has). `config`: load-time settings given to from_pretrained.
PER_LAYER, SHARED = dict(cross_attention_latent="per_layer"), dict(cross_attention_latent="shared")
MLA_VARIANTS = {
    # the original Whisper_MLA layout: every cross-attention block caches a latent of its own
    "mla-naive": dict(conversion=PER_LAYER, config=dict(mla_attn_implementation="naive", mla_cache_quantization=None)),
    "mla-absorbed": dict(conversion=PER_LAYER,
                         config=dict(mla_attn_implementation="absorb", mla_cache_quantization=None)),
    "mla-absorbed-int8": dict(conversion=PER_LAYER,
                              config=dict(mla_attn_implementation="absorb", mla_cache_quantization="int8")),
    # one cross-attention latent (width --cross_kv_lora_rank) serves every decoder layer
    "mla-shared-absorbed": dict(conversion=SHARED,
                                config=dict(mla_attn_implementation="absorb", mla_cache_quantization=None)),
    "mla-shared-absorbed-int8": dict(conversion=SHARED,
                                     config=dict(mla_attn_implementation="absorb", mla_cache_quantization="int8")),
}
ATTENTIONS = ("mha", *MLA_VARIANTS)
AUDIO_FRAMES = 3000  # 30 s of log-mel frames, the only input length Whisper's encoder takes
SLOW_ENV = "WHISPER_MLA_BENCH_SLOW"  # tests only: ATTENTION:ROUND:SECONDS slows that worker's steps in that round


# --------------------------------------------------------------------------------------------- models


def injected_step_delay(attention: str, round_index: int) -> float:
    """Seconds to stall at every decoding step of `attention` in round `round_index`, from WHISPER_MLA_BENCH_SLOW
    (ATTENTION:ROUND:SECONDS): how the tests slow one worker of one round. 0 when unset."""
    spec = os.environ.get(SLOW_ENV)
    if not spec:
        return 0.0
    try:
        name, slow_round, seconds = spec.split(":")
        slow_round, seconds = int(slow_round), float(seconds)
    except ValueError:
        raise ValueError(
            f"Expected {SLOW_ENV}=ATTENTION:ROUND:SECONDS_PER_STEP (e.g. mha:1:0.5), but found {spec!r}; fix or "
            "unset it (it exists for the tests)."
        ) from None
    return seconds if (name, slow_round) == (attention, round_index) else 0.0


def checkpoint_name(attention: str) -> str:
    """Folder of the checkpoint an attention is measured with: mha, or one named after its conversion's fields
    (e.g. mla-cross_attention_latent-shared)."""
    if attention == "mha":
        return "mha"
    return "mla" + "".join(f"-{k}-{v}" for k, v in sorted(MLA_VARIANTS[attention]["conversion"].items()))


def serves(config, attention: str) -> bool:
    """Whether an MLA checkpoint (its config) has the conversion fields a variant fixes."""
    return all(getattr(config, k, None) == v for k, v in MLA_VARIANTS[attention]["conversion"].items())


def load_models(args, mla_args: MLAArguments):
    """(MHA model, {attention: MLA model}, display name) in float32 on the CPU, from a checkpoint or a size: the
    given MLA checkpoint, or one conversion per distinct `conversion` of the measured variants."""
    requested = [a for a in (args.attentions or ATTENTIONS) if a != "mha"]
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
        others = [a for a in requested if not serves(mla.config, a)]
        if args.attentions is not None and others:
            raise ValueError(
                f"--attentions {others} need {[MLA_VARIANTS[a]['conversion'] for a in others]}, but found "
                f"cross_attention_latent={getattr(mla.config, 'cross_attention_latent', None)!r} in "
                f"{args.mla_model_name_or_path}; drop them from --attentions (or leave it out: the variants that "
                "apply are measured)."
            )
        return mha, {a: mla for a in requested if a not in others}, f"{name} vs {args.mla_model_name_or_path}"
    audios, feature_extractor = None, None
    if mla_args.calibration_data is not None:
        audios = load_calibration_audio(mla_args.calibration_data, mla_args.calibration_samples)
        feature_extractor = AutoProcessor.from_pretrained(args.model_name_or_path).feature_extractor
    converted = {}  # checkpoint name: model
    for attention in requested:
        if checkpoint_name(attention) not in converted:
            converted[checkpoint_name(attention)] = convert_whisper_to_mla(
                mha, dataclasses.replace(mla_args, **MLA_VARIANTS[attention]["conversion"]), calibration_audio=audios,
                feature_extractor=feature_extractor)
    return mha, {a: converted[checkpoint_name(a)] for a in requested}, name


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


def prepare_models(args, mla_args: MLAArguments, model_dir: str):
    """Saves the MHA model and each needed MLA checkpoint in the benchmark dtype under model_dir, so that each worker
    loads only the one it measures; returns (display name, {attention: checkpoint folder}, {attention: MLA config},
    decoder prompt length). The models are freed on return."""
    mha, mlas, name = load_models(args, mla_args)
    prompt = prompt_length(mha)
    folders = {"mha": os.path.join(model_dir, "mha")}
    mha.to(DTYPES[args.dtype]).save_pretrained(folders["mha"])
    for attention, model in mlas.items():
        folders[attention] = os.path.join(model_dir, checkpoint_name(attention))
        if not os.path.exists(folders[attention]):  # variants of one conversion share it
            model.to(DTYPES[args.dtype]).save_pretrained(folders[attention])
    measured = [a for a in ATTENTIONS if a in folders and (args.attentions is None or a in args.attentions)]
    max_new_tokens = mha.config.max_target_positions - prompt
    return name, {a: folders[a] for a in measured}, {a: m.config for a, m in mlas.items()}, prompt, max_new_tokens


def describe_mla(config) -> dict:
    """The conversion settings a record needs to be read (also for a remote-code config of an older version)."""
    shared = "decoder_cross" in config.mla_targets and getattr(config, "cross_attention_latent", None) == "shared"
    return dict(mla_targets=list(config.mla_targets), kv_lora_rank=config.kv_lora_rank,
                kv_lora_ranks=getattr(config, "kv_lora_ranks", None),
                kept_key_dims=config.kept_key_dims, cross_attention_latent="shared" if shared else "per_layer",
                shared_cross_rank=(getattr(config, "cross_kv_lora_rank", None) or config.d_model) if shared else None,
                cross_latent_stride=getattr(config, "cross_latent_stride", 1) if shared else None,
                cross_latent_pooling=getattr(config, "cross_latent_pooling", "mean") if shared else None)


# --------------------------------------------------------------------------------------------- worker


class StepTimer(LogitsProcessor):
    """Records when each decoding step's logits are ready, in wall-clock and in this process's CPU time; it changes
    no scores. `delay_s` is the tests' slowdown."""

    def __init__(self, synchronize: bool, delay_s: float = 0.0):
        self.synchronize = synchronize
        self.delay_s = delay_s
        self.times, self.cpu_times = [], []

    def __call__(self, input_ids, scores):
        if self.synchronize:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if self.delay_s:
            end = time.perf_counter() + self.delay_s  # busy: it must slow the CPU-time figures too
            while time.perf_counter() < end:
                pass
        return scores


def now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def timed_generate(model, encoder_hidden, new_tokens: int, num_beams: int,
                   step_delay_s: float = 0.0) -> tuple[float, float, float, dict, int]:
    """(first step seconds, seconds of the `new_tokens - 1` steps after it, CPU seconds of these steps, cache bytes,
    cached tokens per sequence).

    Generation starts from precomputed encoder states, so repeats do not rerun the encoder. The cache is passed in
    rather than read from `return_dict_in_generate`, which would copy it per sample; it is freed on return.
    """
    timer = StepTimer(synchronize=encoder_hidden.is_cuda, delay_s=step_delay_s)
    static = getattr(model.generation_config, "cache_implementation", None) == "static"
    # a static cache is made by generate itself (as a user gets it); `capture_cache` keeps a handle on it
    cache = capture_cache(model) if static else EncoderDecoderCache(DynamicCache(), DynamicCache())
    start = now(encoder_hidden.is_cuda)
    # a fresh BaseModelOutput each time: beam search expands it in place
    model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
                   **({} if static else dict(cache=cache)), logits_processor=LogitsProcessorList([timer]),
                   **generation_kwargs(model, new_tokens, num_beams))
    if static:
        cache = cache.pop()
    if len(timer.times) != new_tokens:
        raise RuntimeError(f"Expected {new_tokens} decoding steps, but found {len(timer.times)}.")
    decode_cpu_s = timer.cpu_times[-1] - timer.cpu_times[0]
    return (timer.times[0] - start, timer.times[-1] - timer.times[0], decode_cpu_s, cache_nbytes(cache),
            int(cache.get_seq_length()))


def capture_cache(model) -> list:
    """A list that receives the cache generate() prepares for itself (a static cache) on its next call."""
    caches, prepare = [], model._prepare_cache_for_generation

    def prepare_and_keep(generation_config, model_kwargs, *args, **kwargs):
        result = prepare(generation_config, model_kwargs, *args, **kwargs)
        caches.append(model_kwargs.get("cache", model_kwargs.get("past_key_values")))
        model._prepare_cache_for_generation = prepare  # once
        return result

    model._prepare_cache_for_generation = prepare_and_keep
    return caches


def compile_static(model) -> None:
    """transformers' documented fast path for Whisper: a static cache and the forward compiled with torch.compile
    (mode "reduce-overhead", fullgraph). generate's own auto-compilation (GPU only) is switched off, so MHA and MLA
    run exactly this compiled forward."""
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. Linux's VmHWM rather than ru_maxrss, which after fork + exec also holds
    the parent's peak (here: the main process with both models)."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_worker(setting: dict) -> None:
    """Measures one setting in this (fresh) process, one round at a time, as the parent asks over JSON lines.

    Sends {"encoder_s"} once loaded and warmed up; answers each {"round": r} on stdin with that round's medians of
    `repeats` timed generations; answers {"stop": true} with the setting's record (cache bytes, peak memory, ...).
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to stderr, not into the protocol

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    transformers.logging.set_verbosity_error()
    device, dtype = torch.device(setting["device"]), DTYPES[setting["dtype"]]
    torch.set_num_threads(setting["num_threads"])
    attention, batch, beams, new_tokens = (setting[k] for k in ("attention", "batch_size", "num_beams", "new_tokens"))
    model_class, overrides = WhisperForConditionalGeneration, {}
    if attention != "mha":  # load-time config settings, as a user would pass them
        model_class = WhisperMLAForConditionalGeneration
        overrides = dict(MLA_VARIANTS[attention]["config"], share_cross_latent_across_beams=setting["share"])
    model = model_class.from_pretrained(setting["model_dir"], dtype=dtype, **overrides,
                                        attn_implementation=setting["attn_implementation"]).to(device).eval()
    if setting.get("static_compile"):
        compile_static(model)
    generator = torch.Generator().manual_seed(setting["seed"])
    features = torch.randn(batch, model.config.num_mel_bins, AUDIO_FRAMES, generator=generator).to(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with torch.inference_mode():
        model.model.encoder(features[:1])  # warm-up; batch 1 initialises the same kernels
        start = now(device.type == "cuda")
        encoder_hidden = model.model.encoder(features).last_hidden_state  # once: the same for every round
        encoder_s = now(device.type == "cuda") - start
        # warm-up of the decoder at this batch size; compiled, at the timed length (a longer static cache recompiles)
        try:
            timed_generate(model, encoder_hidden, new_tokens if setting.get("static_compile") else 2, beams)
        except Exception as error:
            if not setting.get("static_compile"):
                raise
            raise RuntimeError(
                f"--static_compile expects {attention} to decode with a static cache and a compiled forward, but it "
                f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:300]}. Fix: leave "
                f"--static_compile out, or measure only what supports it (--attentions mha)."
            ) from error
        send({"encoder_s": encoder_s})  # only now: the parent measures nothing while a worker is busy starting
        while (request := json.loads(sys.stdin.readline() or "{}")).get("round") is not None:
            delay = injected_step_delay(attention, request["round"])
            runs = [timed_generate(model, encoder_hidden, new_tokens, beams, delay) for _ in range(setting["repeats"])]
            decode_s, decode_cpu_s = (statistics.median(r[i] for r in runs) for i in (1, 2))
            tokens = batch * (new_tokens - 1)  # returned tokens: batch per step, beams or not
            send(dict(round=request["round"], first_step_s=statistics.median(r[0] for r in runs),
                      decode_tokens_per_s=tokens / decode_s, decode_step_ms=1000 * decode_s / (new_tokens - 1),
                      decode_tokens_per_cpu_s=tokens / decode_cpu_s if device.type == "cpu" else None))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the other workers measure while this one waits
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:  # includes the weights and the Python/torch runtime
        peak, peak_kind = peak_rss_bytes(), "process peak RSS"

    *_, nbytes, seq_len = runs[-1]
    sequences = batch * beams
    value_bytes = sequences * model.config.decoder_layers * encoder_hidden.element_size()  # one value, every layer
    send(dict(
        prompt_tokens=seq_len - new_tokens + 1, cache_sequences=sequences, cache_bytes=nbytes["self"] + nbytes["cross"],
        cache_bytes_self=nbytes["self"], cache_bytes_cross=nbytes["cross"],
        values_per_token_per_layer_self=nbytes["self"] / (value_bytes * seq_len),
        values_per_token_per_layer_cross=nbytes["cross"] / (value_bytes * encoder_hidden.shape[1]),
        peak_memory_bytes=peak, peak_memory_kind=peak_kind,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        attn_implementation=model.config._attn_implementation, num_threads=torch.get_num_threads(),
    ))


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent's handle on one setting's worker: started once (model loaded, encoder run), asked for one
    measurement per round, then stopped for the setting's record. It idles, using no CPU, while others measure."""

    def __init__(self, setting: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker cannot block on it
        env = dict(os.environ, OMP_NUM_THREADS=str(setting["num_threads"]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "whisper_mla.benchmark", "--_worker", json.dumps(setting)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
        )
        self.started = self._receive()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.stderr.seek(0)
            raise WorkerError(f"exit {code}: {self.stderr.read()[-2000:]}")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:  # the worker died (e.g. out of memory): _receive reports how
            pass
        return self._receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":  # one setting, measured in this process (see Worker)
        run_worker(json.loads(sys.argv[2]))
