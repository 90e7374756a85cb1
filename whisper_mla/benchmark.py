"""Benchmark Whisper (MHA) against Whisper-MLA side by side: decoder cache bytes, peak memory and decode speed.

One run measures MHA and every MLA variant (naive path, absorbed path, int8 cache, ...) under the same conditions
(30 s of random log-mel audio, a forced number of generated tokens, greedy and beam search). Each setting has its
own fresh worker process, so that its peak memory is its own. Speed is measured in rounds, so that it survives a
shared machine: in every round each setting's worker runs one timed generation, in an order rotated from round to
round, while the others wait; a ratio (MLA/MHA) is computed within a round, from two measurements taken seconds
apart, and reported as the median over the rounds with its range. The machine's load is recorded before and during
the run, and the report says when a ratio's spread is too large to quote or the machine was busy.

    python run_benchmark.py --size small --output_dir outputs/benchmark --batch_sizes 1 16 --new_tokens 64
    python run_benchmark.py --model_name_or_path openai/whisper-small --output_dir outputs/benchmark
    python run_benchmark.py --model_name_or_path openai/whisper-small --mla_model_name_or_path MLA_CKPT \
        --output_dir outputs/benchmark

`run_benchmark.py` is the command line around this module. It writes OUTPUT_DIR/results.json (run, load, records, paired ratios, rounds, warnings), results.md and PNG plots.
"""

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
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
# The paired ratios: wall-clock decode speed (what a user waits for), decode speed per CPU-second of the worker (on a
# CPU: waiting for a core, as on a shared machine, does not count) and the first step's time.
METRIC_LABELS = {"decode_tokens_per_s": "decode tok/s", "decode_tokens_per_cpu_s": "decode tok/CPU-s",
                 "first_step_s": "first-step time"}
AUDIO_FRAMES = 3000  # 30 s of log-mel frames, the only input length Whisper's encoder takes
MIB = 2**20
# The original Whisper_MLA setting (latent 96 + 4 kept key dims per head, -90.6% cache on small), which the
# benchmark measures unless told otherwise; the converter's own default (kv_lora_rank 192) is chosen for WER.
OUTPUT_FILES = ("results.json", "results.md", "*_vs_batch_size.png")  # what write_reports writes
SPREAD_LIMIT = 0.20  # (max - min) / median of a ratio over the rounds above which it is flagged as unsteady
BUSY_SHARE = 0.25  # other processes using this share of the machine's CPUs (or this much steal) make it "busy"
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
                kept_key_dims=config.kept_key_dims, cross_attention_latent="shared" if shared else "per_layer",
                shared_cross_rank=(getattr(config, "cross_kv_lora_rank", None) or config.d_model) if shared else None)


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
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    start = now(encoder_hidden.is_cuda)
    # a fresh BaseModelOutput each time: beam search expands it in place
    model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), cache=cache,
                   logits_processor=LogitsProcessorList([timer]), **generation_kwargs(model, new_tokens, num_beams))
    if len(timer.times) != new_tokens:
        raise RuntimeError(f"Expected {new_tokens} decoding steps, but found {len(timer.times)}.")
    decode_cpu_s = timer.cpu_times[-1] - timer.cpu_times[0]
    return (timer.times[0] - start, timer.times[-1] - timer.times[0], decode_cpu_s, cache_nbytes(cache),
            cache.get_seq_length())


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
    generator = torch.Generator().manual_seed(setting["seed"])
    features = torch.randn(batch, model.config.num_mel_bins, AUDIO_FRAMES, generator=generator).to(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with torch.inference_mode():
        model.model.encoder(features[:1])  # warm-up; batch 1 initialises the same kernels
        start = now(device.type == "cuda")
        encoder_hidden = model.model.encoder(features).last_hidden_state  # once: the same for every round
        encoder_s = now(device.type == "cuda") - start
        timed_generate(model, encoder_hidden, 2, beams)  # warm-up of the decoder at this batch size
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


def rotated(items: list, shift: int) -> list:
    """items rotated left by `shift`: round r starts with the r-th setting, so no setting always goes first."""
    shift %= len(items)
    return items[shift:] + items[:shift]


# --------------------------------------------------------------------------------------------- machine load


def cpu_snapshot() -> dict:
    """CPU seconds so far: the whole machine's busy and stolen time (/proc/stat through psutil) and this process
    tree's own (this process, its finished children, its live workers)."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    steal = getattr(times, "steal", 0.0)
    # guest time is already counted inside user time on Linux
    total = sum(getattr(times, name) for name in times._fields if name not in ("guest", "guest_nice"))
    me = psutil.Process()
    ours = sum(me.cpu_times()[:4])  # user, system, children_user, children_system (children that were waited for)
    for child in me.children(recursive=True):
        try:
            ours += sum(child.cpu_times()[:2])
        except psutil.Error:  # it exited between listing and reading
            pass
    return dict(time=time.monotonic(), total=total, idle=idle, steal=steal, ours=ours)


def load_between(start: dict, end: dict) -> dict:
    """What other processes did to the machine between two snapshots: the CPUs they kept busy on average and the
    share of CPU time the hypervisor stole, with the load average at the end."""
    wall = max(end["time"] - start["time"], 1e-9)
    total = end["total"] - start["total"]
    steal = end["steal"] - start["steal"]
    busy = total - (end["idle"] - start["idle"]) - steal
    others = min(max(busy - (end["ours"] - start["ours"]), 0.0), total)
    total = max(total, 1e-9)
    # CPUs from the share of the machine's CPU time rather than from wall time: the two clocks are read apart
    return dict(seconds=wall, other_cpus=others / total * (os.cpu_count() or 1), steal_share=steal / total,
                load_average=list(os.getloadavg()))


def sample_load(seconds: float) -> dict:
    """The machine's load over the next `seconds`, while this process waits."""
    start = cpu_snapshot()
    time.sleep(seconds)
    return load_between(start, cpu_snapshot())


def is_busy(load: dict, cpus: int) -> bool:
    return load["other_cpus"] >= BUSY_SHARE * cpus or load["steal_share"] >= BUSY_SHARE / 5


# --------------------------------------------------------------------------------------------- measurement


def measure_grid_point(settings: list[dict], rounds: int, progress) -> tuple[list[dict], list[dict]]:
    """Measures the settings of one (batch, beams, new tokens) point, one per attention, in paired rounds.

    Workers are started one after another (loading and the encoder are not compared), then every round asks each
    live worker for one measurement, in rotated order. Returns (one record per setting, one log entry per round).
    """
    attentions = [s["attention"] for s in settings]
    workers, errors, measured, log = {}, {}, {a: [] for a in attentions}, []
    try:
        for setting in settings:
            progress.set_postfix_str(f"starting {setting['attention']} b={setting['batch_size']}")
            try:
                workers[setting["attention"]] = Worker(setting)
            except WorkerError as error:
                errors[setting["attention"]] = str(error)
        for round_index in range(rounds):
            order = rotated(attentions, round_index)
            progress.set_postfix_str(f"b={settings[0]['batch_size']} beams={settings[0]['num_beams']} "
                                     f"n={settings[0]['new_tokens']} round {round_index + 1}/{rounds}")
            start = cpu_snapshot()
            for attention in order:
                if attention not in workers:
                    continue
                try:
                    measured[attention].append(workers[attention].ask({"round": round_index}))
                except WorkerError as error:  # a setting that fails mid-way has no speed figures at all
                    errors[attention] = str(error)
                    workers.pop(attention).close()
            log.append(dict(batch_size=settings[0]["batch_size"], num_beams=settings[0]["num_beams"],
                            new_tokens=settings[0]["new_tokens"], round=round_index, order=order,
                            **load_between(start, cpu_snapshot())))
            progress.update()
        records = []
        for setting in settings:
            attention = setting["attention"]
            keys = {k: setting[k] for k in ("attention", "batch_size", "num_beams", "new_tokens")}
            if attention in errors:
                records.append({**keys, "error": errors[attention]})
                continue
            worker = workers[attention]
            try:
                final = worker.ask({"stop": True})
            except WorkerError as error:
                records.append({**keys, "error": str(error)})
                continue
            records.append(summarise(keys, worker.started, final, measured[attention]))
    finally:
        for worker in workers.values():
            worker.close()
    return records, log


def summarise(keys: dict, started: dict, final: dict, rounds: list[dict]) -> dict:
    """One setting's record: its constants, and each speed figure as the median over rounds with min and max."""
    record = {**keys, **final, "encoder_s": started["encoder_s"], "rounds": rounds}
    for metric in ("decode_tokens_per_s", "decode_tokens_per_cpu_s", "decode_step_ms", "first_step_s"):
        values = [r[metric] for r in rounds]
        if None in values:  # CPU time is not measured on a GPU
            continue
        record.update({metric: statistics.median(values), f"{metric}_min": min(values), f"{metric}_max": max(values)})
    return record


def paired_ratios(records: list[dict]) -> list[dict]:
    """MLA/MHA ratios of decode tokens/s (wall clock, and per CPU-second on a CPU) and of first-step time, each
    computed within a round (the MHA and MLA measurements of the same round, seconds apart) and summarised by the
    median, min, max and spread over the rounds."""
    by_key = {(r["batch_size"], r["num_beams"], r["new_tokens"], r["attention"]): r
              for r in records if "error" not in r}
    ratios = []
    for batch, beams, new_tokens in sorted({k[:3] for k in by_key}, key=lambda k: (k[1], k[2], k[0])):
        mha = by_key.get((batch, beams, new_tokens, "mha"))
        for attention in ATTENTIONS[1:]:
            mla = by_key.get((batch, beams, new_tokens, attention))
            if mha is None or mla is None:
                continue
            mha_rounds = {r["round"]: r for r in mha["rounds"]}
            for metric in METRIC_LABELS:
                if any(r.get(metric) is None for r in mla["rounds"] + mha["rounds"]):
                    continue  # CPU time on a GPU
                values = [r[metric] / mha_rounds[r["round"]][metric] for r in mla["rounds"]]
                median = statistics.median(values)
                spread = (max(values) - min(values)) / median
                ratios.append(dict(batch_size=batch, num_beams=beams, new_tokens=new_tokens, attention=attention,
                                   metric=metric, median=median, min=min(values), max=max(values), spread=spread,
                                   steady=spread <= SPREAD_LIMIT, rounds=values))
    return ratios




def describe_ratio(ratio: dict) -> str:
    """e.g. 'decode tok/s mla-absorbed/MHA at batch 16, beams 1, 32 new tokens: 1.54x (1.50-1.58 over 5 rounds)'."""
    return (f"{METRIC_LABELS[ratio['metric']]} {ratio['attention']}/MHA at batch {ratio['batch_size']}, beams "
            f"{ratio['num_beams']}, {ratio['new_tokens']} new tokens: {ratio['median']:.2f}x ({ratio['min']:.2f}-"
            f"{ratio['max']:.2f} over {len(ratio['rounds'])} rounds)")


def run_warnings(ratios: list[dict], load: dict, num_threads: int, device: str) -> list[str]:
    """Plain sentences for results.md and the terminal: unsteady ratios, a busy machine, an active test hook."""
    cpus = os.cpu_count()
    warnings = [f"Unsteady: {describe_ratio(r)}, spread {r['spread']:.1%} > {SPREAD_LIMIT:.0%}; do not quote it."
                for r in ratios if not r["steady"]]
    busy = [when for when in ("before", "during") if is_busy(load[when], cpus)]
    if busy and device == "cpu":
        warnings.append(
            f"The machine was busy ({' and '.join(busy)} the measurement): other processes kept "
            f"{load['before']['other_cpus']:.1f} of {cpus} CPUs busy before it and {load['during']['other_cpus']:.1f} "
            f"on average during it (steal {load['during']['steal_share']:.0%}). Pairing within rounds cancels much of "
            "this, but absolute tokens/s are low and ratios can shift; quote figures from an idle machine."
        )
    if warnings:
        threads = "" if num_threads == 1 or device != "cpu" else f"--num_threads 1 (this run: {num_threads}), "
        warnings.append(f"For figures to quote: {threads}more --rounds, and an idle machine.")
    if os.environ.get(SLOW_ENV):
        warnings.append(f"{SLOW_ENV}={os.environ[SLOW_ENV]} slowed a worker on purpose: a test run, not figures.")
    return warnings


# --------------------------------------------------------------------------------------------- reports


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} CPUs)"


def median_range(record: dict, metric: str, spec: str) -> str:
    """'median (min-max)' of a speed figure over the rounds."""
    return f"{record[metric]:{spec}} ({record[f'{metric}_min']:{spec}}-{record[f'{metric}_max']:{spec}})"


def ratio_cell(ratio: dict | None) -> str:
    if ratio is None:
        return "-"
    flag = "" if ratio["steady"] else f" ⚠ spread {ratio['spread']:.1%}"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}){flag}"


def load_line(load: dict) -> str:
    cpus = os.cpu_count()
    return (f"other processes {load['other_cpus']:.2f} of {cpus} CPUs, steal {load['steal_share']:.0%}, load average "
            + "/".join(f"{x:.2f}" for x in load["load_average"]) + f" ({load['seconds']:.0f} s)")


def markdown_report(results: dict) -> str:
    """Warnings, a table per (batch, beams, new tokens) and attention with paired MLA/MHA ratios, the rounds' load,
    then every record."""
    records, ratios = results["records"], results["ratios"]
    ratio_of = {(r["batch_size"], r["num_beams"], r["new_tokens"], r["attention"], r["metric"]): r for r in ratios}
    by_key = {(r["batch_size"], r["num_beams"], r["new_tokens"], r["attention"]): r for r in records}
    lines = ["# Whisper MHA vs MLA benchmark", "", *(f"- {k}: {v}" for k, v in results["header"].items()), ""]
    if results["warnings"]:
        lines += ["## Warnings", "", *(f"- {w}" for w in results["warnings"]), ""]
    lines += [
        "Cache: bytes the decoder cache holds after generation (self + cross attention, all layers; beam search keeps "
        "batch x beams sequences); reduction against MHA. Peak: peak memory of the setting's own worker process, "
        "weights included. tok/s: returned tokens per second over the decoding steps after the first, median (min-max) "
        f"over the rounds. /MHA: the ratio within each round, median (min-max) over the rounds; ⚠ marks a spread "
        f"(max-min)/median above {SPREAD_LIMIT:.0%}. tok/CPU-s: tokens per CPU-second of the worker (CPU runs), which "
        "time spent waiting for a core does not change. first step: the first decoding step (cross-attention "
        "keys/values or latents of the 1500 encoder frames, then one token); a time, so below 1 is faster. naive: "
        "MLA, latent expanded to keys and values; absorbed: attention over the latent; int8: absorbed with the int8 "
        "latent cache; shared: one cross-attention latent for all decoder layers (cross_attention_latent shared).",
        "",
        "| batch | beams | new tokens | attention | cache MiB | cache reduction | peak MiB | peak /MHA | tok/s "
        "| tok/s /MHA | tok/CPU-s /MHA | first step /MHA |",
        "|" + "---|" * 12,
    ]
    for batch, beams, new_tokens in sorted({k[:3] for k in by_key}, key=lambda k: (k[1], k[2], k[0])):
        mha = by_key.get((batch, beams, new_tokens, "mha"), {})
        for attention in ATTENTIONS:
            r = by_key.get((batch, beams, new_tokens, attention))
            if r is None:
                continue
            cells = [str(batch), str(beams), str(new_tokens), attention]
            if "error" in r:
                reason = r["error"].strip().splitlines()[-1][:100] if r["error"].strip() else "no output"
                lines.append("| " + " | ".join(cells) + f" | failed: {reason} |" + " |" * 7)
                continue
            has_mha = bool(mha) and "error" not in mha
            cells += [
                f"{r['cache_bytes'] / MIB:.1f}",
                f"{100 * (1 - r['cache_bytes'] / mha['cache_bytes']):.1f}%" if has_mha else "-",
                f"{r['peak_memory_bytes'] / MIB:.0f}",
                f"{r['peak_memory_bytes'] / mha['peak_memory_bytes']:.2f}" if has_mha else "-",
                median_range(r, "decode_tokens_per_s", ".1f"),
                ratio_cell(ratio_of.get((batch, beams, new_tokens, attention, "decode_tokens_per_s"))),
                ratio_cell(ratio_of.get((batch, beams, new_tokens, attention, "decode_tokens_per_cpu_s"))),
                ratio_cell(ratio_of.get((batch, beams, new_tokens, attention, "first_step_s"))),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Rounds", "", "Load over each round: CPUs other processes kept busy (this run's own excluded), "
              "the share of CPU time stolen by the hypervisor, the load average at its end.", "",
              "| batch | beams | new tokens | round | order | seconds | other CPUs | steal | load average |",
              "|" + "---|" * 9]
    for r in results["rounds"]:
        lines.append(f"| {r['batch_size']} | {r['num_beams']} | {r['new_tokens']} | {r['round'] + 1} | "
                     f"{', '.join(r['order'])} | {r['seconds']:.1f} | {r['other_cpus']:.2f} | {r['steal_share']:.0%} "
                     f"| {'/'.join(f'{x:.2f}' for x in r['load_average'])} |")
    lines += ["", "## All records", "",
              "| attention | batch | beams | new tokens | cache self B | cache cross B | values/token/layer self, "
              "cross | peak MiB | encoder s | first step s | decode step ms | tok/s |", "|" + "---|" * 12]
    for r in records:
        if "error" in r:
            continue  # listed in the table above
        lines.append(
            f"| {r['attention']} | {r['batch_size']} | {r['num_beams']} | {r['new_tokens']} | {r['cache_bytes_self']} "
            f"| {r['cache_bytes_cross']} | {r['values_per_token_per_layer_self']:g}, "
            f"{r['values_per_token_per_layer_cross']:g} | {r['peak_memory_bytes'] / MIB:.0f} | {r['encoder_s']:.2f} "
            f"| {median_range(r, 'first_step_s', '.3f')} | {median_range(r, 'decode_step_ms', '.1f')} "
            f"| {median_range(r, 'decode_tokens_per_s', '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def plot_versus_batch_size(records: list[dict], metric: str, ylabel: str, path: str, scale: float = 1.0) -> None:
    """One panel per new-token count; a line per attention (colour) and beam count (line style); error bars show
    the range over the rounds where the metric has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    if not ok:
        return
    new_tokens = sorted({r["new_tokens"] for r in ok})
    batch_sizes = sorted({r["batch_size"] for r in ok})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(new_tokens), figsize=(5 * len(new_tokens), 4.4), squeeze=False)
    fig.suptitle(f"{ok[0]['model']}, {ok[0]['dtype']}, {ok[0]['device_name']}", fontsize=9)
    for ax, n in zip(axes[0], new_tokens):
        for color, attention in zip(colors, ATTENTIONS):
            for style, beams in zip(("-", "--", ":", "-."), sorted({r["num_beams"] for r in ok})):
                points = sorted((r["batch_size"], r[metric] / scale, r.get(f"{metric}_min", r[metric]) / scale,
                                 r.get(f"{metric}_max", r[metric]) / scale) for r in ok
                                if (r["attention"], r["num_beams"], r["new_tokens"]) == (attention, beams, n))
                if points:
                    x, y, low, high = zip(*points)
                    ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, low)], [b - a for a, b in zip(y, high)]],
                                fmt=style, marker="o", capsize=3, color=color, label=f"{attention}, beams={beams}")
        ax.set(xscale="log", xlabel="batch size", ylabel=ylabel, title=f"{n} new tokens")
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict, output_dir: str) -> None:
    """results.json, results.md and the plots."""
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown_report(results))
    for metric, label, name, scale in (
        ("peak_memory_bytes", "peak memory (MiB)", "memory_vs_batch_size.png", MIB),
        ("cache_bytes", "decoder cache (MiB)", "cache_vs_batch_size.png", MIB),
        ("decode_tokens_per_s", "decode tokens/s (median, range over rounds)", "tokens_per_s_vs_batch_size.png", 1.0),
    ):
        plot_versus_batch_size(results["records"], metric, label, os.path.join(output_dir, name), scale=scale)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":  # one setting, measured in this process (see Worker)
        run_worker(json.loads(sys.argv[2]))
