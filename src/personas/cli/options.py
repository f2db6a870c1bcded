"""Option aliases shared by the commands, so a flag reads the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..engine import GPTQ_BACKENDS

FileOpt = Annotated[
    Optional[Path],
    typer.Option("--file", help="Persona file (default: $PERSONAS_FILE, ./personas.toml, the shipped library).",
                 dir_okay=False, show_default=False),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="embedded | llama2-13b-gptq | llama2-7b-gptq | auto | a local "
                 "directory | a .gguf file | a hub id. Default: [defaults].model, $PERSONAS_MODEL, auto.",
                 show_default=False),
]
GptqBackendOpt = Annotated[
    str,
    typer.Option("--gptq-backend", help="GPTQ kernel: " + ", ".join(GPTQ_BACKENDS) + ". auto: Marlin on a "
                 "CUDA card that supports it, else gptqmodel's choice.",
                 case_sensitive=False),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu).",
                 show_default=False),
]
PromptOpt = Annotated[
    Optional[str],
    typer.Option("--prompt", "-p", help="The user's message (default: the persona's own prompt).",
                 show_default=False),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Load pickle (.bin/.pt) weights, which can run code: only for "
                 "models you trust. By default only safetensors are loaded."),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Run Python code shipped with the model (never by default)."),
]
