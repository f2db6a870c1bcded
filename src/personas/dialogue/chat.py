"""`personas chat`: personas talking to each other, one line at a time.

Every line has its own seed, derived from `--seed` and the turn number, so the same seed,
personas, temperatures and opener give the same conversation again.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterator, Sequence

from ..errors import InputError
from ..library.schema import BUILT_IN, Persona
from ..model.load import LoadedModel
from ..sampling.grid import Settings, check_temperature, derive_seed, rules_from
from .conversation import Line, Seat, Turn, speak


class Order(enum.StrEnum):
    """Who speaks next: in the order named, or drawn (seeded) each turn."""

    ROUND_ROBIN = "round-robin"
    RANDOM = "random"


ORDERS = tuple(o.value for o in Order)
DEFAULT_CHAT_TEMPERATURE = BUILT_IN.temperatures[0]


def seat_of(persona: Persona) -> Seat:
    return Seat(persona.name, persona.system, tuple((e.user, e.assistant) for e in persona.examples),
                rules_from(persona))


def speaking_order(names: Sequence[str], turns: int, order: str, seed: int) -> list[str]:
    """Who speaks each turn. round-robin: in the order given, the first name first. random: each
    turn drawn (seeded) from everyone but the last speaker, so nobody answers themself."""
    if order not in ORDERS:
        raise InputError(f"unknown order '{order}'", "choose one of: " + ", ".join(ORDERS))
    if order == "round-robin":
        return [names[i % len(names)] for i in range(turns)]
    rng = random.Random(derive_seed(seed, "order"))
    out: list[str] = []
    for _ in range(turns):
        out.append(rng.choice([n for n in names if not out or n != out[-1]]))
    return out


def chat_temperatures(personas: Sequence[Persona], values: Sequence[str]) -> dict[str, float]:
    """Each persona's temperature: `--temp NAME=T`, else its TOML `temperature`, else a bare
    `--temp T`, else 0.7."""
    names = [p.name for p in personas]
    everyone: float | None = None
    named: dict[str, float] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        try:
            t = float(number)
        except ValueError:
            raise InputError(f"--temp '{value}' is not a temperature", "write T or NAME=T, e.g. --temp pirate=1.2") from None
        check_temperature(t)
        if not name:
            everyone = t
        elif name not in names:
            raise InputError(f"--temp {value}: '{name}' is not in this chat", "chatting: " + ", ".join(names))
        else:
            named[name] = t
    return {p.name: named.get(p.name, p.temperature if p.temperature is not None else
                              everyone if everyone is not None else DEFAULT_CHAT_TEMPERATURE)
            for p in personas}


def chat_opener(personas: Sequence[Persona], given: str | None) -> str | None:
    """--opener, else the first persona's own opener (in the order named), else none."""
    if given is not None:
        return given
    return next((p.opener for p in personas if p.opener), None)


def check_chat(personas: Sequence[Persona], turns: int, opener: str | None) -> None:
    """Everything about a chat that can be refused before a slow model load."""
    names = [p.name for p in personas]
    if len(names) < 2:
        raise InputError("a chat needs at least two personas", "name two or more, e.g. personas chat pirate critic")
    if len(set(names)) < len(names):
        raise InputError("a persona can take only one seat in a chat", "name each persona once")
    if turns < 1:
        raise InputError(f"--turns {turns} is not allowed", "ask for at least 1 line")
    if opener is not None and not opener.strip():
        raise InputError("the opener is empty", "pass a non-empty --opener or leave it out")


def chat_lines(model: LoadedModel, personas: Sequence[Persona], temperatures: dict[str, float], turns: int,
               seed: int, settings: Settings, *, opener: str | None = None, order: str = "round-robin",
               template: str | None = None, on_truncate: Callable[[str, int], None] = lambda _w, _n: None,
               on_step: Callable[[int], None] = lambda _: None) -> Iterator[Line]:
    """The conversation, a line at a time (a generator, so a caller can show each as it comes)."""
    check_chat(personas, turns, opener)
    names = [p.name for p in personas]
    seats = {p.name: seat_of(p) for p in personas}
    lines: list[Line] = []
    for number, speaker in enumerate(speaking_order(names, turns, order, seed), start=1):
        turn = Turn(seats[speaker], tuple(names), tuple(lines), opener, temperatures[speaker],
                    derive_seed(seed, "chat", number))
        [line] = speak(model, settings, [turn], template, on_truncate=on_truncate, on_step=on_step)
        lines.append(line)
        yield line
