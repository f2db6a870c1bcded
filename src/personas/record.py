"""One generated sample as users see it: the shape shared by every output format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """Field order is the column order of JSON and CSV output."""

    persona: str
    prompt: str
    temperature: float
    sample: int
    seed: int
    text: str
    new_tokens: int
    finish_reason: str  # "stop": the model ended its turn; "length": max_new_tokens reached
    model: str

    @property
    def grid_key(self) -> tuple:
        return (self.persona, self.prompt, self.temperature, self.sample)


FIELDS = list(Record.__dataclass_fields__)
