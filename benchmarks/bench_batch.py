"""A batch file at data scale on the CPU: N requests of personas given inline, one new token each.

The file: N lines (default 100,000), each naming `model: "base"` with one of K system texts
(default 1,000, PersonaHub-style one-line personas) and a question of its own, `max_tokens: 1`,
a seed of its own. `personas batch` runs it as a whole process twice, in the same run:

  baseline  the first 100 lines: the model loaded and the engine's buffers, the process's floor
  full      all N lines

Printed: each run's wall time, requests per second and peak RSS, and the full run's RSS beyond
the baseline's — what reading, planning and queueing N lines holds beyond the model, which
should be the queue's worth, whatever N is. Every custom_id must come back exactly once.

The default model is a tiny random Llama written here (two layers of width 64, a 32,000-id BPE
vocabulary trained on the persona library): the work measured is the reading, planning,
queueing and writing, not the model's arithmetic. `--model embedded` runs the shipped SmolLM2,
where the prompts' arithmetic is the cost (give it fewer lines: 2,000 take about a minute and a
half on two cores).

    .venv/bin/python benchmarks/bench_batch.py [--lines 100000] [--personas 1000] [--model PATH|embedded]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cpu_name  # noqa: E402

JOBS = ["baker", "sailor", "nurse", "poet", "beekeeper", "locksmith", "astronomer", "cartographer"]


def write_file(path: Path, lines: int, personas: int) -> None:
    with path.open("w") as f:
        for i in range(lines):
            k = i % personas
            system = (f"You are persona {k}, a {JOBS[k % len(JOBS)]} of {20 + k % 50} years who answers "
                      "plainly and briefly.")
            body = {"model": "base", "max_tokens": 1, "seed": i, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: what is your day like?"}]}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")


def write_tiny_model(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptq_checkpoint import VOCAB, write_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def run(source: Path, output: Path, model: str, cache: Path) -> dict:
    """One `personas batch` process: wall time, peak RSS, and its output's custom_ids."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONAS_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "personas", "batch", str(source), "-o", str(output),
                                "--model", model, "--quiet"], cwd=REPO, env=env, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read().decode()
    if status != 0:
        sys.exit(f"personas batch failed ({status}):\n{stderr[-2000:]}")
    ids = [json.loads(line)["custom_id"] for line in output.open()]
    return {"s": seconds, "rss_MB": usage.ru_maxrss / 1024, "ids": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--personas", type=int, default=1000)
    parser.add_argument("--baseline-lines", type=int, default=100)
    parser.add_argument("--model", help="a model directory, or 'embedded' (default: a tiny random Llama)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="personas-bench-batch-") as folder:
        work = Path(folder)
        model = args.model or str(write_tiny_model(work / "tiny"))
        full, baseline = work / "full.jsonl", work / "baseline.jsonl"
        write_file(full, args.lines, args.personas)
        with full.open() as f, baseline.open("w") as g:
            for _ in range(args.baseline_lines):
                g.write(f.readline())
        results = {}
        for name, source in (("baseline", baseline), ("full", full)):
            results[name] = run(source, work / f"{name}.out.jsonl", model, work / "cache")
            expected = args.baseline_lines if name == "baseline" else args.lines
            ids = results[name].pop("ids")
            assert sorted(ids) == sorted(f"r{i}" for i in range(expected)), f"{name}: custom_ids lost or repeated"
            print(f"{name}: {expected} requests in {results[name]['s']:.1f} s, peak RSS "
                  f"{results[name]['rss_MB']:.0f} MB", file=sys.stderr, flush=True)

    import torch

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
          f"{torch.__version__}; model: {args.model or 'a tiny random Llama (2 layers, width 64)'}")
    print(f"file: {args.lines:,} requests, {args.personas:,} inline system texts, max_tokens 1\n")
    print("| run | requests | wall time (s) | requests/s | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, count in (("baseline", args.baseline_lines), ("full", args.lines)):
        r = results[name]
        print(f"| {name} | {count:,} | {r['s']:.1f} | {count / r['s']:,.0f} | {r['rss_MB']:,.0f} |")
    beyond = results["full"]["rss_MB"] - results["baseline"]["rss_MB"]
    print(f"\nthe full file's RSS beyond the baseline's: {beyond:,.0f} MB")


if __name__ == "__main__":
    main()
