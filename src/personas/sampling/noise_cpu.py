"""chooser.counter_uniform on the CPU as one pass of C (noise_cpu.c), compiled on first use.

torch makes the uniforms of the Gumbel-max choice as ~20 elementwise passes over (rows ×
vocabulary) int64 tensors, a sixth to a third of a CPU decode step (docs/performance.md, "The
choice of a token on the CPU"). The C loop computes the same 32-bit hash and the same 53-bit
integer per (row, token) in registers and writes each uniform once; they are the torch formula's
numbers bit for bit (tested), so the tokens chosen do not change. The logarithms and the argmax
stay torch's. Without a C compiler (or where it fails) the torch formula runs.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..model.block_kernel import KernelUnavailable, compiled, portable_flags

SOURCE = Path(__file__).with_name("noise_cpu.c")


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = compiled((SOURCE,), requires=(), flags=portable_flags())
    except KernelUnavailable:
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.counter_uniform.argtypes = [pointer, pointer, integer, pointer, integer, pointer]
    lib.counter_uniform.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def counter_uniform(first: torch.Tensor, second: torch.Tensor, salts: torch.Tensor) -> torch.Tensor | None:
    """(rows, tokens) float64 uniforms for the rows' keys (`first`, `second`: chooser.row_keys,
    int64 below 2**32) and the tokens' `salts` (int64 below 2**32), all on the CPU; None where
    the C loop cannot run here."""
    lib = _library()
    if lib is None:
        return None
    first, second, salts = first.contiguous(), second.contiguous(), salts.contiguous()
    u = torch.empty((first.shape[0], salts.shape[0]), dtype=torch.float64)
    lib.counter_uniform(first.data_ptr(), second.data_ptr(), first.shape[0], salts.data_ptr(), salts.shape[0],
                        u.data_ptr())
    return u
