"""Which GPTQ kernel, and which Marlin setting, gives the fastest fast-path decode step?

Issue 3's open questions, one process per variant (gptqmodel reads its flags at load time):

  auto         what `--gptq-backend auto` (personas' default) picks on this card, and how long
               it takes to decide (gptqmodel ranks Machete first on Hopper; Machete builds
               against CUTLASS, which it downloads — this machine reaches no network)
  marlin       Marlin with gptqmodel's default fp32 reduction
  marlin-fp16  Marlin with GPTQMODEL_MARLIN_USE_FP32=0 (fp16 reduction)

Each variant times the issue's job on the fast path (3 temperatures x 8 samples, exactly 128
new tokens, the Galaxy Rider customer) after a warm-up, against the floor measured in the same
process (bench_gpu_grid.py's definition).

    python benchmarks/gpu_kernel_variants.py VARIANT [--checkpoint DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

VARIANTS = {"auto": ("auto", None), "marlin": ("marlin", "1"), "marlin-fp16": ("marlin", "0")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=list(VARIANTS))
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq/13b"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    backend, fp32 = VARIANTS[args.variant]
    if fp32 is not None:
        os.environ["GPTQMODEL_MARLIN_USE_FP32"] = fp32

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench_gpu_grid import N, TEMPERATURES, copy_bandwidth, quantized_bytes, sync_time

    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.sampling.graphed import graph_safe
    from personas.generate.request import Request, plan, sample_records
    from personas.library.load import find_library_file, load_library
    from personas.sampling.grid import Settings

    result: dict = {"variant": args.variant, "card": torch.cuda.get_device_name(), "backend": backend,
                    "marlin_fp32": fp32}
    started = time.perf_counter()
    model = load_model(resolve_model(str(args.checkpoint)), device="cuda", gptq_backend=backend)
    result["load_s"] = time.perf_counter() - started
    result["kernel"] = model.gptq_kernel
    result["graph_safe"] = graph_safe(model.model, model.gptq_kernel)
    print(f"{args.variant}: loaded in {result['load_s']:.1f} s, kernel {model.gptq_kernel}", flush=True)

    persona = load_library(find_library_file(None)).get("customer")
    new = args.new_tokens

    def grid(temperatures, n, tokens, minimum) -> tuple[float, list]:
        settings = Settings(max_new_tokens=tokens, min_new_tokens=minimum, fast_path=True)
        request = Request(personas=[persona], temperatures=temperatures, n=n, seed=1, settings=settings,
                          template="llama2")
        rows = plan(request, model)
        records: list = []
        return sync_time(lambda: sample_records(request.settings, model, rows, records.append)), records

    grid((1.0,), 2, 8, 0)  # warm-up: kernels, allocator, graph capture
    seconds, records = grid(TEMPERATURES, N, new, new)
    assert all(r.new_tokens == new for r in records)
    prompt = len(plan(Request(personas=[persona], settings=Settings(), template="llama2"), model)[0].prompt_ids)
    cfg = model.model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    step_bytes = quantized_bytes(model.model) + kv_per_token * (prompt + len(records) * (new + 1) / 2)
    bandwidth = copy_bandwidth()
    result.update(grid_s=seconds, ms_per_step=seconds / new * 1e3, floor_ms=step_bytes / bandwidth * 1e3,
                  bandwidth_TBps=bandwidth / 1e12, prompt_tokens=prompt)
    result["vs_floor"] = result["ms_per_step"] / result["floor_ms"]
    _, greedy = grid((0.0,), 2, 64, 0)
    result["greedy_text_head"] = greedy[0].text[:60]
    print(json.dumps(result), flush=True)
    with open(args.out / "kernel_variants.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
