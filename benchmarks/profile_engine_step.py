"""Where a decode step of the engine spends its time: kernel times from torch.profiler.

The bulk job's shape (issue 12): the 13B GPTQ checkpoint (benchmarks/gptq_checkpoint.py),
Marlin, B slots of the customer persona's rows mid-way through 128 new tokens. Runs a few steps,
then profiles `--steps` eager decode steps (the same kernels a replayed graph launches) and prints
the kernels grouped by what they do, in ms per step.

    python benchmarks/profile_engine_step.py [--slots 512] [--steps 5] [--warm-steps 64] [--modules]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_prompts import persona_rows  # noqa: E402
from gptq_checkpoint import load_checkpoint  # noqa: E402

GROUPS = [  # (label, substrings of kernel names), first match wins
    ("GPTQ GEMM (Marlin)", ("marlin", "Marlin")),
    ("own-part attention (paged Triton kernel)", ("paged_decode",)),
    ("prefix attention (Triton)", ("prefix_decode",)),
    ("norms, rotary, SiLU (fused Triton kernels)", ("_add_rms_norm", "_rotary", "_silu_mul")),
    ("other GEMM / matmul (attention, lm_head)", ("gemm", "gemv", "cutlass", "sm90", "sm80", "xmma", "cublas", "Kernel2")),
    ("softmax / exp / reductions", ("reduce", "softmax", "exp", "max", "sum")),
    ("copies, indexing, cat", ("copy", "index", "gather", "scatter", "cat", "Memcpy", "Memset", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "Elementwise")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warm-steps", type=int, default=64, help="steps before the profiled ones")
    parser.add_argument("--modules", action="store_true", help="the engine's fused layer kernels off")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq/13b"))
    args = parser.parse_args()

    from personas.sampling.engine import Engine
    from personas.sampling.grid import Settings

    model = load_checkpoint(args.checkpoint, "marlin")
    settings = Settings(max_new_tokens=128, min_new_tokens=128)
    rows = persona_rows(model, args.slots, 1.0, settings)
    engine = Engine(model, max_slots=args.slots, layer_kernels=not args.modules)  # eager: the profiler sees each kernel by name
    engine.submit(rows, settings, lambda s: None)
    with torch.inference_mode():
        for _ in range(args.warm_steps):
            engine.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
    totals: collections.Counter = collections.Counter()
    names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if not cuda_us or event.key.startswith(("ProfilerStep", "aten::")):
            continue
        group = next((label for label, keys in GROUPS if any(k in event.key for k in keys)), "other")
        totals[group] += cuda_us
        names[group][event.key[:90]] += cuda_us
    total = sum(totals.values())
    print(f"card: {torch.cuda.get_device_name()}, B={engine.slot_count}, {engine.last_batch} rows decoding, "
          f"{model.gptq_fused} fused GPTQ groups, layer kernels {'off' if args.modules else 'on'}, "
          f"{args.steps} steps profiled, kernel time {total / args.steps / 1e3:.2f} ms per step\n")
    print("| kernels | ms per step | share |")
    print("|---|---:|---:|")
    for group, us in totals.most_common():
        print(f"| {group} | {us / args.steps / 1e3:.2f} | {us / total:.0%} |")
    for group, us in totals.most_common(3):
        print(f"\n{group}:")
        for name, t in names[group].most_common(4):
            print(f"  {t / args.steps / 1e3:7.2f} ms  {name}")


if __name__ == "__main__":
    main()
