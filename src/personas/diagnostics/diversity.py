"""How varied the samples of one persona × prompt × temperature cell are. Pure Python.

* distinct-n (Li et al., 2016): distinct n-grams / all n-grams, pooled over the cell's samples.
  Counted over words (lower-cased, split on whitespace, punctuation kept on the word), so the
  number means the same whatever model's tokenizer made the text; 1.0 = no n-gram repeats.
  A cell with no n-grams at all (every sample shorter than n words) scores 0.
* unique: how many samples differ as texts (after trimming whitespace), out of n.
* mean_tokens: the mean number of new tokens (the model's tokens) per sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CellStats:
    """One object of `--stats-file`; field order is the JSON's."""

    persona: str
    prompt: str
    temperature: float
    distinct_1: float
    distinct_2: float
    unique: int
    n: int
    mean_tokens: float


def words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: Iterable[str], n: int) -> float:
    grams = [tuple(ws[i:i + n]) for ws in map(words, texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def cell_stats(records: Sequence[dict]) -> list[CellStats]:
    """Stats per (persona, prompt, temperature), in the order cells first appear in `records`.

    Records are dicts with persona, prompt, temperature, text and new_tokens (the JSON shape of a
    sample), so samples read back from a file count the same as fresh ones.
    """
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["persona"], r["prompt"], r["temperature"]), []).append(r)
    out = []
    for (persona, prompt, temperature), group in cells.items():
        texts = [r["text"] for r in group]
        out.append(CellStats(
            persona=persona, prompt=prompt, temperature=temperature,
            distinct_1=round(distinct_n(texts, 1), 4), distinct_2=round(distinct_n(texts, 2), 4),
            unique=len({t.strip() for t in texts}), n=len(group),
            mean_tokens=round(sum(r["new_tokens"] for r in group) / len(group), 2),
        ))
    return out


@dataclass(frozen=True)
class TemperatureStats:
    """A temperature's cells averaged (each cell counts once): the table's footer row."""

    temperature: float
    distinct_1: float
    distinct_2: float
    unique_share: float  # mean of unique / n
    mean_tokens: float
    cells: int


def by_temperature(stats: Sequence[CellStats]) -> list[TemperatureStats]:
    out = []
    for t in dict.fromkeys(s.temperature for s in stats):
        group = [s for s in stats if s.temperature == t]
        k = len(group)
        out.append(TemperatureStats(
            temperature=t, distinct_1=sum(s.distinct_1 for s in group) / k,
            distinct_2=sum(s.distinct_2 for s in group) / k,
            unique_share=sum(s.unique / s.n for s in group) / k,
            mean_tokens=sum(s.mean_tokens for s in group) / k, cells=k,
        ))
    return out
