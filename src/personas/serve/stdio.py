"""`personas serve --stdio`: a resident model answering JSONL requests on stdin.

Each request line is `{"persona": ..., "prompt": ..., "temperatures": [...], "n": ...,
"seed": ..., "max_new_tokens": ..., "id": ...}` (only `persona` is required; `prompt` defaults to
the persona's own). Each sample comes back as one line with the `generate` JSONL keys plus
`id` (the request's, else its line number). A malformed line gets `{"error": ..., "line": N}`
and the server goes on.

On the models the decode engine runs (engine/decoder.py's FAMILIES), the engine worker (worker.py) decodes
while lines are read: a request's rows join the running batch as soon as slots are free, and a
failed decode step answers the requests in it with `{"error": "decoding failed: …", "line": N}`
while the server goes on with a fresh engine, as `serve --http` does. Other models answer the
lines that arrive together as one batched grid.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydantic import Field, ValidationError

from ..engine.decoder import supports
from ..engine.loop import engine_for, refuse_rules_without_engine
from ..errors import InputError
from ..generate.request import Cell, Request, plan, sample_records, to_record
from ..library.load import Library
from ..library.schema import RuleFields, Temperature
from ..model.load import LoadedModel
from ..record import as_dict
from ..sampling.grid import NO_RULES, Settings, rules_from
from .worker import EngineWorker

GATHER_SECONDS = 0.05  # after a first line, how long to wait for the lines sent with it
MAX_GATHER = 256  # requests answered by one grid at most


class ServeRequest(RuleFields):
    """One request line of `serve --stdio` (the logits rules too, as a persona file writes them)."""

    persona: str
    prompt: str | None = None
    temperatures: list[Temperature] | None = Field(default=None, min_length=1)
    n: int | None = Field(default=None, ge=1, le=1024)
    seed: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    id: str | int | None = None


@dataclass(frozen=True)
class Accepted:
    """A request line that passed its checks: its cell, and how long its samples may be."""

    line: int
    cell: Cell
    max_new_tokens: int


def read_in_background(lines: Iterable[bytes]) -> tuple[queue.Queue, object]:
    """A thread puts (line number, line) for each input line on the queue, then the end marker
    returned with it, so the caller can wait for input and decode at the same time."""
    waiting: queue.Queue = queue.Queue()
    end = object()

    def read() -> None:
        for number, line in enumerate(lines, start=1):
            waiting.put((number, line))
        waiting.put(end)

    threading.Thread(target=read, daemon=True).start()
    return waiting, end


def batches(lines: Iterable[bytes]) -> Iterable[list[tuple[int, bytes]]]:
    """Numbered input lines, grouped as they arrive: a reader thread fills a queue, and each
    batch is the first waiting line plus whatever else came within GATHER_SECONDS."""
    waiting, end = read_in_background(lines)
    finished = False
    while not finished:
        item = waiting.get()
        if item is end:
            return
        batch = [item]
        while len(batch) < MAX_GATHER:
            try:
                item = waiting.get(timeout=GATHER_SECONDS)
            except queue.Empty:
                break
            if item is end:
                finished = True
                break
            batch.append(item)
        yield batch


def accept(number: int, raw: bytes, library: Library, seed: int) -> Accepted:
    """Parse and check one request line; raises InputError with a message for the client."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError("the line is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg})") from None
    try:
        req = ServeRequest.model_validate(data)
    except ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "request"
        what = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        raise InputError(f"{where}: {what}") from None
    persona = library.get(req.persona)
    prompt = req.prompt if req.prompt is not None else persona.prompt
    if prompt is None or not prompt.strip():
        raise InputError("the prompt is empty, and the persona has no default prompt")
    defaults = library.defaults
    rules = rules_from(req)
    cell = Cell(persona, prompt, tuple(defaults.pick("temperatures", req.temperatures)), defaults.pick("n", req.n),
                req.seed if req.seed is not None else seed, req.id if req.id is not None else number,
                rules=rules if rules != NO_RULES else None)
    return Accepted(number, cell, defaults.pick("max_new_tokens", req.max_new_tokens))


def serve(lines: Iterable[bytes], library: Library, model: LoadedModel, seed: int,
          write: Callable[[dict], None], settings: Settings = Settings(),
          alert: Callable[[str], None] = lambda message: print(message, file=sys.stderr)) -> int:
    """Answer every request in `lines`; returns how many lines were requests (errors included).

    On the engine, one worker thread decodes while this one reads lines: a request joins the
    running batch as soon as it is read. A failed step answers the requests in it with an error
    line each, and the worker goes on with a fresh engine (alert says so on stderr)."""
    if not supports(model.model):
        return serve_in_batches(lines, library, model, seed, write, settings)
    out = Output(write)
    worker = EngineWorker(lambda: engine_for(model, settings, expect_more=True), alert)
    count = 0
    try:
        for count, raw in enumerate(lines, start=1):
            out.check()
            if raw.strip():
                submit(worker, count, raw, library, model, seed, out.write)
    finally:
        worker.close()  # the rows in flight are answered first
    out.check()
    return count


class Output:
    """Result lines written from the worker's thread and this one, one whole line at a time; a
    reader that went away is reported on the reading thread (the CLI's closed-pipe exit)."""

    def __init__(self, write: Callable[[dict], None]):
        self._write, self._lock, self.closed = write, threading.Lock(), False

    def write(self, obj: dict) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self._write(obj)
            except BrokenPipeError:
                self.closed = True

    def check(self) -> None:
        if self.closed:
            raise BrokenPipeError()


def submit(worker: EngineWorker, number: int, raw: bytes, library: Library, model: LoadedModel, seed: int,
           write: Callable[[dict], None]) -> None:
    """One request line into the worker's engine, or its error out."""
    try:
        accepted = accept(number, raw, library, seed)
        limits = Settings(max_new_tokens=accepted.max_new_tokens, file_rules=rules_from(library.defaults))
        rows = plan(Request(personas=[], cells=[accepted.cell], settings=limits), model)
    except InputError as e:  # a bad line; a prompt too long for the context
        write({"error": str(e), "line": number})
        return

    def failed(error: BaseException) -> None:
        write({"error": f"decoding failed: {type(error).__name__}: {error}", "line": number})

    worker.submit(rows, limits, lambda sample: write(as_dict(to_record(sample, model))), on_error=failed)


def serve_in_batches(lines: Iterable[bytes], library: Library, model: LoadedModel, seed: int,
                     write: Callable[[dict], None], settings: Settings) -> int:
    """For models the engine does not run: the lines that came together as one grid each."""
    count = 0
    for batch in batches(lines):
        accepted: list[Accepted] = []
        for number, raw in batch:
            count += 1
            if not raw.strip():
                continue
            try:
                accepted.append(accept(number, raw, library, seed))
            except InputError as e:
                write({"error": str(e), "line": number})
        # One grid per max_new_tokens value among the requests that came together.
        for max_new in sorted({a.max_new_tokens for a in accepted}):
            grid = Settings(max_new_tokens=max_new, max_batch=settings.max_batch, fast_path=settings.fast_path,
                            dense_weights=settings.dense_weights)
            rows = []
            for a in (a for a in accepted if a.max_new_tokens == max_new):
                try:
                    planned = plan(Request(personas=[], cells=[a.cell], settings=grid), model)
                    refuse_rules_without_engine(model, grid, planned)  # this line's error, not the batch's
                    rows += planned
                except InputError as e:  # e.g. a prompt too long for the context
                    write({"error": str(e), "line": a.line})
            if rows:
                sample_records(grid, model, rows, lambda record: write(as_dict(record)))
    return count
