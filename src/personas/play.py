"""`personas play`: many episodes of a game, advanced together, and what they add up to.

All episodes (every temperature's) take their turn in ONE batched generate: turn t samples
the line of every episode still running. Episode k's seed comes from `--seed`, the game and k,
not the temperature, so episode k draws the same secrets and the same random numbers at every
temperature: what differs between temperatures is the temperature alone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .conversation import speak
from .engine import LoadedModel
from .errors import InputError
from .games import Episode, Game, judge, start_episode, turn_for
from .persona import Persona
from .sampling import Settings, derive_seed

NOBODY = "nobody"  # the outcome of an episode that reached its turn cap with no winner


def episode_seeds(seed: int, game: str, n: int) -> list[int]:
    return [derive_seed(seed, "game", game, k) for k in range(1, n + 1)]


def play_episodes(model: LoadedModel, game: Game, personas: dict[str, Persona], temperatures: Sequence[float],
                  seeds: Sequence[int], settings: Settings, *, max_turns: int | None = None,
                  template: str | None = None,
                  on_turn: Callable[[int, int, int], None] = lambda _t, _cap, _live: None,
                  on_truncate: Callable[[str, int], None] = lambda _w, _n: None,
                  on_step: Callable[[int], None] = lambda _: None,
                  on_end: Callable[[Episode], None] = lambda _: None) -> list[Episode]:
    """Play one episode per (temperature, seed); returns them, finished, temperature-major.

    `on_turn(turn, cap, live)` is called before each turn's batch with the episodes still running;
    `on_end(episode)` as soon as an episode is decided, so a caller can keep it even if a later
    turn fails or is interrupted.
    """
    if not seeds:
        raise InputError("no episodes asked for", "pass -n 1 or more")
    if max_turns is not None and max_turns < 1:
        raise InputError(f"--max-turns {max_turns} is not allowed", "use 1 or more")
    cap = max_turns or game.max_turns
    episodes = [start_episode(game, k, s, t) for t in temperatures for k, s in enumerate(seeds, start=1)]
    for turn in range(1, cap + 1):
        live = [e for e in episodes if e.ended_at is None]
        if not live:
            break
        on_turn(turn, cap, len(live))
        turns = [turn_for(e, turn, personas) for e in live]
        for episode, line in zip(live, speak(model, settings, turns, template, on_truncate, on_step)):
            judge(episode, line, cap)
            if episode.ended_at is not None:
                on_end(episode)
    return episodes


@dataclass(frozen=True)
class Summary:
    """What `play` reports per temperature (`--format json` writes these)."""

    temperature: float
    episodes: int
    wins: int  # episodes won by the game's scored side
    win_rate: float
    win_rate_ci95: tuple[float, float]  # Wilson score interval
    mean_turns_to_win: float | None  # over the won episodes; None when none was won
    outcomes: dict[str, int]  # every side's wins, and "nobody"
    example: Episode  # a won episode if there is one, else the first


def wilson_interval(wins: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval for a proportion: sensible at 0 and n wins and small n,
    where the normal approximation gives intervals outside [0, 1]."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(game: Game, episodes: Sequence[Episode]) -> list[Summary]:
    side = game.scored_side
    out = []
    for t in dict.fromkeys(e.temperature for e in episodes):
        group = [e for e in episodes if e.temperature == t]
        won = [e for e in group if e.winner == side]
        outcomes = Counter(e.winner or NOBODY for e in group)
        out.append(Summary(
            temperature=t, episodes=len(group), wins=len(won), win_rate=len(won) / len(group),
            win_rate_ci95=wilson_interval(len(won), len(group)),
            mean_turns_to_win=sum(e.ended_at or 0 for e in won) / len(won) if won else None,
            outcomes={s: outcomes[s] for s in sorted(outcomes)},
            example=won[0] if won else group[0],
        ))
    return out


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
