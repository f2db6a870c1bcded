"""Every knob of the decode engine in one place: what a caller chooses (EngineConfig) and the
constants the engine's parts share."""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling.grid import batch_size

# Prompt tokens per prefill pass: a pass's activations grow with it, and a longer pass delays the
# rows already decoding.
PREFILL_TOKENS = {"cuda": 4096, "cpu": 2048}
# The share of the memory free after loading that the slots and pages may take.
HEADROOM = 0.9
# While rows decode, refill when 1/REFILL_SHARE of the slots can be refilled in one pass (a
# prefill pass reads every weight, as a decode step does: refilling one slot per step would
# nearly double each step's cost).
REFILL_SHARE = 8
# Bytes per slot and token of the vocabulary: the logits, the float32 scores and the noise
# (int64 counters, float64 uniforms) a step makes for each row.
SLOT_WORKSPACE_PER_TOKEN_OF_VOCABULARY = 56


@dataclass(frozen=True)
class EngineConfig:
    """How an engine runs; every field has the default a `personas generate` run uses.

    max_slots: the most rows decoding at once (--batch-size); None: the device's default.
    graphs: on CUDA, capture the decode step as CUDA graphs and replay them (the fast path).
    expect_more: rows keep arriving (a server): size slots for the cap and the memory, not for
        the rows queued when the first step runs.
    max_pages: at most this many cache pages (memory shared with something else; tests force
        preemption with it).
    layer_kernels: on CUDA, fused Triton kernels for the layers' small steps; on the CPU, where
        every projection is GGUF blocks, each pass's layers (decode steps and prompts) as one C
        call (off: the modules' own, for comparisons).
    dense_weights: products of many rows through dense copies of a GPTQ model's weights
        (model/dense_gptq.py): True asks, False refuses, None lets the engine decide from its
        slots and the memory (sizing.py).
    """

    max_slots: int | None = None
    graphs: bool = False
    expect_more: bool = False
    max_pages: int | None = None
    layer_kernels: bool = True
    dense_weights: bool | None = None

    def slot_cap(self, device_type: str) -> int:
        return batch_size(self.max_slots, device_type)
