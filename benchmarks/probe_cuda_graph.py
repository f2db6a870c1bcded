"""Probe: can one decode step of the GPTQ Llama (static KV cache) be captured in a CUDA graph?

Issue 3's fast path hinges on it: HF eager decoding is bound by per-step CPU overhead. This
probe prefills the Galaxy Rider prompt for B rows into a StaticCache, then times one decode
step (forward + argmax) three ways: plain eager, eager with static buffers, and replays of
a captured CUDA graph, and checks the graph's greedy tokens equal the eager ones.

    python benchmarks/probe_cuda_graph.py [--checkpoint /tmp/personas-gptq/13b] [--backend exllama_v2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def timed_steps(fn, steps: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/personas-gptq/13b"))
    parser.add_argument("--backend", default="exllama_v2")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()

    from transformers import StaticCache

    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.library.load import find_library_file, load_library
    from personas.model.prompt import Dialog

    model = load_model(resolve_model(str(args.checkpoint)), device="cuda", gptq_backend=args.backend)
    net = model.model
    persona = load_library(find_library_file(None)).get("customer")
    prompt = model.prompt_ids(Dialog.for_persona(persona, persona.prompt), "llama2")
    B, W, max_len = args.rows, len(prompt), len(prompt) + args.new
    dtype = torch.float16

    def fresh_state():
        cache = StaticCache(config=net.config, max_cache_len=max_len)
        ids = torch.tensor([prompt] * B, device="cuda")
        with torch.inference_mode():
            out = net(input_ids=ids, position_ids=torch.arange(W, device="cuda")[None].expand(B, -1),
                      cache_position=torch.arange(W, device="cuda"), cache=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.full((B, 1), W, device="cuda", dtype=torch.long)
        cpos = torch.tensor([W], device="cuda")
        mask = torch.full((B, 1, 1, max_len), torch.finfo(dtype).min, dtype=dtype, device="cuda")
        mask[..., : W + 1] = 0
        return cache, tok, pos, cpos, mask

    def make_step(cache, tok, pos, cpos, mask, record):
        def step():
            with torch.inference_mode():
                logits = net(input_ids=tok, position_ids=pos, cache_position=cpos, attention_mask=mask,
                             cache=cache, use_cache=True).logits
                tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
                record.append(tok.clone()) if record is not None else None
                pos.add_(1)
                cpos.add_(1)
                mask.index_fill_(3, cpos, 0)  # the next position becomes visible
        return step

    # 1. eager, static buffers: reference tokens and time
    state = fresh_state()
    eager_tokens: list = []
    eager_step = make_step(*state, eager_tokens)
    eager_ms = timed_steps(eager_step, 16) * 1e3
    print(f"eager static-cache step, batch {B}: {eager_ms:.1f} ms", flush=True)

    # 2. capture one step in a CUDA graph, replay from a fresh prefill
    state = fresh_state()
    graph_step = make_step(*state, None)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pass  # no warm-up steps: they would advance the cache; the eager run warmed the kernels
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_step()
    except Exception as e:  # report, do not hide: this is what the probe is for
        print(f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return
    # Capturing does not run the step; restart from a fresh prefill with the same buffers.
    cache, tok, pos, cpos, mask = state
    fresh = fresh_state()
    with torch.inference_mode():  # the buffers are inference tensors
        for dst, src in zip((tok, pos, cpos, mask), fresh[1:]):
            dst.copy_(src)
        for layer_dst, layer_src in zip(cache.layers, fresh[0].layers):
            layer_dst.keys.copy_(layer_src.keys)
            layer_dst.values.copy_(layer_src.values)
    graph_tokens = []
    for _ in range(16):
        graph.replay()
        graph_tokens.append(tok.clone())
    # A second eager run tells kernel nondeterminism (split-k atomics) apart from capture bugs.
    again: list = []
    again_step = make_step(*fresh_state(), again)
    for _ in range(16):
        again_step()

    def agreement(a: list, b: list) -> str:
        equal = torch.stack([torch.eq(x, y).flatten() for x, y in zip(a, b)])  # [steps, rows]
        first = [int(s) for s in (~equal).nonzero()[:, 0].tolist()[:1]]
        return f"{equal.float().mean().item():.3f} of tokens equal, first difference at step {first or None}"

    print(f"eager vs eager (same inputs): {agreement(eager_tokens, again)}")
    print(f"graph vs eager: {agreement(eager_tokens, graph_tokens)}")
    times = []
    for _ in range(5):
        times.append(timed_steps(graph.replay, 20) * 1e3)
    print(f"CUDA graph replay step, batch {B}: {statistics.median(times):.2f} ms (median of 5×20)")

    # Where a replayed step spends its GPU time, by kernel (CUPTI sees kernels inside graphs).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
