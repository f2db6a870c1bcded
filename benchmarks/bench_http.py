"""The HTTP server under load: C concurrent clients, each one chat completion with n choices of
exactly T tokens, against the same rows as one `generate --prompts-file` run, in the same run.

Both sides are the real CLI as a user runs it (`personas serve --http`, `personas generate`), on
the same model; `min_tokens = max_tokens` (`--min-new-tokens` for generate) makes every row
exactly T tokens, so both do the same work. The server gets one warm-up request first (the first
request's decode-step graphs and caches); the clients then start together (a barrier) and each
sends one request over its own connection (stdlib http.client, no retries). Tokens/s is all
completion tokens over the time from the first request sent to the last answer read; latency is
each request's own. The server should reach at least 80% of the prompts file's tokens/s.

    python benchmarks/bench_http.py [--model embedded] [--clients 32] [--n 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cpu_name, prompts, timed  # noqa: E402


def machine() -> str:
    import torch

    cpu = f"{cpu_name()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({cpu}); torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{cpu}; torch {torch.__version__} ({torch.get_num_threads()} threads)"


def start_server(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str, int, list[str]]:
    process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()
    address: list[tuple[str, int]] = []

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if match := re.search(r"listening on http://([\d.]+):(\d+)", line):
                address.append((match[1], int(match[2])))
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(600) or not address:
        sys.exit("the server did not start:\n" + "".join(lines))
    host, port = address[0]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("the server stopped:\n" + "".join(lines))
        try:
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, host, port, lines
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("the server did not get ready:\n" + "".join(lines))


def chat(host: str, port: int, body: dict) -> tuple[float, dict]:
    """(seconds from sending to the whole answer, the answer)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=3600)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    if response.status != 200:
        sys.exit(f"the server answered {response.status}: {answer}")
    return time.perf_counter() - started, answer


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--persona", default="customer")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    asks = prompts(args.clients)
    total = args.clients * args.n * args.tokens

    # The baseline: the same rows as one prompts file.
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps({"prompt": ask}) + "\n" for ask in asks))
    command = [sys.executable, "-m", "personas", "generate", args.persona, "--prompts-file", f.name,
               "-t", str(args.temperature), "-n", str(args.n), "--max-new-tokens", str(args.tokens),
               "--min-new-tokens", str(args.tokens), "--seed", "1", "--format", "jsonl", "--model", args.model]
    whole, result = timed(command, env)
    os.unlink(f.name)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == args.clients * args.n and all(r["new_tokens"] == args.tokens for r in records)
    baseline = float(re.search(r"new tokens in ([\d.]+) s", result.stderr).group(1))

    # The server, C clients at once.
    process, host, port, log = start_server(
        [sys.executable, "-m", "personas", "serve", "--http", "--port", "0", "--model", args.model], env)
    try:
        def body(ask: str, seed: int) -> dict:
            return {"model": args.persona, "messages": [{"role": "user", "content": ask}], "n": args.n,
                    "temperature": args.temperature, "seed": seed, "max_tokens": args.tokens,
                    "min_tokens": args.tokens}

        chat(host, port, body("Warm up: say anything.", 0))
        run = concurrent_load(host, port, [body(asks[i], i + 1) for i in range(args.clients)])
        health = json.loads(health_of(host, port))
    finally:
        process.terminate()
        process.wait(120)
    wall = run["wall"]
    assert run["tokens"] == total, (run["tokens"], total)

    print(f"machine: {machine()}, Python {platform.python_version()}")
    print(f"job: persona '{args.persona}' on {args.model}, {args.clients} requests × n={args.n} × exactly "
          f"{args.tokens} tokens ({total} tokens), T={args.temperature}\n")
    print("| how | wall (s) | tokens/s | p50 latency (s) | p95 latency (s) | share of the prompts file |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| `generate --prompts-file` ({args.clients} lines, generation only; whole process {whole:.1f} s) "
          f"| {baseline:.2f} | {total / baseline:.0f} | — | — | 100% |")
    print(f"| `serve --http`, {args.clients} concurrent clients | {wall:.2f} | {total / wall:.0f} "
          f"| {run['p50']:.2f} | {run['p95']:.2f} "
          f"| {baseline / wall:.0%} |")
    print(f"\nthe server's most rows in one decode step: {health['most_rows_in_one_step']}")


def concurrent_load(host: str, port: int, bodies: list[dict]) -> dict:
    """All bodies at once, one connection each: wall time, tokens, latencies."""
    barrier = threading.Barrier(len(bodies) + 1)
    results: list[tuple[float, float, dict]] = []

    def client(body: dict) -> None:
        barrier.wait()
        sent = time.perf_counter()
        latency, answer = chat(host, port, body)
        results.append((sent, latency, answer))

    threads = [threading.Thread(target=client, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    latencies = [latency for _, latency, _ in results]
    return {"wall": max(sent + latency for sent, latency, _ in results) - started,
            "tokens": sum(answer["usage"]["completion_tokens"] for _, _, answer in results),
            "p50": statistics.median(latencies), "p95": percentile(latencies, 0.95)}


def health_of(host: str, port: int) -> str:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/health")
    return connection.getresponse().read().decode()


if __name__ == "__main__":
    main()
