"""Resolving and loading the model for any command: one options object, one helper."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from ..library.schema import Defaults
from ..model.choice import ModelChoice, default_model_spec, resolve_model
from ..model.imports import collector_paused
from .feedback import Feedback


@dataclass(frozen=True)
class ModelOptions:
    """What the model flags say: which model (resolved), on which device, with which GPTQ kernel,
    and the user's consent to pickle weights and to a model's own code.

    `choice` is None only for `auto` on Ray (`model_options(on_ray=True)`): there the Ray pool
    resolves it by the cluster's GPUs, and the command takes the pool's choice."""

    choice: ModelChoice | None
    device: str | None = None
    gptq_backend: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    fast_path: bool = True  # only to tell the user when the GPU cannot take the fast path
    cpu_weights: str = "gguf"
    # Every command runs the model only through the decode engine except `explain` and `generate
    # --diverge`, which call transformers' forward; the engine's model may load on the CPU as
    # plain modules (model/plain_llama.py).
    engine_only: bool = True

    def load_kwargs(self) -> dict:
        """model.load.load_model's keyword arguments (a Ray worker loads with these)."""
        return {"device": self.device, "gptq_backend": self.gptq_backend, "allow_pickle": self.allow_pickle,
                "trust_remote_code": self.trust_remote_code, "cpu_weights": self.cpu_weights,
                "engine_only": self.engine_only}


def model_options(defaults: Defaults, model: str | None, device: str | None = None, gptq_backend: str = "auto",
                  allow_pickle: bool = False, trust_remote_code: bool = False, fast_path: bool = True,
                  cpu_weights: str = "gguf", engine_only: bool = True, on_ray: bool = False) -> ModelOptions:
    """The model flags, with --model (else [defaults].model, $PERSONAS_MODEL, auto) resolved now,
    so that a model that does not exist is refused before anything slow.

    `auto` asks whether this machine has a CUDA GPU — but not `on_ray`: the cluster's machines
    load the model, and asking here would import torch before the Ray runtime can start."""
    def has_cuda() -> bool:
        with collector_paused():
            from ..model.load import cuda_available

            return cuda_available()

    spec = default_model_spec(model, defaults.model)
    choice = None if on_ray and spec == "auto" else resolve_model(spec, has_cuda=has_cuda)
    return ModelOptions(choice, device, str(gptq_backend), allow_pickle, trust_remote_code, fast_path, str(cpu_weights),
                        engine_only)


def load_model_for(options: ModelOptions, feedback: Feedback, *, tokenizer_only: bool = False) -> Any:
    """The loaded model (model.load.LoadedModel), telling the user what was chosen and how long
    it took. Library output (gptqmodel's banner, for one) goes to stderr: stdout is for data."""
    with collector_paused():
        from ..model.load import load_model
        from ..engine.chunked.graphed import graph_safe
        from ..engine.decoder import unsupported_reason

    choice = options.choice
    if choice is None:
        raise TypeError("auto on Ray is resolved by the Ray pool: load with the pool's choice")
    if choice.reason and not tokenizer_only:
        feedback.info(f"model: {choice.label} ({choice.reason})")
    what = f"loading {'tokenizer of ' if tokenizer_only else ''}{choice.label}"
    with contextlib.redirect_stdout(sys.stderr), feedback.loading(what) as status:
        loaded = load_model(choice, status=status, tokenizer_only=tokenizer_only, **options.load_kwargs())
    if tokenizer_only:
        return loaded
    kernel = f", 4-bit kernel {loaded.gptq_kernel}" if loaded.gptq_kernel else ""
    kernel += f", GGUF blocks for {loaded.block_weights} layers" if loaded.block_weights else ""
    kernel += ", float16 weights" if loaded.half_weights else ""
    if loaded.blocks_unused:
        feedback.info(loaded.blocks_unused)
    feedback.info(f"loaded {loaded.label} on {loaded.device.type} in {loaded.load_seconds:.1f} s{kernel}")
    reason = unsupported_reason(loaded.model)
    if reason:
        feedback.info(f"{reason}; sampling through transformers' generate in chunks")
    if loaded.device.type == "cuda" and options.fast_path and not graph_safe(loaded.model, loaded.gptq_kernel):
        hint = "" if "awq" in loaded.gptq_kernel.lower() else " (--gptq-backend marlin enables it)"
        feedback.info(f"the 4-bit kernel {loaded.gptq_kernel} is not known to work under a CUDA graph: "
                      f"decoding without the fast path{hint}")
    return loaded


def load_here_or_on_ray(stack: contextlib.ExitStack, options: ModelOptions, feedback: Feedback,
                        ray_address: str | None, ray_workers: int | None) -> tuple[Any, Any]:
    """(the loaded model, None); with --ray (its tokenizer alone, the Ray pool, open in `stack`).

    The pool's workers start first and load the model while this process loads only the
    tokenizer, for the prompts and the texts. `auto` on Ray is the pool's choice, said here."""
    if ray_address is None:
        return load_model_for(options, feedback), None
    from ..generate.ray import RayPool
    from .options import ray_messages

    pool = stack.enter_context(RayPool(ray_address, ray_workers, options.choice, options.load_kwargs(),
                                       **ray_messages(feedback)))
    if options.choice is None:
        feedback.info(f"model: {pool.choice.label} ({pool.choice.reason})")
        options = dataclasses.replace(options, choice=pool.choice)
    return load_model_for(options, feedback, tokenizer_only=True), pool
