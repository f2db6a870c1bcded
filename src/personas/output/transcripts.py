"""Rendering conversations and game results: rich for people, JSON lines for scripts. No model code."""

from __future__ import annotations

import enum
import json
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from typing import IO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..dialogue.conversation import Line
from ..dialogue.play import Episode, Summary


class ChatFormat(enum.StrEnum):
    """How `chat` writes its lines."""

    TRANSCRIPT = "transcript"
    JSONL = "jsonl"

_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")


def console_for(stream: IO[str]) -> Console:
    return Console(file=stream, highlight=False, soft_wrap=False)


class TranscriptWriter:
    """Lines as they are spoken: the speaker in its colour, then the text, indented."""

    def __init__(self, stream: IO[str], speakers: Sequence[str]):
        self.console = console_for(stream)
        self.colours = speaker_colours(speakers)

    def opener(self, text: str) -> None:
        self.console.print(Text(text, style="italic dim"))
        self.console.print()

    def add(self, line: Line) -> None:
        print_line(self.console, line, self.colours.get(line.speaker, "bold"))


def speaker_colours(speakers: Sequence[str]) -> dict[str, str]:
    return {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(speakers)}


def print_line(console: Console, line: Line, colour: str, show_temperature: bool = True) -> None:
    head = Text.assemble((f"{line.turn:>2}  ", "dim"), (line.speaker, f"bold {colour}"))
    if show_temperature:
        head.append(f"  T={line.temperature:g}", style="dim")
    console.print(head)
    # Wrapped here rather than by a rich Padding, which pads every line with trailing spaces.
    width = max(20, console.width - 4)
    for paragraph in (line.text or "…").splitlines() or [""]:
        for wrapped in textwrap.wrap(paragraph, width) or [""]:
            console.print(Text("    " + wrapped) if wrapped else "")
    console.print()


class LineJsonWriter:
    """`chat --format jsonl`: one object per line spoken, flushed as it is spoken."""

    FIELDS = ("turn", "speaker", "text", "temperature", "seed")

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def opener(self, _text: str) -> None:
        pass  # not a line: scripts get only what personas said

    def add(self, line: Line) -> None:
        record = {k: v for k, v in asdict(line).items() if k in self.FIELDS}
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()


def episode_dict(episode: Episode) -> dict:
    """An episode as JSON: its seed (`--episode-seed` replays it), secrets, outcome and lines."""
    return {
        "game": episode.game.name, "episode": episode.number, "seed": episode.seed,
        "temperature": episode.temperature, "secrets": episode.secrets,
        "winner": episode.winner, "turns": len(episode.lines),
        "lines": [{"turn": line.turn, "speaker": line.speaker, "text": line.text, "seed": line.seed}
                  for line in episode.lines],
    }


def summary_dict(summary: Summary) -> dict:
    lo, hi = summary.win_rate_ci95
    return {
        "temperature": summary.temperature, "episodes": summary.episodes, "wins": summary.wins,
        "win_rate": summary.win_rate, "win_rate_ci95": [round(lo, 4), round(hi, 4)],
        "mean_turns_to_win": summary.mean_turns_to_win, "outcomes": summary.outcomes,
        "example": episode_dict(summary.example),
    }


def write_play_json(stream: IO[str], summaries: Sequence[Summary]) -> None:
    stream.write(json.dumps([summary_dict(s) for s in summaries], ensure_ascii=False, indent=2) + "\n")


def write_play_table(stream: IO[str], game_name: str, scored: str, summaries: Sequence[Summary]) -> None:
    console = console_for(stream)
    table = Table(title=f"{game_name}: wins for {scored}", box=box.ROUNDED, title_justify="left")
    for column, justify in [("temperature", "right"), ("episodes", "right"), ("wins", "right"),
                            ("win rate (95% CI)", "right"), ("mean turns to win", "right"), ("outcomes", "left")]:
        table.add_column(column, justify=justify)
    for s in summaries:
        lo, hi = s.win_rate_ci95
        table.add_row(f"{s.temperature:g}", str(s.episodes), str(s.wins),
                      f"{s.win_rate:.0%} ({lo:.0%}–{hi:.0%})",
                      "–" if s.mean_turns_to_win is None else f"{s.mean_turns_to_win:.1f}",
                      ", ".join(f"{side} {count}" for side, count in s.outcomes.items()))
    console.print(table)
    for s in summaries:
        e = s.example
        secrets = ", ".join(f"{k} = {v!r}" for k, v in e.secrets.items()) or "none"
        console.print()
        console.print(Text.assemble((f"T={s.temperature:g}", "bold"),
                                    f" · episode {e.number} (--episode-seed {e.seed}) · secrets: {secrets}"
                                    f" · winner: {e.winner or 'nobody'} after {len(e.lines)} turns",
                                    style="dim"))
        if e.game.opener:
            console.print(Text(e.game.opener, style="italic dim"))
        colours = speaker_colours(list(e.game.players))
        for line in e.lines:
            print_line(console, line, colours[line.speaker], show_temperature=False)
