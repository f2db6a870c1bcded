"""One generated sample as users see it: the shape shared by every output format."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def grid_key(self) -> tuple:
        return (self.id, self.persona, self.prompt, self.temperature, self.sample)


FIELDS = list(Record.__dataclass_fields__)


def as_dict(record: Record) -> dict:
    """The record's fields in order; `id` only where the input gave rows ids."""
    d = {name: getattr(record, name) for name in FIELDS}
    if d["id"] is None:
        del d["id"]
    return d


def resume_key(persona: str, prompt: str, temperature: float, sample: int, seed: int) -> tuple:
    """What identifies a finished sample for --resume: a grid row and a written record agree on it."""
    return (persona, prompt, float(temperature), int(sample), int(seed))
