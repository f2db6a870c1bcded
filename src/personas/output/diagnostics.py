"""Rendering `explain` and `--diverge` for people (rich). No model code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..diagnostics.diverge import Divergence

BAR_WIDTH = 20


def shown(token: str) -> str:
    """A token with its whitespace made visible: ' the' -> '␣the', a newline -> '⏎'."""
    return repr(token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥"))[1:-1] or "''"


def prob_text(prob: float) -> str:
    """Three decimals, except that a small but real probability is not shown as 0.000."""
    return f"{prob:.3f}" if prob >= 0.0005 or prob == 0 else f"{prob:.0e}"


def bar(prob: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar in eighths of a character, so small probabilities still show."""
    eighths = round(prob * width * 8)
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def _probabilities(top: Sequence[dict], room: int) -> Group:
    """Token, bar, probability on one line each, the bar as long as the column allows."""
    lines = []
    width = max((len(shown(p["token"])) for p in top), default=0)
    bar_width = max(4, min(BAR_WIDTH, room - width - 8))
    for p in top:
        lines.append(Text.assemble((shown(p["token"]).ljust(width), "bold"), " ",
                                   (bar(p["prob"], bar_width).ljust(bar_width + 1), "cyan"), prob_text(p["prob"])))
    return Group(*lines)


def write_explain_table(stream: IO[str], report: Sequence[dict], title: str) -> None:
    console = Console(file=stream, highlight=False, soft_wrap=False)
    steps = [("first token after the prompt", [(e["entropy"], e["top"]) for e in report])]
    for k in range(len(report[0]["steps"])):
        after = report[0]["steps"][k]["after"]
        steps.append((f"step {k + 2}, after the greedy {after!r}",
                      [(e["steps"][k]["entropy"], e["steps"][k]["top"]) for e in report]))
    for heading, cells in steps:
        table = Table(box=box.ROUNDED, title=heading, title_justify="left", show_footer=True)
        for entry in report:
            t = entry["temperature"]
            table.add_column(f"T = {t:g}" + (" (greedy)" if t == 0 else ""), footer="")
        room = console.width // len(report) - 3  # a column's inside, between its borders
        table.add_row(*(_probabilities(top, room) for _, top in cells))
        for column, (h, _) in zip(table.columns, cells):
            column.footer = Text(f"entropy {h:.2f} nats", style="dim")
        console.print(table)
    console.print(Text(title, style="dim"))


def write_divergences(stream: IO[str], found: Sequence[Divergence]) -> None:
    console = Console(file=stream, highlight=False, soft_wrap=False)
    console.print(Text("Where the samples diverge", style="bold"))
    for d in found:
        head = Text.assemble((d.persona, "bold cyan"), f" · T = {d.temperature:g} · {d.n} samples · ",
                             (d.prompt, "dim italic"))
        console.print(head)
        if d.position is None:
            console.print(Text("    all samples are identical", style="dim"))
            continue
        console.print(Text.assemble("    shared for ", (f"{d.position} token{'' if d.position == 1 else 's'}", "bold"), ": ",
                                    (repr(d.prefix) if d.prefix else "(nothing: they differ at once)", "italic")))
        for a in d.alternatives:
            count = f"×{a['count']}" if a["count"] else "  –"
            console.print(Text.assemble("    ", (count.rjust(4), "bold magenta" if a["count"] else "dim"), " ",
                                        (shown(a["token"]).ljust(16), "bold" if a["count"] else "dim"), " ",
                                        (bar(a["prob"]).ljust(BAR_WIDTH + 1), "cyan"), prob_text(a["prob"])))
