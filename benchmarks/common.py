"""What the benchmarks share: the machine's name, timed subprocesses, the device's clock and
copy bandwidth, the bytes a decode step reads, and the customer persona's rows.

Benchmarks import this beside them (`sys.path` holds their folder when run as scripts).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


# --- the machine and whole processes ------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr}")
    return elapsed, result


def machine() -> str:
    """The CPU and its cores, and the GPU when there is one."""
    cpu = f"{cpu_name()}, {os.cpu_count()} cores"
    return f"{cpu}; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else cpu


# --- the device -----------------------------------------------------------------------------------


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of a GPU script itself


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def copy_bandwidth(gigabytes: float = 2.0, repeats: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of `repeats`)."""
    src = torch.empty(int(gigabytes * 2**30) // 2, dtype=torch.float16, device=device()).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [sync_time(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * gigabytes * 2**30 / statistics.median(times)


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def quantized_bytes(model) -> int:
    """Every parameter and buffer a decode step reads: all weights except the embedding table
    (a tied head is read through its own copy), float16 weights packed for the CPU and GGUF
    blocks included."""
    from personas.model.block_weights import BlockLinear
    from personas.model.half_weights import HalfWeightLinear

    total = sum(m.out_features * m.in_features * 2 for m in model.modules() if isinstance(m, HalfWeightLinear))
    total += sum(m.stored_bytes() for m in model.modules() if isinstance(m, BlockLinear))
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or "embed_tokens" in name or "rotary" in name:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear) and head.weight.data_ptr() not in seen:  # tied to the embedding
        total += head.weight.numel() * head.weight.element_size()
    return total


GRAPH_CALLS = 20


def graph_ms(fn) -> float:
    """Median time of one call, from a captured graph of GRAPH_CALLS calls replayed 5 times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / GRAPH_CALLS)
    return statistics.median(times)



# --- the customer persona's rows -----------------------------------------------------------------

SUBJECTS = ["your last bike repair", "the shop's opening hours", "a muddy trail ride", "a gift for a friend",
            "the price of a helmet", "a slow delivery", "a squeaky brake", "riding in the rain", "a new saddle",
            "the store's website"]
ASKS = ["Tell me about {}.", "What went wrong with {}?", "Describe {} in two sentences.", "Would you recommend {}?",
        "Write a short review of {}.", "What did you expect from {}?", "Complain politely about {}.",
        "What would make {} better?", "Ask the staff a question about {}.", "Summarise {} for a friend."]


def prompts(count: int) -> list[str]:
    return [ASKS[i % len(ASKS)].format(SUBJECTS[(i // len(ASKS)) % len(SUBJECTS)]) + f" (#{i + 1})"
            for i in range(count)]


def persona_rows(model, count: int, temperature: float, settings, n: int = 1, persona: str = "customer"):
    """`count` distinct prompts (as `prompts` makes them) to one persona of the shipped library,
    each × n at one temperature, planned on a loaded model."""
    from personas.generate.request import Cell, Request, plan
    from personas.library.load import find_library_file, load_library

    chosen = load_library(find_library_file(None)).get(persona)
    return plan(Request(personas=[], cells=[Cell(chosen, t) for t in prompts(count)], temperatures=(temperature,),
                        n=n, seed=1, settings=settings), model)
