"""Decode attention over the prefix pool on CUDA: each prefix read once per tile of rows.

The shared part of Hydragen's decomposition (decoder.py): every row's query against its own
prefix — a persona's system context and examples — kept once in the prefix pool. As matrix
products with a 0 / -inf bias this is some fifteen kernels per layer (products, bias, max, exp,
sums, casts); this kernel is one, and reads each row's prefix span straight from its start and
length (device tensors, so one captured graph serves every mix of prefixes).

One program per (tile of BLOCK_M stacked query rows, kv head): the tile's queries as one matrix
against the keys from the lowest start to the highest end among its rows, in blocks, with an
online softmax; a query only sees its own row's span. Rows of one persona sit next to each other
in the slots, so a tile usually reads one prefix, once for all its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefixPart:
    """The prefix pool as a CUDA decode step reads it.

    keys/values: (kv_heads, capacity, head_dim); starts/lengths: (rows,) each row's prefix span
    in the pool (length 0: the row has no prefix and sees nothing here).
    """

    keys: torch.Tensor
    values: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor


def prefix_attention(q: torch.Tensor, part: PrefixPart, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp (rows, kv_heads, group, 1), output (rows, kv_heads, group, head_dim)), float32,
    of one query per row (q: (rows, kv_heads, group, head_dim)) against its prefix span. A row
    without a prefix gets log-sum-exp -inf and output 0."""
    rows, kv_heads, group, head_dim = q.shape
    out = torch.empty((rows, kv_heads, group, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((rows, kv_heads, group, 1), dtype=torch.float32, device=q.device)
    if rows == 0:
        return lse, out
    import triton

    block_m = 64 if rows * group > 32 else 16
    _kernel()[(triton.cdiv(rows * group, block_m), kv_heads)](
        q, part.keys, part.values, part.starts, part.lengths, out, lse, scale, rows * group,
        q.stride(0), q.stride(1), q.stride(2), part.keys.stride(0), part.keys.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=64, num_warps=4)
    return lse, out


_compiled = None


def _kernel():
    """The Triton kernel, defined on first use (as paged_attention's): importing triton costs a
    second, and only CUDA decode steps (or the interpreter, in tests) need it."""
    global _compiled
    if _compiled is not None:
        return _compiled
    import triton
    import triton.language as tl

    @triton.jit
    def _prefix_decode(Q, K, V, Starts, Lengths, Out, Lse, scale, stacked,
                       stride_qr, stride_qh, stride_qg, stride_kh, stride_kn,
                       stride_or, stride_oh, stride_og, stride_lr, stride_lh,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        head = tl.program_id(1)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        valid = m < stacked
        row = m // GROUP
        g = m % GROUP
        in_dim = d < HEAD_DIM
        q = tl.load(Q + row[:, None] * stride_qr + head * stride_qh + g[:, None] * stride_qg + d[None, :],
                    mask=valid[:, None] & in_dim[None, :], other=0.0)
        start = tl.load(Starts + row, mask=valid, other=0)
        end = start + tl.load(Lengths + row, mask=valid, other=0)
        sees = end > start
        high = tl.max(tl.where(sees, end, 0), 0)
        # A tile where no row has a prefix reads [0, 0): a sentinel start would overflow the
        # positions of the loop's first block, which the compiled loop may load ahead of its test.
        low = tl.minimum(tl.min(tl.where(sees, start, 2147483647), 0), high)
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for first in range(low, high, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            readable = n < high
            at = head * stride_kh + n.to(tl.int64) * stride_kn
            mask = readable[:, None] & in_dim[None, :]
            k = tl.load(K + at[:, None] + d[None, :], mask=mask, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # float32, as the matrix-product path
            seen = (n[None, :] >= start[:, None]) & (n[None, :] < end[:, None])
            scores = tl.where(seen, scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            # A query whose span is not in this block yet has new_top -inf: subtract 0 instead, so
            # its weights stay exp(-inf) = 0 rather than NaN.
            safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)
            shrink = tl.exp(top - safe_top)
            weights = tl.exp(scores - safe_top[:, None])
            total = total * shrink + tl.sum(weights, 1)
            v = tl.load(V + at[:, None] + d[None, :], mask=mask, other=0.0)
            acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)
            top = new_top
        saw = total > 0
        o = Out + row[:, None] * stride_or + head * stride_oh + g[:, None] * stride_og + d[None, :]
        tl.store(o, acc / tl.where(saw, total, 1.0)[:, None], mask=valid[:, None] & in_dim[None, :])
        tl.store(Lse + row * stride_lr + head * stride_lh + g, tl.where(saw, top + tl.log(total), float("-inf")),
                 mask=valid)

    _compiled = _prefix_decode
    return _compiled
