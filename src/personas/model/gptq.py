"""GPTQ checkpoints: which kernel runs them, and the loading config that asks transformers for it.

torch, optimum and gptqmodel are imported inside the functions that need them, so the CLI can
list the kernel names without paying for them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelError

# User-facing kernel names -> gptqmodel's BACKEND values (gptqmodel/utils/backend.py).
GPTQ_BACKENDS = {
    "auto": "auto",
    "marlin": "gptq_marlin",
    "machete": "gptq_machete",
    "exllama_v2": "gptq_exllama_v2",
    "triton": "gptq_triton",
    "torch": "gptq_torch",
}


def quantization_of(directory: str) -> dict:
    """The checkpoint's stored quantization config ({} for unquantized weights)."""
    config = Path(directory) / "config.json"
    try:
        return json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return {}


def quant_method_of(directory: str) -> str | None:
    """"gptq", "awq", … as the checkpoint's config names its quantization; None for none."""
    method = quantization_of(directory).get("quant_method")
    return str(method).lower() if method else None


def gptq_config_of(directory: str) -> dict | None:
    """The checkpoint's GPTQ quantization config, or None for unquantized (or otherwise
    quantized) weights."""
    quant = quantization_of(directory)
    return quant if str(quant.get("quant_method", "")).lower() == "gptq" else None


# Marlin's limits (gptqmodel's MarlinLinear): symmetric 4/8-bit, these group sizes, sm75 or newer.
MARLIN_BITS, MARLIN_GROUP_SIZES, MARLIN_MIN_CAPABILITY = (4, 8), (-1, 32, 64, 128), (7, 5)


def gptq_kernel_for(requested: str, stored: dict, device: Any) -> str:
    """personas' `auto`: Marlin on a CUDA card it supports, else gptqmodel's own choice.

    Why not gptqmodel's `auto` everywhere: on Hopper it ranks Machete first, and Machete builds
    against CUTLASS downloaded from GitHub on first use, which fails with no network and means a
    download and a long compile on a user's first run with one (docs/performance.md, "Which
    kernel, which Marlin setting"). Marlin is what the fast path was measured and checked with.
    """
    if requested != "auto" or getattr(device, "type", None) != "cuda":
        return requested
    import torch

    fits = (int(stored.get("bits", 4)) in MARLIN_BITS and stored.get("sym", True) is not False
            and int(stored.get("group_size", 128)) in MARLIN_GROUP_SIZES
            and torch.cuda.get_device_capability(device) >= MARLIN_MIN_CAPABILITY)
    return "marlin" if fits else "auto"


def loading_config(stored: dict, backend: str) -> Any:
    for package in ("optimum", "gptqmodel"):
        if importlib.util.find_spec(package) is None:
            raise ModelError(f"this is a GPTQ checkpoint, and the '{package}' package is missing",
                             "install the GPTQ extra: pip install 'personas[gptq]'")
    if backend not in GPTQ_BACKENDS:
        raise InputError(f"unknown GPTQ backend '{backend}'", "choose one of: " + ", ".join(GPTQ_BACKENDS))
    _quiet_gptqmodel()
    from transformers import GPTQConfig

    # Only the loading attributes (backend) of this config are used; the rest comes from the file.
    return GPTQConfig(bits=int(stored.get("bits", 4)), backend=GPTQ_BACKENDS[backend])


def _quiet_gptqmodel() -> None:
    """gptqmodel logs a banner and INFO lines through logbar; keep them off the user's terminal."""
    import logging

    try:
        from logbar import LogBar

        LogBar.shared().setLevel(logging.ERROR)
    except Exception:  # an older or newer logbar: its chatter is only noise, never a failure
        pass


def is_quantized(module: Any) -> bool:
    """A gptqmodel quantized linear layer, whatever its kernel."""
    return type(module).__module__.startswith("gptqmodel.nn_modules.qlinear")


def kernel_name(model: Any) -> str | None:
    """The class of the model's gptqmodel layers (GPTQ's or AWQ's kernel); None for none."""
    for module in model.modules():
        if is_quantized(module):
            return type(module).__name__
    return None
