"""Option aliases shared by the commands, so a flag reads the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..engine import GPTQ_BACKENDS
from ..errors import InputError

TEMPLATE_CHOICES = ("auto", "llama2", "model")

FileOpt = Annotated[
    Optional[Path],
    typer.Option("--file", help="Persona file (default: $PERSONAS_FILE, ./personas.toml, the shipped library).",
                 dir_okay=False, show_default=False),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="embedded | llama2-13b-gptq | llama2-7b-gptq | auto | a local "
                 "directory | a .gguf file | a hub id. Default: \\[defaults].model, $PERSONAS_MODEL, auto.",
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
TemplateOpt = Annotated[
    str,
    typer.Option("--template", help="Prompt format: auto (Llama-2 for Llama-2-chat models, else the model's "
                 "chat template), llama2, model."),
]
FastPathOpt = Annotated[
    bool,
    typer.Option("--fast-path/--no-fast-path", help="On CUDA: decode with a static KV cache and a captured "
                 "CUDA graph (much faster; off: transformers' plain generate)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]


def template_choice(value: str) -> str | None:
    """--template's value for the core: None lets the model decide."""
    if value not in TEMPLATE_CHOICES:
        raise InputError(f"unknown template '{value}'", "choose one of: " + ", ".join(TEMPLATE_CHOICES))
    return None if value == "auto" else value
