"""Games in TOML (`[games.NAME]`): players with teams and private facts, a turn order, a turn
cap, and win rules checked after every line. The schema and its checks; the episodes that
play a game are `dialogue.play`'s.

Private facts (`secrets`) belong to one player. They reach only that player's prompt, through
`{name}` placeholders in its `brief`; the loader refuses a file where a secret's value could
reach anyone else (another player's brief, system context or examples, the public setting or
opener). A secret given as a list is drawn per episode, from the episode's seed.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ..errors import PersonaFileError
from .schema import Example, Persona, Strict, not_blank
from .toml_lines import KeyLines

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Player(Strict):
    """One seat of a game: a persona (or an inline one), a team, a private brief and secrets."""

    persona: str | None = None  # a persona of the library ...
    system: str | None = None  # ... or one written here
    examples: list[Example] = Field(default_factory=list)
    team: str | None = None  # default: the player's own name
    brief: str | None = None  # private instructions; may name this player's secrets as {name}
    secrets: dict[str, str | list[str]] = Field(default_factory=dict)

    _check = field_validator("persona", "system", "brief", "team")(not_blank)

    @model_validator(mode="after")
    def _one_persona(self) -> Player:
        if (self.persona is None) == (self.system is None):
            raise ValueError("give either persona = \"NAME\" (from [personas]) or an inline system")
        if self.persona is not None and self.examples:
            raise ValueError("examples come with the persona; write them under [personas] instead")
        for name, value in self.secrets.items():
            values = [value] if isinstance(value, str) else value
            if not values or any(not v.strip() for v in values):
                raise ValueError(f"secret '{name}' needs a non-empty value (or a list of them)")
        return self


class WinRule(Strict):
    """`[[games.NAME.win]]`: whose line, containing what, wins the game for which side."""

    winner: str  # a team or a player
    speaker: str | None = None  # whose line is checked; default: anyone's
    says: str | None = None  # words that must appear (whole words, any case); {secret} allowed
    pattern: str | None = None  # or a regular expression (case-insensitive); {secret} allowed

    @model_validator(mode="after")
    def _one_test(self) -> WinRule:
        if (self.says is None) == (self.pattern is None):
            raise ValueError("give either says = \"...\" or pattern = '...'")
        return self


class Game(Strict):
    """`[games.NAME]`: the players, the public setting and opener, the turn order and cap, the win rules."""

    name: str
    description: str | None = None
    setting: str | None = None  # public: every player's prompt has it
    opener: str | None = None  # the first public line; not a turn
    players: dict[str, Player] = Field(min_length=2)
    order: list[str] | None = None  # default: the players in file order
    max_turns: int = Field(default=10, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    win: list[WinRule] = Field(min_length=1)
    otherwise: str | None = None  # who wins when the turn cap is reached; default: nobody
    scored: str | None = None  # whose wins `play` counts; default: the first rule's winner

    _check = field_validator("description", "setting", "opener")(not_blank)

    def team_of(self, player: str) -> str:
        return self.players[player].team or player

    @property
    def sides(self) -> set[str]:
        return set(self.players) | {self.team_of(p) for p in self.players}

    @property
    def turn_order(self) -> list[str]:
        return self.order or list(self.players)

    @property
    def scored_side(self) -> str:
        return self.scored or self.win[0].winner


def check_game(game: Game, personas: dict[str, Persona], path: Path, lines: KeyLines) -> None:
    """What pydantic cannot see: names that must exist, placeholders, and secrets that could leak."""
    def fail(loc: tuple, what: str, todo: str) -> PersonaFileError:
        return PersonaFileError(str(path), lines.find(("games", game.name, *map(str, loc))),
                                f"game '{game.name}': {what}", todo)

    owner: dict[str, str] = {}
    for name, player in game.players.items():
        if player.persona is not None and player.persona not in personas:
            raise fail(("players", name, "persona"), f"player '{name}': unknown persona '{player.persona}'",
                       "known personas: " + ", ".join(personas))
        for secret in player.secrets:
            if secret in owner:
                raise fail(("players", name, "secrets"), f"secret '{secret}' is held by '{owner[secret]}' and '{name}'",
                           "give each secret its own name")
            owner[secret] = name
    for name in game.turn_order:
        if name not in game.players:
            raise fail(("order",), f"order names '{name}', who is not a player", "players: " + ", ".join(game.players))
    silent = [p for p in game.players if p not in game.turn_order]
    if silent:
        raise fail(("order",), f"{', '.join(silent)} never speak{'s' if len(silent) == 1 else ''}",
                   "add every player to order")
    for side, loc in [(game.otherwise, ("otherwise",)), (game.scored, ("scored",))] + [
            (rule.winner, ("win", i, "winner")) for i, rule in enumerate(game.win)]:
        if side is not None and side not in game.sides:
            raise fail(loc, f"'{side}' is neither a player nor a team", "sides: " + ", ".join(sorted(game.sides)))
    for i, rule in enumerate(game.win):
        if rule.speaker is not None and rule.speaker not in game.players:
            raise fail(("win", i, "speaker"), f"speaker '{rule.speaker}' is not a player",
                       "players: " + ", ".join(game.players))
        for name in PLACEHOLDER.findall(rule.says or rule.pattern or ""):
            if name not in owner:
                raise fail(("win", i), f"win rule names {{{name}}}, which no player holds",
                           "secrets: " + (", ".join(owner) or "none"))
        if rule.pattern is not None:
            try:
                re.compile(fill(rule.pattern, {n: "x" for n in owner}, escape=True))
            except re.error as e:
                raise fail(("win", i, "pattern"), f"pattern is not a regular expression: {e}",
                           "write it as a TOML literal string, '...', so backslashes stay") from None
    for name, player in game.players.items():
        for secret in PLACEHOLDER.findall(player.brief or ""):
            if owner.get(secret) != name:
                raise fail(("players", name, "brief"), f"the brief of player '{name}' names {{{secret}}}, "
                           + (f"which belongs to '{owner[secret]}'" if secret in owner else "which no player holds"),
                           "a brief may name only its own player's secrets")
    for secret, holder in owner.items():
        for value in secret_values(game.players[holder].secrets[secret]):
            for name in game.players:
                if name != holder and mentions(public_text(game, name, personas), value):
                    raise fail(("players", name), f"secret '{secret}' ({value!r}) appears in what "
                               f"player '{name}' sees", "keep secret values out of others' text")


def secret_values(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def mentions(text: str, value: str) -> bool:
    """True when `value` stands in `text` as a whole word (or words), in any case."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


def public_text(game: Game, name: str, personas: dict[str, Persona]) -> str:
    """All a player's prompt holds besides the transcript, before its own secrets are filled in."""
    player = game.players[name]
    persona = personas.get(player.persona or "")
    examples = persona.examples if persona else player.examples
    parts = [persona.system if persona else player.system, game.setting, game.opener, player.brief]
    parts += [t for e in examples for t in (e.user, e.assistant)]
    return "\n".join(p for p in parts if p)


def fill(text: str, secrets: dict[str, str], escape: bool = False) -> str:
    """`{name}` placeholders replaced by their secrets; other braces (regex counts) left alone."""
    return PLACEHOLDER.sub(lambda m: (re.escape if escape else str)(secrets[m.group(1)])
                           if m.group(1) in secrets else m.group(0), text)
