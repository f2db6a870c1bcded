"""Rendering results: a rich table for people, JSONL/JSON/CSV for scripts. No model code here.

Every writer gets records as they finish (`add`) and is closed once (`close`). JSONL writes and
flushes each record at once, so a script reading the pipe sees samples as they are done and an
interrupted run keeps every finished line; the other formats need the whole grid and write it
in grid order at the end.
"""

from __future__ import annotations

import csv
import enum
import json
from collections import Counter
from typing import IO, Protocol

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..diagnostics.diversity import TemperatureStats, by_temperature, cell_stats
from ..record import FIELDS, Record, as_dict


class SampleFormat(enum.StrEnum):
    """How `generate` writes its samples."""

    TABLE = "table"
    JSONL = "jsonl"
    JSON = "json"
    CSV = "csv"
    PARQUET = "parquet"


class ReportFormat(enum.StrEnum):
    """How `list`, `play` and `explain` write their report: for people, or for scripts."""

    TABLE = "table"
    JSON = "json"


class Writer(Protocol):
    def add(self, record: Record) -> None: ...
    def close(self) -> None: ...


class JsonlWriter:
    def __init__(self, stream: IO[str]):
        self.stream = stream

    def add(self, record: Record) -> None:
        self.stream.write(json.dumps(as_dict(record), ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class _Collecting:
    """Keeps records until `close`, then writes them in the grid's order."""

    def __init__(self, stream: IO[str], order: list[tuple]):
        self.stream = stream
        self.rank = {key: i for i, key in enumerate(order)}
        self.records: list[Record] = []

    def add(self, record: Record) -> None:
        self.records.append(record)

    def ordered(self) -> list[Record]:
        return sorted(self.records, key=lambda r: self.rank.get(r.grid_key, len(self.rank)))

    def close(self) -> None:
        raise NotImplementedError


class JsonWriter(_Collecting):
    def close(self) -> None:
        json.dump([as_dict(r) for r in self.ordered()], self.stream, ensure_ascii=False, indent=2)
        self.stream.write("\n")
        self.stream.flush()


class CsvWriter(_Collecting):
    def close(self) -> None:
        records = self.ordered()
        fields = [f for f in FIELDS if (f != "id" or any(r.id is not None for r in records))
                  and (f != "json" or any(r.asked_json for r in records))]
        writer = csv.DictWriter(self.stream, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for r in records:
            row = as_dict(r)
            if "json" in row:  # a cell holds the value as JSON text
                row["json"] = json.dumps(row["json"], ensure_ascii=False)
            writer.writerow(row)
        self.stream.flush()


class ParquetWriter(_Collecting):
    """The records as a Parquet table, typed columns in the JSONL records' order (`id` as text,
    where the input gave ids). The stream must be a file's (`--output`): Parquet is binary."""

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = self.ordered()
        # A JSON answer's value has no one column type: its text is the `text` column.
        columns = {name: [getattr(r, name) for r in records] for name in FIELDS if name not in ("id", "json")}
        types = {"persona": pa.string(), "prompt": pa.string(), "temperature": pa.float64(), "sample": pa.int64(),
                 "seed": pa.int64(), "text": pa.string(), "new_tokens": pa.int64(), "finish_reason": pa.string(),
                 "model": pa.string()}
        arrays = {name: pa.array(values, type=types[name]) for name, values in columns.items()}
        if any(r.id is not None for r in records):
            arrays["id"] = pa.array([None if r.id is None else str(r.id) for r in records], type=pa.string())
        self.stream.flush()
        pq.write_table(pa.table(arrays), self.stream.buffer)


class TableWriter(_Collecting):
    """One table row per persona × prompt, one column per temperature, samples stacked."""

    def __init__(self, stream: IO[str], order: list[tuple], temperatures: list[float]):
        super().__init__(stream, order)
        self.temperatures = temperatures

    def close(self) -> None:
        Console(file=self.stream, soft_wrap=False).print(build_table(self.ordered(), self.temperatures))


def build_table(records: list[Record], temperatures: list[float]) -> Table:
    """The samples, and a footer row with each temperature's diversity (diversity.py)."""
    model = records[0].model if records else ""
    footer = {s.temperature: s for s in by_temperature(cell_stats([as_dict(r) for r in records]))}
    table = Table(box=box.ROUNDED, show_lines=True, expand=True, show_footer=bool(records),
                  caption=f"model: {model}" if model else None, caption_justify="right")
    table.add_column("persona / prompt", ratio=1, style="bold",
                     footer=Text("diversity\n(mean per cell)", style="bold"))
    for t in temperatures:
        table.add_column(f"T = {t:g}" + (" (greedy)" if t == 0 else ""), ratio=2,
                         footer=_footer(footer[t]) if t in footer else "")

    cells: dict[tuple[str, str], dict[float, list[Record]]] = {}
    for r in records:
        cells.setdefault((r.persona, r.prompt), {}).setdefault(r.temperature, []).append(r)
    for (persona, prompt), by_temp in cells.items():
        head = Text.assemble((persona, "bold cyan"), "\n", (prompt, "dim italic"))
        table.add_row(head, *(_cell(by_temp.get(t, [])) for t in temperatures))
    return table


def _footer(stats: TemperatureStats) -> Text:
    return Text(f"distinct-1 {stats.distinct_1:.2f} · distinct-2 {stats.distinct_2:.2f}\n"
                f"unique {stats.unique_share:.0%} · {stats.mean_tokens:.1f} tokens", style="")


def _cell(records: list[Record]) -> Group:
    """Distinct samples in order of first appearance; repeats shown once with ×count."""
    counts = Counter(r.text for r in records)
    truncated = {r.text for r in records if r.finish_reason == "length"}
    parts: list[Text] = []
    for text in dict.fromkeys(r.text for r in records):
        line = Text()
        if counts[text] > 1:
            line.append(f"×{counts[text]} ", style="bold magenta")
        line.append(text or "(empty)", style="" if text else "dim")
        if text in truncated:
            line.append(" …", style="dim")
        if parts:
            parts.append(Text("─" * 3, style="dim"))
        parts.append(line)
    return Group(*parts)


def make_writer(fmt: str, stream: IO[str], order: list[tuple], temperatures: list[float]) -> Writer:
    if fmt == "jsonl":
        return JsonlWriter(stream)
    if fmt == "json":
        return JsonWriter(stream, order)
    if fmt == "csv":
        return CsvWriter(stream, order)
    if fmt == "parquet":
        return ParquetWriter(stream, order)
    return TableWriter(stream, order, temperatures)
