"""Speed measured in paired rounds, and the machine's load while it is measured.

In every round each setting's worker (`whisper_mla.benchmark.Worker`) runs one timed generation, in an order rotated
from round to round, while the others wait; a ratio (MLA/MHA) is computed within a round, from two measurements taken
seconds apart, and reported as the median over the rounds with its range. The machine's load (other processes' CPU
use, steal) is recorded before and during the run. Its sibling `whisper_mla.benchmark_report` turns the records and
ratios into warnings, results.md and plots.
"""

import os
import statistics
import time

import psutil

from whisper_mla.benchmark import ATTENTIONS, Worker, WorkerError


# The paired ratios: wall-clock decode speed (what a user waits for), decode speed per CPU-second of the worker (on a
# CPU: waiting for a core, as on a shared machine, does not count) and the first step's time.
METRIC_LABELS = {"decode_tokens_per_s": "decode tok/s", "decode_tokens_per_cpu_s": "decode tok/CPU-s",
                 "first_step_s": "first-step time"}
SPREAD_LIMIT = 0.20  # (max - min) / median of a ratio over the rounds above which it is flagged as unsteady
BUSY_SHARE = 0.25  # other processes using this share of the machine's CPUs (or this much steal) make it "busy"


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


def rotated(items: list, shift: int) -> list:
    """items rotated left by `shift`: round r starts with the r-th setting, so no setting always goes first."""
    shift %= len(items)
    return items[shift:] + items[:shift]


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
                ratios.append(dict(batch_size=batch, num_beams=beams, new_tokens=new_tokens, attention=attention,
                                   metric=metric, **summarise_ratio(values)))
    return ratios


def summarise_ratio(values: list[float]) -> dict:
    """A ratio measured once per round: its median, min, max, spread ((max - min) / median) and whether the spread
    stays within SPREAD_LIMIT, with the per-round values."""
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median
    return dict(median=median, min=min(values), max=max(values), spread=spread, steady=spread <= SPREAD_LIMIT,
                rounds=values)
