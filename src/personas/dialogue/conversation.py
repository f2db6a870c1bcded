"""Several speakers, one transcript: each speaker's prompt from its own seat, and the batched turn.

A speaker sees the conversation as a chat with itself: its own system context and examples,
its own earlier lines as assistant turns, everyone else's lines (and an opener) as user turns
written `name: text`. Chat formats want user and assistant to alternate, so consecutive lines
of others merge into one user turn; a speaker who opens the conversation gets a short stage
direction as the user turn it answers.

`speak` samples one line for each of many (seat, transcript) pairs in ONE batched generate:
all episodes of a game advance together, a turn at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..model.load import LoadedModel, fit_dialog
from ..model.prompt import Dialog
from ..sampling.grid import NO_RULES, Row, Rules, Sample, Settings, resolve_rules


@dataclass(frozen=True)
class Seat:
    """Who speaks, and what only they see: their system context (with any private brief)."""

    name: str
    system: str | None
    examples: tuple[tuple[str, str], ...] = ()
    rules: Rules = NO_RULES  # its persona's own logits rules (token texts not yet ids)


@dataclass(frozen=True)
class Line:
    """One line spoken; the shape of `chat --format jsonl` output."""

    turn: int  # from 1; an opener is not a turn
    speaker: str
    text: str
    temperature: float
    seed: int
    new_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Turn:
    """A request for one line: this seat speaks next in this transcript."""

    seat: Seat
    everyone: tuple[str, ...]
    lines: tuple[Line, ...]
    opener: str | None
    temperature: float
    seed: int


def scene(name: str, everyone: Sequence[str]) -> str:
    """The stage directions every speaker gets: who is here, how lines look, to speak only for itself."""
    others = [n for n in everyone if n != name]
    return (f"You are {name}, in a conversation with {_join(others)}. Their lines reach you as "
            f"\"name: text\". Reply with your own next line only, in character, and never write "
            f"lines for {_join(others)}.")


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def seat_dialog(turn: Turn) -> Dialog:
    """The conversation as `turn.seat` sees it, ready for the chat format."""
    seat = turn.seat
    system = "\n\n".join(p for p in (seat.system, scene(seat.name, turn.everyone)) if p)
    messages: list[tuple[str, str]] = []  # (role, text), roles alternating
    heard = [turn.opener] if turn.opener else []
    for line in turn.lines:
        if line.speaker == seat.name:
            messages.append(("user", "\n\n".join(heard) if heard else _opening_cue(turn)))
            messages.append(("assistant", line.text or "…"))
            heard = []
        else:
            heard.append(f"{line.speaker}: {line.text or '…'}")
    messages.append(("user", "\n\n".join(heard) if heard else _opening_cue(turn)))
    exchanges = tuple((messages[i][1], messages[i + 1][1]) for i in range(0, len(messages) - 1, 2))
    return Dialog(system=system, examples=seat.examples + exchanges, user=messages[-1][1])


def _opening_cue(turn: Turn) -> str:
    others = [n for n in turn.everyone if n != turn.seat.name]
    return f"(You speak first. Open the conversation with {_join(others)}.)"


def clean_line(text: str, speaker: str, everyone: Sequence[str]) -> str:
    """The speaker's own line: without a leading `speaker:` and cut where the model starts
    writing someone else's line (small models like to play every part)."""
    text = text.strip()
    # Names come bare or in markdown emphasis: "pirate:", "**Pirate:**", "*pirate*:".
    own = re.compile(rf"^[\s*_]*{re.escape(speaker)}[\s*_]*:[\s*_]*", re.IGNORECASE)
    text = own.sub("", text, count=1)
    names = "|".join(re.escape(n) for n in everyone)
    cut = re.search(rf"(^|\n)[\s*_]*({names})[\s*_]*:", text, re.IGNORECASE)
    if cut:
        text = text[:cut.start()]
    return text.strip()


def speak(model: LoadedModel, settings: Settings, turns: Sequence[Turn], template: str | None = None,
          on_truncate: Callable[[str, int], None] = lambda _who, _n: None,
          on_step: Callable[[int], None] = lambda _: None) -> list[Line]:
    """One new line for every turn, all sampled in one batched generate (chunked as usual).

    A transcript too long for the model's context loses its oldest exchanges (examples first),
    and `on_truncate` hears of it; the reproducibility of a line is unaffected (same seed, same
    prompt, same text).
    """
    # Imported here, not above: the CLI reads this module (and its enums) for `--help`, which
    # must not pay for importing torch; the decode loops need it.
    from ..engine.loop import sample_rows

    rows = []
    for i, turn in enumerate(turns):
        ids, dropped = fit_dialog(seat_dialog(turn), model, template, settings.max_new_tokens,
                                  truncate=True, who=f"speaker '{turn.seat.name}'")
        if dropped:
            on_truncate(turn.seat.name, dropped)
        rules = resolve_rules(settings.rules.over(turn.seat.rules).over(settings.file_rules), model.tokenizer)
        rows.append(Row(turn.seat.name, "", turn.temperature, i + 1, turn.seed, tuple(ids), id=i, rules=rules))
    samples: dict[int, Sample] = {}
    sample_rows(settings, model, rows, lambda s: samples.__setitem__(s.row.id, s), on_step)
    lines = []
    for i, turn in enumerate(turns):
        sample = samples[i]
        text = clean_line(model.decode(list(sample.token_ids)), turn.seat.name, turn.everyone)
        lines.append(Line(turn=len(turn.lines) + 1, speaker=turn.seat.name, text=text,
                          temperature=turn.temperature, seed=turn.seed, new_tokens=len(sample.token_ids),
                          finish_reason=sample.finish_reason))
    return lines
