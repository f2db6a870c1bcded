"""PNG pictures for `--plot`: diversity against temperature, and next-token probability bars.

matplotlib is imported only here and only when a plot is asked for (it is slow to import), with
the Agg backend, so plotting works with no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..diagnostics.diversity import CellStats, by_temperature
from ..errors import InputError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: Path) -> None:
    """Refuse a bad --plot before any slow work."""
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot {path}: the picture is written as PNG", "give a file name ending in .png")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist", "create it first")


def _save(fig, path: Path) -> None:
    # Written beside the target and renamed, so a failed save never leaves half a picture.
    temporary = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(temporary, dpi=120, bbox_inches="tight")
    temporary.replace(path)


def plot_diversity(stats: Sequence[CellStats], path: Path, model: str) -> None:
    """Distinct-1, distinct-2 and the share of unique samples against temperature (each a mean
    over the persona × prompt cells), so a newcomer sees variety grow with T."""
    plt = _pyplot()
    rows = sorted(by_temperature(stats), key=lambda s: s.temperature)
    temps = [s.temperature for s in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for values, label, marker in [
        ([s.distinct_1 for s in rows], "distinct-1: distinct words ÷ all words", "o"),
        ([s.distinct_2 for s in rows], "distinct-2: distinct word pairs ÷ all pairs", "s"),
        ([s.unique_share for s in rows], "unique samples / n", "^"),
    ]:
        ax.plot(temps, values, marker=marker, label=label)
    ax.set_xlabel("temperature (0 = always the likeliest token)")
    ax.set_ylabel("diversity (0 = all repeats, 1 = all different)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xticks(temps)
    cells, n = rows[0].cells if rows else 0, max((s.n for s in stats), default=0)
    ax.set_title(f"How varied are the samples?\n{cells} persona × prompt cell{'s' if cells != 1 else ''}, "
                 f"{n} samples each, model {model}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    plt.close(fig)


def plot_next_token(report: Sequence[dict], path: Path, title: str) -> None:
    """One panel per temperature: the likeliest next tokens as horizontal bars, entropy on top."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(report), figsize=(3.6 * len(report), 0.35 * len(report[0]["top"]) + 1.8),
                             sharey=False, squeeze=False)
    for ax, entry in zip(axes[0], report):
        tokens = [repr(p["token"]) for p in entry["top"]][::-1]
        probs = [p["prob"] for p in entry["top"]][::-1]
        ax.barh(tokens, probs, color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"probability (these {len(probs)} hold {sum(probs):.2f})")
        t = entry["temperature"]
        ax.set_title(f"T = {t:g}{' (greedy)' if t == 0 else ''}\nentropy {entry['entropy']:.2f} nats", fontsize=10)
        for y, p in enumerate(probs):
            ax.text(min(p + 0.02, 0.8), y, f"{p:.2f}", va="center", fontsize=8)
    fig.suptitle(f"Next-token probabilities: {title}", fontsize=11)
    fig.tight_layout()
    fig.text(0.5, -0.02, "softmax(logits / T) of the model's real logits; higher T flattens the distribution. "
             "Entropy (over the whole vocabulary): 0 = one certain token, higher = more spread.",
             ha="center", fontsize=8, color="dimgray")
    _save(fig, path)
    plt.close(fig)
