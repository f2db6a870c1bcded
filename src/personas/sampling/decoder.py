"""One pass of a Llama decoder over personas' own cache layout: shared prefixes and slot suffixes.

transformers' Llama forward keeps one cache row per sequence, so rows that share a persona's
system context and examples each hold, and each step read, a copy of it. This pass runs the
model's own modules — embeddings, norms, projections (GPTQ kernels included), rotary embedding,
MLP, head — but computes attention in two parts and merges them by their log-sum-exp, the
decomposition Hydragen uses:

* the shared part: every row's queries against the prefix pool (the prefixes of the rows being
  decoded, stored once). The queries of all rows are stacked into one matrix, so each prefix is
  read once per step however many rows share it; a per-row bias of 0 / -inf keeps each row to
  its own prefix;
* the own part: each row's queries against its own keys — in a slot's cache while decoding, the
  suffix's fresh keys while prefilling it.

Read bottom-up: `attention_part` and `merge` are the arithmetic, `Decoder.run` the layer loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# A row with nothing visible in a part (a slot without a prefix) has max -inf there; clamping
# it keeps exp(score - max) at 0 instead of NaN, so that part weighs nothing in the merge.
NOTHING_VISIBLE = -1e30


def supports(model: Any) -> bool:
    """True for models this decoder can run: Llama-architecture causal LMs (Llama 2, SmolLM2 …)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (getattr(config, "model_type", None) == "llama" and inner is not None
            and hasattr(inner, "layers") and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head"))


@dataclass
class Part:
    """Keys and values one part of attention reads, with the bias that says who sees what.

    Shared (the prefix pool): keys/values (kv_heads, P, head_dim), bias (rows, P).
    Own (each row's): keys/values (rows, kv_heads, S, head_dim), bias (rows, queries, S).
    fused: computed by torch's memory-efficient attention kernel (CUDA, one query per row).
    """

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    shared: bool
    fused: bool = False


def attention_part(q: torch.Tensor, part: Part, scale: float, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, normalised output) of softmax attention over one part, in float32.

    q is (rows, kv_heads, group, head_dim) with group = query heads per kv head × `queries`
    (positions per row), ordered (head, position). A row that sees nothing here gets
    log-sum-exp -inf and output 0, so the part weighs nothing in `merge`.
    """
    if part.fused:
        return fused_part(q, part, scale)
    rows, kv_heads, group, head_dim = q.shape
    # Scores in float32: rounding them to half precision moves attention weights by whole
    # percents at the logit sizes Llama reaches (what the fused kernel also avoids).
    q = q.float()
    if part.shared:
        # All rows' queries as one matrix per kv head: the prefix pool is read once.
        stacked = q.transpose(0, 1).reshape(kv_heads, rows * group, head_dim)
        scores = torch.matmul(stacked, part.keys.float().transpose(1, 2)).mul_(scale)
        scores = scores.view(kv_heads, rows, group, -1).transpose(0, 1)
        scores = scores + part.bias[:, None, None, :]
    else:
        scores = torch.matmul(q, part.keys.float().transpose(2, 3)).mul_(scale)
        span = scores.shape[-1]
        scores = (scores.view(rows, kv_heads, group // queries, queries, span)
                  + part.bias[:, None, None, :, :]).view(rows, kv_heads, group, span)
    top = scores.amax(-1, keepdim=True).clamp_min_(NOTHING_VISIBLE)
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    if part.shared:
        flat = weights.transpose(0, 1).reshape(kv_heads, rows * group, -1)
        out = torch.matmul(flat, part.values.float()).view(kv_heads, rows, group, head_dim).transpose(0, 1)
    else:
        out = torch.matmul(weights, part.values.float())
    return top + total.log(), out / total.clamp_min(torch.finfo(total.dtype).tiny)


def fused_part(q: torch.Tensor, part: Part, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The own part while decoding, by torch's memory-efficient attention kernel: it reads each
    slot's cache once, keeps scores in float32, and returns the log-sum-exp the merge needs."""
    rows, kv_heads, group, _ = q.shape
    bias = part.bias[:, None, :, :].expand(rows, kv_heads, group, part.bias.shape[-1])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, part.keys, part.values, bias, True, scale=scale)[:2]
    return lse[:, :, :group, None], out.float()


def fused_attention_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch and device run `fused_part` correctly (checked once, on small tensors)."""
    if device.type != "cuda":
        return False
    try:
        q = torch.randn(3, 2, 1, 64, device=device, dtype=dtype)
        k, v = torch.randn(3, 2, 32, 64, device=device, dtype=dtype), torch.randn(3, 2, 32, 64, device=device, dtype=dtype)
        bias = torch.zeros(3, 1, 32, device=device, dtype=dtype)
        bias[:, :, 20:] = float("-inf")
        lse, out = fused_part(q, Part(k, v, bias, shared=False, fused=True), 0.125)
        ref_lse, ref = attention_part(q, Part(k, v, bias, shared=False), 0.125, 1)
        return bool(torch.allclose(out, ref, atol=2e-2) and torch.allclose(lse, ref_lse, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """softmax over the union of the parts' keys, from each part's (log-sum-exp, output)."""
    if len(parts) == 1:
        return parts[0][1]
    lse = torch.stack([p[0] for p in parts])
    weights = torch.exp(lse - lse.amax(0))
    out = sum(w * p[1] for w, p in zip(weights, parts))
    return out / weights.sum(0)


# own(layer index, keys, values) -> the Part of each row's own keys for that layer. The caller
# decides where fresh keys go: into the slots' caches (decoding, prefilling a suffix) or into
# the prefix pool (prefilling a prefix).
OwnKeys = Callable[[int, torch.Tensor, torch.Tensor], Part]


class Decoder:
    """A Llama model's modules, run by `run` over the shared and own parts."""

    def __init__(self, model: Any):
        inner = model.model
        config = model.config
        self.model = model
        self.embed, self.layers, self.norm = inner.embed_tokens, inner.layers, inner.norm
        self.rotary, self.head = inner.rotary_emb, model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.layer_count = len(self.layers)
        self.device, self.dtype = model.device, model.dtype
        self.fused = fused_attention_works(self.device, self.dtype)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers (keys and values)."""
        return 2 * self.layer_count * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def run(self, ids: torch.Tensor, positions: torch.Tensor, own: OwnKeys,
            shared: list[Part] | None, last: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocabulary) in float32 at each row's `last` position.

        ids, positions: (rows, queries). `shared`: the prefix pool's Part per layer, or None.
        """
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        rows, queries = ids.shape
        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, positions)
        group = self.heads // self.kv_heads * queries
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(rows, queries, self.heads, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(rows, queries, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(rows, queries, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            # Query head h reads kv head h // (heads / kv_heads), as transformers' repeat_kv does.
            q = q.reshape(rows, self.kv_heads, group, self.head_dim)
            parts = [attention_part(q, own(index, k, v), self.scale, queries)]
            if shared is not None:
                parts.append(attention_part(q, shared[index], self.scale, queries))
            out = merge(parts).to(hidden.dtype).view(rows, self.heads, queries, self.head_dim)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(rows, queries, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        picked = hidden[torch.arange(rows, device=hidden.device), last]
        return self.head(self.norm(picked)).float()
