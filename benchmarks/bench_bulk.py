"""The bulk job (issue 12) on one GPU: the decode engine against the old chunked path and
transformers' continuous batching, with the roofline, in one run.

The job: 512 distinct prompts to the `customer` persona (≈ 200 tokens of system context and
examples, then the prompt) × n = 2 × T = 1.0, exactly 128 new tokens each (min = max), on the
13B GPTQ checkpoint written by benchmarks/gptq_checkpoint.py (random weights, Llama-2-13B-chat-
GPTQ's layout), Marlin. Then the same prompts with max_new_tokens drawn per row from 16–256
("ragged"), and a greedy check: the engine's first 64 tokens against transformers' `generate`.

    python benchmarks/bench_bulk.py [--prompts 512] [--n 2] [--new-tokens 128] [--skip-old]
                                    [--hf-prompts 64] [--compare-unfused] [--compare-layer-kernels]
                                    [--compare-dense] [--memory-gb GB] [--out DIR]

The engine decides by itself whether to keep dense half-precision copies of the GPTQ weights for
its products of many rows (model/dense_gptq.py: when the memory left holds a row for each slot);
--compare-dense runs the fixed job once more with the copies refused (Marlin alone, every page
the memory allows). The copies are dropped before the old path, transformers' `generate_batch`
and the greedy check, which measure the model as loaded.

--memory-gb GB holds back all of the card's memory but GB (one allocation made before the model
loads, left untouched), so the engine sizes its slots, pages and dense copies as on a card of GB:
an H100 80GB holds 85.5 GB. Only the capacity is the smaller card's; bandwidth and clocks stay
this card's. Peak memory is printed without the held-back part.

--compare-unfused runs the fixed job at 256 slots on the fused checkpoint and, at the end, on the
checkpoint loaded without fused q/k/v and gate/up layers (model/fused_gptq.py): the difference
they make at the same rows per step (at 512 slots the second model finds less memory free).

--compare-layer-kernels runs the fixed job once more with the engine's fused layer kernels off
(decoder.py: transformers' modules for norms, rotary and SiLU, matrix products for the prefix
part and the merge).

Prints a table; writes bulk.json to --out ($OUT on the device).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_prompts import persona_rows  # noqa: E402
from bench_gpu_grid import copy_bandwidth, log, peak_gb, quantized_bytes, reset_peak, sync_time  # noqa: E402
from gptq_checkpoint import load_checkpoint  # noqa: E402

H100_DENSE_FP16_FLOPS = 989e12  # the card's tensor-core peak; the GEMM half of the roofline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq"))
    parser.add_argument("--backend", default="marlin")
    parser.add_argument("--skip-old", action="store_true", help="skip the old chunked path")
    parser.add_argument("--hf-prompts", type=int, default=64,
                        help="prompts (× n) for transformers' generate_batch; 0 skips it (it is slow)")
    parser.add_argument("--compare-unfused", action="store_true",
                        help="also run the fixed job on the checkpoint loaded without fused projections")
    parser.add_argument("--compare-layer-kernels", action="store_true",
                        help="also run the fixed job with the engine's fused layer kernels off")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also run the fixed job with the dense copies of the GPTQ weights refused")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="leave the engine only this much of the card's memory (85.5: an H100 80GB)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()

    import transformers

    from personas.model.dense_gptq import drop_dense, has_dense
    from personas.sampling.engine import Engine
    from personas.sampling.grid import Settings
    from personas.sampling.scheduler import generate_grid

    results: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "transformers": transformers.__version__}
    bandwidth = results["bandwidth_Bps"] = copy_bandwidth(2.0)
    _, total = torch.cuda.mem_get_info()
    held_back = 0
    if args.memory_gb:
        held_back = max(0, total - int(args.memory_gb * 1e9))
        ballast = torch.empty(held_back, dtype=torch.uint8, device="cuda")  # noqa: F841 (held, never read)
        results["memory_gb"] = args.memory_gb
        log(f"the card holds {total / 1e9:.1f} GB; {held_back / 1e9:.1f} GB held back, {args.memory_gb:.1f} GB left")
    results["card_memory_GB"] = (total - held_back) / 1e9

    def peak_engine_gb() -> float:
        """Peak memory allocated since reset_peak(), the held-back part left out."""
        return peak_gb() - held_back / 1e9

    model = load_checkpoint(args.checkpoint / "13b", args.backend)
    results["kernel"], results["fused_groups"] = model.gptq_kernel, model.gptq_fused
    log(f"loaded in {model.load_seconds:.1f} s, kernel {model.gptq_kernel}, {model.gptq_fused} fused groups; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")

    fixed = Settings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    rows = persona_rows(model, args.prompts, 1.0, fixed, n=args.n)
    shared = len(os.path.commonprefix([r.prompt_ids for r in rows]))
    results["prompt_tokens_mean"] = sum(len(r.prompt_ids) for r in rows) / len(rows)
    results["shared_prefix_tokens"] = shared
    log(f"{len(rows)} rows, prompts {results['prompt_tokens_mean']:.0f} tokens on average, {shared} shared")

    def run_engine(run_rows, settings, label, on=None, layer_kernels=True, dense=None) -> dict:
        engine = Engine(on or model, max_slots=settings.max_batch, graphs=True, layer_kernels=layer_kernels,
                        dense_weights=dense)
        samples, events = [], []
        engine.on_dense = lambda size: events.append(f"step {engine.steps}: dense copies {size / 1e9:.1f} GB")
        engine.on_split = lambda old, new: events.append(f"step {engine.steps}: slots {old} -> {new}")
        engine.submit(run_rows, settings, samples.append)
        reset_peak()
        with torch.inference_mode():
            seconds = sync_time(engine.run)
        # The hooks refer to the engine: without this cycle broken, its pages and graphs would
        # outlive it and starve the next run of memory.
        engine.on_dense = engine.on_split = lambda *_: None
        tokens = sum(len(s.token_ids) for s in samples)
        # A row's own cache: the pages it held at its end (its suffix and new tokens, whole pages;
        # the prompt pages an identical prompt's row holds are counted once).
        positions = engine.positions_held / engine.rows_delivered
        out = {"s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "slots": engine.slot_count,
               "mean_rows_per_step": engine.rows_decoded / engine.steps, "pages": engine.page_count,
               "preemptions": engine.preemptions,
               "row_positions": positions, "row_bytes": positions * engine.decoder.kv_bytes_per_token(),
               "peak_GB": peak_engine_gb(), "steps": engine.steps, "graphs": len(engine.graphs),
               "dense": has_dense((on or model).model), "events": events}
        log(f"{label}: {tokens} tokens in {seconds:.1f} s = {out['tokens_per_s']:.0f} tokens/s, B={engine.slot_count}, "
            f"dense copies {'yes' if out['dense'] else 'no'}, "
            f"{out['mean_rows_per_step']:.0f} rows per step, {out['row_bytes'] / 1e6:.0f} MB per row, "
            f"{engine.preemptions} preempted, "
            f"{engine.steps} steps, {len(engine.graphs)} graphs, peak {out['peak_GB']:.1f} GB; "
            f"events: {'; '.join(events) or 'none'}")
        out["texts"] = {(s.row.prompt, s.row.sample): s.token_ids for s in samples}
        return out

    # Warm-up (kernels, Marlin workspaces, allocator), not timed.
    run_engine(rows[:16], Settings(max_new_tokens=8), "warm-up")
    engine_fixed = run_engine(rows, fixed, "engine, fixed length")
    marlin_only = None
    if args.compare_dense:
        marlin_only = run_engine(rows, fixed, "engine, fixed length, dense copies refused", dense=False)
        marlin_only["same_texts"] = sum(marlin_only["texts"][k] == v for k, v in engine_fixed["texts"].items())
    modules = None
    if args.compare_layer_kernels:
        modules = run_engine(rows, fixed, "engine, fixed length, layer kernels off", layer_kernels=False)
        modules["same_texts"] = sum(modules["texts"][k] == v for k, v in engine_fixed["texts"].items())
    at_256 = Settings(**{**fixed.__dict__, "max_batch": 256})
    fused_256 = run_engine(rows, at_256, "engine, fixed length, 256 slots") if args.compare_unfused else None

    rng = random.Random(12)
    ragged_rows = [r.__class__(**{**r.__dict__, "max_new_tokens": rng.randint(16, 256)}) for r in rows]
    ragged_settings = Settings(max_new_tokens=256, min_new_tokens=256)  # every row runs to its own limit
    engine_ragged = run_engine(ragged_rows, ragged_settings, "engine, ragged 16-256")
    assert engine_ragged["tokens"] == sum(r.max_new_tokens for r in ragged_rows)

    drop_dense(model.model)  # the baselines and the greedy check run the model as loaded
    old = None
    if not args.skip_old:
        samples = []
        reset_peak()
        with torch.inference_mode():
            seconds = sync_time(lambda: generate_grid(model.model, rows, Settings(**{**fixed.__dict__, "max_batch": 256}),
                                                      eos_ids=model.eos_ids, pad_id=model.pad_id,
                                                      on_sample=samples.append, graph_safe=True))
        tokens = sum(len(s.token_ids) for s in samples)
        old = {"s": seconds, "tokens_per_s": tokens / seconds, "peak_GB": peak_engine_gb()}
        old_texts = {(s.row.prompt, s.row.sample): s.token_ids for s in samples}
        old["same_texts"] = sum(old_texts[k] == v for k, v in engine_fixed["texts"].items())
        log(f"old chunked path: {tokens / seconds:.0f} tokens/s, peak {old['peak_GB']:.1f} GB, "
            f"{old['same_texts']} of {len(rows)} texts equal to the engine's")

    hf = None
    if args.hf_prompts:
        from transformers import GenerationConfig

        subset = [list(r.prompt_ids) for r in rows[:args.hf_prompts * args.n]]
        config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, eos_token_id=model.eos_ids,
                                  pad_token_id=model.pad_id)
        try:
            reset_peak()
            outputs = {}
            seconds = sync_time(lambda: outputs.update(model.model.generate_batch(subset, generation_config=config)))
            tokens = sum(len(o.generated_tokens) for o in outputs.values())
            hf = {"s": seconds, "tokens_per_s": tokens / seconds, "peak_GB": peak_engine_gb(),
                  "rows": len(subset)}
            log(f"generate_batch: {tokens / seconds:.0f} tokens/s on {len(subset)} rows")
        except Exception as error:  # report, keep the engine's numbers
            hf = {"error": f"{type(error).__name__}: {error}"[:300]}
            log(f"generate_batch failed: {hf['error']}")

    # Greedy: the engine's tokens against transformers' generate, 64 tokens, a few prompts.
    greedy_rows = [r.__class__(**{**r.__dict__, "temperature": 0.0}) for r in rows[:16:2]]
    got = {}
    partings: list[dict] = []
    engine = Engine(model, graphs=True)
    engine.submit(greedy_rows, Settings(max_new_tokens=64), lambda s: got.__setitem__(s.row.prompt, list(s.token_ids)))
    with torch.inference_mode():
        engine.run()
        equal = 0
        for r in greedy_rows:
            ids = torch.tensor([r.prompt_ids], device="cuda")
            expected = model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                            eos_token_id=model.eos_ids, pad_token_id=model.pad_id)[0, ids.shape[1]:]
            expected = [t for t in expected.tolist() if t not in model.eos_ids][:64]
            if got[r.prompt] == expected:
                equal += 1
                continue
            # Where they part, and how close transformers' own top two logits were there: a
            # near-tie flipped by fp16 rounding, or a real difference.
            at = next(i for i, (a, b) in enumerate(zip(got[r.prompt] + [-1], expected + [-2])) if a != b)
            context = torch.tensor([list(r.prompt_ids) + expected[:at]], device="cuda")
            top2 = model.model(context).logits[0, -1].float().topk(2).values.tolist()
            partings.append({"token": at, "top2_gap": top2[0] - top2[1]})
    # The same question for transformers against itself: each prompt alone vs all of them in
    # one left-padded batch. Where that disagrees too, the checkpoint's near-ties decide.
    batch = [list(r.prompt_ids) for r in greedy_rows]
    width = max(map(len, batch))
    ids = torch.tensor([[model.pad_id] * (width - len(b)) + b for b in batch], device="cuda")
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device="cuda")
    with torch.inference_mode():
        together = model.model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                        eos_token_id=model.eos_ids, pad_token_id=model.pad_id)[:, width:].tolist()
        hf_equal = 0
        for b, out in zip(batch, together):
            alone = model.model.generate(torch.tensor([b], device="cuda"), max_new_tokens=64, do_sample=False,
                                         eos_token_id=model.eos_ids, pad_token_id=model.pad_id)[0, len(b):].tolist()
            hf_equal += alone == out[:len(alone)]
    results["hf_alone_equals_hf_batched"] = f"{hf_equal} of {len(batch)}"
    results["greedy_equal"] = f"{equal} of {len(greedy_rows)}"
    results["greedy_partings"] = partings
    log(f"greedy engine == transformers generate (64 tokens): {results['greedy_equal']}")

    # The roofline of the fixed job at the engine's mean batch: per step the weights once, each
    # row's own suffix (half its new tokens on average over the steps), each prefix once; plus
    # the GEMMs.
    weights = quantized_bytes(model.model)
    cfg = model.model.config
    kv = engine_fixed["row_bytes"] / engine_fixed["row_positions"]  # cache bytes per position
    B = round(engine_fixed["mean_rows_per_step"])
    suffix = results["prompt_tokens_mean"] - shared + args.new_tokens / 2
    step_bytes = weights + B * suffix * kv + shared * kv
    linear_flops = 2 * (4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.intermediate_size) * cfg.num_hidden_layers \
        + 2 * cfg.hidden_size * cfg.vocab_size
    memory_s, gemm_s = step_bytes / bandwidth, linear_flops * B / H100_DENSE_FP16_FLOPS
    results["roofline_tokens_per_s"] = {"memory_only": B / memory_s, "memory_plus_gemm": B / (memory_s + gemm_s)}

    unfused = None
    if args.compare_unfused:
        # The fused model goes first, so both runs have the same memory for pages.
        del engine, model
        gc.collect()  # transformers' modules hold reference cycles
        torch.cuda.empty_cache()
        plain = load_checkpoint(args.checkpoint / "13b", args.backend, fuse=False)
        unfused = run_engine(rows, at_256, "engine, fixed length, 256 slots, unfused projections", on=plain)
        unfused["same_texts"] = sum(unfused["texts"][k] == v for k, v in engine_fixed["texts"].items())
        unfused.pop("texts")
        del plain

    for key, value in (("engine_fixed", engine_fixed), ("engine_ragged", engine_ragged), ("engine_fixed_256", fused_256),
                       ("engine_fixed_layer_kernels_off", modules), ("engine_fixed_dense_refused", marlin_only)):
        if value:
            value.pop("texts", None)
        results[key] = value
    results["old"], results["generate_batch"], results["engine_fixed_unfused"] = old, hf, unfused
    (args.out / "bulk.json").write_text(json.dumps(results, indent=2, default=str))

    print(f"\ncard: {results['card']}, torch {results['torch']}, transformers {results['transformers']}, "
          f"kernel {results['kernel']}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; memory "
          f"{results['card_memory_GB']:.1f} GB" + (f" (--memory-gb: {held_back / 1e9:.1f} GB of {total / 1e9:.1f} held back)"
                                                    if held_back else ""))
    print(f"job: {args.prompts} prompts × n={args.n} × T=1.0, {args.new_tokens} new tokens; prompts "
          f"{results['prompt_tokens_mean']:.0f} tokens on average, {shared} of them shared\n")
    print("| how | tokens/s | slots (B) / mean rows per step | dense copies | cache per row (MB) | peak GPU memory (GB) |")
    print("|---|---:|---:|---|---:|---:|")
    engines = [("engine, fixed 128 tokens", engine_fixed), ("engine, ragged 16–256 tokens", engine_ragged)]
    if marlin_only:
        engines += [("engine, fixed, dense copies refused (Marlin alone)", marlin_only)]
    if modules:
        engines += [("engine, fixed, layer kernels off", modules)]
    if unfused:
        engines += [("engine, fixed, 256 slots", fused_256), ("engine, fixed, 256 slots, q/k/v and gate/up unfused", unfused)]
    for label, r in engines:
        print(f"| {label} | {r['tokens_per_s']:,.0f} | {r['slots']} / {r['mean_rows_per_step']:.0f} | "
              f"{'yes' if r['dense'] else 'no'} | {r['row_bytes'] / 1e6:.0f} | {r['peak_GB']:.1f} |")
    if old:
        print(f"| old chunked path, chunks of 256 (same run) | {old['tokens_per_s']:,.0f} | 256 | no | "
              f"{(results['prompt_tokens_mean'] + args.new_tokens) * kv / 1e6:.0f} | {old['peak_GB']:.1f} |")
    if hf and "error" not in hf:
        print(f"| transformers generate_batch, first {hf['rows']} rows | {hf['tokens_per_s']:,.0f} | | no | | {hf['peak_GB']:.1f} |")
    elif hf:
        print(f"| transformers generate_batch | failed: {hf['error']} | | | | |")
    roof = results["roofline_tokens_per_s"]
    print(f"| roofline at {B} rows: memory {step_bytes / 1e9:.1f} GB/step; + GEMMs at {H100_DENSE_FP16_FLOPS / 1e12:.0f} "
          f"TFLOP/s | {roof['memory_only']:,.0f} / {roof['memory_plus_gemm']:,.0f} | | | | |")
    print(f"\nragged vs fixed: {engine_ragged['tokens_per_s'] / engine_fixed['tokens_per_s']:.0%}; "
          f"greedy == transformers generate: {results['greedy_equal']}; where not: {partings}; "
          f"transformers alone == transformers batched: {results['hf_alone_equals_hf_batched']}")
    if old:
        print(f"engine vs old path: {engine_fixed['tokens_per_s'] / old['tokens_per_s']:.2f}×; "
              f"texts equal: {old['same_texts']} of {len(rows)}")
    if marlin_only:
        print(f"dense copies vs Marlin alone: {engine_fixed['tokens_per_s'] / marlin_only['tokens_per_s']:.2f}×; "
              f"texts equal: {marlin_only['same_texts']} of {len(rows)}")
    if modules:
        print(f"layer kernels on vs off: {engine_fixed['tokens_per_s'] / modules['tokens_per_s']:.2f}×; "
              f"texts equal: {modules['same_texts']} of {len(rows)}")
    if unfused:
        print(f"fused vs unfused projections (256 slots each): {fused_256['tokens_per_s'] / unfused['tokens_per_s']:.2f}×; "
              f"texts equal: {unfused['same_texts']} of {len(rows)}")


if __name__ == "__main__":
    main()
