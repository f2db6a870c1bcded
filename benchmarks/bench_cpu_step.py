"""A CPU decode step of the embedded model: the layers as one C call against the decoder's modules.

The customer persona's prompt shared by N rows (`--rows`), exactly `--new-tokens` new tokens each
at T = 0.7, the GGUF's own blocks (`--cpu-weights gguf`), 2 threads, in one process: each way
run `--repeats` times, alternating, after a warm-up run of each. Printed per row count and way:
the median decode step (the first step, which prefills the prompt, apart), the median forward
pass inside it (layers, final norm and head; the rest of a step is the sampler and the engine's
bookkeeping), the first step, whether each way's runs chose the same tokens, and how many rows
chose the modules' tokens throughout (the C step rounds otherwise in places, so a near-tie
between two tokens may fall the other way over 64 sampled tokens). Floor: the blocks a
one-row step reads (every layer and the head) over the copy bandwidth measured here.

    .venv/bin/python benchmarks/bench_cpu_step.py [--rows 1 16 64 128] [--new-tokens 64] [--repeats 3]
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

from personas.engine.engine import Engine, EngineConfig  # noqa: E402
from personas.library.load import find_library_file, load_library  # noqa: E402
from personas.model.block_weights import BlockLinear  # noqa: E402
from personas.model.choice import EMBEDDED, resolve_model  # noqa: E402
from personas.model.load import load_model  # noqa: E402
from personas.model.prompt import Dialog  # noqa: E402
from personas.sampling.grid import Row, Settings  # noqa: E402


def run(model, prompt: tuple[int, ...], rows: int, new_tokens: int, c_layers: bool) -> dict:
    """One job; its step times, forward-pass times and tokens."""
    engine = Engine(model, EngineConfig(layer_kernels=c_layers))
    forwards: list[float] = []
    if engine.runner.cpu_layers is not None:
        layers = engine.runner.cpu_layers
        logits = layers.logits

        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = logits(*args, **kwargs)
            forwards.append(time.perf_counter() - started)
            return out

        layers.logits = timed
    elif c_layers:
        raise SystemExit("the C layers do not run here (no AVX-512 VNNI, no compiler, or no GGUF blocks)")
    got: dict[int, tuple[int, ...]] = {}
    engine.submit([Row("customer", "p", 0.7, k + 1, 1000 + k, prompt) for k in range(rows)],
                  Settings(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                  lambda sample: got.__setitem__(sample.row.sample, sample.token_ids))
    steps = []
    with torch.inference_mode():
        while engine.busy:
            started = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - started)
    return {"first": steps[0], "step": statistics.median(steps[1:]),
            "forward": statistics.median(forwards) if forwards else None, "tokens": got}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(resolve_model(EMBEDDED), device="cpu", engine_only=True)
    persona = load_library(find_library_file(None)).get("customer")
    prompt = tuple(model.prompt_ids(Dialog.for_persona(persona, persona.prompt)))
    blocks = sum(m.stored_bytes() for m in model.model.modules() if isinstance(m, BlockLinear))
    bandwidth = copy_bandwidth(2)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, 2 threads; torch {torch.__version__}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; embedded model, {model.block_weights} block layers ({blocks / 1e6:.0f} MB)")
    print(f"job: the customer prompt ({len(prompt)} tokens) shared by N rows, {args.new_tokens} new tokens each, "
          f"T = 0.7; medians over {args.repeats} alternating runs; floor of a one-row step "
          f"{blocks / bandwidth * 1e3:.1f} ms (the blocks at the copy bandwidth)\n")
    print("| rows | way | decode step (ms) | forward pass (ms) | first step (ms) | runs repeat their tokens "
          "| rows with the modules' tokens |")
    print("|---:|---|---:|---:|---:|---|---:|")
    for rows in args.rows:
        for c_layers in (True, False):
            run(model, prompt, rows, 4, c_layers)  # warm
        results: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.repeats):
            for c_layers in (True, False):
                results[c_layers].append(run(model, prompt, rows, args.new_tokens, c_layers))
        reference = results[False][0]["tokens"]
        for c_layers, label in ((True, "C layers"), (False, "modules")):
            runs = results[c_layers]
            forward = [r["forward"] for r in runs if r["forward"] is not None]
            repeatable = all(r["tokens"] == runs[0]["tokens"] for r in runs)
            alike = sum(runs[0]["tokens"][k] == reference[k] for k in reference)
            print(f"| {rows} | {label} | {statistics.median(r['step'] for r in runs) * 1e3:.2f} | "
                  + (f"{statistics.median(forward) * 1e3:.2f}" if forward else "–")
                  + f" | {statistics.median(r['first'] for r in runs) * 1e3:.0f} | {'yes' if repeatable else 'NO'} "
                  f"| {alike} of {len(reference)} |")


if __name__ == "__main__":
    main()
