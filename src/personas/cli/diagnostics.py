"""`generate --stats-file / --diverge / --plot`: what the samples show about temperature.

Collects what the diagnostics need while the grid runs, and writes them when it is done:
the stats file atomically (like --output json), the divergences after the table (or into the
stats file, for the script formats, whose sample output stays as it is), the plot as a PNG.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import InputError
from ..output.files import OutputFile
from ..record import Record, as_dict
from .feedback import Feedback


@dataclass
class Diagnostics:
    """What `generate`'s diagnostic flags asked for, and what they need of the samples as they come."""

    stats_file: Path | None
    diverge: bool
    plot: Path | None
    fmt: str
    records: list[dict] = field(default_factory=list)
    samples: list[Any] = field(default_factory=list)  # sampling.grid.Sample, when --diverge
    target: OutputFile | None = None
    order: list[tuple] = field(default_factory=list)  # the grid's (persona, prompt, temperature) cells

    def open(self, resume: bool) -> None:
        """Refuse impossible combinations and bad paths before any slow work."""
        if self.diverge and self.fmt != "table" and self.stats_file is None:
            raise InputError(f"--diverge with --format {self.fmt} needs --stats-file FILE",
                             "the samples' format stays as it is; the divergences go into the stats file")
        if self.diverge and resume:
            raise InputError("--diverge cannot be combined with --resume",
                             "the samples already written have no token ids to compare")
        if self.plot is not None:
            from ..output.plots import check_plot_path

            check_plot_path(self.plot)
        if self.stats_file is not None:
            self.target = OutputFile(self.stats_file, "json")

    @property
    def wanted(self) -> bool:
        return self.stats_file is not None or self.diverge or self.plot is not None

    def add(self, record: Record, sample: Any) -> None:
        if self.wanted:
            self.records.append(as_dict(record))
        if self.diverge:
            self.samples.append(sample)

    def finish(self, model: Any, out: IO[str], feedback: Feedback, resumed_from: Path | None) -> None:
        from ..diagnostics.diversity import cell_stats

        if not self.wanted:
            return
        # After --resume the file holds every sample, earlier runs' too: the stats cover them all.
        records = _read_jsonl(resumed_from) if resumed_from is not None else self.records
        # Samples finish in any order; the grid's order is the one people read.
        rank = {cell: i for i, cell in reversed(list(enumerate(self.order)))}
        stats = sorted((asdict(s) for s in cell_stats(records)),
                       key=lambda s: rank.get((s["persona"], s["prompt"], s["temperature"]), len(rank)))
        divergences = []
        if self.diverge:
            from ..diagnostics.diverge import divergences as find

            divergences = sorted(find(model, self.samples),
                                 key=lambda d: rank.get((d.persona, d.prompt, d.temperature), len(rank)))
            if self.fmt == "table":
                from ..output.diagnostics import write_divergences

                write_divergences(out, divergences)
            by_cell = {(d.persona, d.prompt, d.temperature): d for d in divergences}
            for s in stats:
                if (d := by_cell.get((s["persona"], s["prompt"], s["temperature"]))) is not None:
                    s["diverge"] = {"position": d.position, "prefix": d.prefix, "alternatives": d.alternatives}
        if self.target is not None:
            json.dump(stats, self.target.stream, ensure_ascii=False, indent=2)
            self.target.stream.write("\n")
            self.target.commit()
            self.target = None
            feedback.info(f"diversity of {len(stats)} cells written to {self.stats_file}")
        if self.plot is not None:
            from ..diagnostics.diversity import CellStats
            from ..output.plots import plot_diversity

            plot_diversity([CellStats(**{k: v for k, v in s.items() if k != "diverge"}) for s in stats],
                           self.plot, model.label)
            feedback.info(f"plot written to {self.plot}")

    def abandon(self) -> None:
        if self.target is not None:
            self.target.abandon()


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line was dropped by --resume; anything else is not ours to judge
    return records
