"""The report of a capacity search (`whisper_mla.capacity.run_capacity`): capacity.md and capacity.png."""

import statistics

from whisper_mla.capacity import AUDIO_SECONDS, GIB, LAYOUT_LABELS, MIB, REFUSE_MARGIN, median_range


def audio_seconds_per_second(batch: int, step_s: float, new_tokens: int, encoder_s: float | None) -> float:
    """Seconds of 30 s audio transcribed per second: B utterances over T steps of `step_s` (each timed at the end of
    the T tokens, so early steps are counted as long as the last), plus the encoder's time for B utterances."""
    return batch * AUDIO_SECONDS / (new_tokens * step_s + batch * (encoder_s or 0.0))


def markdown_report(results: dict) -> str:
    """The header, the largest batches, the throughput at them, and every try."""
    lines = ["# What fits in memory: the largest batch per layout", "",
             *(f"- {k}: {v}" for k, v in results["header"].items()), ""]
    encoder = results["encoder"] or {}
    encoder_s = encoder.get("encoder_s_per_utterance")
    if encoder.get("status") == "ok":
        lines += [f"Encoder, one chunk of {results['run']['encoder_batch']} utterance(s): peak "
                  f"{encoder['peak_memory_bytes'] / GIB:.2f} GiB (whole model resident), {encoder_s:.2f} s per "
                  "utterance; chunks are encoded one after another, so the encoder's peak does not grow with the "
                  "batch (it is not part of the tries below).", ""]
    else:
        lines += [f"Encoder chunk: {encoder.get('status')} ({encoder.get('reason', '')[:200]}); throughput below "
                  "excludes the encoder.", ""]
    lines += ["Largest batch: the largest batch of 30 s utterances whose try stayed within the budget; over budget: "
              "the smallest batch found over it (killed: the watchdog or the allocator stopped it; refused: predicted "
              f"over the budget by more than {REFUSE_MARGIN:.0%}, never started). Sequences = batch x beams.", "",
              "| T | beams | layout | largest batch | x MHA | sequences | over budget | peak GiB at largest | "
              "cache MiB at largest | tries |", "|" + "---|" * 10]
    mha_max = {(s["new_tokens"], s["num_beams"]): s["max_batch"] for s in results["searches"] if s["layout"] == "mha"}
    for s in results["searches"]:
        reference = mha_max.get((s["new_tokens"], s["num_beams"]))
        fail = next((t for t in s["tries"] if t["batch_size"] == s["fail_batch"]), None)
        over = f"{s['fail_batch']} ({fail['status']})" if fail else f"- ({s['stopped']})"
        lines.append(
            f"| {s['new_tokens']} | {s['num_beams']} | {LAYOUT_LABELS[s['layout']]} | {s['max_batch']} | "
            + (f"{s['max_batch'] / reference:.1f}x" if reference else "-") + f" | {s['max_batch'] * s['num_beams']} | "
            f"{over} | " + (f"{s['peak_memory_bytes'] / GIB:.2f}" if s["peak_memory_bytes"] else "-") + " | "
            + (f"{s['cache_bytes'] / MIB:.0f}" if s["cache_bytes"] else "-") + f" | {len(s['tries'])} |")
    if results["throughput"]:
        steps = results["run"]["decode_steps"] - 1
        lines += ["", f"Throughput at each layout's largest batch, the same tries as the search's: decode tokens/s "
                  f"returned (one per utterance and step, beams or not) over {steps} timed step(s) at the end of the T "
                  "tokens (after one untimed "
                  "step), median (min-max) over the rounds; x MHA: the ratio within each round (each layout at its "
                  "own largest batch), median (min-max). Audio s/s: seconds of audio per second, T steps at the "
                  "timed step's pace (the last steps are the slowest, so this is a lower bound) plus the encoder's "
                  "measured time per utterance" + ("" if encoder_s else " (not measured: excluded)") + ".", "",
                  "| T | beams | layout | batch | decode tok/s | x MHA (paired) | s per step | audio s/s "
                  "(encoder incl.) | audio s/s (decode only) |", "|" + "---|" * 9]
        for t in results["throughput"]:
            for layout, rounds in t["measured"].items():
                if not rounds:
                    lines.append(f"| {t['new_tokens']} | {t['num_beams']} | {LAYOUT_LABELS[layout]} | "
                                 f"{t['batch_sizes'][layout]} | failed: {t['errors'].get(layout, '')[:80]} |"
                                 + " |" * 4)
                    continue
                speed = median_range([r["decode_tokens_per_s"] for r in rounds])
                step_s = statistics.median(r["decode_step_s"] for r in rounds)
                ratio = t["ratios"].get(layout)
                batch = t["batch_sizes"][layout]
                lines.append(
                    f"| {t['new_tokens']} | {t['num_beams']} | {LAYOUT_LABELS[layout]} | {batch} | "
                    f"{speed['median']:.1f} ({speed['min']:.1f}-{speed['max']:.1f}) | "
                    + (f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"
                       + ("" if ratio["steady"] else f" ⚠ spread {ratio['spread']:.0%}") if ratio else "-")
                    + f" | {step_s:.2f} | "
                    + (f"{audio_seconds_per_second(batch, step_s, t['new_tokens'], encoder_s):.1f}" if encoder_s
                       else "-")
                    + f" | {audio_seconds_per_second(batch, step_s, t['new_tokens'], None):.1f} |")
    lines += ["", "## Every try", "", "| T | beams | layout | batch | outcome | peak GiB | predicted GiB | max RSS "
              "seen GiB | phase | seconds |", "|" + "---|" * 10]
    for s in results["searches"]:
        for t in s["tries"]:
            outcome = t["status"] if t["status"] == "ok" else f"{t['status']}: {t['reason'][:90]}"
            lines.append(
                f"| {s['new_tokens']} | {s['num_beams']} | {s['layout']} | {t['batch_size']} | {outcome} | "
                + (f"{t['peak_memory_bytes'] / GIB:.2f}" if t.get("peak_memory_bytes") else "-")
                + f" | {t['predicted_bytes'] / GIB:.2f} | "
                + (f"{t['max_rss_bytes'] / GIB:.2f}" if t.get("max_rss_bytes") else "-")
                + f" | {t.get('phase', '-')} | {t.get('seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def plot_capacity(results: dict, path: str) -> None:
    """Left: the largest batch per layout for each (T, beams); right: decode tokens/s at it, median with the range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(s["new_tokens"], s["num_beams"]) for s in results["searches"]})
    layouts = list(dict.fromkeys(s["layout"] for s in results["searches"]))
    panels = 2 if results["throughput"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.6), squeeze=False)
    width = 0.8 / max(len(layouts), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0][0]
    by_key = {(s["new_tokens"], s["num_beams"], s["layout"]): s for s in results["searches"]}
    for i, layout in enumerate(layouts):
        values = [by_key.get((*g, layout), {}).get("max_batch", 0) for g in groups]
        bars = ax.bar([j + i * width for j in range(len(groups))], values, width, label=LAYOUT_LABELS[layout],
                      color=colors[i % len(colors)])
        ax.bar_label(bars, fontsize=7)
    ax.set(yscale="log", ylabel="largest batch of 30 s utterances", title="largest batch within the budget")
    ax.set_ylim(bottom=0.8)  # a bar of 1 or 4 stays visible on the log scale
    ax.set_xticks([j + width * (len(layouts) - 1) / 2 for j in range(len(groups))],
                  [f"T={t}, beams {b}" for t, b in groups])
    ax.grid(alpha=0.3, axis="y")
    if panels == 2:
        ax = axes[0][1]
        for i, layout in enumerate(layouts):
            xs, ys, lows, highs = [], [], [], []
            for j, g in enumerate(groups):
                entry = next((t for t in results["throughput"] if (t["new_tokens"], t["num_beams"]) == g), None)
                rounds = entry["measured"].get(layout) if entry else None
                if rounds:
                    speed = median_range([r["decode_tokens_per_s"] for r in rounds])
                    xs.append(j + i * width)
                    ys.append(speed["median"])
                    lows.append(speed["median"] - speed["min"])
                    highs.append(speed["max"] - speed["median"])
            if xs:
                bars = ax.bar(xs, ys, width, yerr=[lows, highs], capsize=3, color=colors[i % len(colors)],
                              label=LAYOUT_LABELS[layout])
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set(yscale="log", ylabel="decode tokens/s at the largest batch",
               title="throughput at the limit (paired rounds)")
        ax.set_xticks([j + width * (len(layouts) - 1) / 2 for j in range(len(groups))],
                      [f"T={t}, beams {b}" for t, b in groups])
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(layouts), fontsize=8)
    header = results["header"]
    fig.suptitle(f"{header['model'].split(',')[0]}, {header['dtype']}, budget {header['memory budget'].split(' (')[0]}"
                 f", {header['machine'].split(', torch')[0]}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
