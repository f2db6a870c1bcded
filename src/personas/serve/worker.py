"""The decode engine on a thread of its own, fed from any thread.

The engine is not thread-safe and decodes in steps; a server's requests arrive on other threads
at any time. So one thread owns the engine: it takes submissions and cancellations from an inbox
between steps (a request that arrives while others decode joins the running batch at the next
step) and blocks on the inbox only when nothing decodes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.engine import Engine
from ..engine.job import Job, TokenListener
from ..sampling.grid import Row, Sample, Settings


@dataclass(eq=False)
class Ticket:
    """One submission's rows in the engine: cancel them with it; `on_error` hears a failure
    that ended them."""

    rows: Sequence[Row]
    settings: Settings
    deliver: Callable[[Sample], None]
    on_token: TokenListener | None
    logprobs: bool
    on_error: Callable[[BaseException], None]
    jobs: list[Job] = field(default_factory=list)
    left: int = 0  # rows neither delivered nor cancelled
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False  # a row of it has its first token


@dataclass
class WorkerEvents:
    """What a worker tells about its work, from its own thread (a server's metrics)."""

    on_step: Callable[[float], None] = lambda _seconds: None  # a decode step took this long
    on_sample: Callable[[Sample], None] = lambda _sample: None  # a row finished
    on_first_token: Callable[[float], None] = lambda _seconds: None  # a submission's first token, after this long


_STOP = object()


class EngineWorker:
    """The thread that owns one engine (a fresh one after a failed step); `submit` and `cancel`
    from any thread."""

    def __init__(self, make_engine: Callable[[], Engine], log: Callable[[str], None],
                 events: WorkerEvents | None = None):
        self._make_engine = make_engine
        self._log = log
        self._events = events or WorkerEvents()
        self._engine = make_engine()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._live: set[Ticket] = set()
        self.broken: BaseException | None = None  # why no engine could be made after a failure
        self.most_rows = 0  # the most rows one step has decoded
        # Gauges, set on the engine's thread before it waits for work, so they are right while it
        # is idle: after a cancellation, after the last row ends, after a failure.
        self.rows_decoding = 0  # rows in the engine's slots
        self.rows_queued = 0  # rows waiting for a slot
        self.slots = 0  # slots allocated
        self.pages_in_use = 0  # cache pages held by rows
        self._thread = threading.Thread(target=self._run, name="personas-engine", daemon=True)
        self._thread.start()

    @property
    def outstanding(self) -> int:
        """Rows submitted and not yet delivered or cancelled."""
        return self._outstanding

    def submit(self, rows: Sequence[Row], settings: Settings, deliver: Callable[[Sample], None], *,
               on_error: Callable[[BaseException], None], on_token: TokenListener | None = None,
               logprobs: bool = False) -> Ticket:
        ticket = Ticket(rows, settings, deliver, on_token, logprobs, on_error, left=len(rows))
        with self._lock:
            self._outstanding += len(rows)
        self._inbox.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket, rows: Sequence[Row] | None = None) -> None:
        """Drop the ticket's rows (or only `rows` of them) that are not delivered yet."""
        self._inbox.put(("cancel", ticket, rows))

    def close(self) -> None:
        """Stop once nothing decodes (the rows in flight are finished first)."""
        self._inbox.put(_STOP)
        self._thread.join()

    # --- on the engine's thread -------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while True:
            engine = self._engine
            items = []
            try:
                items.append(self._inbox.get(block=not engine.busy and not stopping))
                while True:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            for item in items:
                if item is _STOP:
                    stopping = True
                elif item[0] == "submit":
                    self._submit(item[1])
                else:
                    self._cancel(item[1], item[2])
            if stopping and not engine.busy:
                self._gauge()
                return
            if engine.busy:
                started = time.perf_counter()
                try:
                    engine.step()
                except Exception as error:  # noqa: BLE001 — every request in flight is told
                    self._fail(error)
                    self._gauge()
                    continue
                self._events.on_step(time.perf_counter() - started)
                self.most_rows = max(self.most_rows, engine.stats.last_batch)
                self._first_tokens()
            self._gauge()

    def _gauge(self) -> None:
        engine = self._engine
        self.rows_decoding = len(engine.jobs)
        self.rows_queued = len(engine.scheduler.queue)
        self.slots = engine.slot_count
        self.pages_in_use = engine.pages.count - 1 - len(engine.pages.free) if engine.pages.count else 0

    def _first_tokens(self) -> None:
        """Tell the time to the first token of each submission whose rows have just begun."""
        now = time.perf_counter()
        for ticket in self._live:
            if not ticket.started and any(job.tokens for job in ticket.jobs):
                ticket.started = True
                self._events.on_first_token(now - ticket.submitted)

    def _submit(self, ticket: Ticket) -> None:
        if self.broken is not None:
            self._finished(ticket, ticket.left)
            ticket.on_error(self.broken)
            return

        def deliver(sample: Sample) -> None:
            self._finished(ticket, 1)
            if not ticket.started:  # ended at once (a one-token answer): its first token is now
                ticket.started = True
                self._events.on_first_token(time.perf_counter() - ticket.submitted)
            self._events.on_sample(sample)
            ticket.deliver(sample)

        self._live.add(ticket)
        ticket.jobs = self._engine.submit(ticket.rows, ticket.settings, deliver, on_token=ticket.on_token,
                                          logprobs=ticket.logprobs)

    def _cancel(self, ticket: Ticket, rows: Sequence[Row] | None) -> None:
        # The inbox keeps order, so a ticket's submission was taken before its cancellation.
        if rows is None:
            jobs = ticket.jobs
        else:
            wanted = set(rows)
            jobs = [job for job in ticket.jobs if job.row in wanted]
        self._finished(ticket, self._engine.cancel(jobs))

    def _finished(self, ticket: Ticket, rows: int) -> None:
        ticket.left -= rows
        if ticket.left <= 0:
            self._live.discard(ticket)
        with self._lock:
            self._outstanding -= rows

    def _fail(self, error: BaseException) -> None:
        """A step failed (not out of memory: the engine backs off from that itself). The engine's
        state is unknown now: every request in flight gets the error, and a fresh engine takes
        the next ones."""
        self._log(f"decoding failed: {type(error).__name__}: {error}")
        for ticket in list(self._live):
            self._finished(ticket, ticket.left)
            ticket.on_error(error)
        self._live.clear()
        try:
            self._engine = self._make_engine()
        except Exception as again:  # noqa: BLE001 — e.g. a CUDA context lost to a device-side assert
            self.broken = again
            self._log(f"no fresh engine can be made ({type(again).__name__}: {again}): every request fails "
                      "from now on — restart the server")
