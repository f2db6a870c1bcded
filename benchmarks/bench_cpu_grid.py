"""Notebook way vs personas' single batched grid, on the embedded model on the CPU.

Both run as whole processes (interpreter start, imports, model load, generation) on the same
converted SmolLM2-135M-Instruct weights, the same prompt, temperature 1.0, n samples of exactly
MAX_NEW_TOKENS tokens (min_new_tokens = max_new_tokens, so both do the same work).

    .venv/bin/python benchmarks/bench_cpu_grid.py [--n 16] [--max-new-tokens 64] [--persona customer]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--persona", default="customer")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    import torch
    from personas.model.choice import EMBEDDED, resolve_model
    from personas.model.embedded import embedded_checkpoint
    from personas.model.load import load_model
    from personas.library.load import find_library_file, load_library
    from personas.model.prompt import Dialog

    # Convert once, outside the timings: both sides load the same converted copy.
    model_dir, _ = embedded_checkpoint(Path(resolve_model(EMBEDDED).location))
    persona = load_library(find_library_file(None)).get(args.persona)
    tokenizer_only = load_model(resolve_model(EMBEDDED), tokenizer_only=True)
    prompt_text = tokenizer_only.prompt_text(Dialog.for_persona(persona, persona.prompt))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONAS_MODEL": EMBEDDED}
    tokens = args.n * args.max_new_tokens

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt_text)
    notebook_s, notebook = timed([sys.executable, str(REPO / "benchmarks" / "notebook_way.py"), model_dir, f.name,
                                  str(args.n), str(args.max_new_tokens), str(args.temperature)], env)
    os.unlink(f.name)
    notebook_inner = json.loads(notebook.stdout.strip().splitlines()[-1])

    grid_s, grid = timed([sys.executable, "-m", "personas", "generate", args.persona, "-t", str(args.temperature),
                          "-n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
                          "--min-new-tokens", str(args.max_new_tokens), "--seed", "1", "--format", "jsonl"], env)
    grid_rows = [json.loads(line) for line in grid.stdout.splitlines()]
    assert len(grid_rows) == args.n and all(r["new_tokens"] == args.max_new_tokens for r in grid_rows)
    grid_gen = float(re.search(r"new tokens in ([\d.]+) s", grid.stderr).group(1))

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    print(f"job: persona '{args.persona}', T={args.temperature}, n={args.n}, "
          f"{args.max_new_tokens} new tokens each ({tokens} tokens), embedded SmolLM2-135M-Instruct, CPU\n")
    print("| method | whole process (s) | generation only (s) | tokens/s (whole process) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| notebook: {args.n} pipeline calls, one per sample (baseline) | {notebook_s:.1f} | "
          f"{notebook_inner['generate_s']:.1f} | {tokens / notebook_s:.1f} | 1.0× |")
    print(f"| personas generate: one batched grid | {grid_s:.1f} | {grid_gen:.1f} | {tokens / grid_s:.1f} | "
          f"{notebook_s / grid_s:.1f}× |")


if __name__ == "__main__":
    main()
