"""One 13B layer's products at M rows: the GPTQ kernel (Marlin) against cuBLAS on its dense copy.

Where a product of M rows is cheaper through the half-precision copy of model/dense_gptq.py than
through the 4-bit kernel: the layer's four products (fused q/k/v, o, fused gate/up, down) of the
13B checkpoint (benchmarks/gptq_checkpoint.py), each timed as a captured CUDA graph of 20 calls,
medians of 5, for M from 16 to 4,096 rows. Beside each time, its floor: the weights' bytes at the
measured copy bandwidth, or the arithmetic at the card's dense fp16 rate, whichever is longer.

    python benchmarks/gemm_crossover.py [--backend marlin] [--checkpoint /tmp/personas-gptq]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_grid import copy_bandwidth  # noqa: E402
from gptq_checkpoint import load_checkpoint  # noqa: E402

DENSE_FP16_FLOPS = 989e12  # H100/H200 SXM tensor-core peak, dense fp16
ROWS = (16, 24, 64, 128, 192, 256, 384, 512, 1024, 4096)
CALLS = 20


def graph_ms(fn) -> float:
    """Median time of one call, from a captured graph of CALLS calls replayed 5 times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="marlin")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq"))
    args = parser.parse_args()

    from personas.model.dense_gptq import DENSE_MIN_ROWS, dense_weight, is_quantized

    bandwidth = copy_bandwidth(2.0)
    model = load_checkpoint(args.checkpoint / "13b", args.backend)
    layer = model.model.model.layers[0]
    quantized = [m for m in layer.modules() if is_quantized(m)]
    dense = [dense_weight(q, torch.float16) for q in quantized]
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, kernel {model.gptq_kernel}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; one layer: "
          + ", ".join(f"{q.in_features}×{q.out_features}" for q in quantized)
          + f"; DENSE_MIN_ROWS = {DENSE_MIN_ROWS}\n")
    print("| rows | GPTQ kernel (µs) | dense cuBLAS (µs) | kernel / dense | floor, 4-bit (µs) | floor, fp16 (µs) "
          "| kernel TFLOP/s | dense TFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in ROWS:
            xs = [torch.randn(rows, q.in_features, device="cuda", dtype=torch.float16) for q in quantized]
            kernel = graph_ms(lambda: [q(x) for q, x in zip(quantized, xs)])
            cublas = graph_ms(lambda: [x @ w for x, w in zip(xs, dense)])
            flops = sum(2 * rows * q.in_features * q.out_features for q in quantized)
            weights4 = sum(q.in_features * q.out_features / 2 for q in quantized)  # + scales, ~3%
            weights16 = sum(w.numel() * 2 for w in dense)
            floor4 = max(weights4 / bandwidth, flops / DENSE_FP16_FLOPS) * 1e6
            floor16 = max(weights16 / bandwidth, flops / DENSE_FP16_FLOPS) * 1e6
            print(f"| {rows} | {kernel * 1e3:.1f} | {cublas * 1e3:.1f} | {kernel / cublas:.2f} | {floor4:.1f} | "
                  f"{floor16:.1f} | {flops / kernel / 1e9:.0f} | {flops / cublas / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
