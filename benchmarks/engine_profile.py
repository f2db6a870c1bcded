"""Where the engine's time goes on the GPU: a run step by step, a step kernel by kernel, and one
layer's products through the GPTQ kernel against its dense copy.

--timeline (the default): the 24-sample grid (the customer persona, T = 0.2 / 0.7 / 1.0 × 8 samples,
exactly 128 new tokens) on the 13B GPTQ checkpoint (benchmarks/gptq_checkpoint.py), Marlin, CUDA
graphs: each `Engine.step()` timed with the device synchronised around it, the first step (slots
and pages allocated, prefix and suffixes prefilled, one eager step, the graph captured) apart
from the replayed ones and split into those phases, and each replay's GPU time (CUDA events
around the captured graph's replay inside the real steps), so that the host's share of a step
shows. `--prompts N`: the bulk job's rows instead (N distinct prompts × n = 2, T = 1.0), where
later steps also refill.

--kernels: the bulk job's shape, `--slots` rows mid-way through 128 new tokens; `--steps` eager
decode steps (the same kernels a replayed graph launches) under torch.profiler, the kernels
grouped by what they do, in ms per step.

--gemm-crossover: one 13B layer's four products (fused q/k/v, o, fused gate/up, down) at M rows
from 16 to 4,096, each timed as a captured CUDA graph of 20 calls (medians of 5), through the
GPTQ kernel and through cuBLAS on the layer's dense half-precision copy (model/dense_gptq.py);
beside each time its floor: the weights' bytes at the measured copy bandwidth, or the arithmetic
at the card's dense fp16 rate, whichever is longer. Where the copy wins is DENSE_MIN_ROWS.

    python benchmarks/engine_profile.py [--timeline | --kernels | --gemm-crossover]
        [--rows-per-temperature 8] [--prompts 0] [--new-tokens 128] [--runs 3]    (timeline)
        [--slots 512] [--steps 5] [--warm-steps 64] [--modules]                   (kernels)
        [--checkpoint /tmp/personas-gptq/13b] [--backend marlin]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, graph_ms, persona_rows  # noqa: E402
from gptq_checkpoint import load_checkpoint  # noqa: E402

DENSE_FP16_FLOPS = 989e12  # H100/H200 SXM tensor-core peak, dense fp16
CROSSOVER_ROWS = (16, 24, 64, 128, 192, 256, 384, 512, 1024, 4096)

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


class TimedGraph:
    """A captured graph whose replays are timed on the device (CUDA events around each)."""

    def __init__(self, graph):
        self.graph, self.times, self.pending = graph, [], []

    def replay(self) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.replay()
        end.record()
        self.pending.append((start, end))

    def collect(self) -> None:
        self.times += [start.elapsed_time(end) for start, end in self.pending]
        self.pending.clear()


PHASES = (("allocate", "_allocate"), ("prefill", "_place"), ("decode", "runner._decode"))


def timed_phases(engine, phases: dict) -> None:
    """Wrap the engine's first-step phases so each one's synchronised wall time adds to `phases`
    (a graph's capture, which records `_decode` without running it, is left to "the rest")."""
    for name, path in PHASES:
        owner = engine.runner if path.startswith("runner.") else engine
        method = getattr(owner, path.removeprefix("runner."))

        def timed(*args, _method=method, _name=name, **kwargs):
            if torch.cuda.is_current_stream_capturing():  # recording a graph: no synchronising
                return _method(*args, **kwargs)
            torch.cuda.synchronize()
            t = time.perf_counter()
            result = _method(*args, **kwargs)
            torch.cuda.synchronize()
            phases[_name] = phases.get(_name, 0.0) + time.perf_counter() - t
            return result

        setattr(owner, path.removeprefix("runner."), timed)


def timeline(args: argparse.Namespace) -> None:
    """A run step by step (the default)."""
    from personas.generate.request import Request, plan
    from personas.library.load import find_library_file, load_library
    from personas.engine.engine import Engine, EngineConfig
    from personas.sampling.grid import Settings

    model = load_checkpoint(args.checkpoint, args.backend)
    persona = load_library(find_library_file(None)).get("customer")
    settings = Settings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    if args.prompts:
        rows = persona_rows(model, args.prompts, 1.0, settings, n=2)
    else:
        rows = plan(Request(personas=[persona], temperatures=(0.2, 0.7, 1.0), n=args.rows_per_temperature, seed=1,
                            settings=settings), model)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, {len(rows)} rows × {args.new_tokens} "
          f"tokens, prompt {len(rows[0].prompt_ids)} tokens; run 1 compiles and warms\n")
    print("| run | whole run (s) | first step (ms): allocate / prefill / decode calls / the rest (capture) | "
          "later steps: median (ms) | their sum (s) | slowest (ms) | replay GPU time: median (ms) | "
          "host per step (ms) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for run in range(1, args.runs + 1):
        engine = Engine(model, EngineConfig(graphs=True))
        engine.submit(rows, settings, lambda s: None)
        steps, phases, timed = [], {}, {}
        timed_phases(engine, phases)
        with torch.inference_mode():
            torch.cuda.synchronize()
            started = time.perf_counter()
            while engine.busy:
                t = time.perf_counter()
                engine.step()
                torch.cuda.synchronize()
                steps.append(time.perf_counter() - t)
                if len(steps) == 1:
                    first = dict(phases)
                for key, graph in list(engine.runner.graphs.items()):  # time the later replays of each graph
                    if not isinstance(graph, TimedGraph):
                        engine.runner.graphs[key] = timed[key] = TimedGraph(graph)
                    else:
                        graph.collect()
            whole = time.perf_counter() - started
        replays = [t for graph in timed.values() for t in graph.times]
        replay_ms = statistics.median(replays)
        step_ms = statistics.median(steps[1:]) * 1e3
        split = [first.get(name, 0.0) * 1e3 for name, _ in PHASES]
        print(f"| {run} | {whole:.3f} | {steps[0] * 1e3:.1f}: {split[0]:.1f} / {split[1]:.1f} / {split[2]:.1f} / "
              f"{steps[0] * 1e3 - sum(split):.1f} | {step_ms:.2f} | {sum(steps[1:]):.3f} | "
              f"{max(steps[1:]) * 1e3:.1f} | {replay_ms:.2f} | {step_ms - replay_ms:.2f} |")



def kernels(args: argparse.Namespace) -> None:
    """One decode step kernel by kernel."""
    from personas.engine.engine import Engine, EngineConfig
    from personas.sampling.grid import Settings

    model = load_checkpoint(args.checkpoint, args.backend)
    settings = Settings(max_new_tokens=128, min_new_tokens=128)
    rows = persona_rows(model, args.slots, 1.0, settings)
    engine = Engine(model, EngineConfig(max_slots=args.slots, layer_kernels=not args.modules))  # eager: the profiler sees each kernel by name
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
    print(f"card: {torch.cuda.get_device_name()}, B={engine.slot_count}, {engine.stats.last_batch} rows decoding, "
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



def gemm_crossover(args: argparse.Namespace) -> None:
    """One layer's products through the GPTQ kernel and through the dense copy."""
    from personas.model.dense_gptq import DENSE_MIN_ROWS, dense_weight, is_quantized

    bandwidth = copy_bandwidth(2.0)
    model = load_checkpoint(args.checkpoint, args.backend)
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
        for rows in CROSSOVER_ROWS:
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



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--timeline", action="store_true", help="a run step by step (the default)")
    mode.add_argument("--kernels", action="store_true", help="one decode step kernel by kernel")
    mode.add_argument("--gemm-crossover", action="store_true", help="one layer's products: GPTQ kernel vs dense copy")
    parser.add_argument("--rows-per-temperature", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=0, help="the bulk job's N prompts × n = 2 instead")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warm-steps", type=int, default=64, help="steps before the profiled ones")
    parser.add_argument("--modules", action="store_true", help="the engine's fused layer kernels off")
    parser.add_argument("--backend", default="marlin")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq/13b"))
    args = parser.parse_args()
    (kernels if args.kernels else gemm_crossover if args.gemm_crossover else timeline)(args)


if __name__ == "__main__":
    main()
