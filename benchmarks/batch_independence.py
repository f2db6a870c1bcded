"""Does a sample's text depend on what else shares its batch? Measured through the real CLI.

1. `generate pirate -t 1.0 -n N --max-new-tokens 64 --seed 21` on the embedded model, batched as
   the CLI batches it and again with `--batch-size 1`: how many of the N texts differ.
2. `play password -t 0.2 -t 1.0 -n E --max-turns 3 --seed 1`, then every episode replayed alone
   with `--episode-seed`: how many episodes' lines match their batched run.

With `--baseline-tree DIR` (a checkout of an earlier commit, e.g. made with `git worktree add`),
experiment 1 also runs on that tree's code in the same run, for a before/after.

    .venv/bin/python benchmarks/batch_independence.py --n 40 --n 200 [--episodes 20] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree / "src")}
    result = subprocess.run([sys.executable, "-m", "personas", *args, "--model", "embedded", "--quiet"],
                            capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"failed: personas {' '.join(args)}\n{result.stderr}")
    return result


def texts(args: list[str], tree: Path) -> dict[int, str]:
    rows = [json.loads(line) for line in cli([*args, "--format", "jsonl"], tree).stdout.splitlines()]
    return {r["sample"]: r["text"] for r in rows}


def generate_differences(n: int, tree: Path) -> tuple[int, float]:
    """(texts that differ between the CLI's batching and one row at a time, seconds)."""
    started = time.perf_counter()
    job = ["generate", "pirate", "-t", "1.0", "-n", str(n), "--max-new-tokens", "64", "--seed", "21"]
    batched, alone = texts(job, tree), texts([*job, "--batch-size", "1"], tree)
    assert len(batched) == len(alone) == n
    return sum(batched[k] != alone[k] for k in batched), time.perf_counter() - started


def replay_matches(episodes: int, tree: Path) -> dict[float, tuple[int, int]]:
    """Per temperature: (episodes whose replay alone has the same lines, episodes)."""
    common = ["--max-turns", "3", "--max-new-tokens", "64"]
    with tempfile.TemporaryDirectory() as scratch:
        batched_file = Path(scratch) / "batched.jsonl"
        cli(["play", "password", "-t", "0.2", "-t", "1.0", "-n", str(episodes), "--seed", "1", *common,
             "--format", "json", "--transcripts", str(batched_file)], tree)
        batched = [json.loads(line) for line in batched_file.read_text().splitlines()]
        out: dict[float, tuple[int, int]] = {}
        for episode in batched:
            alone_file = Path(scratch) / "alone.jsonl"
            cli(["play", "password", "-t", str(episode["temperature"]), "--episode-seed", str(episode["seed"]),
                 *common, "--format", "json", "--transcripts", str(alone_file)], tree)
            [alone] = [json.loads(line) for line in alone_file.read_text().splitlines()]
            same = [(line["speaker"], line["text"]) for line in alone["lines"]] == [
                (line["speaker"], line["text"]) for line in episode["lines"]]
            matched, total = out.get(episode["temperature"], (0, 0))
            out[episode["temperature"]] = (matched + same, total + 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="samples for experiment 1 (repeatable)")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per temperature for experiment 2")
    parser.add_argument("--baseline-tree", type=Path, help="an earlier checkout to compare with")
    args = parser.parse_args()
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"Python {platform.python_version()}; embedded SmolLM2-135M-Instruct on the CPU\n")
    trees = [("this tree", REPO)] + ([("baseline tree " + str(args.baseline_tree), args.baseline_tree)]
                                     if args.baseline_tree else [])
    print("| code | samples | texts that differ, CLI batching vs --batch-size 1 | seconds |")
    print("|---|---:|---:|---:|")
    for n in args.n or [40]:
        for label, tree in trees:
            differ, seconds = generate_differences(n, tree)
            print(f"| {label} | {n} | {differ} of {n} | {seconds:.0f} |", flush=True)
    if args.episodes:
        print("\n| temperature | episodes whose replay alone matches its batched run (3 turns of 64 tokens) |")
        print("|---:|---:|")
        for t, (matched, total) in sorted(replay_matches(args.episodes, REPO).items()):
            print(f"| {t:g} | {matched} of {total} |", flush=True)


if __name__ == "__main__":
    main()
