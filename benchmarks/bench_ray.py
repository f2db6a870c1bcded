"""`generate --prompts-file` on Ray workers against one process, same rows, same machine.

The job: PROMPTS distinct prompts to one persona, n = 2, exactly NEW tokens each (min = max, so
both runs do the same work), the embedded model on the CPU unless --model says otherwise. Both
are whole processes (start-up, model loads, the Ray runtime's start for the Ray run); the
generation time is what each prints, from the first row handed out to the last sample. Prints the
machine, both timings, the overhead, whether the two runs wrote the same rows (keys and seeds;
texts up to floating point, so their agreement is counted), and where the difference lies: when
each had the model ready (the Ray run: its runtime's and workers' start), when its last sample
came, and how long the process took to end after it (the Ray run: stopping the runtime).

    .venv/bin/python benchmarks/bench_ray.py [--prompts 200] [--new-tokens 32] [--workers 2] [--model embedded]
                                             [--persona pirate] [--ray local] [--warmup] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(label: str, args: list[str], timeout: float | None) -> tuple[float, list[dict], list[tuple[float, str]]]:
    """One whole `personas` process: its wall time, its JSONL rows and its stderr lines, each with
    the time it came (seconds since the start). The child's progress lines are echoed as they come
    and the time printed when it ends, so a run cut short (a time limit, a hang in a worker's
    start) still shows how far each process got."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as rows:
        child = subprocess.Popen([sys.executable, "-m", "personas", *args], stdout=rows, stderr=subprocess.PIPE,
                                 text=True, env=env, cwd=REPO)
        # A thread reads stderr so that the time limit below still holds while the child is silent.
        err_lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=_echo, args=(child.stderr, label, started, err_lines), daemon=True)
        reader.start()
        try:
            returncode = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            reader.join(timeout=5)
            sys.exit(f"{label}: stopped after {time.perf_counter() - started:.1f} s (--timeout {timeout:g})")
        reader.join()
        elapsed = time.perf_counter() - started
        if returncode != 0:
            sys.exit(f"failed: personas {' '.join(args)}\n{''.join(line for _, line in err_lines)}")
        rows.seek(0)
        parsed = [json.loads(line) for line in rows]
    print(f"[{elapsed:7.1f} s] {label} done: {len(parsed)} rows", file=sys.stderr, flush=True)
    return elapsed, parsed, err_lines


def _echo(stream, label: str, started: float, into: list[tuple[float, str]]) -> None:
    # The CLI redraws its progress line with carriage returns: echo whole lines only.
    for line in stream:
        at = time.perf_counter() - started
        into.append((at, line))
        print(f"  [{at:7.1f} s] {label}: {line.rstrip()}", file=sys.stderr, flush=True)


def phases(whole: float, lines: list[tuple[float, str]]) -> tuple[float, float, float, float]:
    """Where a run's time went, from when its stderr lines came: (when the model was ready — loaded
    in this process, or the Ray workers ready; the generation time the CLI prints, from the rows
    planned to the last sample; when that line came, at the last sample; from then to the
    process's end)."""
    ready = next(at for at, line in lines if line.startswith("loaded ") or ("Ray worker" in line and " ready" in line))
    done_at, done = next((at, line) for at, line in lines if " new tokens in " in line)
    generation = float(re.search(r"new tokens in ([\d.]+) s", done).group(1))
    return ready, generation, done_at, whole - done_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--persona", default="pirate")
    parser.add_argument("--ray", default="local", help="the --ray address for the Ray run")
    parser.add_argument("--warmup", action="store_true", help="one tiny run first (a GPU kernel's first-use compile)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds each process may take before it is stopped")
    args = parser.parse_args()
    import ray
    import torch

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.writelines(f"Tell me, in a few words, about day {i} of your last voyage.\n" for i in range(1, args.prompts + 1))
    common = ["generate", args.persona, "--prompts-file", f.name, "-t", "1.0", "-n", "2", "--seed", "1",
              "--max-new-tokens", str(args.new_tokens), "--min-new-tokens", str(args.new_tokens),
              "--model", args.model, "--format", "jsonl"]
    if args.warmup:
        run("warm-up", ["generate", args.persona, "-p", "Hello?", "--max-new-tokens", "2", "--model", args.model,
                        "--format", "jsonl"], args.timeout)
    one_s, one_rows, one_err = run("one process", common, args.timeout)
    ray_s, ray_rows, ray_err = run("ray", [*common, "--ray", args.ray, "--ray-workers", str(args.workers)], args.timeout)
    one_phases, ray_phases = phases(one_s, one_err), phases(ray_s, ray_err)
    one_gen, ray_gen = one_phases[1], ray_phases[1]
    os.unlink(f.name)

    def key(r: dict) -> tuple:
        return (r["id"], r["sample"], r["seed"])

    same_keys = sorted(map(key, one_rows)) == sorted(map(key, ray_rows))
    texts = {key(r): r["text"] for r in one_rows}
    same_texts = sum(texts.get(key(r)) == r["text"] for r in ray_rows)
    tokens = sum(r["new_tokens"] for r in one_rows)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"ray {ray.__version__}, Python {platform.python_version()}; model {args.model}")
    print(f"job: {args.prompts} prompts × n = 2 × {args.new_tokens} new tokens = {tokens} tokens, T = 1.0\n")
    print("| run | whole process (s) | generation (s) | tokens/s of generation | vs one process |")
    print("|---|---:|---:|---:|---:|")
    print(f"| one process (baseline) | {one_s:.1f} | {one_gen:.1f} | {tokens / one_gen:.0f} | 1.00× |")
    print(f"| --ray {args.ray} --ray-workers {args.workers} | {ray_s:.1f} | {ray_gen:.1f} | {tokens / ray_gen:.0f} | "
          f"{one_gen / ray_gen:.2f}× |")
    print(f"\nsame rows (keys and seeds): {same_keys}; same texts: {same_texts} of {len(ray_rows)}")
    # Where the overhead is: before the model is ready (the runtime's and the workers' start), in the
    # generation, or after it (handing the rows back, stopping the workers and the runtime).
    print("\n| run | model ready at (s) | generation ends at (s) | then to the process's end (s) | whole (s) |")
    print("|---|---:|---:|---:|---:|")
    for label, whole, (ready, _, done_at, after) in (("one process", one_s, one_phases), ("ray", ray_s, ray_phases)):
        print(f"| {label} | {ready:.1f} | {done_at:.1f} | {after:.2f} | {whole:.1f} |")


if __name__ == "__main__":
    main()
