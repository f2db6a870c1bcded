"""Which rows decode: the queue, admission into free slots, refill, preemption, and the rows'
tokens as they come (a row ends on an end-of-turn id or at its max_new_tokens).

    submit(rows) ──► queue ──► admissions: free slots, pages ──► running ──► record: ended rows
                       ▲                                                         │
                       └──────── preempted, or backed off (rerun from the prompt) ◄┘

No torch: slots and pages are numbers here; the engine hands them to the runner.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from ..sampling.grid import NO_RULES, Row, Sample, Settings, TokenLogprob
from .config import REFILL_SHARE
from .job import ChosenLogprobs, Job, Prefix, TokenListener
from .pages import PAGE, Slot, ceil_div
from .prefix_groups import shared_prefixes

# A persona's prompts of earlier submissions that a new one may share a start with: a server's
# requests come one at a time, each its own submission. A few dozen cover the system texts in use
# at once under one name (inline personas) and keep each grouping (a sort over them) cheap.
RECENT_PROMPTS = 64


class PrefixHolds(Protocol):
    """Who counts the rows that need each prefix (the prefix pool: a prefix is dropped when its
    last row is delivered or cancelled)."""

    def hold(self, prefix: Prefix) -> None: ...

    def release(self, prefix: Prefix) -> None: ...


class Scheduler:
    """The queue of waiting rows and the rows running in slots."""

    def __init__(self, pool: PrefixHolds, end_ids: Sequence[int]):
        self.pool = pool
        self.end_ids = set(end_ids)
        self.queue: deque[Job] = deque()
        self.running: dict[Slot, Job] = {}
        self.recent: dict[str, deque[tuple[int, ...]]] = {}  # persona -> its distinct prompts submitted lately

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    @property
    def rows_waiting(self) -> int:
        return len(self.queue) + len(self.running)

    def submit(self, rows: Iterable[Row], settings: Settings, deliver: Callable[[Sample], None], *,
               on_token: TokenListener | None = None, logprobs: bool = False) -> list[Job]:
        """Queue rows, each holding the start of its prompt that it shares with the other rows of
        its persona (prefix_groups.py: grouped by their prompts' common starts, so inline personas
        under one name share by their texts — and with the persona's recent prompts, so requests
        arriving one at a time still share). Returns the rows' jobs, in the order given."""
        rows = list(rows)
        kept: dict[tuple[int, ...], int] = {}
        by_persona: dict[str, list[Row]] = {}
        for row in rows:
            by_persona.setdefault(row.persona, []).append(row)
        for persona, members in by_persona.items():
            recent = self.recent.setdefault(persona, deque(maxlen=RECENT_PROMPTS))
            readers = Counter(row.prompt_ids for row in members)
            for prompt in recent:
                readers.setdefault(prompt, 1)
            kept.update(shared_prefixes(readers))
            recent.extend(prompt for prompt in dict.fromkeys(row.prompt_ids for row in members) if prompt not in recent)
        jobs = []
        for row in rows:
            job = Job(row, row.limit(settings), settings.min_new_tokens, settings.top_k or 0,
                      settings.top_p if settings.top_p is not None else 1.0, deliver,
                      prefix=row.prompt_ids[:kept[row.prompt_ids]], on_token=on_token, logprobs=logprobs,
                      rules=(row.rules or NO_RULES).over(settings.rules))
            self.pool.hold(job.prefix)
            jobs.append(job)
        # Longest rows first, so the last steps are not a few long rows decoding alone; identical
        # prompts next to each other, so one prefill serves them all and they share its pages.
        self.queue.extend(sorted(jobs, key=lambda j: (-j.max_new, j.prefix, j.suffix)))
        return jobs

    def cancel_queued(self, gone: set[Job]) -> int:
        """Drop the queued rows among `gone`; returns how many there were."""
        queued = [job for job in self.queue if job in gone]
        if queued:
            self.queue = deque(job for job in self.queue if job not in gone)
            for job in queued:
                self.pool.release(job.prefix)
        return len(queued)

    def admissions(self, slot_count: int, free_pages: int, span: int) -> list[tuple[Slot, Job]]:
        """The queued rows that go into free slots now, taken off the queue with their slots.

        A row fits when a slot is free and the pages it takes are (rows with the prompt of the row
        before them read its prompt-only pages); the queue's order is kept, so a longer row at the
        front waits rather than be overtaken."""
        free = [b for b in range(slot_count) if b not in self.running]
        # Pages kept for the rows in flight to grow into (each crosses into a new page every
        # PAGE steps): admitting into those would only preempt someone at the next step.
        budget = free_pages - ceil_div(len(self.running), PAGE)
        fits, previous = 0, None
        for job in self.queue:
            cost = job.first_pages - (job.prompt_pages if job.prompt == previous else 0)
            if fits == len(free) or cost > budget or job.cache_need > span:
                break
            fits, budget, previous = fits + 1, budget - cost, job.prompt
        # A prefill pass reads every weight, as a decode step does: refilling one slot per step
        # would nearly double the cost of each step. While rows decode, wait until an eighth of
        # the slots (or the whole queue) can be refilled in one pass — but rows whose suffix is
        # one token need no pass (Runner.place): those at the front join the next step at once.
        if self.running and fits < min(len(self.queue), max(1, slot_count // REFILL_SHARE)):
            fits = next((k for k in range(fits) if not self.queue[k].starts_in_decode), fits)
        return [(free.pop(0), self.queue.popleft()) for _ in range(fits)]

    def least_done(self) -> Slot:
        """The running row to preempt when pages run out: the one with the fewest tokens."""
        return min(self.running, key=lambda slot: (len(self.running[slot].tokens), -slot))

    def requeue(self, job: Job) -> None:
        """A preempted row back to the front of the queue, to rerun from its prompt (its seed makes
        the rerun identical, and its listener is not told its tokens twice)."""
        self.pool.hold(job.prefix)  # still waiting: its prefix stays in the pool
        job.tokens.clear()
        self.queue.appendleft(job)

    def requeue_all(self) -> None:
        """Every running row back to the front of the queue, in order (an out-of-memory back-off:
        nothing was delivered for them; they still hold their prefixes)."""
        for job in reversed(list(self.running.values())):
            job.tokens.clear()
            self.queue.appendleft(job)
        self.running.clear()

    def record(self, tokens: dict[Slot, int], logprobs: dict[Slot, ChosenLogprobs] | None,
               complete: Collection[Slot] = ()) -> list[tuple[Slot, str]]:
        """Each slot's new token onto its row (its listener told); returns the rows that ended,
        with why: "stop" (an end-of-turn id, or the token completed the row's answer format:
        the slots in `complete`) or "length" (max_new_tokens)."""
        ended = []
        for b, token in tokens.items():
            job = self.running[b]
            if token in self.end_ids:
                ended.append((b, "stop"))
                continue
            job.tokens.append(token)
            if job.on_token is not None and len(job.tokens) > job.reported:
                job.reported += 1
                told = None
                if job.logprobs and logprobs is not None:
                    told = TokenLogprob(token, *logprobs[b])
                job.on_token(job.row, token, told)
            if b in complete:
                ended.append((b, "stop"))
            elif len(job.tokens) >= job.max_new:
                ended.append((b, "length"))
        return ended

    def masks_needed(self) -> bool:
        """Some running row uses top-k/top-p (the step then sorts its scores)."""
        return any(job.top_k or job.top_p < 1.0 for job in self.running.values())

    def rules_needed(self) -> bool:
        """Some running row uses min_p, a penalty, logit_bias or DRY."""
        return any(job.rules.used for job in self.running.values())

    def logprobs_needed(self) -> bool:
        return any(job.logprobs for job in self.running.values())

    def slot_prefixes(self, slot_count: int) -> list[Prefix]:
        """Each slot's prefix, () for an idle slot."""
        return [self.running[b].prefix if b in self.running else () for b in range(slot_count)]
