"""`generate --prompts-file` on Ray workers against one process, same rows, same machine.

The job: PROMPTS distinct prompts to one persona, n = 2, exactly NEW tokens each (min = max, so
both runs do the same work), the embedded model on the CPU unless --model says otherwise. Both
are whole processes (start-up, model loads, the Ray runtime's start for the Ray run); the
generation time is what each prints, from the first row handed out to the last sample. Prints the
machine, both timings, the overhead, and whether the two runs wrote the same rows (keys and seeds;
texts up to floating point, so their agreement is counted).

    .venv/bin/python benchmarks/bench_ray.py [--prompts 200] [--new-tokens 32] [--workers 2] [--model embedded]
                                             [--persona pirate] [--ray local]
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> tuple[float, list[dict], str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "personas", *args], capture_output=True, text=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed: personas {' '.join(args)}\n{result.stderr}")
    return elapsed, [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--persona", default="pirate")
    parser.add_argument("--ray", default="local", help="the --ray address for the Ray run")
    parser.add_argument("--warmup", action="store_true", help="one tiny run first (a GPU kernel's first-use compile)")
    args = parser.parse_args()
    import ray
    import torch

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.writelines(f"Tell me, in a few words, about day {i} of your last voyage.\n" for i in range(1, args.prompts + 1))
    common = ["generate", args.persona, "--prompts-file", f.name, "-t", "1.0", "-n", "2", "--seed", "1",
              "--max-new-tokens", str(args.new_tokens), "--min-new-tokens", str(args.new_tokens),
              "--model", args.model, "--format", "jsonl"]
    if args.warmup:
        run(["generate", args.persona, "-p", "Hello?", "--max-new-tokens", "2", "--model", args.model, "--format", "jsonl"])
    one_s, one_rows, one_err = run(common)
    ray_s, ray_rows, ray_err = run([*common, "--ray", args.ray, "--ray-workers", str(args.workers)])
    one_gen, ray_gen = (float(re.search(r"new tokens in ([\d.]+) s", err).group(1)) for err in (one_err, ray_err))
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


if __name__ == "__main__":
    main()
