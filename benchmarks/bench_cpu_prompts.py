"""A prompts file on the CPU: the embedded model, N prompts × n samples × exactly T new tokens.

The CPU prompts-file job: 100 distinct prompts to one persona through `generate --prompts-file`,
n = 2, 48 new tokens each (min = max, so every run does the same work), as whole processes.
With `--baseline-tree DIR` (a checkout of an earlier commit) the same command also runs on that
tree's code, alternating, in the same run; the texts of both are compared.

    .venv/bin/python benchmarks/bench_cpu_prompts.py [--prompts 100] [--n 2] [--max-new-tokens 48]
                                                     [--baseline-tree DIR] [--repeats 3] [--rules]

--rules also runs this tree with min_p and three penalties on every row (what they cost).
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
from common import REPO, cpu_name, prompts, timed  # noqa: E402

# The rules a user reaches for first, on every row: what --rules times.
RULES = ["--min-p", "0.05", "--repetition-penalty", "1.1", "--frequency-penalty", "0.3", "--presence-penalty", "0.3"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--persona", default="customer")
    parser.add_argument("--baseline-tree", type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rules", action="store_true",
                        help="also run this tree with min_p and the penalties on every row")
    args = parser.parse_args()

    import torch

    from personas.model.choice import EMBEDDED

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(prompts(args.prompts)) + "\n")
    command = [sys.executable, "-m", "personas", "generate", args.persona, "--prompts-file", f.name, "-t", "1.0",
               "-n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
               "--min-new-tokens", str(args.max_new_tokens), "--seed", "1", "--format", "jsonl"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONAS_MODEL": EMBEDDED}
    trees = [("personas (this tree)", REPO, [])]
    if args.rules:
        trees.append(("this tree, min_p + penalties on every row", REPO, RULES))
    if args.baseline_tree:
        trees.append((f"baseline: {args.baseline_tree}", args.baseline_tree, []))
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in trees}
    texts: dict[str, dict] = {}
    tokens = args.prompts * args.n * args.max_new_tokens
    for _ in range(args.repeats):
        for label, tree, extra in trees:
            whole, result = timed(command + extra, {**env, "PYTHONPATH": str(tree / "src")})
            records = [json.loads(line) for line in result.stdout.splitlines()]
            assert len(records) == args.prompts * args.n and all(r["new_tokens"] == args.max_new_tokens for r in records)
            texts[label] = {(r["id"], r["sample"]): r["text"] for r in records}
            runs[label].append((whole, float(re.search(r"new tokens in ([\d.]+) s", result.stderr).group(1))))
    os.unlink(f.name)

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    print(f"job: persona '{args.persona}', {args.prompts} prompts × n={args.n} × {args.max_new_tokens} tokens "
          f"({tokens} tokens), T=1.0, embedded SmolLM2-135M-Instruct; medians of {args.repeats} alternating runs\n")
    print("| code | whole process (s) | generation (s) | tokens/s (generation) | generation time vs this tree |")
    print("|---|---:|---:|---:|---:|")
    this = statistics.median(t[1] for t in runs[trees[0][0]])
    for label, timings in runs.items():
        whole = statistics.median(t[0] for t in timings)
        generation = statistics.median(t[1] for t in timings)
        print(f"| {label} | {whole:.1f} | {generation:.1f} | {tokens / generation:.0f} | {generation / this:.2f}× |")
    if args.baseline_tree:
        a, b = texts[trees[0][0]], texts[trees[-1][0]]
        print(f"\ntexts identical to the baseline's: {sum(a[k] == b.get(k) for k in a)} of {len(a)}")


if __name__ == "__main__":
    main()
