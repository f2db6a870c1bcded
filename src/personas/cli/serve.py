"""`personas serve --stdio`: load the model once, answer JSONL requests until end of input."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
from typing import Annotated, Optional

import typer

from ..errors import InputError, PipeClosed
from ..library.load import find_library_file, load_library
from .feedback import Feedback
from .loading import load_model_for, model_options
from .options import (AllowPickleOpt, DeviceOpt, FileOpt, GptqBackend, GptqBackendOpt, ModelOpt, QuietOpt,
                      TrustRemoteCodeOpt)


def serve(
    stdio: Annotated[bool, typer.Option("--stdio", help="Read JSONL requests on stdin, write results "
                                        "on stdout (the only transport so far).")] = False,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", "-s", help="Seed for requests that name none (default: random, printed).", min=0,
        show_default=False)] = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    gptq_backend: GptqBackendOpt = GptqBackend.AUTO,
    device: DeviceOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Keep a model loaded and answer JSONL requests: one result line per sample."""
    if not stdio:
        raise InputError("serve needs a transport", "pass --stdio")
    from ..generate.serve import serve as serve_lines

    feedback = Feedback(quiet)
    library = load_library(find_library_file(file))
    base_seed = seed if seed is not None else secrets.randbelow(2**31)
    out = sys.stdout

    def write(obj: dict) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    options = model_options(library.defaults, model, device, gptq_backend, allow_pickle, trust_remote_code)
    loaded = load_model_for(options, feedback)
    with contextlib.redirect_stdout(sys.stderr):  # libraries may print; stdout is for the answers
        feedback.info(f"serving {loaded.label} on {loaded.device.type}; seed {base_seed} for requests "
                      "without one; one JSON request per line on stdin")
        try:
            count = serve_lines(sys.stdin.buffer, library, loaded, base_seed, write)
        except BrokenPipeError:
            raise PipeClosed() from None
    feedback.info(f"end of input after {count} lines")
