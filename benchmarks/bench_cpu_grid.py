"""Notebook way vs personas' single batched grid, on the embedded model on the CPU.

Both run as whole processes (interpreter start, imports, model load, generation) on the same
converted SmolLM2-135M-Instruct weights, the same prompt, temperature 1.0, n samples of exactly
MAX_NEW_TOKENS tokens (min_new_tokens = max_new_tokens, so both do the same work).

    .venv/bin/python benchmarks/bench_cpu_grid.py [--n 16] [--max-new-tokens 64] [--persona customer]
                                                  [--baseline-tree DIR] [--skip-notebook]

With `--baseline-tree DIR` (a checkout of an earlier commit, e.g. from `git worktree add`), the
same personas command also runs on that tree's code, in the same run, for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cpu_name, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--persona", default="customer")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--baseline-tree", type=Path, help="an earlier checkout whose personas to time as well")
    parser.add_argument("--skip-notebook", action="store_true", help="time only personas (the notebook takes minutes)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each personas tree, alternating between trees; medians are printed")
    args = parser.parse_args()

    import torch
    from personas.model.choice import EMBEDDED, resolve_model
    from personas.model.gguf_cache import embedded_checkpoint
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

    rows = []  # (label, whole process s, generation s)
    if not args.skip_notebook:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(prompt_text)
        notebook_s, notebook = timed([sys.executable, str(REPO / "benchmarks" / "notebook_way.py"), model_dir, f.name,
                                      str(args.n), str(args.max_new_tokens), str(args.temperature)], env)
        os.unlink(f.name)
        notebook_gen = json.loads(notebook.stdout.strip().splitlines()[-1])["generate_s"]
        rows.append((f"notebook: {args.n} pipeline calls, one per sample (baseline)", notebook_s, notebook_gen))

    grid_cmd = [sys.executable, "-m", "personas", "generate", args.persona, "-t", str(args.temperature),
                "-n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
                "--min-new-tokens", str(args.max_new_tokens), "--seed", "1", "--format", "jsonl"]
    trees = [("personas generate: one batched grid", REPO)]
    if args.baseline_tree:
        trees.append((f"the same, code of {args.baseline_tree}", args.baseline_tree))
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in trees}
    for _ in range(args.repeats):  # alternating, so drift (caches, other load) touches every tree alike
        for label, tree in trees:
            grid_s, grid = timed(grid_cmd, {**env, "PYTHONPATH": str(tree / "src")})
            grid_rows = [json.loads(line) for line in grid.stdout.splitlines()]
            assert len(grid_rows) == args.n and all(r["new_tokens"] == args.max_new_tokens for r in grid_rows)
            runs[label].append((grid_s, float(re.search(r"new tokens in ([\d.]+) s", grid.stderr).group(1))))
    for label, timings in runs.items():
        rows.append((label, statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)))

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    print(f"job: persona '{args.persona}', T={args.temperature}, n={args.n}, "
          f"{args.max_new_tokens} new tokens each ({tokens} tokens), embedded SmolLM2-135M-Instruct, CPU"
          + (f"; personas rows: medians of {args.repeats} alternating runs" if args.repeats > 1 else "") + "\n")
    print("| method | whole process (s) | generation only (s) | tokens/s (whole process) | vs first row |")
    print("|---|---:|---:|---:|---:|")
    for label, whole, generation in rows:
        print(f"| {label} | {whole:.1f} | {generation:.1f} | {tokens / whole:.1f} | {rows[0][1] / whole:.2f}× |")

if __name__ == "__main__":
    main()
