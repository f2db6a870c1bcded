"""The 13B GPTQ grid on one GPU: the notebook's way, per-temperature calls, personas' grid, the floor.

The 24-sample grid: the Galaxy Rider customer with its examples, 3 temperatures × 8 samples,
exactly 128 new tokens each (min_new_tokens = 128, so every method does the same work), on a
GPTQ checkpoint with Llama-2-13B-chat-GPTQ's exact layout (benchmarks/gptq_checkpoint.py;
random weights, since the GPU machine reaches no hub), loaded through personas' own loader.

  a. notebook: a text-generation pipeline, one call per sample, sequential (24 calls)
  b. one generate per temperature with num_return_sequences=8 (3 calls)
  c. personas' grid: one call, as `personas generate` runs it; and the engine alone on the same
     rows with and without its fused layer kernels (norms, rotary, SiLU, prefix attention and
     the merge; off: transformers' modules and matrix products), alternating
  d. the floor: bytes one decode step must read (quantized weights + KV cache, the shared
     prompt counted once) / measured device-to-device bandwidth, × 128 steps

    python benchmarks/bench_gpu_grid.py [--shape 13b] [--backend exllama_v2] [--skip-notebook] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import STARTED, copy_bandwidth, device, log, peak_gb, quantized_bytes, reset_peak, sync_time  # noqa: E402
from gptq_checkpoint import write_checkpoint  # noqa: E402

TEMPERATURES = (0.2, 0.7, 1.0)
N = 8
DEVICE = device()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="13b")
    parser.add_argument("--backend", default="exllama_v2")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternating engine runs, kernels on / off")
    parser.add_argument("--deadline-s", type=float, default=540, help="stop the notebook loop before this")
    parser.add_argument("--skip-notebook", action="store_true",
                        help="skip method a (minutes on a big model); b, the per-temperature generate calls, stays as the baseline")
    args = parser.parse_args()
    new = args.new_tokens

    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.generate.request import Request, plan, sample_records
    from personas.library.load import find_library_file, load_library
    from personas.model.prompt import Dialog
    from personas.sampling.grid import Settings

    results: dict = {"card": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)", "torch": torch.__version__,
                     "shape": args.shape, "backend": args.backend}
    import transformers
    results["transformers"] = transformers.__version__

    directory = args.checkpoint / args.shape
    if not (directory / "model.safetensors").is_file():
        results["write_s"] = sync_time(lambda: write_checkpoint(directory, args.shape, DEVICE))
        log(f"checkpoint written in {results['write_s']:.1f} s")
    results["bandwidth_Bps"] = copy_bandwidth(2.0 if DEVICE == "cuda" else 0.25)
    log(f"device-to-device copy: {results['bandwidth_Bps'] / 1e12:.2f} TB/s")

    choice = resolve_model(str(directory))
    t = time.perf_counter()
    model = load_model(choice, device=DEVICE, gptq_backend=args.backend)
    results["load_cold_s"] = time.perf_counter() - t
    del model
    reset_peak()
    t = time.perf_counter()
    model = load_model(choice, device=DEVICE, gptq_backend=args.backend)
    results["load_warm_s"] = time.perf_counter() - t
    results["kernel"] = model.gptq_kernel
    log(f"loaded: cold {results['load_cold_s']:.1f} s, warm {results['load_warm_s']:.1f} s, kernel {model.gptq_kernel}")

    persona = load_library(find_library_file(None)).get("customer")
    dialog = Dialog.for_persona(persona, persona.prompt)
    prompt_ids = model.prompt_ids(dialog, "llama2")
    results["prompt_tokens"] = len(prompt_ids)
    weights = quantized_bytes(model.model)
    cfg = model.model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    rows = len(TEMPERATURES) * N
    mean_generated = (new + 1) / 2  # tokens already generated, averaged over the steps
    step_bytes = weights + kv_per_token * (len(prompt_ids) + rows * mean_generated)
    results["floor_step_s"] = step_bytes / results["bandwidth_Bps"]
    results["floor_bytes_per_step"] = step_bytes
    log(f"floor: {step_bytes / 1e9:.2f} GB per step -> {results['floor_step_s'] * 1e3:.2f} ms/step")

    ids = torch.tensor([prompt_ids], device=DEVICE)
    mask = torch.ones_like(ids)
    common = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, top_p=1.0, top_k=0,
                  pad_token_id=model.pad_id)

    # c. personas' grid as `personas generate` runs it: the fast path (the default on CUDA), and
    # the plain path (--no-fast-path). Each is warmed up first (kernels, allocator).
    def grid(fast: bool, temperatures=TEMPERATURES, n=N, tokens=new, minimum=new) -> tuple[float, list]:
        settings = Settings(max_new_tokens=tokens, min_new_tokens=minimum, fast_path=fast)
        request = Request(personas=[persona], temperatures=temperatures, n=n, seed=1, settings=settings)
        planned = plan(request, model)
        records: list = []
        return sync_time(lambda: sample_records(request.settings, model, planned, records.append)), records

    for fast, key in ((True, "c"), (False, "c_plain")):
        grid(fast, (1.0,), 2, 8, 0)
        reset_peak()
        results[f"{key}_s"], records = grid(fast)
        results[f"{key}_peak_GB"] = peak_gb()
        assert len(records) == rows and all(r.new_tokens == new for r in records), [r.new_tokens for r in records]
        log(f"{key}. grid: {results[f'{key}_s']:.2f} s ({results[f'{key}_s'] / new * 1e3:.1f} ms/step)")

    # The engine alone on the grid's rows, fused layer kernels on and off, alternating: the same
    # work as c (a fresh engine each time, its graphs captured inside the timing).
    from personas.engine.engine import Engine, EngineConfig

    def engine_run(layer_kernels: bool) -> float:
        settings = Settings(max_new_tokens=new, min_new_tokens=new)
        rows_planned = plan(Request(personas=[persona], temperatures=TEMPERATURES, n=N, seed=1, settings=settings),
                            model)
        engine = Engine(model, EngineConfig(graphs=True, layer_kernels=layer_kernels))
        engine.submit(rows_planned, settings, lambda s: None)
        with torch.inference_mode():
            return sync_time(engine.run)

    timings: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for layer_kernels in (True, False):
            timings[layer_kernels].append(engine_run(layer_kernels))
    for layer_kernels, key in ((True, "engine_kernels"), (False, "engine_modules")):
        results[f"{key}_s"] = statistics.median(timings[layer_kernels][1:] or timings[layer_kernels])
        log(f"engine, layer kernels {'on' if layer_kernels else 'off'}: "
            f"{', '.join(f'{t:.2f}' for t in timings[layer_kernels])} s (first run compiles and warms)")

    # Correctness: greedy rows of the fast path equal the plain path token for token.
    check = {}
    for fast in (True, False):
        _, records = grid(fast, (0.0,), 2, 64, 0)
        check[fast] = [r.text for r in records]
    results["greedy_fast_equals_plain"] = check[True] == check[False]
    log(f"greedy fast path == plain path over 64 tokens: {results['greedy_fast_equals_plain']}")

    # b. one generate per temperature, num_return_sequences = 8
    reset_peak()
    def per_temperature():
        for temperature in TEMPERATURES:
            model.model.generate(input_ids=ids, attention_mask=mask, temperature=temperature,
                                 num_return_sequences=N, **common)
    results["b_s"] = sync_time(per_temperature)
    results["b_peak_GB"] = peak_gb()
    log(f"b. per temperature: {results['b_s']:.2f} s ({results['b_s'] / (3 * new) * 1e3:.1f} ms/step)")

    # a. the notebook: a pipeline, one call per sample. Skipped, the "vs" column compares with b.
    calls = []
    if not args.skip_notebook:
        from transformers import pipeline

        pipe = pipeline("text-generation", model=model.model, tokenizer=model.tokenizer)
        text = model.prompt_text(dialog, "llama2")
        reset_peak()
        for temperature in TEMPERATURES:
            for _ in range(N):
                if calls and time.perf_counter() - STARTED + 1.5 * max(calls) > args.deadline_s:
                    break
                calls.append(sync_time(lambda: pipe(text, temperature=temperature, return_full_text=False, **common)))
        results["a_calls_measured"] = len(calls)
        results["a_call_s_median"] = statistics.median(calls)
        results["a_s"] = sum(calls) * rows / len(calls)
        results["a_peak_GB"] = peak_gb()
        log(f"a. notebook: {len(calls)} of {rows} calls measured, median {results['a_call_s_median']:.2f} s/call")

    (args.out / "gpu_grid.json").write_text(json.dumps(results, indent=2))
    floor = results["floor_step_s"] * new
    baseline, baseline_name = (results["a_s"], "notebook") if calls else (results["b_s"], "b")
    print(f"\ncard: {results['card']}, torch {results['torch']}, transformers {results['transformers']}, "
          f"GPTQ kernel {results['kernel']} (--gptq-backend {args.backend})")
    print(f"job: {args.shape} GPTQ (4-bit, g128), prompt {len(prompt_ids)} tokens, {rows} rows × {new} new tokens; "
          f"load cold {results['load_cold_s']:.1f} s, warm {results['load_warm_s']:.1f} s\n")
    print(f"| method | generation (s) | ms per decode step | peak GPU memory (GB) | vs {baseline_name} |")
    print("|---|---:|---:|---:|---:|")
    if calls:
        extrapolated = "" if len(calls) == rows else f" ({len(calls)} of {rows} calls timed, scaled)"
        print(f"| a. notebook: {rows} pipeline calls{extrapolated} | {results['a_s']:.1f} | "
              f"{results['a_call_s_median'] / new * 1e3:.1f} | {results['a_peak_GB']:.1f} | 1.0× |")
    print(f"| b. 3 generate calls, num_return_sequences=8 | {results['b_s']:.1f} | "
          f"{results['b_s'] / (3 * new) * 1e3:.1f} | {results['b_peak_GB']:.1f} | {baseline / results['b_s']:.1f}× |")
    print(f"| c. personas grid, 1 call, plain path (--no-fast-path) | {results['c_plain_s']:.1f} | "
          f"{results['c_plain_s'] / new * 1e3:.1f} | {results['c_plain_peak_GB']:.1f} | "
          f"{baseline / results['c_plain_s']:.1f}× |")
    print(f"| c. personas grid, 1 call, fast path (default) | {results['c_s']:.2f} | {results['c_s'] / new * 1e3:.1f} | "
          f"{results['c_peak_GB']:.1f} | {baseline / results['c_s']:.1f}× |")
    for key, label in (("engine_kernels", "layer kernels on (default)"), ("engine_modules", "layer kernels off")):
        print(f"| c. the engine alone, {label}, median of runs 2–{args.repeats} | {results[f'{key}_s']:.2f} | "
              f"{results[f'{key}_s'] / new * 1e3:.1f} | | {baseline / results[f'{key}_s']:.1f}× |")
    print(f"| d. floor: {step_bytes / 1e9:.2f} GB/step at {results['bandwidth_Bps'] / 1e12:.2f} TB/s | "
          f"{floor:.2f} | {results['floor_step_s'] * 1e3:.2f} | | {baseline / floor:.0f}× |")
    print(f"\nfast path vs floor: {results['c_s'] / floor:.1f}× (ms/step incl. prefill); greedy fast == plain: "
          f"{results['greedy_fast_equals_plain']}")


if __name__ == "__main__":
    main()
