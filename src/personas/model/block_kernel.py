"""block_kernel.c, compiled on first use into the user's cache and called through ctypes.

The kernel is a few hundred lines of C with AVX-512 VNNI intrinsics: compiling it where it runs
(one `cc` call, under a second) needs no build step at install and no wheel per CPU. Where the
CPU lacks those instructions or no C compiler is found, `load()` says why and the caller keeps
float16 weights. The library links the same OpenMP runtime as torch (libgomp, loaded by torch
first), so its threads are torch's number of threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from .choice import cache_dir

SOURCE = Path(__file__).with_name("block_kernel.c")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
# -ffp-contract=off: the arithmetic written is the arithmetic done (no fused multiply-adds the
# compiler chose), so a C step rounds as the modules it stands for.
COMPILE_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c",
                 "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


class KernelUnavailable(Exception):
    """Why the block kernel cannot run here (the CPU, the compiler); the caller falls back."""


@cache
def load(source: Path = SOURCE) -> ctypes.CDLL:
    """The compiled kernel, built into the cache once per source text and compiler flags
    (`source`: another version of block_kernel.c, as a benchmark compares two)."""
    lib = compiled((source,))
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.block_linear.argtypes = [pointer, pointer, pointer, integer, integer, integer, pointer,
                                 pointer, integer, pointer, pointer, pointer]
    lib.block_linear.restype = None
    return lib


@cache
def compiled(sources: tuple[Path, ...], requires: tuple[str, ...] = CPU_FLAGS,
             flags: tuple[str, ...] = COMPILE_FLAGS) -> ctypes.CDLL:
    """`sources` (block_kernel.c first where others call its functions) as one shared library,
    compiled with `flags` into the cache once per source text and flags, on a CPU with the
    `requires` flags of /proc/cpuinfo. Raises KernelUnavailable."""
    missing = [flag for flag in requires if flag not in _cpu_flags()]
    if missing:
        raise KernelUnavailable(f"this CPU lacks {', '.join(missing)}")
    texts = b"".join(source.read_bytes() for source in sources)
    digest = hashlib.sha256(texts + " ".join(flags).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"{sources[-1].stem}-{digest}.so"
    if not library.is_file():
        _compile(sources, flags, library)
    return ctypes.CDLL(str(library))


def portable_flags() -> tuple[str, ...]:
    """Flags for plain C that any CPU runs, vectorised as wide as this one allows (compilers do
    that from plain loops; no flag names an instruction this CPU lacks)."""
    have = _cpu_flags()
    if {"avx512f", "avx512dq", "avx512vl"} <= have:
        wide = ("-mavx512f", "-mavx512dq", "-mavx512vl")
    elif "avx2" in have:
        wide = ("-mavx2",)
    else:
        wide = ()
    return ("-O3", *wide, "-fopenmp", "-shared", "-fPIC")


def _compile(sources: tuple[Path, ...], flags: tuple[str, ...], library: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise KernelUnavailable("no C compiler (cc) was found")
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        # Compiled beside its final name and renamed: two processes starting at once never load half a file.
        handle, scratch = tempfile.mkstemp(prefix=".compiling-", suffix=".so", dir=library.parent)
    except OSError as e:
        raise KernelUnavailable(f"cannot write into {library.parent} ({e.strerror})") from e
    os.close(handle)
    try:
        try:
            done = subprocess.run([compiler, *flags, *map(str, sources), "-o", scratch],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise KernelUnavailable(f"the C compiler {compiler} could not run ({reason})") from e
        if done.returncode:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise KernelUnavailable(f"{Path(compiler).name} could not compile it ({first})")
        os.replace(scratch, library)
    finally:
        Path(scratch).unlink(missing_ok=True)


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()  # not Linux, or no /proc: the kernel is not tried


def product(weights: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bits: int, outputs: int,
            bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (float32, [rows, width], contiguous) ↦ x times the packed block weights (+ bias),
    [rows, outputs]; `m` None for symmetric blocks (the kernel derives their offsets). What does
    not change from call to call is bound once: a one-row step makes about 120 of these calls,
    and Python's share of each is most of a small one's time."""
    width = weights.shape[1] * 32
    call = functools.partial(load().block_linear, weights.data_ptr(), d.data_ptr(),
                             None if m is None else m.data_ptr(), bits, outputs, width,
                             None if bias is None else bias.data_ptr())
    blocks = width // 32

    def multiply(x: torch.Tensor, _kept: tuple = (weights, d, m, bias)) -> torch.Tensor:
        # _kept: the tensors behind the bound addresses live as long as this function.
        rows = x.shape[0]
        y = torch.empty(rows, outputs)
        # One allocation for the scratch: the rows' two int8 planes, then a scale and a sum per block.
        scratch = torch.empty(rows * (width // 2 + 2 * blocks))
        planes = scratch.data_ptr()
        call(x.data_ptr(), rows, planes, planes + 2 * rows * width, y.data_ptr())
        return y

    return multiply
