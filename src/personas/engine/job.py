"""A row inside the engine (Job), the names the engine's parts pass between them, and what an
engine reports of itself (EngineStats)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..sampling.grid import NO_RULES, Row, Rules, Sample, TokenLogprob
from .pages import PAGE, Slot, pages_for
from .prefix_groups import common_start

Prefix = tuple[int, ...]  # the start of a prompt that rows share, stored once in the prefix pool
TokenListener = Callable[[Row, int, TokenLogprob | None], None]


class Prompt(NamedTuple):
    """A row's prompt ids as the engine stores them: the start kept once in the prefix pool, and
    the rest in the row's own pages."""

    prefix: Prefix
    suffix: tuple[int, ...]


class ChosenLogprobs(NamedTuple):
    """A chosen token's log-probability and the likeliest (token id, log-probability) pairs."""

    logprob: float
    top: tuple[tuple[int, float], ...]


class Placement(NamedTuple):
    """A row given a slot: the pages its table holds, the first `shared` of them read from the row
    admitted just before it with the same prompt."""

    slot: Slot
    job: Job
    pages: list[int]
    shared: int


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many first tokens all prompts share, leaving each at least its last token."""
    limit = min(len(p) for p in prompts) - 1
    return max(0, min([limit] + [common_start(prompts[0], p) for p in prompts[1:]]))


@dataclass(eq=False)
class Job:
    """A row inside the engine: the row, its sampling rules, and where its sample goes.

    Made by the scheduler from a submitted row; the runner reads its rules into the slot's
    tensors, the scheduler appends its tokens and delivers its Sample when it ends.
    """

    row: Row
    max_new: int
    min_new: int
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    deliver: Callable[[Sample], None]
    prefix: Prefix = ()  # the start of its prompt kept in the prefix pool
    tokens: list[int] = field(default_factory=list)
    on_token: TokenListener | None = None  # told each new token as it is chosen (streaming)
    logprobs: bool = False  # on_token gets each token's log-probabilities
    reported: int = 0  # tokens already given to on_token (a rerun after a back-off repeats none)
    rules: Rules = NO_RULES  # min_p, penalties, logit_bias (token ids), DRY

    @property
    def context(self) -> tuple[int, ...]:
        """Its tokens so far: the prompt and the new tokens (what penalties and DRY look at)."""
        return self.row.prompt_ids + tuple(self.tokens)

    @property
    def suffix(self) -> tuple[int, ...]:
        return self.row.prompt_ids[len(self.prefix):]

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.prefix, self.suffix)

    @property
    def starts_in_decode(self) -> bool:
        """Its suffix is one token: no prefill pass, the first decode step takes it (see
        Runner.place)."""
        return len(self.row.prompt_ids) - len(self.prefix) == 1

    @property
    def cache_need(self) -> int:
        """Positions its own cache must hold: its suffix and its new tokens."""
        return len(self.suffix) + self.max_new

    @property
    def pages(self) -> int:
        """Pages its own cache spans at its longest."""
        return pages_for(self.cache_need)

    @property
    def first_pages(self) -> int:
        """Pages it takes when admitted: its suffix and its first new token's position."""
        return len(self.suffix) // PAGE + 1

    @property
    def prompt_pages(self) -> int:
        """Its pages that hold only prompt: a row with the same prompt, admitted with it, reads
        these instead of its own copy (the n samples of one prompt)."""
        return len(self.suffix) // PAGE


@dataclass
class EngineStats:
    """What an engine has done so far (progress bars, benchmarks, the server's gauges)."""

    steps: int = 0  # decode steps taken
    last_batch: int = 0  # rows the last decode step decoded
    rows_decoded: int = 0  # rows summed over steps (the mean batch: rows_decoded / steps)
    rows_delivered: int = 0
    positions_held: int = 0  # own pages × PAGE of each row delivered, summed (the mean cache per row)
    preemptions: int = 0  # rows preempted for pages, to rerun later
    # Wall time of the admission passes (prompts read, each row's first token chosen): the rest
    # of a run is decode steps, as a peer's "generation speed" that leaves its prompts out.
    prompt_seconds: float = 0.0
