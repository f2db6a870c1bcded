"""A change to the GGUF block kernel against an earlier version of it, alternating in one process.

    git show HEAD~1:src/personas/model/block_kernel.c > /tmp/before.c
    .venv/bin/python benchmarks/bench_kernel_change.py /tmp/before.c [--rows 1 16 64] [--threads 2]

Both versions are compiled as the engine compiles the kernel and called on the same weights and
rows, one after the other, many times: on a machine whose speed moves from minute to minute
(shared virtual CPUs), only calls that alternate within one process compare two versions fairly.
Each product shape of the embedded model and of a Llama-3.2-1B shape runs twice: hot (one matrix
again and again, in cache) and cold (turning over copies that add up to more than the last-level
cache, as a step meets its weights). Printed per shape and row count: each version's median µs,
the median of the paired ratios (baseline / current: above 1, the change is faster), whether the
two gave identical outputs (hot), and the floor of a cold one-row product (the bytes it reads over
the copy bandwidth measured here).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402
from peer_llamacpp import copy_bandwidth  # noqa: E402

from personas.model import block_kernel  # noqa: E402

# (outputs, width, bits): the embedded SmolLM2-135M's products (its head is Q8_0), then a 1B shape's.
SHAPES = {"135M q/k/v": (960, 576, 4), "135M gate/up": (3072, 576, 4), "135M down": (576, 1536, 4),
          "135M head": (49152, 576, 8), "1B q/k/v": (3072, 2048, 4), "1B gate/up": (16384, 2048, 4),
          "1B down": (2048, 8192, 4), "1B head": (128256, 2048, 4)}
COLD_BYTES = 600 << 20  # more than this machine's last-level cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="the earlier block_kernel.c")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="alternating rounds per cell")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE")
    args = parser.parse_args()
    if not args.baseline.is_file():
        parser.error(f"{args.baseline} is not a file — write the earlier kernel with "
                     "git show REV:src/personas/model/block_kernel.c > FILE")
    torch.set_num_threads(args.threads)
    try:
        versions = {"baseline": block_kernel.load(args.baseline), "current": block_kernel.load()}
    except block_kernel.KernelUnavailable as e:
        parser.error(f"a version of the kernel cannot run here: {e}")
    bandwidth = copy_bandwidth(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {args.repeats} alternating rounds a cell\n")
    print("| shape | rows | weights | baseline µs | current µs | baseline / current | identical | floor µs |")
    print("|---|---:|---|---:|---:|---:|---|---:|")
    generator = torch.Generator().manual_seed(0)
    for name in args.shapes:
        outputs, width, bits = SHAPES[name]
        groups, blocks = outputs // 16, width // 32
        one = groups * blocks * (16 * 32 * bits // 8 + 2 * 16)  # packed weights and their float16 scales
        copies = max(1, -(-COLD_BYTES // one))
        steps = 4 if bits == 4 else 8  # 64-byte chunks a block: two 4-bit steps share one
        packed = [torch.randint(0, 256, (groups, blocks, steps, 16, 4), dtype=torch.uint8, generator=generator)
                  for _ in range(copies)]
        scales = [(torch.rand(groups, blocks, 16, generator=generator) * 0.01 + 0.001).half() for _ in range(copies)]
        for rows in args.rows:
            x = torch.randn(rows, width, generator=generator)
            scratch = torch.empty(rows * (width // 2 + 2 * blocks))
            for temperature in ("hot", "cold"):
                # Cold turns over every copy, the turn carried across calls and versions alike.
                used, turn = (1 if temperature == "hot" else copies), 0
                results = {version: torch.empty(rows, outputs) for version in versions}

                def product(library: ctypes.CDLL, y: torch.Tensor) -> None:
                    nonlocal turn
                    turn = (turn + 1) % used
                    planes = scratch.data_ptr()
                    library.block_linear(packed[turn].data_ptr(), scales[turn].data_ptr(), None, bits, outputs,
                                         width, None, x.data_ptr(), rows, planes, planes + 2 * rows * width,
                                         y.data_ptr())

                started = time.perf_counter()
                product(versions["current"], results["current"])
                calls = min(64, max(1, round(0.002 / (time.perf_counter() - started))))  # ~2 ms a round
                times: dict[str, list[float]] = {version: [] for version in versions}
                for _ in range(args.repeats):
                    for version, library in versions.items():
                        started = time.perf_counter()
                        for _ in range(calls):
                            product(library, results[version])
                        times[version].append((time.perf_counter() - started) / calls * 1e6)
                identical = ""
                if temperature == "hot":
                    identical = "yes" if torch.equal(results["baseline"], results["current"]) else "**no**"
                ratio = statistics.median(b / c for b, c in zip(times["baseline"], times["current"]))
                floor = f"{one / bandwidth * 1e6:,.0f}" if temperature == "cold" and rows == 1 else ""
                print(f"| {name} | {rows} | {temperature} | {statistics.median(times['baseline']):,.1f} | "
                      f"{statistics.median(times['current']):,.1f} | {ratio:.2f}× | {identical} | {floor} |",
                      flush=True)


if __name__ == "__main__":
    main()
