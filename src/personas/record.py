"""One generated sample as users see it: the shape shared by every output format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """One generated sample as users see it, in every output format; field order is the column
    order of JSON and CSV output."""

    persona: str
    prompt: str
    temperature: float
    sample: int
    seed: int
    text: str
    new_tokens: int
    finish_reason: str  # "stop": the model ended its turn; "length": max_new_tokens reached
    model: str
    id: str | int | None = None  # the input line's id, for prompts files and `serve`
    # The answer parsed, for a row asked for JSON whose answer is complete; else None. Derived from
    # `text`, so left out of comparisons (and of the hash: a dict has none).
    json: Any = field(default=None, compare=False)
    asked_json: bool = field(default=False, repr=False, compare=False)  # the row was asked for JSON: `json` is written

    @property
    def grid_key(self) -> tuple:
        return (self.id, self.persona, self.prompt, self.temperature, self.sample)


FIELDS = [name for name in Record.__dataclass_fields__ if name != "asked_json"]


def as_dict(record: Record) -> dict:
    """The record's fields in order; `id` only where the input gave rows ids, `json` only where
    the row was asked for JSON (null there when its answer was cut short)."""
    d = {name: getattr(record, name) for name in FIELDS}
    if d["id"] is None:
        del d["id"]
    if not record.asked_json:
        del d["json"]
    return d


def resume_key(persona: str, prompt: str, temperature: float, sample: int, seed: int) -> tuple:
    """What identifies a finished sample for --resume: a grid row and a written record agree on it."""
    return (persona, prompt, float(temperature), int(sample), int(seed))
