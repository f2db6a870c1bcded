"""The GGUF block kernel (model/block_kernel.c) against fbgemm's float16 products, one layer
shape at a time, as a CPU decode step meets them.

For each of the embedded model's product shapes (q/k/v fused, o, gate/up fused, down, and the
49,152-token head as Q8_0; the others Q4_1), 30 distinct random matrices (2 for the head) are
multiplied in turn by the same rows, so that each is cold in cache as in a step; the median of 5
passes, µs per matrix, at 1, 16, 64 and 128 rows. Baseline in the same run: the same weights as
float16 through fbgemm (`--cpu-weights float16`). Floor: the bytes each side reads over the copy
bandwidth measured here.

    .venv/bin/python benchmarks/bench_block_kernel.py [--rows 1 16 64 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402
from peer_llamacpp import copy_bandwidth  # noqa: E402

from personas.model.block_weights import BlockLinear, Blocks, PackedBlocks  # noqa: E402
from personas.model.half_weights import HalfWeightLinear  # noqa: E402

SHAPES = {"q/k/v (960 × 576)": (960, 576, 4), "o (576 × 576)": (576, 576, 4),
          "gate/up (3,072 × 576)": (3072, 576, 4), "down (576 × 1,536)": (576, 1536, 4),
          "head (49,152 × 576, 8-bit)": (49152, 576, 8)}


def random_blocks(outputs: int, width: int, bits: int, generator: torch.Generator) -> Blocks:
    integers = torch.randint(0, 16 if bits == 4 else 256, (outputs, width), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(outputs, width // 32, generator=generator) * 0.01).half()
    offset = (-8 * scale.float() if bits == 4 else -128 * scale.float()).half()
    return Blocks(bits, integers, scale, offset)


def per_matrix_us(layers: list, x: torch.Tensor) -> float:
    passes = []
    for _ in range(5):
        started = time.perf_counter()
        for layer in layers:
            layer(x)
        passes.append((time.perf_counter() - started) / len(layers) * 1e6)
    return statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("µs per matrix, GGUF blocks / float16 (fbgemm); floor at one row = bytes read / copy bandwidth\n")
    print("| rows | " + " | ".join(SHAPES) + " |")
    print("|---:|" + "---:|" * len(SHAPES))
    built = {}
    for name, (outputs, width, bits) in SHAPES.items():
        count = 2 if outputs > 10000 else 30
        blocks = [random_blocks(outputs, width, bits, generator) for _ in range(count)]
        built[name] = ([BlockLinear(PackedBlocks.of(b), None) for b in blocks],
                       [HalfWeightLinear(b.dequantized(), None) for b in blocks])
    floors = []
    for name, (ours, theirs) in built.items():
        floors.append(f"{ours[0].stored_bytes() / bandwidth * 1e6:.0f} / "
                      f"{ours[0].out_features * ours[0].in_features * 2 / bandwidth * 1e6:.0f}")
    print("| floor, 1 | " + " | ".join(floors) + " |")
    for rows in args.rows:
        cells = []
        for name, (ours, theirs) in built.items():
            x = torch.randn(rows, ours[0].in_features, generator=generator)
            mine, base = [], []
            for _ in range(2):  # alternating
                mine.append(per_matrix_us(ours, x))
                base.append(per_matrix_us(theirs, x))
            a, b = min(mine), min(base)
            cells.append(f"{a:,.0f} / {b:,.0f} ({b / a:.2f}×)")
        print(f"| {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
