"""`GET /metrics`: the server's Prometheus metrics, through prometheus-client, in a registry of
the server's own (so servers in one process, as tests run them, keep theirs apart).

Counters move as requests end and rows finish; the gauges read the engine worker's, which it sets
before it waits for work, so they are right while it is idle; the histograms are the time from a
request's submission to its first token and each decode step's time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..sampling.grid import Sample
from .worker import EngineWorker, WorkerEvents

# Seconds: from a few milliseconds (a GPU step, a first token while slots are free) to minutes
# (a CPU request queued behind others).
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)


class ServerMetrics:
    """The metrics of one server; `events` feeds them from its engine worker."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.requests = Counter("personas_requests", "HTTP requests answered, by path and status.",
                                ["path", "status"], registry=registry)
        self.rows = Counter("personas_rows_generated", "Rows (samples, choices) finished.", registry=registry)
        self.tokens = Counter("personas_tokens_generated", "New tokens in the finished rows.", registry=registry)
        self.first_token = Histogram("personas_time_to_first_token_seconds",
                                     "From a request's rows reaching the engine to the first token of one of them.",
                                     buckets=FIRST_TOKEN_BUCKETS, registry=registry)
        self.step = Histogram("personas_decode_step_seconds", "One engine step: admission, prefill, one decode step.",
                              buckets=STEP_BUCKETS, registry=registry)
        self._gauges: list[tuple[Gauge, Callable[[EngineWorker], float]]] = [
            (Gauge("personas_rows_waiting", "Rows queued for a slot.", registry=registry),
             lambda w: w.rows_queued),
            (Gauge("personas_rows_decoding", "Rows in the engine's slots.", registry=registry),
             lambda w: w.rows_decoding),
            (Gauge("personas_engine_slots", "Decode slots allocated.", registry=registry), lambda w: w.slots),
            (Gauge("personas_engine_pages_in_use", "Cache pages held by rows.", registry=registry),
             lambda w: w.pages_in_use),
        ]
        self.events = WorkerEvents(on_step=self.step.observe, on_sample=self._sample,
                                   on_first_token=self.first_token.observe)

    def watch(self, worker: EngineWorker) -> None:
        """The gauges read `worker`'s from now on."""
        for gauge, read in self._gauges:
            gauge.set_function(lambda read=read: float(read(worker)))

    def _sample(self, sample: Sample) -> None:
        self.rows.inc()
        self.tokens.inc(len(sample.token_ids))

    def text(self) -> bytes:
        return generate_latest(self.registry)
