"""The choice of each row's next token, per step: on one GPU the Gumbel noise as torch's
elementwise operations against the one Triton kernel (sampling/noise_kernel.py); with `--cpu`,
on the CPU, its uniforms as torch's operations against one pass of C (sampling/noise_cpu.py).

For each (rows, vocabulary) — the engine's bulk and grid steps over Llama 2's 32,000, SmolLM2's
49,152, Llama 3's 128,256 and Qwen 2.5's 152,064 tokens; on the CPU the embedded model's and the
1B shape's steps — `choose` at T = 1.0 on random float32 logits, both ways alternating, timed
(CUDA events, or the clock on the CPU: the median of 50 after a warm-up, 20 on the CPU, the lower
of two alternating rounds), the tokens compared; with the floor: the logits read once at the copy
bandwidth measured in the same run.

    python benchmarks/bench_choice.py [--cpu [--threads 2]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth  # noqa: E402

SHAPES = ((24, 32_000), (512, 32_000), (64, 49_152), (512, 128_256), (512, 152_064), (24, 152_064))
CPU_SHAPES = ((1, 49_152), (16, 49_152), (64, 49_152), (128, 49_152), (1, 128_256), (16, 128_256))


def timed(call, repeats: int = 50) -> float:
    call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed_cpu(call, repeats: int = 20) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main_cpu(threads: int) -> None:
    from peer_llamacpp import copy_bandwidth as cpu_copy_bandwidth

    from common import cpu_name
    from personas.sampling import chooser, noise_cpu

    torch.set_num_threads(threads)
    bandwidth = cpu_copy_bandwidth(threads)
    print(f"machine: {cpu_name()}, {threads} threads, torch {torch.__version__}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; the C loop {'runs' if noise_cpu.available() else 'is unavailable'} here\n")
    print("| rows × vocabulary | torch operations (ms) | one pass of C (ms) | speed-up | floor: logits read once (ms) "
          "| same tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for rows, vocabulary in CPU_SHAPES:
        salts = chooser.token_salts(vocabulary, torch.device("cpu"))
        logits = torch.randn(rows, vocabulary) * 3
        temperatures = torch.ones(rows)
        seeds = torch.arange(rows) * 104_729 + 7
        result = {}
        for in_c in (False, True, False, True):
            chooser.C_UNIFORMS_ON_CPU = in_c
            result.setdefault(in_c, []).append(timed_cpu(lambda: chooser.choose(logits, temperatures, seeds, 17, salts)))
            result[f"tokens {in_c}"] = chooser.choose(logits, temperatures, seeds, 17, salts).tolist()
        chooser.C_UNIFORMS_ON_CPU = True
        plain, in_c = min(result[False]), min(result[True])
        floor = rows * vocabulary * 4 / bandwidth * 1e3
        same = result["tokens True"] == result["tokens False"]
        print(f"| {rows} × {vocabulary:,} | {plain:.3f} | {in_c:.3f} | {plain / in_c:.1f}× | {floor:.3f} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="on the CPU: torch's uniforms against the C loop")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.cpu:
        main_cpu(args.threads)
        return
    from personas.sampling import chooser

    bandwidth = copy_bandwidth(2.0)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s\n")
    print("| rows × vocabulary | torch operations (ms) | Triton kernel (ms) | speed-up | floor: logits read once (ms) | same tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for rows, vocabulary in SHAPES:
        salts = chooser.token_salts(vocabulary, torch.device("cuda"))
        logits = torch.randn(rows, vocabulary, device="cuda") * 3
        temperatures = torch.ones(rows, device="cuda")
        seeds = torch.arange(rows, device="cuda") * 104_729 + 7
        step = torch.full((rows,), 17, device="cuda")
        result = {}
        for fused in (False, True, False, True):
            chooser.FUSED_NOISE_ON_CUDA = fused
            ms = timed(lambda: chooser.choose(logits, temperatures, seeds, step, salts))
            result.setdefault(fused, []).append(ms)
            result[f"tokens {fused}"] = chooser.choose(logits, temperatures, seeds, step, salts).tolist()
        chooser.FUSED_NOISE_ON_CUDA = True
        plain, fused = min(result[False]), min(result[True])
        floor = rows * vocabulary * 4 / bandwidth * 1e3
        same = result["tokens True"] == result["tokens False"]
        print(f"| {rows} × {vocabulary:,} | {plain:.3f} | {fused:.3f} | {plain / fused:.1f}× | {floor:.3f} | {same} |")


if __name__ == "__main__":
    main()
