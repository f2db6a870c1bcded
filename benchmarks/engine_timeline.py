"""Where an engine run's wall time goes, step by step, on the GPU.

The issue-3 job by default (the customer persona, T = 0.2 / 0.7 / 1.0 × 8 samples, exactly 128
new tokens) on the 13B GPTQ checkpoint (benchmarks/gptq_checkpoint.py), Marlin, CUDA graphs:
each `Engine.step()` timed with the device synchronised around it, the first step (slots and
pages allocated, prefix and suffixes prefilled, one eager step, the graph captured) apart from
the replayed ones, and split into those phases; and each replay's GPU time (CUDA events around
the captured graph's replay inside the real steps), so that the host's share of a step shows. `--prompts N`: the bulk job's rows instead (N distinct
prompts × n = 2, T = 1.0), where later steps also refill.

    python benchmarks/engine_timeline.py [--rows-per-temperature 8] [--prompts 0] [--new-tokens 128] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_prompts import persona_rows  # noqa: E402
from gptq_checkpoint import load_checkpoint  # noqa: E402


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


def timed_phases(engine, phases: dict) -> None:
    """Wrap the engine's first-step phases so each one's synchronised wall time adds to `phases`
    (a graph's capture, which records `_decode` without running it, is left to "the rest")."""
    for name in ("_allocate", "_prefill", "_decode"):
        method = getattr(engine, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            if torch.cuda.is_current_stream_capturing():  # recording a graph: no synchronising
                return _method(*args, **kwargs)
            torch.cuda.synchronize()
            t = time.perf_counter()
            result = _method(*args, **kwargs)
            torch.cuda.synchronize()
            phases[_name] = phases.get(_name, 0.0) + time.perf_counter() - t
            return result

        setattr(engine, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-temperature", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=0, help="the bulk job's N prompts × n = 2 instead")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq/13b"))
    args = parser.parse_args()

    from personas.generate.request import Request, plan
    from personas.library.load import find_library_file, load_library
    from personas.sampling.engine import Engine
    from personas.sampling.grid import Settings

    model = load_checkpoint(args.checkpoint, "marlin")
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
        engine = Engine(model, graphs=True)
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
                for key, graph in list(engine.graphs.items()):  # time the later replays of each graph
                    if not isinstance(graph, TimedGraph):
                        engine.graphs[key] = timed[key] = TimedGraph(graph)
                    else:
                        graph.collect()
            whole = time.perf_counter() - started
        replays = [t for graph in timed.values() for t in graph.times]
        replay_ms = statistics.median(replays)
        step_ms = statistics.median(steps[1:]) * 1e3
        split = [first.get(name, 0.0) * 1e3 for name in ("_allocate", "_prefill", "_decode")]
        print(f"| {run} | {whole:.3f} | {steps[0] * 1e3:.1f}: {split[0]:.1f} / {split[1]:.1f} / {split[2]:.1f} / "
              f"{steps[0] * 1e3 - sum(split):.1f} | {step_ms:.2f} | {sum(steps[1:]):.3f} | "
              f"{max(steps[1:]) * 1e3:.1f} | {replay_ms:.2f} | {step_ms - replay_ms:.2f} |")


if __name__ == "__main__":
    main()
