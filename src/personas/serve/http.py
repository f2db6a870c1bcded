"""`personas serve --http`: an OpenAI-compatible chat-completions server; every persona is a model.

    client ──HTTP──► FastAPI route (event loop) ──rows──► EngineWorker ──► the decode engine
           ◄──JSON / server-sent events── ChoiceRun ◄──tokens, samples (call_soon_threadsafe)──┘

The model loads on a thread after the socket is open (GET /health says 503 until it is ready).
Every request's rows join the engine's running batch, so concurrent clients are decoded
together; each row keeps its own seed, so a request's choices do not depend on what else shares
the batch. A client that goes away has its rows cancelled. SIGTERM: uvicorn stops accepting,
the requests in flight finish, the process exits 0.

Errors are OpenAI's error object with the status that fits; nothing else reaches a client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine.decoder import unsupported_reason
from ..engine.loop import engine_for
from ..errors import InputError
from ..library.load import Library
from ..model.load import LoadedModel
from ..model.tokens import token_text
from ..sampling.grid import Row, Sample, Settings, TokenLogprob
from .metrics import ServerMetrics
from .openai import ApiError, ChatPlan, Choices, chunk, chunk_choice, completion_id, model_entry, parse_request, usage
from .rows import plan_rows, plan_settings
from .worker import EngineWorker, Ticket

MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_QUEUE = 1024
KNOWN_PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


class TokenEvent(NamedTuple):
    """A row's new token (and its log-probabilities when asked for), from the engine's thread."""

    row: Row
    token: int
    logprob: TokenLogprob | None


class SampleEvent(NamedTuple):
    """A row's finished sample."""

    sample: Sample


class FailureEvent(NamedTuple):
    """The decode step that held the request's rows failed."""

    error: BaseException


Event = TokenEvent | SampleEvent | FailureEvent


class PersonaServer:
    """What the routes share: the library, the model once loaded, the engine's thread, the key."""

    def __init__(self, library: Library, load: Callable[[], LoadedModel], *, settings: Settings = Settings(),
                 api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, seed: int | None = None,
                 log: Callable[[str], None] = print, alert: Callable[[str], None] = print):
        """log: what the server does (hidden by --quiet); alert: failures (always shown)."""
        self.library = library
        self.load = load
        self.settings = settings  # the engine's: --batch-size, the fast path
        self.api_key = api_key
        self.max_queue = max_queue
        self.seed = seed
        self.log = log
        self.alert = alert
        self.created = int(time.time())
        self.loaded: LoadedModel | None = None
        self.worker: EngineWorker | None = None
        self.failure: BaseException | None = None  # why loading failed (the server then stops)
        self.on_failure: Callable[[], None] = lambda: None
        self.answered = 0
        self.metrics = ServerMetrics()

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="personas-load", daemon=True).start()

    def _load(self) -> None:
        try:
            loaded = self.load()
            reason = unsupported_reason(loaded.model)
            if reason:
                raise InputError(f"serve --http runs on the decode engine, and {reason}",
                                 "serve it with --stdio, or choose a Llama, Mistral or Qwen model")
            self.worker = EngineWorker(lambda: engine_for(loaded, self.settings, expect_more=True), self.alert,
                                       self.metrics.events)
            self.metrics.watch(self.worker)
            self.loaded = loaded
            self.log(f"ready: {len(self.library.personas)} personas on {loaded.label} ({loaded.device.type})")
        except BaseException as error:  # noqa: BLE001 — the server stops and the CLI reports it
            self.failure = error
            self.on_failure()

    def ready(self) -> tuple[LoadedModel, EngineWorker]:
        if self.loaded is None or self.worker is None:
            raise ApiError(503, "the model is still loading — retry in a moment (GET /health says when it is ready)",
                           type="service_unavailable", code="model_loading")
        return self.loaded, self.worker

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES (before reading it, when its length is sent)."""
    try:
        declared = int(request.headers.get("content-length", "0"))
    except ValueError:
        raise ApiError(400, "the Content-Length header is not a number") from None
    too_large = ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
    if declared > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def server_sent(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read, so the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ChoiceRun:
    """One request's rows in the engine, seen from the event loop: the engine's thread posts
    tokens and samples here, and the request's choices are built from them."""

    def __init__(self, server: PersonaServer, loaded: LoadedModel, worker: EngineWorker, plan: ChatPlan,
                 rows: list[Row], prompt_tokens: int):
        self.server, self.loaded, self.worker, self.plan, self.rows = server, loaded, worker, plan, rows
        self.prompt_tokens = prompt_tokens
        self.id = completion_id()
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.choices = Choices(plan, lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True),
                               lambda token: token_text(loaded.tokenizer, token))
        self.ticket: Ticket = worker.submit(
            rows, plan_settings(plan), lambda sample: self._post(SampleEvent(sample)),
            on_error=lambda error: self._post(FailureEvent(error)),
            on_token=(lambda row, token, lp: self._post(TokenEvent(row, token, lp))) if self.choices.watch_tokens
            else None,
            logprobs=plan.logprobs is not None)

    def _post(self, event: Event) -> None:
        """From the engine's thread: hand an event to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, and this request with it
            pass

    @property
    def done(self) -> bool:
        return self.choices.done

    async def progress(self) -> AsyncIterator[tuple[int, list[dict] | None]]:
        """Each time a choice moves, (its index, the log-probability entries of its new token).
        Ends when every choice has finished; raises ApiError if decoding failed."""
        choices = self.choices
        while not choices.done:
            event = await self.events.get()
            if isinstance(event, FailureEvent):
                error = event.error
                raise ApiError(500, f"decoding failed: {type(error).__name__}: {error}", type="server_error")
            row = event.sample.row if isinstance(event, SampleEvent) else event.row
            i = row.sample - 1
            if choices.finish[i]:
                continue  # ended by a stop string; its row is being cancelled
            if isinstance(event, TokenEvent):
                yield i, choices.add_token(i, event.token, event.logprob)
                if choices.finish[i]:
                    self.worker.cancel(self.ticket, [row])
                    yield i, None
            else:
                choices.add_sample(i, event.sample.token_ids, event.sample.finish_reason)
                yield i, None

    def cancel(self, why: str) -> None:
        if not self.done:
            self.worker.cancel(self.ticket)
            unfinished = sum(1 for f in self.choices.finish if not f)
            self.server.log(f"{self.id}: {why}: its {unfinished} unfinished rows cancelled")

    async def answer(self, request: Request) -> dict[str, Any] | None:
        """The whole completion; None if the client went away first (its rows are cancelled)."""
        async def consume() -> None:
            async for _ in self.progress():
                pass

        work, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client went away (or the server task was cancelled)
                work.cancel()
                self.cancel("the client went away")
        if work.cancelled():
            return None
        work.result()
        return self.choices.completion(self.id, self.prompt_tokens)

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent chunks: each choice's role, its text as it grows, its finish reason; the
        usage if asked; then [DONE]."""
        created, model = int(time.time()), self.plan.persona.name
        piece = lambda choices, **kw: server_sent(chunk(self.id, created, model, choices, **kw))  # noqa: E731
        ended = False
        try:
            yield piece([chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(len(self.rows))])
            async for i, logprobs in self.progress():
                finished = self.choices.finish[i] is not None
                delta = self.choices.texts[i].delta(finished)
                if delta or logprobs:
                    yield piece([chunk_choice(i, {"content": delta}, logprobs=logprobs)])
                if finished:
                    yield piece([chunk_choice(i, {}, self.choices.finish[i])])
            if self.plan.include_usage:
                yield piece([], usage_=usage(self.prompt_tokens, self.choices.completion_tokens()))
            ended = True
        except ApiError as error:  # the headers are sent: the error goes in the stream, as OpenAI's does
            self.server.alert(f"{self.id}: {error.message}")
            ended = True
            yield server_sent(error.body())
        finally:
            if not ended:  # the client went away mid-stream (the task was cancelled)
                self.cancel("the client went away")
        self.server.answered += 1
        yield server_sent("[DONE]")


def create_app(server: PersonaServer) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.start_loading()
        yield
        if server.worker is not None:
            await asyncio.to_thread(server.worker.close)

    app = FastAPI(title="personas", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", type=kind).body()
        return JSONResponse(body, status_code=error.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.worker is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        worker = server.worker
        if worker.broken is not None:  # a supervisor should restart the process
            return JSONResponse({"status": "failed", "error": f"{type(worker.broken).__name__}: {worker.broken}"},
                                status_code=500)
        return JSONResponse({"status": "ready", "model": server.loaded.label if server.loaded else None,
                             "rows_waiting": worker.outstanding, "rows_queued": worker.rows_queued,
                             "rows_decoding": worker.rows_decoding, "most_rows_in_one_step": worker.most_rows,
                             "requests_answered": server.answered})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        server.authorize(request)
        return Response(server.metrics.text(), media_type=server.metrics.content_type)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Any]) -> Any:
        response = await call_next(request)
        # Known paths by name; anything else as one label, so a scanner cannot grow the series.
        path = request.url.path if request.url.path in KNOWN_PATHS else "other"
        server.metrics.requests.labels(path=path, status=str(response.status_code)).inc()
        return response

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.authorize(request)
        context = server.loaded.context_length if server.loaded else None
        return JSONResponse({"object": "list", "data": [model_entry(p, server.created, context)
                                                        for p in server.library.personas.values()]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            return await answer_chat(server, request)
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001 — one log line, OpenAI's error object, never a traceback
            server.alert(f"POST /v1/chat/completions failed: {type(error).__name__}: {error}")
            raise ApiError(500, f"the server failed: {type(error).__name__}: {error}", type="server_error") from None

    return app


async def answer_chat(server: PersonaServer, request: Request) -> Any:
    server.authorize(request)
    chat = parse_request(await read_body(request))
    if chat.model_extra:
        server.log(f"ignored unknown request fields: {', '.join(sorted(chat.model_extra))}")
    loaded, worker = server.ready()
    plan, rows, prompt_tokens = plan_rows(chat, server.library, loaded, server.seed)
    if worker.outstanding + len(rows) > server.max_queue:
        raise ApiError(429, f"{worker.outstanding} rows are queued and this request adds {len(rows)}; the limit is "
                       f"{server.max_queue} (--max-queue) — retry later", type="rate_limit_error", code="queue_full")
    run = ChoiceRun(server, loaded, worker, plan, rows, prompt_tokens)
    if plan.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = await run.answer(request)
    server.answered += 1
    return JSONResponse(answer) if answer is not None else JSONResponse({}, status_code=499)


# --- running it ------------------------------------------------------------------------------------


def check_exposure(host: str, api_key: str | None) -> None:
    """Binding beyond loopback needs a key: the server runs a model for whoever reaches it."""
    if api_key:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise InputError(f"--host {host} cannot be resolved ({e.strerror})", "pass an address, e.g. 127.0.0.1") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise InputError(f"--host {host} is reachable from other machines, and no API key is set",
                         "pass --api-key KEY (or set PERSONAS_API_KEY), or keep the default 127.0.0.1")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened here so that a port in use is one clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                         "choose another --port (0 picks a free one) or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def run_server(server: PersonaServer, sock: socket.socket, quiet: bool) -> bool:
    """Serve until SIGTERM or Ctrl-C; returns whether SIGTERM ended it (then exit 0). Raises what
    stopped the model from loading."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging_config = json.loads(json.dumps(LOGGING_CONFIG))
    logging_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout stays clean
    config = uvicorn.Config(create_app(server), log_config=logging_config, log_level="warning" if quiet else "info",
                            access_log=not quiet, timeout_graceful_shutdown=None, lifespan="on")
    uvicorn_server = uvicorn.Server(config)

    def stop() -> None:
        uvicorn_server.should_exit = True

    server.on_failure = stop
    terminated: list[int] = []
    # uvicorn handles SIGTERM itself (stop accepting, finish what is in flight) and raises it
    # again once done; this handler hears that, so the process can exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(1))
    try:
        uvicorn_server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if server.failure is not None:
        raise server.failure
    return bool(terminated)
