"""What fits in memory: the largest batch of 30 s utterances a model decodes within a memory budget, MHA against
Whisper-MLA's layouts, each try measured in a child process that is refused or killed before it can exceed the budget.

    python run_benchmark.py --find_max_batch --size small --dtype float32 --num_beams 1 5 --new_tokens 100 \
        --memory_budget 10GiB --output_dir outputs/capacity_small

What one try measures (`run_try`, in a fresh process): the peak memory (CPU: the process's peak RSS, VmHWM, reset once
the model is built; GPU: `torch.cuda.max_memory_allocated`, reset likewise) of decoding the last `decode_steps` tokens
of T new tokens for a batch of B utterances with `generate()` itself (beam search included: its beam expansion of the
encoder output for MHA, its per-step logits, its cache reorder). The cache the steps start from holds the 1-token
prompt and the first T - decode_steps tokens, built by the model's own code: one decoder forward over one utterance
(its beams) writes every layer's cache, whose tensors are then repeated B times along the batch dim (a layer that
aliases another, as the shared cross latent does, stays an alias). So the steps see the cache of exactly the shapes and
dtypes a full T-token decode ends with, without decoding T tokens for hundreds of sequences (hours on a CPU).

What it does not measure: the encoder. Its output is a random tensor of shape (B, 1500, d_model) held through decoding,
as a server that encodes in chunks holds it; the encoder's own activation peak depends on the chunk, not on B, and is
measured apart (`run_encoder_try`, one chunk, with its time per utterance for the throughput). Weights are random in
the model's shapes: memory and speed depend on the shapes and the dtype, not on the weight values. Memory that a real
T-step decode might add over the filled cache (allocator fragmentation over T steps) is not in the figure; the
`--decode_steps` option can make a try decode all T tokens for real, to compare at a small batch.

Safety: each try runs in a child; a try whose predicted footprint (analytic bytes, then a line through the measured
tries) exceeds the budget by more than `REFUSE_MARGIN` is refused before it starts; on a CPU the parent polls the
child's RSS every `WATCH_INTERVAL_S` and kills it above the budget, or when the machine's available memory falls under
`MACHINE_FLOOR_BYTES`; an address-space limit (budget + `ADDRESS_SPACE_SLACK`) backs the watchdog up. On a GPU the
child caps its allocator at the budget (`torch.cuda.set_per_process_memory_fraction`), so a try over it fails with an
out-of-memory error.
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch
import transformers
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import BaseModelOutput

from configuration_whisper_mla import WhisperMLAConfig
from modeling_whisper_mla import (
    WhisperMLAForConditionalGeneration,
    cache_nbytes,
    cross_cache_frames,
    expected_cache_bytes_per_token,
)
from whisper_mla.benchmark import AUDIO_FRAMES, SIZES, StepTimer, generation_kwargs, now, peak_rss_bytes
from whisper_mla.benchmark_report import load_line, machine_description
from whisper_mla.benchmark_rounds import cpu_snapshot, load_between, rotated, sample_load, summarise_ratio
from whisper_mla.transcription import DTYPES


GIB, MIB = 2**30, 2**20
# The measured layouts. None: the MHA original. A dict: WhisperMLAConfig settings over the converter's defaults, whose
# exact default caches each self-attention block's input (d_model values per token) and ONE cross latent (the
# encoder output) for all layers and, in beam search, all beams of an utterance.
CAPACITY_LAYOUTS = {
    "mha": None,
    "mla-default": {},
    "mla-default-int8": dict(mla_cache_quantization="int8"),
    # the -93.2% tiny.en recipe's layout (README, "Recovery at -93.2%"): self latents of 352, no kept key dims, the
    # full-width shared cross latent pooled over every 3 encoder frames; capped at d_model for narrower test shapes
    "mla-93-layout": dict(kv_lora_rank=352, kept_key_dims=0, cross_latent_stride=3),
}
LAYOUT_LABELS = {"mha": "MHA", "mla-default": "MLA exact default", "mla-default-int8": "MLA default, int8 cache",
                 "mla-93-layout": "MLA -93% layout"}
REFUSE_MARGIN = 0.10  # a try predicted above budget * (1 + this) is refused; closer ones run under the watchdog
WATCH_INTERVAL_S = 0.02  # RSS poll period of the watchdog
MACHINE_FLOOR_BYTES = GIB  # a try is killed when the machine's available memory falls under this
MACHINE_RETRIES, MACHINE_WAIT_S = 3, 60  # a try killed for the machine's sake is retried this often, after this wait
ADDRESS_SPACE_SLACK = 3 * GIB  # RLIMIT_AS = budget + this: virtual memory a torch process maps beyond its RSS
DEFAULT_MARGIN = dict(cpu=2 * GIB, cuda=GIB)  # default budget: available memory minus this
RUNTIME_BYTES = dict(cpu=450 * MIB, cuda=0)  # Python, torch and transformers resident before any tensor (first guess)
PROMPT_TOKENS = 1  # the decoder start token; the T tokens follow it
AUDIO_SECONDS = 30  # one utterance: one 30 s window
CAPACITY_OUTPUT_FILES = ("capacity.json", "capacity.md", "capacity.png")  # what run_capacity writes


# --------------------------------------------------------------------------------------------- settings


def parse_memory(text: str) -> int:
    """Bytes from '8GiB', '8GB', '8G', '512MiB' or a plain number of bytes (binary units: G = GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--memory_budget expects a size such as 8GiB, 512MiB or 8589934592, but found {text!r}; "
                         "pass one of those forms.")
    value, unit, suffix = float(match[1]), match[2].upper(), (match[3] or "")
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if suffix.upper() == "B" and unit else 1024  # 8GB: decimal; 8G, 8GiB: binary
    return int(value * base**power)


def available_memory(device: str) -> int:
    """Memory a try could take now: the machine's available memory (CPU), or the GPU's free memory."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def resolve_budget(text: str | None, device: str) -> tuple[int, str]:
    """(budget bytes, how it was chosen). Refuses a budget above what is available now."""
    available = available_memory(device)
    if text is None:
        budget = available - DEFAULT_MARGIN[device.split(":")[0]]
        how = f"available {available / GIB:.1f} GiB minus a {DEFAULT_MARGIN[device.split(':')[0]] / GIB:.0f} GiB margin"
        if budget <= 0:
            raise ValueError(f"Expected some free memory for the default --memory_budget, but found "
                             f"{available / GIB:.1f} GiB available; free memory or pass --memory_budget.")
        return budget, how
    budget = parse_memory(text)
    if budget > available:
        raise ValueError(f"--memory_budget expects at most the {available / GIB:.1f} GiB available now, but found "
                         f"{budget / GIB:.1f} GiB; lower it (the search must never push the machine into swap).")
    return budget, "--memory_budget " + text


def layout_config(shapes: dict, layout: str):
    """The config a layout is measured with: Whisper's for MHA, Whisper-MLA's with the layout's settings."""
    settings = CAPACITY_LAYOUTS[layout]
    if settings is None:
        return WhisperConfig(**shapes)
    settings = dict(settings)
    if "kv_lora_rank" in settings:
        settings["kv_lora_rank"] = min(settings["kv_lora_rank"], shapes["d_model"])
    return WhisperMLAConfig(**shapes, **settings)


def describe_layout(config) -> str:
    """One line a reader can check: what each layout caches per token and layer."""
    if getattr(config, "model_type", None) != "whisper_mla":
        return "keys and values of every layer (2 x d_model per token and layer, cross and self)"
    quant = ", int8 with a float32 scale per token" if config.mla_cache_quantization == "int8" else ""
    stride = (f", pooled over every {config.cross_latent_stride} encoder frames" if config.cross_latent_stride > 1
              else "")
    return (f"self latent {config.kv_lora_rank} (kept key dims {config.kept_key_dims}); one shared cross latent of "
            f"width {config.shared_cross_rank()}{stride}, one per utterance{quant}")


def param_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the model's weights, counted on the meta device (nothing is allocated)."""
    model_class = WhisperMLAForConditionalGeneration if config.model_type == "whisper_mla" else \
        WhisperForConditionalGeneration
    with torch.device("meta"):
        model = model_class(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * itemsize


def bytes_per_utterance(config, dtype: torch.dtype, beams: int, new_tokens: int) -> int:
    """Analytic bytes one more utterance adds while decoding: its decoder cache at the last step, its encoder output
    (and for MHA's beam search the per-beam copy generate makes), and the float32 logits/log-probs of its beams."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    is_mla = config.model_type == "whisper_mla"
    per_token = expected_cache_bytes_per_token(config, dtype)
    frames = cross_cache_frames(config, config.max_source_positions)
    cross_copies = 1 if is_mla and config.share_cross_latent_across_beams else beams
    encoder = config.max_source_positions * config.d_model * itemsize
    cache = beams * (PROMPT_TOKENS + new_tokens) * per_token["self"] + cross_copies * frames * per_token["cross"]
    return cache + encoder * (1 + (beams if beams > 1 and not is_mla else 0)) + 4 * beams * config.vocab_size * 4


# --------------------------------------------------------------------------------------------- the child


def build_model(setting: dict):
    """A random-weight model of the setting's layout, built directly in its dtype on its device: uninitialised, tied,
    then filled with uniform noise once (transformers' own initialisation takes minutes for large-v3 on one core)."""
    config = layout_config(setting["shapes"], setting["layout"])
    model_class = WhisperMLAForConditionalGeneration if config.model_type == "whisper_mla" else \
        WhisperForConditionalGeneration
    torch.manual_seed(setting["seed"])
    with torch.device(setting["device"]), no_init_weights():
        model = model_class._from_config(config, dtype=DTYPES[setting["dtype"]],
                                         attn_implementation=setting["attn_implementation"])
    model.tie_weights()  # before the fill: the untied output projection's pages are never touched
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.05, 0.05)
    return model.eval()


def fill_cache(model, batch: int, beams: int, cached_tokens: int) -> EncoderDecoderCache:
    """The cache of `batch` utterances x `beams` after `cached_tokens` decoder tokens, built by the model's own code.

    One decoder forward of one token over one utterance's beams (a random encoder output) writes every layer's cross
    entries and one self entry, as generate's first step does (for MHA, the cross keys and values of each beam; for
    MLA, the one cross latent the beams share). Each self tensor (rows, heads, 1, width) is then repeated to
    `cached_tokens` along the sequence and every tensor `batch` times along the batch dim; a layer that points at
    another layer's tensors (the shared cross latent) keeps pointing at the repeated ones.
    """
    config, device, dtype = model.config, model.device, model.dtype
    shares = getattr(model, "shares_cross_latent_across_beams", lambda: False)() and beams > 1
    encoder_hidden = torch.randn(1 if shares else beams, config.max_source_positions, config.d_model, device=device,
                                 dtype=dtype)
    tokens = torch.full((beams, 1), config.decoder_start_token_id, device=device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.inference_mode():
        model.model.decoder(input_ids=tokens, encoder_hidden_states=encoder_hidden, cache=cache, use_cache=True)
    repeated = {}  # id(tensor of one utterance) -> tensor of the batch
    for sub_cache, tokens_dim in ((cache.self_attention_cache, cached_tokens), (cache.cross_attention_cache, 1)):
        for layer in sub_cache.layers:
            if not layer.is_initialized:
                continue
            for name in ("keys", "values"):
                tensor = getattr(layer, name)  # (rows, heads, tokens, width)
                if id(tensor) not in repeated:
                    repeated[id(tensor)] = tensor.repeat(batch, 1, tokens_dim, 1)
                setattr(layer, name, repeated[id(tensor)])
    return cache


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return peak_rss_bytes(), "peak RSS (VmHWM)"


def reset_peak_memory(device: torch.device) -> None:
    """Starts the peak over from now: the build's transients are not part of decoding."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


def run_try(setting: dict, send) -> dict:
    """Decodes the last `decode_steps` of `new_tokens` tokens for `batch` utterances with `num_beams` beams (see the
    module docstring) and returns its peak memory, cache bytes and, with `decode_steps` >= 2, the step times."""
    device = torch.device(setting["device"])
    batch, beams, new_tokens, steps = (setting[k] for k in ("batch_size", "num_beams", "new_tokens", "decode_steps"))
    model = build_model(setting)
    send({"phase": "built"})
    reset_peak_memory(device)
    cached = PROMPT_TOKENS + new_tokens - steps - 1 if steps < new_tokens else 0
    cache = fill_cache(model, batch, beams, cached) if cached else EncoderDecoderCache(DynamicCache(), DynamicCache())
    send({"phase": "filled"})
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (batch, PROMPT_TOKENS + new_tokens - steps), device=device)
    prompt[:, 0] = config.decoder_start_token_id
    timer = StepTimer(synchronize=device.type == "cuda")
    kwargs = generation_kwargs(model, steps, beams)
    with torch.inference_mode():
        # the only reference to the encoder output is in generate's kwargs: beam search may expand it in place
        model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=torch.randn(
                batch, config.max_source_positions, config.d_model, device=device, dtype=model.dtype)),
            decoder_input_ids=prompt, cache=cache, logits_processor=[timer], **kwargs)
    if len(timer.times) != steps:
        raise RuntimeError(f"Expected {steps} decoding steps, but found {len(timer.times)}.")
    peak, kind = peak_memory(device)
    nbytes = cache_nbytes(cache)
    result = dict(peak_memory_bytes=peak, peak_memory_kind=kind, cache_bytes=nbytes["self"] + nbytes["cross"],
                  cache_bytes_self=nbytes["self"], cache_bytes_cross=nbytes["cross"],
                  cached_tokens=cache.get_seq_length(),
                  param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    if steps >= 2:  # the steps after the first: its time holds generate's setup
        decode_s = timer.times[-1] - timer.times[0]
        result.update(decode_s=decode_s, decode_step_s=decode_s / (steps - 1),
                      decode_tokens_per_s=batch * (steps - 1) / decode_s)
    return result


def run_encoder_try(setting: dict, send) -> dict:
    """The encoder over one chunk of `batch_size` random 30 s log-mel inputs: its peak memory (weights of the whole
    model included) and its seconds per utterance."""
    device = torch.device(setting["device"])
    model = build_model(setting)
    send({"phase": "built"})
    reset_peak_memory(device)
    features = torch.randn(setting["batch_size"], model.config.num_mel_bins, AUDIO_FRAMES, device=device,
                           dtype=model.dtype)
    with torch.inference_mode():
        start = now(device.type == "cuda")
        model.model.encoder(features)
        seconds = now(device.type == "cuda") - start
    peak, kind = peak_memory(device)
    return dict(peak_memory_bytes=peak, peak_memory_kind=kind, encoder_s_per_utterance=seconds / setting["batch_size"],
                param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))


def child_main(setting: dict) -> None:
    """A try in this process: JSON lines on stdout ({"phase"} while it goes, then {"result"} or {"error"})."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to stderr, not into the protocol

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(setting["num_threads"])
    device = torch.device(setting["device"])
    if device.type == "cuda":  # the allocator refuses what the budget does not allow: an OOM error, not a crash
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, setting["budget_bytes"] / total), device)
    try:
        result = (run_encoder_try if setting["mode"] == "encoder" else run_try)(setting, send)
    except torch.OutOfMemoryError as error:
        send({"error": "out of memory", "detail": str(error)[:500], "out_of_memory": True})
        return
    except (MemoryError, RuntimeError) as error:  # the address-space backstop: "can't allocate memory"
        out_of_memory = "allocate" in str(error) or isinstance(error, MemoryError)
        send({"error": type(error).__name__, "detail": str(error)[-500:], "out_of_memory": out_of_memory})
        return
    send({"result": result})


# --------------------------------------------------------------------------------------------- the parent


def supervise(setting: dict, budget: int, timeout_s: float | None = None) -> dict:
    """Runs one try in a child under the watchdog. Returns {"status": "ok", **result}, or {"status": "killed" |
    "out_of_memory" | "machine_low" | "error", "reason", "max_rss_bytes", "phase"}; never raises for the child's
    failures. "machine_low": other processes left the machine under MACHINE_FLOOR_BYTES, which says nothing about
    the try's own need."""
    setting = dict(setting, budget_bytes=budget)
    stderr = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ, OMP_NUM_THREADS=str(setting["num_threads"]))
    # run from the folder this package is imported from, so the child imports the same code as the parent
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "whisper_mla.capacity", "--_try", json.dumps(setting)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=root)
    cpu = not setting["device"].startswith("cuda")
    if cpu:  # the backstop behind the watchdog (not on a GPU: CUDA maps far more address space than it uses)
        try:
            psutil.Process(proc.pid).rlimit(psutil.RLIMIT_AS, (budget + ADDRESS_SPACE_SLACK,) * 2)
        except psutil.Error:  # it already ended: reported below
            pass
    messages = []
    reader = threading.Thread(target=lambda: messages.extend(json.loads(line) for line in proc.stdout), daemon=True)
    reader.start()
    watched, max_rss, killed, status, start = psutil.Process(proc.pid), 0, None, "killed", time.monotonic()
    while proc.poll() is None:
        try:
            rss = watched.memory_info().rss
        except psutil.Error:  # it exited between poll and read
            break
        max_rss = max(max_rss, rss)
        if cpu and rss > budget:
            killed = f"RSS {rss / GIB:.2f} GiB above the budget {budget / GIB:.2f} GiB"
        elif psutil.virtual_memory().available < MACHINE_FLOOR_BYTES:
            killed, status = (f"the machine's available memory fell under {MACHINE_FLOOR_BYTES / GIB:.1f} GiB "
                              f"(this try: {rss / GIB:.2f} GiB)"), "machine_low"
        elif timeout_s is not None and time.monotonic() - start > timeout_s:
            killed, status = f"over the {timeout_s:.0f} s time limit", "error"
        if killed:
            proc.kill()
            break
        time.sleep(WATCH_INTERVAL_S)
    code = proc.wait()
    reader.join(timeout=10)
    stderr.seek(0)
    tail = stderr.read()[-1500:]
    stderr.close()
    phases = [m["phase"] for m in messages if "phase" in m]
    common = dict(max_rss_bytes=max_rss, phase=phases[-1] if phases else "starting", seconds=time.monotonic() - start)
    if killed:
        return dict(status=status, reason=killed, **common)
    final = next((m for m in messages if "result" in m or "error" in m), None)
    if final is None:
        return dict(status="error", reason=f"exit {code} without a result: {tail.strip()[-300:]}", **common)
    if "error" in final:
        status = "out_of_memory" if final.get("out_of_memory") else "error"
        return dict(status=status, reason=f"{final['error']}: {final['detail']}", **common)
    return dict(status="ok", **final["result"], **common)


def predict(points: dict[int, int], batch: int, base: int, slope: int) -> int:
    """Predicted peak bytes at `batch`: a line through the two largest measured batches when there are two, else
    the largest measured one (or `base` at batch 0) and the analytic `slope`."""
    measured = sorted(points)
    if len(measured) >= 2:
        (b1, p1), (b2, p2) = [(b, points[b]) for b in measured[-2:]]
        slope = max((p2 - p1) / (b2 - b1), 1)
    anchor = measured[-1] if measured else 0
    return int((points[anchor] if measured else base) + slope * (batch - anchor))


def find_max_batch(setting: dict, budget: int, base: int, slope: int, tolerance: float, max_tries: int,
                   log=print) -> dict:
    """The largest batch whose try fits the budget, searched from the prediction and bracketed by measured tries.

    Args:
        setting: the try's fields but batch_size.
        base: predicted bytes at batch 0 (weights and runtime); slope: analytic bytes per utterance.
        tolerance: stop once the smallest failing batch is within this share (and at least 1) of the largest fitting.
        max_tries: tries at most (refusals included).

    Returns:
        {"max_batch", "fail_batch" (smallest batch found over the budget, or None), "tries": [...], "stopped"}.
    """
    fits, fails, tries = {}, {}, []
    candidate = 1
    while len(tries) < max_tries:
        predicted = predict(fits, candidate, base, slope)
        if predicted > budget * (1 + REFUSE_MARGIN):
            outcome = dict(status="refused", reason=f"predicted {predicted / GIB:.2f} GiB > budget "
                                                    f"{budget / GIB:.2f} GiB + {REFUSE_MARGIN:.0%}")
        else:
            outcome = supervise(dict(setting, batch_size=candidate), budget)
            for _ in range(MACHINE_RETRIES):  # the machine, not the try, ran short: wait and try again
                if outcome["status"] != "machine_low":
                    break
                log(f"  {outcome['reason']}: retrying batch {candidate} in {MACHINE_WAIT_S} s")
                time.sleep(MACHINE_WAIT_S)
                outcome = supervise(dict(setting, batch_size=candidate), budget)
        outcome.update(batch_size=candidate, predicted_bytes=predicted)
        tries.append(outcome)
        fitted = outcome["status"] == "ok" and outcome["peak_memory_bytes"] <= budget
        log(f"  {setting['layout']} beams {setting['num_beams']} batch {candidate}: {outcome['status']}"
            + (f", peak {outcome['peak_memory_bytes'] / GIB:.2f} GiB" if outcome["status"] == "ok" else
               f" ({outcome['reason'][:160]})") + f", predicted {predicted / GIB:.2f} GiB")
        if fitted:
            fits[candidate] = outcome["peak_memory_bytes"]
        elif outcome["status"] in ("error", "machine_low"):  # neither fits nor exceeds: no limit found
            return dict(max_batch=max(fits, default=0), fail_batch=None, tries=tries, stopped=outcome["status"])
        else:
            fails[candidate] = outcome["status"]
        lo, hi = max(fits, default=0), min(fails, default=None)
        if hi is not None and (hi - lo <= max(1, tolerance * lo)):
            return dict(max_batch=lo, fail_batch=hi, tries=tries, stopped="bracketed")
        if lo == 0:  # batch 1 does not fit
            return dict(max_batch=0, fail_batch=hi, tries=tries, stopped="batch 1 exceeds the budget")
        step = max(1, math.ceil(tolerance * lo))
        # the batch the line through the measured tries puts at the budget
        guess = lo + int((budget - fits[lo]) / max(predict(fits, lo + 1, base, slope) - fits[lo], 1))
        if len(fits) == 1:  # one point and the analytic slope: first a second point, half way, for a measured line
            guess = (lo + guess) // 2
        candidate = max(guess, lo + step)
        if hi is not None and candidate >= hi:  # the line is off: bisect
            candidate = (lo + hi) // 2
    lo, hi = max(fits, default=0), min(fails, default=None)
    return dict(max_batch=lo, fail_batch=hi, tries=tries, stopped=f"{max_tries} tries")


def paired_throughput(settings: dict[str, dict], rounds: int, budget: int, log=print) -> dict:
    """Decode speed of each layout at its own batch, one fresh child per layout and round (two children at their limits
    would not fit the budget together), in an order rotated from round to round. Returns {layout: {"rounds": [...]},
    "ratios": {layout: ratio summary against MHA}}."""
    names = list(settings)
    measured = {name: [] for name in names}
    errors = {}
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            if name in errors:
                continue
            outcome = supervise(settings[name], budget)
            if outcome["status"] in ("killed", "out_of_memory", "machine_low"):
                # at the limit a try fits by less than the run-to-run noise of RSS: one more try of the same batch
                log(f"  throughput {name} round {round_index + 1}: {outcome['reason'][:120]}; trying it once more")
                outcome = supervise(settings[name], budget)
            if outcome["status"] != "ok":
                errors[name] = outcome["reason"]
                log(f"  throughput {name} round {round_index + 1}: {outcome['status']} ({outcome['reason'][:160]})")
                continue
            measured[name].append(dict(round=round_index, decode_tokens_per_s=outcome["decode_tokens_per_s"],
                                       decode_step_s=outcome["decode_step_s"],
                                       peak_memory_bytes=outcome["peak_memory_bytes"]))
            log(f"  throughput {name} batch {settings[name]['batch_size']} round {round_index + 1}: "
                f"{outcome['decode_tokens_per_s']:.1f} tok/s ({outcome['decode_step_s']:.2f} s/step)")
    ratios = {}
    if "mha" in names and measured["mha"]:
        mha = {r["round"]: r["decode_tokens_per_s"] for r in measured["mha"]}
        for name in names[1:] if names[0] == "mha" else [n for n in names if n != "mha"]:
            values = [r["decode_tokens_per_s"] / mha[r["round"]] for r in measured[name] if r["round"] in mha]
            if values:
                ratios[name] = summarise_ratio(values)
    return dict(measured=measured, errors=errors, ratios=ratios)


def median_range(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_try":  # one try, measured in this process (see supervise)
        child_main(json.loads(sys.argv[2]))


# --------------------------------------------------------------------------------------------- the run


def model_shapes(args) -> tuple[dict, str]:
    """(Whisper config fields that set the shapes, display name): `--size`, or a checkpoint's config (its weights are
    not loaded: the tries use random weights of its shapes)."""
    if args.size is not None:
        return dict(SIZES[args.size]), f"whisper-{args.size} shapes"
    config = transformers.AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    return {k: getattr(config, k) for k in SIZES["tiny"]}, f"{args.model_name_or_path} shapes"


def run_capacity(args, output_dir: str, command: list[str], log=print) -> dict:
    """The whole search: the encoder chunk, then per (new tokens, beams) the largest batch of each layout, then the
    throughput of each layout at its largest batch in paired rounds. Writes capacity.json, capacity.md and
    capacity.png to output_dir and returns the results."""
    shapes, model_name = model_shapes(args)
    budget, budget_how = resolve_budget(args.memory_budget, args.device)
    dtype = DTYPES[args.dtype]
    load_before, started = sample_load(2.0), cpu_snapshot()
    common = dict(shapes=shapes, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation,
                  num_threads=args.num_threads, seed=args.seed)
    configs = {layout: layout_config(shapes, layout) for layout in args.capacity_layouts}
    weights = {layout: param_bytes(config, dtype) for layout, config in configs.items()}
    results = dict(
        header={
            "command": f"`python run_benchmark.py {' '.join(command)}`",
            "model": f"{model_name}, random weights (memory and speed depend on shapes and dtype only)",
            "machine": f"{args.device}: {machine_description(args.device)}, torch threads per try: {args.num_threads}",
            "dtype": args.dtype,
            "memory budget": f"{budget / GIB:.2f} GiB ({budget_how})",
            "layouts": "; ".join(f"{LAYOUT_LABELS[k]}: {describe_layout(c)}" for k, c in configs.items()),
            "method": (f"each try decodes the last {args.decode_steps} of T tokens with generate() from a cache of the "
                       "first ones built by the model's own forward (one utterance, repeated over the batch); the "
                       "encoder output is a random tensor held through decoding; peak = "
                       + ("the try's peak RSS, weights and runtime included" if args.device == "cpu" else
                          "torch.cuda.max_memory_allocated") + f"; search stops within {args.search_tolerance:.0%}"),
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        },
        run=dict(vars(args), command=command, budget_bytes=budget, param_bytes=weights),
        encoder=None, searches=[], throughput=[], load=dict(before=load_before),
    )

    # 1. The encoder over one chunk: its peak (whole model resident) and time per utterance.
    log(f"encoder, chunk of {args.encoder_batch}")
    results["encoder"] = supervise(dict(common, layout="mha", mode="encoder", batch_size=args.encoder_batch), budget)
    log(f"  {results['encoder']['status']}" + (f", peak {results['encoder']['peak_memory_bytes'] / GIB:.2f} GiB, "
        f"{results['encoder']['encoder_s_per_utterance']:.1f} s per utterance" if results['encoder']['status'] == 'ok'
        else f" ({results['encoder']['reason'][:200]})"))

    # 2. The largest batch of each layout (or the one an earlier run of the same model, dtype and budget found).
    earlier = earlier_searches(args.resume_from, results["run"])
    for new_tokens in args.new_tokens:
        for beams in args.num_beams:
            for layout, config in configs.items():
                if (layout, beams, new_tokens) in earlier:
                    log(f"  {layout} beams {beams}: largest batch {earlier[layout, beams, new_tokens]['max_batch']} "
                        f"from {args.resume_from}")
                    results["searches"].append(dict(earlier[layout, beams, new_tokens], resumed_from=args.resume_from))
                    continue
                setting = dict(common, layout=layout, mode="decode", num_beams=beams, new_tokens=new_tokens,
                               decode_steps=min(args.decode_steps, new_tokens))
                base = weights[layout] + RUNTIME_BYTES[args.device.split(":")[0]]
                slope = bytes_per_utterance(config, dtype, beams, new_tokens)
                search = find_max_batch(setting, budget, base, slope, args.search_tolerance, args.max_tries, log)
                best = next((t for t in search["tries"] if t["batch_size"] == search["max_batch"]), {})
                results["searches"].append(dict(
                    layout=layout, num_beams=beams, new_tokens=new_tokens, predicted_bytes_per_utterance=slope,
                    **search, peak_memory_bytes=best.get("peak_memory_bytes"), cache_bytes=best.get("cache_bytes")))
                write_json(results, output_dir)

    # 3. Throughput at each layout's largest batch, paired rounds.
    if args.throughput_rounds:
        for new_tokens in args.new_tokens:
            for beams in args.num_beams:
                limits = {s["layout"]: s["max_batch"] for s in results["searches"]
                          if (s["num_beams"], s["new_tokens"]) == (beams, new_tokens) and s["max_batch"] >= 1}
                settings = {layout: dict(common, layout=layout, mode="decode", num_beams=beams, new_tokens=new_tokens,
                                         batch_size=batch, decode_steps=min(args.decode_steps, new_tokens))
                            for layout, batch in limits.items() if layout in args.throughput_layouts}
                if not settings:
                    continue
                log(f"throughput at the limits, T={new_tokens}, beams {beams}: {settings and limits}")
                measured = paired_throughput(settings, args.throughput_rounds, budget, log)
                results["throughput"].append(dict(num_beams=beams, new_tokens=new_tokens, batch_sizes=limits,
                                                  **measured))
                write_json(results, output_dir)

    results["load"]["during"] = load_between(started, cpu_snapshot())
    results["header"]["load"] = (f"before: {load_line(results['load']['before'])}; during: "
                                 f"{load_line(results['load']['during'])}")
    write_json(results, output_dir)
    from whisper_mla.capacity_report import markdown_report, plot_capacity  # the report reads this module's tables
    with open(os.path.join(output_dir, "capacity.md"), "w") as f:
        f.write(markdown_report(results))
    plot_capacity(results, os.path.join(output_dir, "capacity.png"))
    return results


def earlier_searches(path: str | None, run: dict) -> dict:
    """{(layout, beams, new tokens): search} of an earlier capacity.json, refused unless it measured the same shapes,
    dtype, device, budget and decode steps."""
    if path is None:
        return {}
    with open(path) as f:
        earlier = json.load(f)
    keys = ("size", "model_name_or_path", "dtype", "device", "budget_bytes", "decode_steps", "attn_implementation")
    different = {k: (earlier["run"].get(k), run.get(k)) for k in keys if earlier["run"].get(k) != run.get(k)}
    if different:
        raise ValueError(f"--resume_from expects a run of the same settings, but found (earlier, now) {different} in "
                         f"{path}; pass the same settings or leave --resume_from out.")
    return {(s["layout"], s["num_beams"], s["new_tokens"]): s for s in earlier["searches"]}


def write_json(results: dict, output_dir: str) -> None:
    with open(os.path.join(output_dir, "capacity.json"), "w") as f:
        json.dump(results, f, indent=1)
