"""Loading the model for a command: the spinner, the status lines, and the fast-path notice."""

from __future__ import annotations

from typing import Any

from .feedback import Feedback


def load(choice: Any, feedback: Feedback, *, device: str | None, gptq_backend: str, allow_pickle: bool,
         trust_remote_code: bool, fast_path: bool) -> Any:
    """The loaded model (engine.LoadedModel), telling the user what was chosen and how long it took.

    Call it with stdout redirected to stderr: libraries (gptqmodel's banner, for one) print there.
    """
    from ..engine import load_model
    from ..fastpath import usable

    if choice.reason:
        feedback.info(f"model: {choice.label} ({choice.reason})")
    with feedback.loading(f"loading {choice.label}") as status:
        loaded = load_model(choice, device=device, gptq_backend=gptq_backend, status=status,
                            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    kernel = f", GPTQ kernel {loaded.gptq_kernel}" if loaded.gptq_kernel else ""
    feedback.info(f"loaded {loaded.label} on {loaded.device.type} in {loaded.load_seconds:.1f} s{kernel}")
    if loaded.device.type == "cuda" and fast_path and not usable(loaded.model, loaded.gptq_kernel):
        feedback.info(f"the GPTQ kernel {loaded.gptq_kernel} is not known to work under a CUDA graph: "
                      "decoding without the fast path (--gptq-backend marlin enables it)")
    return loaded
