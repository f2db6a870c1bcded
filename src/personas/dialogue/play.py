"""`personas play`: episodes of a game (secrets drawn, seats briefed, lines judged), many of them
advanced together, and what they add up to.

All episodes (every temperature's) take their turn in ONE batched generate: turn t samples
the line of every episode still running. Episode k's seed comes from `--seed`, the game and k,
not the temperature, so episode k draws the same secrets and the same random numbers at every
temperature: what differs between temperatures is the temperature alone.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InputError
from ..library.games import Game, fill, mentions, secret_values
from ..library.schema import Persona
from ..model.load import LoadedModel
from ..sampling.grid import NO_RULES, Settings, derive_seed, rules_from
from .conversation import Line, Seat, Turn, speak

NOBODY = "nobody"  # the outcome of an episode that reached its turn cap with no winner


# --- an episode ----------------------------------------------------------------------------------


@dataclass
class Episode:
    """One game played: its seed, temperature and secrets, the lines so far, and how it ended."""

    game: Game
    number: int  # from 1, within its temperature
    seed: int
    temperature: float
    secrets: dict[str, str]  # each secret's value in this episode
    lines: list[Line]
    winner: str | None = None  # a side; None: nobody won
    ended_at: int | None = None  # the turn whose line ended it (a win rule or the turn cap)


def start_episode(game: Game, number: int, seed: int, temperature: float) -> Episode:
    """Draw the episode's secrets from its seed (sorted names, so the draw is stable)."""
    rng = random.Random(derive_seed(seed, "secrets"))
    secrets = {}
    for name in sorted(s for p in game.players.values() for s in p.secrets):
        holder = next(p for p in game.players.values() if name in p.secrets)
        secrets[name] = rng.choice(secret_values(holder.secrets[name]))
    return Episode(game, number, seed, temperature, secrets, [])


def seat_for(game: Game, name: str, episode: Episode, personas: dict[str, Persona]) -> Seat:
    """A player's seat: its persona, the public setting, its team, and its private brief."""
    player = game.players[name]
    persona = personas.get(player.persona or "")
    mates = [p for p in game.players if p != name and game.team_of(p) == game.team_of(name)]
    own = {s: episode.secrets[s] for s in player.secrets}
    parts = [
        persona.system if persona else player.system,
        f"You are playing a game: {game.setting}" if game.setting else None,
        f"You are on team {game.team_of(name)} with {', '.join(mates)}." if mates else None,
        fill(player.brief, own) if player.brief else None,
    ]
    examples = persona.examples if persona else player.examples
    return Seat(name, "\n\n".join(p for p in parts if p), tuple((e.user, e.assistant) for e in examples),
                rules_from(persona) if persona else NO_RULES)


def speaker_at(game: Game, turn: int) -> str:
    order = game.turn_order
    return order[(turn - 1) % len(order)]


def turn_for(episode: Episode, number: int, personas: dict[str, Persona]) -> Turn:
    """What the speaker of turn `number` is asked, given the episode's lines before it. `play`
    builds every prompt through here, so rendering an episode's turns shows exactly what each
    player saw."""
    game = episode.game
    speaker = speaker_at(game, number)
    return Turn(seat_for(game, speaker, episode, personas), tuple(game.players), tuple(episode.lines[:number - 1]),
                game.opener, episode.temperature, derive_seed(episode.seed, "turn", number))


def judge(episode: Episode, line: Line, max_turns: int) -> None:
    """Record the line; the first win rule it meets ends the episode, as does the turn cap."""
    episode.lines.append(line)
    for rule in episode.game.win:
        if rule.speaker not in (None, line.speaker):
            continue
        if rule.says is not None:
            hit = mentions(line.text, fill(rule.says, episode.secrets))
        else:
            hit = re.search(fill(rule.pattern or "", episode.secrets, escape=True), line.text, re.IGNORECASE) is not None
        if hit:
            episode.winner, episode.ended_at = rule.winner, line.turn
            return
    if line.turn >= max_turns:
        episode.winner, episode.ended_at = episode.game.otherwise, line.turn


# --- many episodes -------------------------------------------------------------------------------


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
