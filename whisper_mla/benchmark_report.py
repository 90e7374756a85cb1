"""The benchmark's reports: plain-sentence warnings (unsteady ratios, a busy machine), results.json, results.md and
the plots against batch size, from the records and paired ratios of `whisper_mla.benchmark_rounds`.
"""

import json
import os
import platform

import torch

from whisper_mla.benchmark import ATTENTIONS, SLOW_ENV
from whisper_mla.benchmark_rounds import METRIC_LABELS, SPREAD_LIMIT, is_busy


MIB = 2**20
OUTPUT_FILES = ("results.json", "results.md", "*_vs_batch_size.png")  # what write_reports writes


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
