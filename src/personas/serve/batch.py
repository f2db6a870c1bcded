"""`personas batch`: an OpenAI Batch API file in, its output lines out, on the decode engine.

Each input line is one request, as OpenAI's Batch API and `vllm run-batch` read them:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

The body is what `serve --http` takes, planned by the same code (openai.py, rows.py): `model`
names a persona, or `base` (or the loaded model's own name) for the request's own messages with
its system message as the persona. Each request answers with one output line as it completes:

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": <chat.completion>},
     "error": null}

A request refused on its own merits (a bad value, an unknown persona, too long for the context)
gets the status and error object the server would answer with, as its line's `response` — as
OpenAI's batch output writes a failed request (`vllm run-batch` puts the error in `error`
instead) — and the others run.

The file is read twice: first every line's envelope is checked, before the model loads (a line
that is not JSON, lacks a custom_id, repeats one or names another url stops the run, naming the
file and line); then the requests are read again as the engine has room for them, so a file of
any length holds only the requests in flight. All requests share one engine queue — or, with
`--ray`, go to Ray workers a chunk at a time (generate/ray.py).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.job import Job
from ..errors import PersonaFileError
from ..library.load import Library
from ..model.load import LoadedModel
from ..model.tokens import token_text
from ..sampling.grid import Row, Sample, TokenLogprob
from .openai import ApiError, ChatPlan, Choices, completion_id, parse_request
from .rows import plan_rows, plan_settings

if TYPE_CHECKING:  # the engine brings torch, which a file refused for its input never needs
    from ..engine.engine import Engine

URL = "/v1/chat/completions"


@dataclass(frozen=True)
class BatchLine:
    """One input line's envelope: where it is, its id, and its request's body (not yet checked)."""

    number: int
    custom_id: str
    body: dict[str, Any]


def read_lines(path: Path, name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, streamed; the bytes must be UTF-8."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PersonaFileError(name, number, f"not UTF-8 text ({e.reason})", "save the file as UTF-8") from None
            if text.strip():
                yield number, text


def envelope(name: str, number: int, text: str) -> BatchLine:
    """The line's envelope; PersonaFileError (exit 2) for one that is not a batch request."""
    todo = 'write one request per line: {"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}'
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise PersonaFileError(name, number, f"not valid JSON ({e.msg})", todo) from None
    if not isinstance(item, dict):
        raise PersonaFileError(name, number, "not a JSON object", todo)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise PersonaFileError(name, number, "custom_id is missing (or not a non-empty string)", todo)
    if item.get("url") != URL:
        raise PersonaFileError(name, number, f"url {item.get('url')!r} is not served: only {URL}", todo)
    if item.get("method", "POST") != "POST":
        raise PersonaFileError(name, number, f"method {item.get('method')!r}: only POST", todo)
    body = item.get("body")
    if not isinstance(body, dict):
        raise PersonaFileError(name, number, "body is missing (or not a JSON object)", todo)
    return BatchLine(number, custom_id, body)


@dataclass(frozen=True)
class BatchFile:
    """A checked batch file: how many requests are to run, and how many rows they ask for."""

    requests: int
    rows: int


def check_file(path: Path, name: str, skip: Container[str] = ()) -> BatchFile:
    """Every line's envelope, and each custom_id once; raises PersonaFileError naming the line.
    Requests whose custom_id is in `skip` (already answered) are checked, not counted."""
    seen: dict[str, int] = {}
    requests = rows = 0
    for number, text in read_lines(path, name):
        line = envelope(name, number, text)
        if line.custom_id in seen:
            raise PersonaFileError(name, number, f"custom_id {line.custom_id!r} repeats line {seen[line.custom_id]}",
                                   "give every request its own custom_id")
        seen[line.custom_id] = number
        if line.custom_id not in skip:
            n = line.body.get("n", 1)
            rows += n if isinstance(n, int) and n >= 1 else 1
            requests += 1
    return BatchFile(requests, rows)


def requests(path: Path, name: str, skip: Container[str] = ()) -> Iterator[BatchLine]:
    """The file's requests, streamed, less those whose custom_id is in `skip` (already answered)."""
    for number, text in read_lines(path, name):
        line = envelope(name, number, text)
        if line.custom_id not in skip:
            yield line


def output_line(custom_id: str, status: int, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """One output line, as OpenAI's batch output writes it."""
    return {"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


@dataclass(eq=False)
class LiveRequest:
    """A request whose rows are in the engine."""

    line: BatchLine
    plan: ChatPlan
    choices: Choices
    prompt_tokens: int
    id: str = field(default_factory=completion_id)
    jobs: dict[int, Job] = field(default_factory=dict)  # sample number -> its row's job


@dataclass
class BatchSummary:
    """What a run did: requests answered and refused (with their line numbers), rows, new tokens."""

    answered: int = 0
    refused: list[int] = field(default_factory=list)
    rows: int = 0
    tokens: int = 0


class BatchRun:
    """The requests on one engine (`run`: each planned as the engine has room for it) or on Ray
    workers (`run_on`: a chunk of requests at a time); each output line written (`write`) as its
    request completes. `on_row` hears each finished row (a progress bar)."""

    def __init__(self, loaded: LoadedModel, library: Library, engine: Engine | None,
                 write: Callable[[dict[str, Any]], None], *, seed: int | None = None, queue_rows: int | None = None,
                 on_row: Callable[[], None] = lambda: None):
        """engine: None when the rows run on Ray workers (`run_on`); then `queue_rows` is needed."""
        self.loaded, self.library, self.engine, self.write = loaded, library, engine, write
        self.seed = seed
        # Enough queued rows to refill every slot as rows end, no more: the rest stay in the file.
        self.queue_rows = queue_rows or 2 * engine.slot_cap
        self.on_workers = False  # finished samples only: no token-by-token view
        self.on_row = on_row
        self.summary = BatchSummary()
        self._stopped: list[Job] = []  # rows ended by a stop string, cancelled after the step
        self._live: dict[int, LiveRequest] = {}  # id of a row in the engine -> its request
        self._decode = lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True)
        self._token_text = lambda token: token_text(loaded.tokenizer, token)

    def run(self, lines: Iterator[BatchLine]) -> BatchSummary:
        exhausted = False
        while True:
            if not exhausted:
                planned, exhausted = self._read(lines, self.queue_rows - self.engine.rows_waiting)
                self._submit(planned)
            if self.engine.busy:
                self.engine.step()
                if self._stopped:
                    self.engine.cancel(self._stopped)
                    self._stopped.clear()
            elif exhausted:
                return self.summary

    def run_on(self, lines: Iterator[BatchLine], pool: Any) -> BatchSummary:
        """The requests on Ray workers (`pool`: generate.ray.RayPool), read and planned `queue_rows`
        rows at a time, each such chunk handed out whole. A worker returns finished samples, so a
        stop string is found by reading each sample's tokens in order, as the engine's rows are
        read token by token: the same text, finish reason and token count."""
        self.on_workers = True
        exhausted = False
        while not exhausted:
            planned, exhausted = self._read(lines, self.queue_rows)
            work = []
            for key, members in self._groups(planned).items():
                work.append((key[0], [row for _, rows in members for row in rows]))
                for live, rows in members:
                    self._live.update((id(row), live) for row in rows)
            if work:
                pool.sample(work, self._sample)
        return self.summary

    def _read(self, lines: Iterator[BatchLine], room: int) -> tuple[list[tuple[LiveRequest, list[Row]]], bool]:
        """Requests read and planned until they fill `room` rows: (them, whether the file ended)."""
        planned: list[tuple[LiveRequest, list[Row]]] = []
        while room > 0:
            line = next(lines, None)
            if line is None:
                return planned, True
            if (request := self._plan(line)) is not None:
                planned.append(request)
                room -= len(request[1])
        return planned, False

    def _plan(self, line: BatchLine) -> tuple[LiveRequest, list[Row]] | None:
        """The request's rows; None when it is refused (its error line is written)."""
        try:
            chat = parse_request(line.body)
            if chat.stream:
                raise ApiError(400, "stream: a batch request is answered whole, not streamed", param="stream")
            if chat.logprobs and self.on_workers:
                raise ApiError(400, "logprobs: not available with --ray, whose workers return finished samples",
                               param="logprobs")
            plan, rows, prompt_tokens = plan_rows(chat, self.library, self.loaded, self.seed)
        except ApiError as error:
            self.summary.refused.append(line.number)
            self.write(output_line(line.custom_id, error.status, completion_id(), error.body()))
            return None
        return LiveRequest(line, plan, Choices(plan, self._decode, self._token_text), prompt_tokens), rows

    def _submit(self, planned: list[tuple[LiveRequest, list[Row]]]) -> None:
        """Into the engine together, one submission per way of sampling: the scheduler groups the
        rows of one submission by their prompts' common starts, so requests read together share
        their system text's cache from the first step."""
        for (settings, watch, logprobs), members in self._groups(planned).items():
            rows = [row for _, request_rows in members for row in request_rows]
            for live, request_rows in members:
                self._live.update((id(row), live) for row in request_rows)
            jobs = self.engine.submit(rows, settings, self._sample, on_token=self._token if watch else None,
                                      logprobs=logprobs)
            for job in jobs:
                self._live[id(job.row)].jobs[job.row.sample] = job

    @staticmethod
    def _groups(planned: list[tuple[LiveRequest, list[Row]]]) -> dict[tuple, list[tuple[LiveRequest, list[Row]]]]:
        """The planned requests by how their rows are sampled (settings, tokens watched, logprobs)."""
        groups: dict[tuple, list[tuple[LiveRequest, list[Row]]]] = {}
        for live, rows in planned:
            key = (plan_settings(live.plan), live.choices.watch_tokens, live.plan.logprobs is not None)
            groups.setdefault(key, []).append((live, rows))
        return groups

    def _token(self, row: Row, token: int, logprob: TokenLogprob | None) -> None:
        live = self._live.get(id(row))
        i = row.sample - 1
        if live is None or live.choices.finish[i]:  # its request is answered; a stop string ended it
            return
        live.choices.add_token(i, token, logprob)
        if live.choices.finish[i]:  # a stop string: the row ends here
            self._stopped.append(live.jobs[row.sample])
            self._row_done(live)

    def _sample(self, sample: Sample) -> None:
        live = self._live.get(id(sample.row))
        i = sample.row.sample - 1
        if live is None or live.choices.finish[i]:
            return
        if self.on_workers and live.plan.stops:  # read its tokens in order, as the engine's are
            for token in sample.token_ids:
                live.choices.add_token(i, token, None)
                if live.choices.finish[i]:
                    break
        if not live.choices.finish[i]:
            live.choices.add_sample(i, sample.token_ids, sample.finish_reason)
        self._row_done(live)

    def _row_done(self, live: LiveRequest) -> None:
        self.on_row()
        self.summary.rows += 1
        if live.choices.done:
            for job in live.jobs.values():
                self._live.pop(id(job.row), None)
            self.summary.answered += 1
            self.summary.tokens += live.choices.completion_tokens()
            self.write(output_line(live.line.custom_id, 200, live.id, live.choices.completion(live.id,
                                                                                              live.prompt_tokens)))
