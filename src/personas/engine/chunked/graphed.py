"""The chunked CUDA fast path: a static KV cache and one decode step captured as a CUDA graph.

Since the decode engine (engine/engine.py) this runs only for architectures the engine's decoder does
not cover, and as the benchmarks' baseline ("the old chunked path"); `graph_safe` decides for
both whether a model's GPTQ kernel may be captured.

On a GPU, HF's eager `generate` is bound by per-step CPU work (Python, thousands of kernel
launches per step for a 40-layer model), many times what reading the weights takes
(docs/performance.md). Capturing the whole decode step — forward pass, per-row sampling,
bookkeeping — once and replaying it removes that overhead.

The rows, seeds and sampling rule are the eager path's (`chooser.TokenChooser`), so a row's
text is the same function of its seed; only the kernels' arithmetic may differ in the last
bits. Finished rows are read back every `CHECK_EVERY` steps (a host sync), which is also how
often `on_sample` hears of them.

Not every GPTQ kernel survives capture: gptqmodel's ExllamaV2 kernel produced wrong tokens
under a CUDA graph (docs/performance.md), while Marlin, Triton and Torch matched
eager decoding token for token. Unknown kernels take the eager path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...sampling.chooser import TokenChooser
from ...sampling.grid import Row, Sample, Settings
from .prefill import distinct_prompts, left_padded

CHECK_EVERY = 16
GRAPH_SAFE_KERNELS = {None, "MarlinLinear", "TritonV2Linear", "TorchLinear", "MacheteLinear"}


def graph_safe(model: Any, kernel: str | None) -> bool:
    """True when the model is on CUDA with a GPTQ kernel (or none) known to survive capture."""
    return model.device.type == "cuda" and kernel in GRAPH_SAFE_KERNELS


def generate_chunk(model: Any, rows: Sequence[Row], chunk: list[int], settings: Settings,
                           eos_ids: Sequence[int], pad_id: int,
                           deliver: Callable[[int, Sample], None], on_step: Callable[[int], None]) -> None:
    from transformers import StaticCache

    device, dtype = model.device, model.dtype
    B, new = len(chunk), settings.max_new_tokens
    ids, real = (t.to(device) for t in left_padded(rows, chunk, pad_id))
    W = ids.shape[1]
    L = W + new

    choose = TokenChooser(torch.tensor([rows[i].temperature for i in chunk], dtype=torch.float32, device=device),
                          torch.tensor([rows[i].seed for i in chunk], dtype=torch.long, device=device), settings)
    eos = torch.tensor(list(eos_ids), device=device)
    out = torch.full((B, new), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        """Choose, respect min_new_tokens, silence finished rows, record; all on the device."""
        scores = logits.float()
        if settings.min_new_tokens:
            early = (step < settings.min_new_tokens)[:, None] & torch.isin(
                torch.arange(scores.shape[-1], device=device), eos)[None, :]
            scores = scores.masked_fill(early, float("-inf"))
        chosen = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), choose(None, scores, step))
        out.index_copy_(1, step, chosen[:, None])
        done.logical_or_(torch.isin(chosen, eos))
        return chosen

    # Prefill each distinct prompt once (a grid repeats each temperatures × n times), then
    # give every row its prompt's copy of the cache.
    firsts, positions_of = distinct_prompts(rows, chunk)
    which = torch.tensor(positions_of, device=device)
    cache = StaticCache(config=model.config, max_cache_len=L)
    with torch.inference_mode():
        positions = (real.cumsum(-1) - 1).masked_fill_(real == 0, 1)
        logits = model(input_ids=ids[firsts], attention_mask=real[firsts], position_ids=positions[firsts],
                       cache_position=torch.arange(W, device=device), cache=cache, use_cache=True).logits
        cache.reorder_cache(which)
        tok = pick(logits[:, -1].index_select(0, which))[:, None].clone()
        # Decode state, updated in place by every step (a graph replays fixed addresses).
        pos = real.sum(-1, keepdim=True)
        cpos = torch.tensor([W], device=device)
        mask = torch.full((B, 1, 1, L), torch.finfo(dtype).min, dtype=dtype, device=device)
        mask[:, 0, 0, :W].masked_fill_(real.bool(), 0)
        mask[..., W] = 0
        step += 1

        def decode_step() -> None:
            logits = model(input_ids=tok, position_ids=pos, cache_position=cpos, attention_mask=mask,
                           cache=cache, use_cache=True).logits
            tok.copy_(pick(logits[:, -1])[:, None])
            pos.add_(1)
            cpos.add_(1)
            mask.index_fill_(3, cpos.clamp(max=L - 1), 0)
            step.add_(1)

        delivered: set[int] = set()

        def report(final: bool) -> bool:
            """Deliver rows that finished; True when every row has."""
            finished = done.tolist()
            tokens = None
            for r, i in enumerate(chunk):
                if r in delivered or not (finished[r] or final):
                    continue
                tokens = tokens if tokens is not None else out.tolist()
                row_tokens = tokens[r]
                stop = next((k for k, t in enumerate(row_tokens) if t in eos_ids), None)
                kept = row_tokens[:stop] if stop is not None else row_tokens
                deliver(i, Sample(rows[i], tuple(kept), "stop" if stop is not None else "length"))
                delivered.add(r)
            return len(delivered) == B

        on_step(1)
        run_step = decode_step
        if new > 1:
            decode_step()  # eager once: warms every kernel before capture
            on_step(2)
            if device.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    decode_step()  # recorded, not run
                run_step = graph.replay
            # (On the CPU the same loop runs eagerly: that is how CI tests it against the plain path.)
            for s in range(2, new):
                run_step()
                if (s + 1) % CHECK_EVERY == 0:
                    on_step(s + 1)
                    if report(final=False):
                        break
        report(final=True)
