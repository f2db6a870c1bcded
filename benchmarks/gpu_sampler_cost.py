"""What the Gumbel-max chooser costs on the GPU, against the inverse-CDF chooser it replaced.

Two measurements, both choosers in the same process on the same card:

  a. the chooser alone, captured in a CUDA graph: 24 rows × the model's vocabulary of float32
     logits, median replay time;
  b. issue 3's job on the 13B GPTQ checkpoint (benchmarks/gptq_checkpoint.py): the Galaxy Rider
     customer, 3 temperatures × 8 samples, exactly 128 new tokens, through personas' fast path
     (one captured decode step per token): generation time per decode step with the prefill, and
     the replayed step alone, (T(128 tokens) - T(64 tokens)) / 64. Runs alternate between the two
     choosers, five of each; medians.

The inverse-CDF chooser is kept here, as it was, only as the baseline.

    python benchmarks/gpu_sampler_cost.py [--checkpoint /tmp/personas-gptq] [--backend marlin]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_checkpoint import write_checkpoint  # noqa: E402

STEPS = 128
TEMPERATURES = (0.2, 0.7, 1.0)
N = 8


# --- the baseline: one counter uniform per (seed, step), located in the CDF ----------------------

def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    lo, hi = x & 0xFFFF, x >> 16
    cross = ((lo * (m >> 16) + hi * (m & 0xFFFF)) & 0xFFFF) << 16
    return (lo * (m & 0xFFFF) + cross) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def _counter_uniform(seeds: torch.Tensor, step) -> torch.Tensor:
    lo, hi = seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF
    steps = step.expand_as(seeds) if isinstance(step, torch.Tensor) else torch.full_like(seeds, step)
    h = _mix32(lo ^ _mix32(hi ^ _mix32(steps & 0xFFFFFFFF)))
    a = _mix32(h ^ 0x5BD1E995) >> 5
    b = _mix32(h ^ 0x1B873593) >> 6
    return (a * 67108864 + b).double() / 9007199254740992.0


class InverseCdfChooser:
    """The rule before issue 11 (top-k/top-p omitted: this job uses neither)."""

    def __init__(self, temperatures, seeds, settings):
        self.greedy = temperatures == 0
        self.divisor = torch.where(self.greedy, torch.ones_like(temperatures), temperatures)[:, None]
        self.seeds = seeds

    def __call__(self, input_ids, scores, step):
        cdf = torch.softmax(scores.float() / self.divisor, dim=-1).cumsum(dim=-1)
        target = _counter_uniform(self.seeds, step).to(cdf.dtype) * cdf[:, -1]
        sampled = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=scores.shape[-1] - 1)
        return torch.where(self.greedy, scores.argmax(dim=-1), sampled)


# --- measurements -----------------------------------------------------------------------------------


def replay_ms(chooser_class, vocab: int, rows: int = 24, repeats: int = 200) -> float:
    from personas.sampling.grid import Settings

    temperatures = torch.tensor([TEMPERATURES[i % 3] for i in range(rows)], device="cuda")
    seeds = torch.arange(rows, dtype=torch.long, device="cuda") * 7919 + 11
    chooser = chooser_class(temperatures, seeds, Settings())
    logits = torch.randn(rows, vocab, device="cuda")
    step = torch.zeros(1, dtype=torch.long, device="cuda")
    out = torch.zeros(rows, dtype=torch.long, device="cuda")
    for _ in range(3):
        out.copy_(chooser(None, logits, step))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(chooser(None, logits, step))
        step.add_(1)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def generation_s(model, rows, steps: int) -> float:
    from personas.generate.request import sample_records
    from personas.sampling.grid import Settings

    records = []
    torch.cuda.synchronize()
    started = time.perf_counter()
    sample_records(Settings(max_new_tokens=steps, min_new_tokens=steps), model, rows, records.append)
    torch.cuda.synchronize()
    assert len(records) == len(rows) and all(r.new_tokens == steps for r in records)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq"))
    parser.add_argument("--backend", default="marlin")
    args = parser.parse_args()

    import transformers

    from personas.generate.request import Request, plan
    from personas.library.load import find_library_file, load_library
    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.sampling import graphed
    from personas.sampling.chooser import TokenChooser
    from personas.sampling.grid import Settings

    if not (args.checkpoint / "config.json").is_file():
        write_checkpoint(args.checkpoint, "13b", device="cuda")
    started = time.perf_counter()
    model = load_model(resolve_model(str(args.checkpoint)), device="cuda", gptq_backend=args.backend)
    load_s = time.perf_counter() - started
    persona = load_library(find_library_file(None)).get("customer")
    request = Request(personas=[persona], temperatures=TEMPERATURES, n=N, seed=1,
                      settings=Settings(max_new_tokens=STEPS), template="llama2")
    rows = plan(request, model)
    vocab = model.model.config.vocab_size

    choosers = {"inverse CDF (baseline)": InverseCdfChooser, "Gumbel-max (personas)": TokenChooser}
    alone = {label: replay_ms(chooser, vocab) for label, chooser in choosers.items()}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(5):  # alternate, so drift in clocks or memory affects both alike
        for label, chooser in choosers.items():
            graphed.TokenChooser = chooser  # the fast path builds its chooser through this name
            for steps in (STEPS, STEPS // 2):
                times.setdefault((label, steps), []).append(generation_s(model, rows, steps))
    graphed.TokenChooser = TokenChooser
    results = {}
    for label in choosers:
        full, half = (statistics.median(times[(label, n)]) for n in (STEPS, STEPS // 2))
        results[label] = (alone[label], full / STEPS * 1000, (full - half) / (STEPS - STEPS // 2) * 1000)

    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"kernel {model.gptq_kernel}, load {load_s:.0f} s")
    print(f"job: 24 rows (customer, T = {', '.join(map(str, TEMPERATURES))} × {N}), {STEPS} new tokens, "
          f"prompt {len(rows[0].prompt_ids)} tokens, vocabulary {vocab}\n")
    print("| chooser | chooser alone, graph replay (ms) | per step incl. prefill (ms) | replayed step (ms) |")
    print("|---|---:|---:|---:|")
    for label, (chooser_ms, with_prefill, replayed) in results.items():
        print(f"| {label} | {chooser_ms:.3f} | {with_prefill:.2f} | {replayed:.2f} |")
    (a0, p0, r0), (a1, p1, r1) = results.values()
    print(f"| difference | {a1 - a0:+.3f} | {p1 - p0:+.2f} | {r1 - r0:+.2f} |")


if __name__ == "__main__":
    main()
