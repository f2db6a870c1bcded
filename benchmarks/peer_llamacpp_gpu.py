"""personas against llama.cpp on one GPU: 13B-shaped random 4-bit models, the same jobs, one run.

The two jobs (exactly 128 new tokens a row, temperature 1.0):
  small  the customer persona's prompt shared by 24 rows (issue 3's grid: 3 temperatures × 8)
  bulk   512 distinct prompts to the customer persona × n = 2 (1,024 rows)

personas: the GPTQ checkpoint of `gptq_checkpoint.py` (Llama-2-13B-chat-GPTQ's layout, random
weights), Marlin, as `personas generate` runs it (small) and the engine over the bulk rows as
bench_bulk.py runs it; each job in a process of its own, after a warm-up.

llama.cpp: built with CUDA for this card from the source inside the llama-cpp-python sdist
(`--source`, its vendor/llama.cpp), into `--build` once. The model is a Llama-2-13B-shaped GGUF
with random fp16 weights and Llama 2's own vocabulary (copied from llama.cpp's vocabulary-only
test file, `--vocab`), written with the gguf-py of the same llama.cpp and quantized with its
`llama-quantize` to each of `--quants`. (Not `convert_hf_to_gguf.py`: a random checkpoint has no
SentencePiece model, and the converter refuses an unknown BPE pre-tokenizer.) Each job then runs
as `llama-batched-bench`, every layer on the GPU, flash attention on:
  small  -npp P -ntg 128 -npl 24 -pps   (the prompt processed once and shared, as personas does)
  bulk   -npp P -ntg 128 -npl K, for each K of `--bulk-parallel`: one batch of K distinct prompts
         (llama.cpp takes at most 256 sequences in one context). The 1,024 rows take 1,024 / K
         such batches, so the job's tokens/s is K × 128 / T. Each
         prompt is processed whole (batched-bench cannot share a persona's prefix among distinct
         prompts as personas does); its generation-only speed is printed beside.

On a machine that reaches no registry, carry the sdist's `vendor/llama.cpp` subset the build
needs — CMakeLists.txt, cmake/, app/, ggml/, src/, common/, tools/, vendor/, include/, gguf-py/,
about 8 MB as .tar.xz — and point `--source` at it; the CUDA build takes about 5 minutes on 16
cores, the f16 model and its two quantizations about 2.5 more.

The floor of one decode step is the bytes it must read (the 4-bit weights, and each row's cache)
over the copy bandwidth measured in the same run.

    python benchmarks/peer_llamacpp_gpu.py [--source DIR] [--build DIR] [--vocab FILE]
        [--quants Q4_0 Q4_K_M] [--bulk-parallel 128 256] [--work /tmp/peer-gpu] [--out DIR]
        [--jobs small bulk]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, log  # noqa: E402

NEW_TOKENS = 128
SMALL_ROWS = 24
BULK_PROMPTS, BULK_N = 512, 2
SHAPE = dict(hidden=5120, intermediate=13824, layers=40, heads=40, vocab=32000, context=4096)
CUDA_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_NATIVE=OFF",
              "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]


def build_cuda(source: Path, build: Path) -> Path:
    """llama-batched-bench and llama-quantize with CUDA for this card, built once into `build`."""
    binaries = build / "bin"
    if not (binaries / "llama-batched-bench").is_file() or not (binaries / "llama-quantize").is_file():
        log(f"building llama.cpp with CUDA from {source}")
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *CUDA_FLAGS], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-batched-bench", "llama-quantize",
                        "-j", str(os.cpu_count() or 4)], check=True, stdout=subprocess.DEVNULL)
    return binaries


def write_f16_gguf(path: Path, source: Path, vocab: Path) -> None:
    """A Llama-2-13B-shaped GGUF with random fp16 weights (one random matrix per shape, used by
    every layer: the speed does not depend on the values) and Llama 2's vocabulary."""
    sys.path.insert(0, str(source / "gguf-py"))
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    h, i, layers = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["layers"]
    rng = np.random.default_rng(0)

    def matrix(rows: int, columns: int) -> np.ndarray:
        return (rng.standard_normal((rows, columns), dtype=np.float32) / np.sqrt(columns)).astype(np.float16)

    fields = GGUFReader(vocab).fields
    writer = GGUFWriter(path, "llama")
    writer.add_name("random Llama-2-13B shape")
    writer.add_context_length(SHAPE["context"])
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(i)
    writer.add_head_count(SHAPE["heads"])
    writer.add_head_count_kv(SHAPE["heads"])
    writer.add_rope_dimension_count(h // SHAPE["heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(1)  # mostly F16
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"].contents())
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"].contents())
    writer.add_token_list(fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_scores(fields["tokenizer.ggml.scores"].contents())
    writer.add_token_types(fields["tokenizer.ggml.token_type"].contents())
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"].contents())
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"].contents())
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"].contents())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    norm = np.ones(h, dtype=np.float32)
    square, wide, narrow = matrix(h, h), matrix(i, h), matrix(h, i)
    writer.add_tensor("token_embd.weight", matrix(SHAPE["vocab"], h))
    writer.add_tensor("output_norm.weight", norm)
    writer.add_tensor("output.weight", matrix(SHAPE["vocab"], h))
    for layer in range(layers):
        for name, tensor in (("attn_norm", norm), ("attn_q", square), ("attn_k", square), ("attn_v", square),
                             ("attn_output", square), ("ffn_norm", norm), ("ffn_gate", wide), ("ffn_up", wide),
                             ("ffn_down", narrow)):
            writer.add_tensor(f"blk.{layer}.{name}.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_models(work: Path, source: Path, vocab: Path, binaries: Path, quants: list[str]) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "llama-13b-random-f16.gguf"
    models = {q: work / f"llama-13b-random-{q}.gguf" for q in quants}
    if all(m.is_file() for m in models.values()):
        return models
    if not f16.is_file():
        started = time.perf_counter()
        write_f16_gguf(f16, source, vocab)
        log(f"wrote {f16.name}: {f16.stat().st_size / 1e9:.1f} GB in {time.perf_counter() - started:.0f} s")
    for quant, model in models.items():
        if not model.is_file():
            started = time.perf_counter()
            subprocess.run([str(binaries / "llama-quantize"), str(f16), str(model), quant, str(os.cpu_count())],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            log(f"quantized {quant}: {model.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s")
    f16.unlink()  # 26 GB of disk
    return models


def batched_bench(binary: Path, model: Path, prompt: int, rows: int, shared: bool) -> dict:
    """One llama-batched-bench run: its jsonl record (seconds and speeds)."""
    command = [str(binary), "-m", str(model), "-ngl", "99", "-fa", "on", "-c", str((prompt + NEW_TOKENS) * rows + 256),
               "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(NEW_TOKENS), "-npl", str(rows),
               "--output-format", "jsonl", *(["-pps"] if shared else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr[-600:]}
    output = result.stdout + "\n" + result.stderr
    return json.loads(next(line for line in output.splitlines() if line.startswith('{"')))


def personas_job(job: str, checkpoint: Path) -> dict:
    """One personas job, in this process (the parent runs each job in a process of its own)."""
    import torch

    from bench_bulk import Card, run_engine
    from common import persona_rows, quantized_bytes, sync_time
    from gptq_checkpoint import load_checkpoint
    from personas.generate.request import Request, plan, sample_records
    from personas.library.load import find_library_file, load_library
    from personas.sampling.grid import Settings

    model = load_checkpoint(checkpoint, "marlin")
    fixed = Settings(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    out = {"kernel": model.gptq_kernel, "weights_bytes": quantized_bytes(model.model),
           "kv_bytes_per_token": 2 * SHAPE["layers"] * SHAPE["hidden"] * 2}
    if job == "small":
        persona = load_library(find_library_file(None)).get("customer")

        def grid(temperatures, n, settings) -> float:
            request = Request(personas=[persona], temperatures=temperatures, n=n, seed=1, settings=settings)
            planned = plan(request, model)
            out["prompt_tokens"] = len(planned[0].prompt_ids)
            return sync_time(lambda: sample_records(settings, model, planned, lambda record: None))

        grid((1.0,), 2, Settings(max_new_tokens=8))  # warm-up: kernels, workspaces, allocator
        seconds = [grid((0.2, 0.7, 1.0), 8, fixed) for _ in range(3)]
        out["s"] = sorted(seconds)[1]
        out["tokens_per_s"] = SMALL_ROWS * NEW_TOKENS / out["s"]
        out["rows_per_step"] = SMALL_ROWS
        # The shared prompt's cache once, each row's own new tokens (half of them on average).
        cache_tokens = out["prompt_tokens"] + SMALL_ROWS * NEW_TOKENS / 2
    else:
        card = Card(None)
        rows = persona_rows(model, BULK_PROMPTS, 1.0, fixed, n=BULK_N)
        out["prompt_tokens"] = round(sum(len(r.prompt_ids) for r in rows) / len(rows))
        shared = len(os.path.commonprefix([r.prompt_ids for r in rows]))
        run_engine(model, card, rows[:16], Settings(max_new_tokens=8), "warm-up")
        run = run_engine(model, card, rows, fixed, "engine, bulk")
        out.update({k: run[k] for k in ("s", "tokens_per_s", "slots", "peak_GB", "dense")})
        out["rows_per_step"] = run["mean_rows_per_step"]
        # The persona's shared prefix once, each row's own prompt and new tokens.
        cache_tokens = shared + out["rows_per_step"] * (out["prompt_tokens"] - shared + NEW_TOKENS / 2)
    out["floor_step_bytes"] = out["weights_bytes"] + out["kv_bytes_per_token"] * cache_tokens
    del torch
    return out


def main() -> None:
    default_source = REPO / ".peer" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=default_source)
    parser.add_argument("--build", type=Path, default=REPO / ".peer" / "build-cuda")
    parser.add_argument("--vocab", type=Path, default=REPO.parent / "shared" / "testdata" / "ggml-vocab-llama-spm.gguf")
    parser.add_argument("--quants", nargs="+", default=["Q4_0", "Q4_K_M"])
    parser.add_argument("--bulk-parallel", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--jobs", nargs="+", choices=["small", "bulk"], default=["small", "bulk"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/peer-gpu"))
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq/13b"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--personas-job", choices=["small", "bulk"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.personas_job:
        print("RESULT " + json.dumps(personas_job(args.personas_job, args.checkpoint)), flush=True)
        return

    import torch

    from common import copy_bandwidth

    binaries = build_cuda(args.source, args.build)
    models = make_models(args.work, args.source, args.vocab, binaries, args.quants)
    bandwidth = copy_bandwidth(2.0)
    card = torch.cuda.get_device_name()
    torch.cuda.empty_cache()
    results: dict = {"card": card, "bandwidth_Bps": bandwidth, "quants": {q: m.stat().st_size for q, m in models.items()}}
    for job in args.jobs:
        ran = subprocess.run([sys.executable, __file__, "--personas-job", job, "--checkpoint", str(args.checkpoint)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        found = re.search(r"^RESULT (.*)$", ran.stdout, re.M)
        if not found:
            sys.exit(f"personas' {job} job failed:\n{ran.stdout[-2000:]}\n{ran.stderr[-3000:]}")
        ours = results[f"personas_{job}"] = json.loads(found.group(1))
        log(f"personas {job}: {ours['tokens_per_s']:.0f} tokens/s ({ours['s']:.2f} s)")
        for quant, model in models.items():
            if job == "small":
                theirs = [batched_bench(binaries / "llama-batched-bench", model, ours["prompt_tokens"], SMALL_ROWS, True)]
            else:
                theirs = [batched_bench(binaries / "llama-batched-bench", model, ours["prompt_tokens"], k, False)
                          for k in args.bulk_parallel]
            results[f"llamacpp_{job}_{quant}"] = theirs
            for run in theirs:
                log(f"llama.cpp {quant} {job}: {json.dumps(run)[:300]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_gpu.json").write_text(json.dumps(results, indent=2))
    print_table(results, args)


def print_table(results: dict, args) -> None:
    bandwidth = results["bandwidth_Bps"]
    print(f"\ncard: {results['card']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s; {NEW_TOKENS} new tokens a row")
    print("| job | who | model | tokens/s (prompt included) | ms per step | generation-only tokens/s | floor: ms per step |")
    print("|---|---|---|---:|---:|---:|---:|")
    for job in args.jobs:
        ours = results.get(f"personas_{job}")
        if not ours:
            continue
        floor_ms = ours["floor_step_bytes"] / bandwidth * 1e3
        per_step = ours["rows_per_step"]
        print(f"| {job} | personas | GPTQ 4-bit, {ours['kernel']} | {ours['tokens_per_s']:,.0f} | "
              f"{per_step / ours['tokens_per_s'] * 1e3:.2f} | | {floor_ms:.2f} |")
        for quant in args.quants:
            for run in results.get(f"llamacpp_{job}_{quant}", []):
                if "error" in run:
                    print(f"| {job} | llama.cpp | {quant} | failed: {run['error'][-120:]!r} | | | |")
                    continue
                k = run["pl"]
                tokens_per_s = k * NEW_TOKENS / run["t"]
                print(f"| {job} | llama.cpp, {k} rows a batch | {quant} ({results['quants'][quant] / 1e9:.2f} GB) | "
                      f"{tokens_per_s:,.0f} | {k / tokens_per_s * 1e3:.2f} | {run['speed_tg']:,.0f} | |")


if __name__ == "__main__":
    main()
