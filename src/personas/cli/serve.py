"""`personas serve`: load the model once and answer requests — JSONL on stdin (`--stdio`), or
OpenAI's chat-completions API over HTTP (`--http`)."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
from typing import Annotated, Optional

import typer

from ..errors import InputError, PipeClosed
from ..library.load import Library, find_library_file, load_library
from ..sampling.grid import Settings
from .feedback import Feedback
from .loading import ModelOptions, load_model_for, model_options
from .options import (AllowPickleOpt, BatchSizeOpt, CpuWeights, CpuWeightsOpt, DenseWeightsOpt, DeviceOpt,
                      FastPathOpt, FileOpt, GptqBackend, GptqBackendOpt, ModelOpt, QuietOpt, TrustRemoteCodeOpt)


def serve(
    stdio: Annotated[bool, typer.Option("--stdio", help="Read JSONL requests on stdin, write results "
                                        "on stdout.")] = False,
    http: Annotated[bool, typer.Option("--http", help="Serve OpenAI's chat-completions API; every persona "
                                       "is a model.")] = False,
    host: Annotated[str, typer.Option("--host", help="--http: the address to listen on. Any other than "
                                      "loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="--http: the port (0: a free one, printed).",
                                      min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="PERSONAS_API_KEY", help="--http: requests must send 'Authorization: Bearer KEY' "
        "(default: $PERSONAS_API_KEY; none on loopback).", show_default=False)] = None,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="--http: the most rows queued or decoding; a request beyond it gets 429.",
        min=1)] = 1024,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", "-s", help="Seed for requests that name none (default: --stdio a random one, printed; "
        "--http a fresh one per request).", min=0, show_default=False)] = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    gptq_backend: GptqBackendOpt = GptqBackend.AUTO,
    cpu_weights: CpuWeightsOpt = CpuWeights.GGUF,
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = None,
    fast_path: FastPathOpt = True,
    gptq_dense: DenseWeightsOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Keep a model loaded and answer requests: JSONL lines (--stdio) or HTTP (--http)."""
    if stdio == http:
        raise InputError("serve needs one transport", "pass --stdio or --http")
    feedback = Feedback(quiet)
    library = load_library(find_library_file(file))
    options = model_options(library.defaults, model, device, gptq_backend, allow_pickle, trust_remote_code, fast_path,
                            cpu_weights=cpu_weights)
    if http:
        return serve_http(library, options, feedback, host, port, api_key, max_queue, seed,
                          Settings(max_batch=batch_size, fast_path=fast_path, dense_weights=gptq_dense))
    from ..serve.stdio import serve as serve_lines

    base_seed = seed if seed is not None else secrets.randbelow(2**31)
    out = sys.stdout

    def write(obj: dict) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    loaded = load_model_for(options, feedback)
    with contextlib.redirect_stdout(sys.stderr):  # libraries may print; stdout is for the answers
        feedback.info(f"serving {loaded.label} on {loaded.device.type}; seed {base_seed} for requests "
                      "without one; one JSON request per line on stdin")
        try:
            count = serve_lines(sys.stdin.buffer, library, loaded, base_seed, write,
                                Settings(max_batch=batch_size, fast_path=fast_path, dense_weights=gptq_dense),
                                alert=feedback.warn)
        except BrokenPipeError:
            raise PipeClosed() from None
    feedback.info(f"end of input after {count} lines")


def serve_http(library: Library, options: ModelOptions, feedback: Feedback, host: str, port: int,
               api_key: str | None, max_queue: int, seed: int | None, settings: Settings) -> None:
    """Check the address, open the socket, serve until SIGTERM; the model loads while it listens."""
    from ..serve.http import PersonaServer, check_exposure, listen, run_server

    check_exposure(host, api_key)
    sock = listen(host, port)
    server = PersonaServer(library, lambda: load_model_for(options, feedback),
                           settings=settings, api_key=api_key,
                           max_queue=max_queue, seed=seed, log=feedback.info, alert=feedback.warn)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    feedback.info(f"listening on http://{shown}:{bound[1]}/v1 ({len(library.personas)} personas as models; "
                  f"the model loads now, GET /health says when it is ready)")
    if run_server(server, sock, feedback.quiet):
        feedback.info(f"stopped by SIGTERM after answering {server.answered} requests")
