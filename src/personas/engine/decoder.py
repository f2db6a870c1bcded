"""One pass of a Llama decoder over personas' own cache layout: shared prefixes and slot suffixes.

transformers' Llama forward keeps one cache row per sequence, so rows that share a persona's
system context and examples each hold, and each step read, a copy of it. This pass runs the
model's own modules — embeddings, norms, projections (GPTQ kernels included), rotary embedding,
MLP, head — but computes attention in two parts and merges them by their log-sum-exp, the
decomposition Hydragen uses:

* the shared part: every row's queries against the prefix pool (the prefixes of the rows being
  decoded, stored once). The queries of all rows are stacked into one matrix, so each prefix is
  read once per step however many rows share it; a per-row bias of 0 / -inf keeps each row to
  its own prefix (a CUDA decode step runs this as one kernel reading each row's span,
  prefix_attention.py);
* the own part: each row's queries against its own keys — in its pages while decoding (read
  through its page table as far as its own length, paged_attention.py), the suffix's fresh keys
  while prefilling it.

On CUDA the layers' small steps — residual add and RMSNorm, rotary, SiLU × up, the merge — run
as fused Triton kernels (layer_kernels.py; the merge inside the paged kernel), rounding as the
modules do; `Decoder(model, layer_kernels=False)` and the CPU use the modules.

Read bottom-up: `attention_part` and `merge` are the arithmetic, `Decoder.run` the layer loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .kernels.paged import PagedPart, paged_attention, paged_attention_after
from .kernels.prefix import PrefixPart, prefix_attention

# A row with nothing visible in a part (a slot without a prefix) has max -inf there; clamping
# it keeps exp(score - max) at 0 instead of NaN, so that part weighs nothing in the merge.
NOTHING_VISIBLE = -1e30


# The families whose layers are Llama's, and how each differs (read from transformers' modeling
# files): llama — Llama 2, Llama 3.x (llama3 rope scaling lives in the model's own rotary module,
# which the decoder calls), SmolLM2; mistral — a sliding window (LoadedModel.context_length keeps
# every row inside it); qwen2 — bias on q/k/v (inside the projections the decoder calls), tied
# embeddings in the small ones; qwen3 — an RMSNorm over each head of q and of k before rotary.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Gemma's layers differ in ways that would give wrong tokens if run as Llama's.
GEMMA = ("(1 + w) RMSNorms, a scaled embedding, attention and final logit soft-capping, alternating local and "
         "global layers and a query scale of their own")


def unsupported_reason(model: Any) -> str | None:
    """Why this decoder cannot run `model`, or None when it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    inner = getattr(model, "model", None)
    if kind not in FAMILIES:
        why = GEMMA if str(kind).startswith("gemma") else "its layers are not Llama's"
        return f"the decode engine does not run '{kind}' models: {why}"
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return f"the decode engine does not run this '{kind}' model: it lacks the usual layers"
    return None


def supports(model: Any) -> bool:
    """True for models this decoder can run: Llama 2 and 3.x, SmolLM2, Mistral, Qwen 2/2.5 and 3."""
    return unsupported_reason(model) is None


@dataclass
class Part:
    """Keys and values one part of attention reads, with the bias that says who sees what.

    Shared (the prefix pool): keys/values (kv_heads, P, head_dim), bias (rows, P).
    Own (each row's): keys/values (rows, kv_heads, S, head_dim), bias (rows, queries, S).
    """

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    shared: bool


def attention_part(q: torch.Tensor, part: Part | PagedPart | PrefixPart, scale: float,
                   queries: int, masks: "CpuMasks | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, normalised output) of softmax attention over one part, in float32.

    q is (rows, kv_heads, group, head_dim) with group = query heads per kv head × `queries`
    (positions per row), ordered (head, position). A row that sees nothing here gets
    log-sum-exp -inf and output 0, so the part weighs nothing in `merge`.
    """
    if isinstance(part, PagedPart):
        return paged_attention(q, part, scale)
    if isinstance(part, PrefixPart):
        return prefix_attention(q, part, scale)
    if q.device.type == "cpu":
        return cpu_part(q, part, scale, queries, masks)
    return matmul_part(q, part, scale, queries)


def matmul_part(q: torch.Tensor, part: Part, scale: float, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_part` as matrix products (CUDA): one product over all rows for the shared part."""
    rows, kv_heads, group, head_dim = q.shape
    # Scores in float32: rounded to half precision they would move attention weights by whole
    # percents at the sizes Llama's scores reach (SDPA's kernels keep them in float32 too).
    if part.shared:
        # All rows' queries as one matrix per kv head: the prefix pool is read once.
        stacked = q.transpose(0, 1).reshape(kv_heads, rows * group, head_dim)
        scores = matmul32(stacked, part.keys.transpose(1, 2)).mul_(scale)
        scores = scores.view(kv_heads, rows, group, -1).transpose(0, 1)
        scores = scores + part.bias[:, None, None, :]
    else:
        scores = matmul32(q, part.keys.transpose(2, 3)).mul_(scale)
        span = scores.shape[-1]
        scores = (scores.view(rows, kv_heads, group // queries, queries, span)
                  + part.bias[:, None, None, :, :]).view(rows, kv_heads, group, span)
    top = scores.amax(-1, keepdim=True).clamp_min_(NOTHING_VISIBLE)
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    weights = weights.to(part.values.dtype)  # in [0, 1]: half precision holds them well
    if part.shared:
        flat = weights.transpose(0, 1).reshape(kv_heads, rows * group, -1)
        out = matmul32(flat, part.values).view(kv_heads, rows, group, head_dim).transpose(0, 1)
    else:
        out = matmul32(weights, part.values)
    return top + total.log(), out / total.clamp_min(torch.finfo(total.dtype).tiny)


def cpu_part(q: torch.Tensor, part: Part, scale: float, queries: int,
             masks: "CpuMasks | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_part` on the CPU through torch's fused flash-attention kernel, which also returns
    the log-sum-exp the merge needs; faster than `matmul_part` on the CPU (docs/performance.md).
    It gives a fully masked row log-sum-exp 0, not -inf: those are set here."""
    rows, kv_heads, group, head_dim = q.shape
    masks = masks or CpuMasks()
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if part.shared:
        mask, sees_something = masks.shared(part.bias, rows, group)
        stacked = q.transpose(0, 1).reshape(1, kv_heads, rows * group, head_dim)
        out, lse = kernel(stacked, part.keys[None], part.values[None], 0.0, False, attn_mask=mask, scale=scale)
        out = out[0].view(kv_heads, rows, group, head_dim).transpose(0, 1)
        lse = lse[0].view(kv_heads, rows, group).transpose(0, 1)[..., None]
        return torch.where(sees_something, lse, float("-inf")), out
    out, lse = kernel(q, part.keys, part.values, 0.0, False, attn_mask=masks.own(part.bias, rows, group, queries),
                      scale=scale)
    return lse[..., None], out


class CpuMasks:
    """One pass's attention masks in the layout the CPU kernel takes, made once for all layers:
    every layer's parts carry the same biases, and expanding them to (rows × group, span) is a
    copy that would otherwise be made twice per layer."""

    def __init__(self) -> None:
        self.made: dict[tuple, tuple[torch.Tensor, Any]] = {}

    def _once(self, bias: torch.Tensor, key: tuple, make: Callable[[], Any]) -> Any:
        entry = self.made.get((id(bias), *key))
        if entry is None or entry[0] is not bias:  # the bias itself is kept, so its id stays its own
            entry = self.made[(id(bias), *key)] = (bias, make())
        return entry[1]

    def shared(self, bias: torch.Tensor, rows: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the prefix pool's mask (1, 1, rows × group, P), which rows see any prefix at all)."""
        span = bias.shape[-1]
        return self._once(bias, ("shared", rows, group), lambda: (
            bias[:, None, :].expand(rows, group, span).reshape(1, 1, rows * group, span),
            torch.isfinite(bias).any(-1)[:, None, None, None]))

    def own(self, bias: torch.Tensor, rows: int, group: int, queries: int) -> torch.Tensor:
        """Each row's own mask (rows, 1, group, S), its queries repeated for each head of a group."""
        span = bias.shape[-1]
        return self._once(bias, ("own", rows, group, queries), lambda: bias[:, None, None].expand(
            rows, 1, group // queries, queries, span).reshape(rows, 1, group, span))


def matmul32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over the last two dimensions, in float32.

    On CUDA, half-precision inputs go to cuBLAS as they are and only the product is float32
    (`out_dtype`): casting the cache itself would read and write it once more per step.
    """
    if a.device.type != "cuda" or a.dtype == torch.float32:
        return torch.matmul(a.float(), b.float())
    lead = a.shape[:-2]
    product = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
    return product.view(*lead, *product.shape[-2:])


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """softmax over the union of the parts' keys, from each part's (log-sum-exp, output): each
    output weighed by its part's share of the whole sum, softmax over the log-sum-exps."""
    if len(parts) == 1:
        return parts[0][1]
    weights = torch.softmax(torch.stack([p[0] for p in parts]), 0)
    out = parts[0][1] * weights[0]
    for weight, part in zip(weights[1:], parts[1:]):
        out = out + part[1] * weight
    return out


# own(layer index, keys, values) -> the Part of each row's own keys for that layer. The caller
# decides where fresh keys go: into the rows' pages (decoding, prefilling a suffix) or into the
# prefix pool (prefilling a prefix).
OwnKeys = Callable[[int, torch.Tensor, torch.Tensor], "Part | PagedPart"]


class Decoder:
    """A Llama-family model's modules (FAMILIES), run by `run` over the shared and own parts.

    layer_kernels: on CUDA, run the layers' small steps — residual add and RMSNorm, rotary
    embedding, the MLP's activation, the merge of the two attention parts — as the fused Triton
    kernels of layer_kernels.py and paged_attention.py (about 12 kernels a layer instead of 60);
    off, transformers' own modules (the CPU always)."""

    def __init__(self, model: Any, *, layer_kernels: bool = True):
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
        self.head_norms = hasattr(attention, "q_norm") and hasattr(attention, "k_norm")
        self.layer_count = len(self.layers)
        self.device, self.dtype = model.device, model.dtype
        self.layer_kernels = layer_kernels and self.device.type == "cuda"
        # SiLU(gate) × up as one kernel needs the activation to be SiLU and gate/up one product.
        mlp = self.layers[0].mlp
        self.kernel_mlp = (self.layer_kernels and getattr(config, "hidden_act", None) == "silu"
                           and getattr(mlp, "gate_up_proj", None) is not None)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token takes over all layers (keys and values)."""
        return 2 * self.layer_count * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def run(self, ids: torch.Tensor, positions: torch.Tensor, own: OwnKeys,
            shared: list[Part] | list[PrefixPart] | None, last: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocabulary) in float32 at each row's `last` position.

        ids, positions: (rows, queries). `shared`: the prefix pool's Part per layer, or None.
        """
        rows, queries = ids.shape
        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, positions)
        if self.layer_kernels:
            from .kernels import layer as kernels
            add_norm, rope = kernels.add_rms_norm, kernels.rotary
        elif self.device.type == "cpu":
            # The same arithmetic as the modules in fewer operations, which a CPU step of a few
            # rows pays for one by one: a norm as one call, rotary with its sign folded into sin.
            add_norm, rope = add_rms_norm_cpu, rotary_cpu
            cos, sin = cos[:, :, None], signed_sin(sin)[:, :, None]
        else:
            add_norm, rope = add_rms_norm_modules, rotary_modules
        masks = CpuMasks() if self.device.type == "cpu" else None  # only the CPU's attention reads them
        group = self.heads // self.kv_heads * queries
        delta = None
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            hidden, x = add_norm(hidden, delta, layer.input_layernorm)
            q, k, v = project_qkv(attention, x)
            q = q.view(rows, queries, self.heads, self.head_dim)
            k = k.view(rows, queries, self.kv_heads, self.head_dim)
            if self.head_norms:  # Qwen 3: each head of q and of k normalised before rotary
                q, k = attention.q_norm(q), attention.k_norm(k)
            v = v.view(rows, queries, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = rope(q, k, cos, sin)  # (rows, heads, queries, head_dim), (rows, kv_heads, queries, head_dim)
            # Query head h reads kv head h // (heads / kv_heads), as transformers' repeat_kv does.
            q = q.reshape(rows, self.kv_heads, group, self.head_dim)
            out = self.attend(q, own(index, k, v), shared[index] if shared is not None else None, queries, masks)
            delta = attention.o_proj(out.view(rows, self.heads, queries, self.head_dim).transpose(1, 2)
                                     .reshape(rows, queries, -1))
            hidden, x = add_norm(hidden, delta, layer.post_attention_layernorm)
            delta = self.mlp(layer.mlp, x)
        hidden = hidden + delta
        picked = hidden[torch.arange(rows, device=hidden.device), last]
        return self.head(self.norm(picked)).float()

    def attend(self, q: torch.Tensor, mine: Part | PagedPart, theirs: Part | PrefixPart | None,
               queries: int, masks: CpuMasks | None = None) -> torch.Tensor:
        """Softmax attention over a row's own part and its prefix, in the model's dtype,
        (rows, kv_heads, group, head_dim)."""
        if self.layer_kernels and isinstance(mine, PagedPart):
            # The own part's kernel starts from the prefix part's state: the merge is free.
            if theirs is None:
                return paged_attention(q, mine, self.scale)[1].to(self.dtype)
            return paged_attention_after(q, mine, self.scale, attention_part(q, theirs, self.scale, queries))
        parts = [attention_part(q, mine, self.scale, queries, masks)]
        if theirs is not None:
            parts.append(attention_part(q, theirs, self.scale, queries, masks))
        return merge(parts).to(self.dtype)

    def mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """The MLP, as transformers' Llama MLP computes it: down(act(gate(x)) × up(x)), gate and
        up as one product where they are fused (projections.py)."""
        fused = getattr(mlp, "gate_up_proj", None)
        if fused is None:
            return mlp(x)
        gate, up = fused(x)
        if self.kernel_mlp:
            from .kernels.layer import silu_mul

            return mlp.down_proj(silu_mul(gate, up))
        return mlp.down_proj(mlp.act_fn(gate) * up)


def project_qkv(attention: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v of x: one product where they are fused (projections.py), else three."""
    fused = getattr(attention, "qkv_proj", None)
    if fused is not None:
        return fused(x)
    return attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)


def add_rms_norm_modules(hidden: torch.Tensor, delta: torch.Tensor | None,
                         norm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, norm(that)) through transformers' RMSNorm module."""
    if delta is not None:
        hidden = hidden + delta
    return hidden, norm(hidden)


def rotary_modules(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb over q (rows, queries, heads, dim) and k."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def add_rms_norm_cpu(hidden: torch.Tensor, delta: torch.Tensor | None,
                     norm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm_modules` with the norm as torch's one `rms_norm` call, which in float32
    gives the module's very numbers (tested) in one operation instead of seven."""
    if delta is not None:
        hidden = hidden + delta
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or hidden.dtype != torch.float32:
        return hidden, norm(hidden)
    return hidden, torch.nn.functional.rms_norm(hidden, hidden.shape[-1:], norm.weight, eps)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with the minus of rotate_half folded into its first half: rotate_half(x) · sin equals
    swap_halves(x) · signed_sin(sin) exactly (only signs move), in fewer operations a layer."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def rotary_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_modules` with cos (rows, queries, 1, dim) and sin from `signed_sin`, bit for bit."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
        return (x * cos + swapped * sin).transpose(1, 2)

    return rotate(q), rotate(k)
