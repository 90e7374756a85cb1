"""Draws docs/cache_layout.png: the decoder cache of one 30 s utterance, Whisper tiny.en, MHA against MLA's default.

Every box is drawn to scale: width = cached positions (100 decoder tokens, 1500 encoder frames), height = values
cached per position, so areas compare as bytes do. No model is loaded; the sizes are tiny.en's (4 decoder layers,
d_model 384) and the MiB figures are `expected_cache_bytes_per_utterance` at float32 (18.75 and 2.78 MiB).

    python docs/make_cache_figure.py            # writes docs/cache_layout.png
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

LAYERS, D_MODEL, TOKENS, FRAMES = 4, 384, 100, 1500
ROW = 2 * D_MODEL + 220  # vertical room per decoder layer (MHA's K + V, and a gap)
GAP = 160  # between the self-attention and the cross-attention columns
CROSS_X = TOKENS + GAP
COLORS = {"self_k": "#4c72b0", "self_v": "#8fa8d6", "cross_k": "#dd8452", "cross_v": "#f0b48d",
          "latent": "#55a868", "shared": "#8172b3"}


def mib(values: int) -> float:
    return values * 4 / 2**20  # float32


def box(ax, x, y, w, h, color, label=None, dashed=False, text_color="white", fontsize=10):
    ax.add_patch(Rectangle((x, y), w, h, facecolor="none" if dashed else color, edgecolor=color if dashed else "white",
                           linestyle="--" if dashed else "-", linewidth=1.4))
    if label:
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=fontsize,
                color=color if dashed else text_color)


def layer_y(i: int) -> float:
    return (LAYERS - 1 - i) * ROW  # layer 0 on top


def draw_mha(ax):
    for i in range(LAYERS):
        y = layer_y(i)
        box(ax, 0, y + D_MODEL, TOKENS, D_MODEL, COLORS["self_k"], "K")
        box(ax, 0, y, TOKENS, D_MODEL, COLORS["self_v"], "V", text_color="black")
        box(ax, CROSS_X, y + D_MODEL, FRAMES, D_MODEL, COLORS["cross_k"], f"layer {i} cross K  (1500 frames x 384)")
        box(ax, CROSS_X, y, FRAMES, D_MODEL, COLORS["cross_v"], f"layer {i} cross V", text_color="black")
    total = LAYERS * (TOKENS + FRAMES) * 2 * D_MODEL
    ax.set_title(f"MHA (original Whisper tiny.en): every layer caches its own keys and values: {mib(total):.2f} MiB",
                 loc="left", fontsize=13, fontweight="bold")


def draw_mla(ax):
    for i in range(LAYERS):
        y = layer_y(i) + D_MODEL / 2
        box(ax, 0, y, TOKENS, D_MODEL, COLORS["latent"], "x")
        if i == 0:
            box(ax, CROSS_X, y, FRAMES, D_MODEL, COLORS["shared"],
                "ONE shared cross latent: the encoder output h  (1500 frames x 384), cached once")
        else:
            box(ax, CROSS_X, y, FRAMES, D_MODEL, COLORS["shared"],
                f"layer {i} cross-attention reads the same latent (no copy)", dashed=True)
            ax.add_patch(FancyArrowPatch((CROSS_X + 70, layer_y(i - 1) + D_MODEL / 2),
                                         (CROSS_X + 70, y + D_MODEL), arrowstyle="-|>", mutation_scale=14,
                                         color=COLORS["shared"], linewidth=1.4))
    total = LAYERS * TOKENS * D_MODEL + FRAMES * D_MODEL
    mha = LAYERS * (TOKENS + FRAMES) * 2 * D_MODEL
    ax.set_title(f"MLA, the converter's default (exact): {mib(total):.2f} MiB, {100 * (1 - total / mha):.1f}% less",
                 loc="left", fontsize=13, fontweight="bold")


def main():
    fig, axes = plt.subplots(2, 1, figsize=(13, 9.4), sharex=True)
    draw_mha(axes[0])
    draw_mla(axes[1])
    for ax in axes:
        ax.set_xlim(-260, CROSS_X + FRAMES + 10)
        ax.set_ylim(-60, LAYERS * ROW + 120)
        for i in range(LAYERS):
            ax.text(-30, layer_y(i) + D_MODEL, f"decoder\nlayer {i}", ha="right", va="center", fontsize=10)
        ax.axis("off")
    top = layer_y(0) + 2 * D_MODEL + 25
    axes[0].text(TOKENS / 2, top, "self-attention\n(100 tokens)", ha="center", va="bottom", fontsize=10)
    axes[0].text(CROSS_X + FRAMES / 2, top, "cross-attention (1500 encoder frames of a 30 s window)",
                 ha="center", va="bottom", fontsize=10)
    axes[1].text(0, 20, "x: each self-attention block caches its own input: 384 values per token instead of 768 keys "
                 "and values;\nits key and value weights are absorbed into the query and the output. With the int8 "
                 "cache the same latents take 0.71 MiB.",
                 ha="left", va="top", fontsize=10)
    fig.suptitle("Decoder cache of one 30 s utterance with 100 tokens, Whisper tiny.en, float32 (boxes to scale: "
                 "area = bytes)", fontsize=11, y=0.995)
    fig.tight_layout(rect=(0, 0.02, 1, 0.98))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache_layout.png")
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
