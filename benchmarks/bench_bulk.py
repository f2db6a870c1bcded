"""The bulk job on one GPU: the decode engine against the old chunked path and
transformers' continuous batching, with the roofline, in one run.

The job: 512 distinct prompts to the `customer` persona (≈ 200 tokens of system context and
examples, then the prompt) × n = 2 × T = 1.0, exactly 128 new tokens each (min = max), on the
13B GPTQ checkpoint written by benchmarks/gptq_checkpoint.py (random weights, Llama-2-13B-chat-
GPTQ's layout), Marlin. Then the same prompts with max_new_tokens drawn per row from 16–256
("ragged"), and a greedy check: the engine's first 64 tokens against transformers' `generate`.

    python benchmarks/bench_bulk.py [--prompts 512] [--n 2] [--new-tokens 128] [--skip-old]
                                    [--hf-prompts 64] [--compare-unfused] [--compare-layer-kernels]
                                    [--compare-dense] [--compare-fused-noise] [--memory-gb GB]
                                    [--out DIR]

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

--compare-fused-noise runs the fixed job once more with the choice's Gumbel noise made by torch's
elementwise operations instead of the one Triton kernel (sampling/noise_kernel.py).

Prints a table; writes bulk.json to --out (default: $OUT if set, else the current folder).
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
from common import copy_bandwidth, log, peak_gb, persona_rows, quantized_bytes, reset_peak, sync_time  # noqa: E402
from gptq_checkpoint import load_checkpoint  # noqa: E402

H100_DENSE_FP16_FLOPS = 989e12  # the card's tensor-core peak; the GEMM half of the roofline


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq"))
    parser.add_argument("--shape", default="13b", help="gptq_checkpoint.py's shape: 13b, llama3-8b, qwen2.5-7b, ...")
    parser.add_argument("--backend", default="marlin")
    parser.add_argument("--skip-old", action="store_true", help="skip the old chunked path")
    parser.add_argument("--hf-prompts", type=int, default=64,
                        help="prompts (× n) for transformers' generate_batch; 0 skips it (it is slow)")
    parser.add_argument("--compare-unfused", action="store_true",
                        help="also run the fixed job on the checkpoint loaded without fused projections")
    parser.add_argument("--compare-layer-kernels", action="store_true",
                        help="also run the fixed job with the engine's fused layer kernels off")
    parser.add_argument("--compare-fused-noise", action="store_true",
                        help="also run the fixed job with the noise made by torch operations, not the Triton kernel")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also run the fixed job with the dense copies of the GPTQ weights refused")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="leave the engine only this much of the card's memory (85.5: an H100 80GB)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    return parser.parse_args()


class Card:
    """The card's memory, less what --memory-gb holds back (one allocation, never read)."""

    def __init__(self, memory_gb: float | None):
        _, self.total = torch.cuda.mem_get_info()
        self.held_back = max(0, self.total - int(memory_gb * 1e9)) if memory_gb else 0
        self.ballast = torch.empty(self.held_back, dtype=torch.uint8, device="cuda") if self.held_back else None
        if self.held_back:
            log(f"the card holds {self.total / 1e9:.1f} GB; {self.held_back / 1e9:.1f} GB held back, "
                f"{memory_gb:.1f} GB left")

    def peak_gb(self) -> float:
        """Peak memory allocated since reset_peak(), the held-back part left out."""
        return peak_gb() - self.held_back / 1e9


def run_engine(model, card: Card, rows, settings, label: str, layer_kernels: bool = True, dense=None) -> dict:
    """One engine over `rows`, timed; its numbers, the events it reported, and its texts."""
    from personas.engine.engine import Engine, EngineConfig
    from personas.model.dense_gptq import has_dense

    samples, events = [], []
    config = EngineConfig(max_slots=settings.max_batch, graphs=True, layer_kernels=layer_kernels, dense_weights=dense)
    engine = Engine(model, config,
                    on_dense=lambda size: events.append(f"step {engine.stats.steps}: dense copies {size / 1e9:.1f} GB"),
                    on_split=lambda old, new: events.append(f"step {engine.stats.steps}: slots {old} -> {new}"))
    engine.submit(rows, settings, samples.append)
    reset_peak()
    with torch.inference_mode():
        seconds = sync_time(engine.run)
    # The hooks refer to the engine: without this cycle broken, its pages and graphs would
    # outlive it and starve the next run of memory.
    engine.on_dense = engine.on_split = lambda *_: None
    tokens = sum(len(s.token_ids) for s in samples)
    stats = engine.stats
    # A row's own cache: the pages it held at its end (its suffix and new tokens, whole pages;
    # the prompt pages an identical prompt's row holds are counted once).
    positions = stats.positions_held / stats.rows_delivered
    out = {"s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "slots": engine.slot_count,
           "mean_rows_per_step": stats.rows_decoded / stats.steps, "pages": engine.pages.count,
           "preemptions": stats.preemptions, "row_positions": positions,
           "row_bytes": positions * engine.runner.decoder.kv_bytes_per_token(), "peak_GB": card.peak_gb(),
           "steps": stats.steps, "graphs": len(engine.runner.graphs), "dense": has_dense(model.model),
           "events": events}
    log(f"{label}: {tokens} tokens in {seconds:.1f} s = {out['tokens_per_s']:.0f} tokens/s, B={engine.slot_count}, "
        f"dense copies {'yes' if out['dense'] else 'no'}, {out['mean_rows_per_step']:.0f} rows per step, "
        f"{out['row_bytes'] / 1e6:.0f} MB per row, {stats.preemptions} preempted, {stats.steps} steps, "
        f"{len(engine.runner.graphs)} graphs, peak {out['peak_GB']:.1f} GB; events: {'; '.join(events) or 'none'}")
    out["texts"] = {(s.row.prompt, s.row.sample): s.token_ids for s in samples}
    return out


def same_texts(run: dict, reference: dict) -> int:
    return sum(run["texts"][k] == v for k, v in reference["texts"].items())


def old_chunked_path(model, card: Card, rows, fixed, reference: dict) -> dict:
    """The chunked loop that came before the engine, in chunks of 256 rows."""
    from personas.engine.loop import generate_grid
    from personas.sampling.grid import Settings

    samples = []
    reset_peak()
    with torch.inference_mode():
        seconds = sync_time(lambda: generate_grid(model.model, rows, Settings(**{**fixed.__dict__, "max_batch": 256}),
                                                  eos_ids=model.eos_ids, pad_id=model.pad_id,
                                                  on_sample=samples.append, graph_safe=True))
    tokens = sum(len(s.token_ids) for s in samples)
    old = {"s": seconds, "tokens_per_s": tokens / seconds, "peak_GB": card.peak_gb(),
           "texts": {(s.row.prompt, s.row.sample): s.token_ids for s in samples}}
    old["same_texts"] = same_texts(old, reference)
    log(f"old chunked path: {tokens / seconds:.0f} tokens/s, peak {old['peak_GB']:.1f} GB, "
        f"{old['same_texts']} of {len(rows)} texts equal to the engine's")
    return old


def generate_batch(model, card: Card, rows, new_tokens: int) -> dict:
    """transformers' own continuous batching on the first rows."""
    from transformers import GenerationConfig

    subset = [list(r.prompt_ids) for r in rows]
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, eos_token_id=model.eos_ids,
                              pad_token_id=model.pad_id)
    try:
        reset_peak()
        outputs = {}
        seconds = sync_time(lambda: outputs.update(model.model.generate_batch(subset, generation_config=config)))
        tokens = sum(len(o.generated_tokens) for o in outputs.values())
        log(f"generate_batch: {tokens / seconds:.0f} tokens/s on {len(subset)} rows")
        return {"s": seconds, "tokens_per_s": tokens / seconds, "peak_GB": card.peak_gb(), "rows": len(subset)}
    except Exception as error:  # report, keep the engine's numbers
        log(f"generate_batch failed: {error}")
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def greedy_check(model, rows) -> dict:
    """The engine's first 64 greedy tokens against transformers' generate, a few prompts; where
    they part, how close transformers' own top two logits were (a near-tie flipped by fp16
    rounding, or a real difference); and transformers alone against itself batched."""
    from personas.engine.engine import Engine, EngineConfig
    from personas.sampling.grid import Settings

    greedy_rows = [r.__class__(**{**r.__dict__, "temperature": 0.0}) for r in rows[:16:2]]
    got = {}
    partings: list[dict] = []
    engine = Engine(model, EngineConfig(graphs=True))
    engine.submit(greedy_rows, Settings(max_new_tokens=64), lambda s: got.__setitem__(s.row.prompt, list(s.token_ids)))
    options = dict(max_new_tokens=64, do_sample=False, eos_token_id=model.eos_ids, pad_token_id=model.pad_id)
    with torch.inference_mode():
        engine.run()
        equal = 0
        for r in greedy_rows:
            ids = torch.tensor([r.prompt_ids], device="cuda")
            expected = model.model.generate(ids, attention_mask=torch.ones_like(ids), **options)[0, ids.shape[1]:]
            expected = [t for t in expected.tolist() if t not in model.eos_ids][:64]
            if got[r.prompt] == expected:
                equal += 1
                continue
            at = next(i for i, (a, b) in enumerate(zip(got[r.prompt] + [-1], expected + [-2])) if a != b)
            context = torch.tensor([list(r.prompt_ids) + expected[:at]], device="cuda")
            top2 = model.model(context).logits[0, -1].float().topk(2).values.tolist()
            partings.append({"token": at, "top2_gap": top2[0] - top2[1]})
        batch = [list(r.prompt_ids) for r in greedy_rows]
        width = max(map(len, batch))
        ids = torch.tensor([[model.pad_id] * (width - len(b)) + b for b in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device="cuda")
        together = model.model.generate(ids, attention_mask=mask, **options)[:, width:].tolist()
        hf_equal = 0
        for b, out in zip(batch, together):
            alone = model.model.generate(torch.tensor([b], device="cuda"), **options)[0, len(b):].tolist()
            hf_equal += alone == out[:len(alone)]
    log(f"greedy engine == transformers generate (64 tokens): {equal} of {len(greedy_rows)}")
    return {"greedy_equal": f"{equal} of {len(greedy_rows)}", "greedy_partings": partings,
            "hf_alone_equals_hf_batched": f"{hf_equal} of {len(batch)}"}


def roofline(model, fixed_run: dict, bandwidth: float, prompt_tokens: float, shared: int, new_tokens: int) -> dict:
    """The fixed job's tokens/s at the engine's mean batch if a step only read, per step, the
    weights once, each row's own suffix (half its new tokens on average over the steps) and each
    prefix once — and with the GEMMs' arithmetic at the card's peak added."""
    weights = quantized_bytes(model.model)
    cfg = model.model.config
    kv = fixed_run["row_bytes"] / fixed_run["row_positions"]  # cache bytes per position
    rows = round(fixed_run["mean_rows_per_step"])
    suffix = prompt_tokens - shared + new_tokens / 2
    step_bytes = weights + rows * suffix * kv + shared * kv
    linear_flops = 2 * (4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.intermediate_size) * cfg.num_hidden_layers \
        + 2 * cfg.hidden_size * cfg.vocab_size
    memory_s, gemm_s = step_bytes / bandwidth, linear_flops * rows / H100_DENSE_FP16_FLOPS
    return {"rows": rows, "step_GB": step_bytes / 1e9, "kv_bytes_per_position": kv,
            "memory_only": rows / memory_s, "memory_plus_gemm": rows / (memory_s + gemm_s)}


def main() -> None:
    args = arguments()

    import transformers

    from personas.model.dense_gptq import drop_dense
    from personas.sampling.grid import Settings

    results: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "transformers": transformers.__version__}
    bandwidth = results["bandwidth_Bps"] = copy_bandwidth(2.0)
    card = Card(args.memory_gb)
    results["card_memory_GB"] = (card.total - card.held_back) / 1e9
    if args.memory_gb:
        results["memory_gb"] = args.memory_gb

    model = load_checkpoint(args.checkpoint / args.shape, args.backend, shape=args.shape)
    results["kernel"], results["fused_groups"] = model.gptq_kernel, model.gptq_fused
    log(f"loaded in {model.load_seconds:.1f} s, kernel {model.gptq_kernel}, {model.gptq_fused} fused groups; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")

    fixed = Settings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    rows = persona_rows(model, args.prompts, 1.0, fixed, n=args.n)
    shared = len(os.path.commonprefix([r.prompt_ids for r in rows]))
    prompt_tokens = results["prompt_tokens_mean"] = sum(len(r.prompt_ids) for r in rows) / len(rows)
    results["shared_prefix_tokens"] = shared
    log(f"{len(rows)} rows, prompts {prompt_tokens:.0f} tokens on average, {shared} shared")

    run_engine(model, card, rows[:16], Settings(max_new_tokens=8), "warm-up")  # kernels, workspaces, allocator
    runs = {"engine_fixed": run_engine(model, card, rows, fixed, "engine, fixed length")}
    if args.compare_dense:
        runs["engine_fixed_dense_refused"] = run_engine(model, card, rows, fixed,
                                                        "engine, fixed length, dense copies refused", dense=False)
    if args.compare_fused_noise:
        from personas.sampling import chooser

        chooser.FUSED_NOISE_ON_CUDA = False
        runs["engine_fixed_torch_noise"] = run_engine(model, card, rows, fixed, "engine, fixed length, torch's noise")
        chooser.FUSED_NOISE_ON_CUDA = True
    if args.compare_layer_kernels:
        runs["engine_fixed_layer_kernels_off"] = run_engine(model, card, rows, fixed,
                                                            "engine, fixed length, layer kernels off", layer_kernels=False)
    at_256 = Settings(**{**fixed.__dict__, "max_batch": 256})
    if args.compare_unfused:
        runs["engine_fixed_256"] = run_engine(model, card, rows, at_256, "engine, fixed length, 256 slots")
    rng = random.Random(12)
    ragged_rows = [r.__class__(**{**r.__dict__, "max_new_tokens": rng.randint(16, 256)}) for r in rows]
    ragged_settings = Settings(max_new_tokens=256, min_new_tokens=256)  # every row runs to its own limit
    runs["engine_ragged"] = run_engine(model, card, ragged_rows, ragged_settings, "engine, ragged 16-256")
    assert runs["engine_ragged"]["tokens"] == sum(r.max_new_tokens for r in ragged_rows)

    drop_dense(model.model)  # the baselines and the greedy check run the model as loaded
    fixed_run = runs["engine_fixed"]
    if not args.skip_old:
        runs["old"] = old_chunked_path(model, card, rows, fixed, fixed_run)
    if args.hf_prompts:
        results["generate_batch"] = generate_batch(model, card, rows[:args.hf_prompts * args.n], args.new_tokens)
    results.update(greedy_check(model, rows))
    roof = results["roofline_tokens_per_s"] = roofline(model, fixed_run, bandwidth, prompt_tokens, shared,
                                                       args.new_tokens)
    if args.compare_unfused:
        # The fused model goes first, so both runs have the same memory for pages.
        del model
        gc.collect()  # transformers' modules hold reference cycles
        torch.cuda.empty_cache()
        plain = load_checkpoint(args.checkpoint / args.shape, args.backend, fuse=False, shape=args.shape)
        runs["engine_fixed_unfused"] = run_engine(plain, card, rows, at_256,
                                                  "engine, fixed length, 256 slots, unfused projections")
        del plain
    for key, run in runs.items():
        if key != "engine_fixed":
            run["same_texts"] = run.get("same_texts", same_texts(run, fixed_run))
    for run in runs.values():
        run.pop("texts", None)
    results.update(runs)
    (args.out / "bulk.json").write_text(json.dumps(results, indent=2, default=str))
    print_table(args, results, runs, card, roof)


def print_table(args: argparse.Namespace, results: dict, runs: dict, card: Card, roof: dict) -> None:
    print(f"\ncard: {results['card']}, torch {results['torch']}, transformers {results['transformers']}, "
          f"kernel {results['kernel']}; copy bandwidth {results['bandwidth_Bps'] / 1e12:.2f} TB/s; memory "
          f"{results['card_memory_GB']:.1f} GB" + (f" (--memory-gb: {card.held_back / 1e9:.1f} GB of "
                                                    f"{card.total / 1e9:.1f} held back)" if card.held_back else ""))
    print(f"job: {args.prompts} prompts × n={args.n} × T=1.0, {args.new_tokens} new tokens; prompts "
          f"{results['prompt_tokens_mean']:.0f} tokens on average, {results['shared_prefix_tokens']} of them shared\n")
    print("| how | tokens/s | slots (B) / mean rows per step | dense copies | cache per row (MB) | peak GPU memory (GB) |")
    print("|---|---:|---:|---|---:|---:|")
    labels = {"engine_fixed": "engine, fixed 128 tokens", "engine_ragged": "engine, ragged 16–256 tokens",
              "engine_fixed_dense_refused": "engine, fixed, dense copies refused (Marlin alone)",
              "engine_fixed_layer_kernels_off": "engine, fixed, layer kernels off",
              "engine_fixed_torch_noise": "engine, fixed, the noise as torch operations (before the fused kernel)",
              "engine_fixed_256": "engine, fixed, 256 slots",
              "engine_fixed_unfused": "engine, fixed, 256 slots, q/k/v and gate/up unfused"}
    for key, label in labels.items():
        if key in runs:
            r = runs[key]
            print(f"| {label} | {r['tokens_per_s']:,.0f} | {r['slots']} / {r['mean_rows_per_step']:.0f} | "
                  f"{'yes' if r['dense'] else 'no'} | {r['row_bytes'] / 1e6:.0f} | {r['peak_GB']:.1f} |")
    old, hf = runs.get("old"), results.get("generate_batch")
    if old:
        row_mb = (results["prompt_tokens_mean"] + args.new_tokens) * roof["kv_bytes_per_position"] / 1e6
        print(f"| old chunked path, chunks of 256 (same run) | {old['tokens_per_s']:,.0f} | 256 | no | "
              f"{row_mb:.0f} | {old['peak_GB']:.1f} |")
    if hf and "error" not in hf:
        print(f"| transformers generate_batch, first {hf['rows']} rows | {hf['tokens_per_s']:,.0f} | | no | | "
              f"{hf['peak_GB']:.1f} |")
    elif hf:
        print(f"| transformers generate_batch | failed: {hf['error']} | | | | |")
    print(f"| roofline at {roof['rows']} rows: memory {roof['step_GB']:.1f} GB/step; + GEMMs at "
          f"{H100_DENSE_FP16_FLOPS / 1e12:.0f} TFLOP/s | {roof['memory_only']:,.0f} / {roof['memory_plus_gemm']:,.0f} "
          "| | | | |")
    fixed = runs["engine_fixed"]
    print(f"\nragged vs fixed: {runs['engine_ragged']['tokens_per_s'] / fixed['tokens_per_s']:.0%}; "
          f"greedy == transformers generate: {results['greedy_equal']}; where not: {results['greedy_partings']}; "
          f"transformers alone == transformers batched: {results['hf_alone_equals_hf_batched']}")
    rows = args.prompts * args.n
    for key, what in (("old", "engine vs old path"), ("engine_fixed_dense_refused", "dense copies vs Marlin alone"),
                      ("engine_fixed_layer_kernels_off", "layer kernels on vs off")):
        if key in runs:
            print(f"{what}: {fixed['tokens_per_s'] / runs[key]['tokens_per_s']:.2f}×; "
                  f"texts equal: {runs[key]['same_texts']} of {rows}")
    if "engine_fixed_unfused" in runs:
        fused, unfused = runs["engine_fixed_256"], runs["engine_fixed_unfused"]
        print(f"fused vs unfused projections (256 slots each): {fused['tokens_per_s'] / unfused['tokens_per_s']:.2f}×; "
              f"texts equal: {unfused['same_texts']} of {rows}")


if __name__ == "__main__":
    main()
