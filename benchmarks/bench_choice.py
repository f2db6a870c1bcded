"""The choice of each row's next token on one GPU: the Gumbel noise as torch's elementwise
operations against the one Triton kernel (sampling/noise_kernel.py), per step.

For each (rows, vocabulary) — the engine's bulk and grid steps over Llama 2's 32,000, SmolLM2's
49,152, Llama 3's 128,256 and Qwen 2.5's 152,064 tokens — `choose` at T = 1.0 on random float32
logits, both ways alternating, CUDA-event timed (the median of 50 after a warm-up, the lower of
two alternating rounds), the tokens compared; with the floor: the logits read once at the copy
bandwidth measured in the same run.

    python benchmarks/bench_choice.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth  # noqa: E402

SHAPES = ((24, 32_000), (512, 32_000), (64, 49_152), (512, 128_256), (512, 152_064), (24, 152_064))


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


def main() -> None:
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
