"""Decode attention over paged slot caches, reading each row only as far as its own length.

The engine keeps each row's own keys and values (its suffix and new tokens) in fixed-size pages
of one shared pool; a row's page table says which pages hold its positions, in order. A step's
own-part attention must read, for every row, exactly its own positions: a matrix product over a
padded (rows, span) cache reads every row to the longest one, which is what made ragged jobs
slow and sized every slot for the longest row (docs/performance.md).

torch has no attention that reads through a page table (SDPA and its flash kernels take dense
tensors; FlexAttention compiles a kernel per shape), so this is one small Triton kernel, in the
manner of flash-decoding: one program per (row, kv head) walks its row's pages in blocks, with
an online softmax, and returns the normalised output and the log-sum-exp the merge with the
shared part needs. It launches with device-side lengths and page tables, so one captured graph
serves every step whatever the rows' lengths.

On the CPU (and as the reference the kernel is tested against), `gather` copies the rows'
positions into a dense tensor for the ordinary attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pages import PAGE


@dataclass
class PagedPart:
    """Each row's own keys and values, read through its page table (CUDA decode steps).

    keys/values: (pages, PAGE, kv_heads, head_dim), the pool; table: (rows, width) page ids;
    lengths: (rows,) positions each row sees (≥ 1).
    """

    keys: torch.Tensor
    values: torch.Tensor
    table: torch.Tensor
    lengths: torch.Tensor


def flat_positions(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Index into the pool viewed as (pages × PAGE, …) of each row's `positions`.

    table: (rows, width); positions: (rows,) or (rows, n) -> the same shape as positions."""
    column = positions if positions.dim() == 2 else positions[:, None]
    pages = table.gather(1, torch.div(column, PAGE, rounding_mode="floor"))
    flat = pages.long() * PAGE + column % PAGE
    return flat if positions.dim() == 2 else flat[:, 0]


def gather(pool: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The pool's positions `at` (rows, span) — from `flat_positions` — as a dense
    (rows, kv_heads, span, head_dim)."""
    return pool.view(-1, *pool.shape[2:])[at].transpose(1, 2)


def gather_positions(pool: torch.Tensor, table: torch.Tensor, span: int) -> torch.Tensor:
    """The first `span` positions of each row as a dense (rows, kv_heads, span, head_dim)."""
    return gather(pool, flat_positions(table, torch.arange(span, device=table.device).expand(table.shape[0], span)))


def paged_attention(q: torch.Tensor, part: PagedPart, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp (rows, kv_heads, group, 1), output (rows, kv_heads, group, head_dim)), float32,
    of one query per row (q: (rows, kv_heads, group, head_dim)) against its own pages."""
    rows, kv_heads, group, head_dim = q.shape
    out = torch.empty((rows, kv_heads, group, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((rows, kv_heads, group, 1), dtype=torch.float32, device=q.device)
    _launch(q, part, scale, out, lse, None)
    return lse, out


def paged_attention_after(q: torch.Tensor, part: PagedPart, scale: float,
                          earlier: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention over the union of an earlier part — its (log-sum-exp, output), such as the
    prefix's — and each row's own pages, in q's dtype: the online softmax starts from the earlier
    part's state, so merging costs no kernels of its own."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # The kernel reads the earlier output with this output's strides: both contiguous, q's shape.
    assert earlier[1].shape == q.shape and earlier[1].is_contiguous()
    _launch(q, part, scale, out, earlier[0], earlier[1])
    return out


def _launch(q: torch.Tensor, part: PagedPart, scale: float, out: torch.Tensor, lse: torch.Tensor,
            earlier_out: torch.Tensor | None) -> None:
    import triton

    rows, kv_heads, group, head_dim = q.shape
    if rows == 0:
        return
    earlier = earlier_out is not None
    _kernel()[(rows, kv_heads)](
        q, part.keys, part.values, part.table, part.lengths, out, lse, earlier_out if earlier else out, scale,
        q.stride(0), q.stride(1), q.stride(2),
        part.keys.stride(0), part.keys.stride(1), part.keys.stride(2),
        part.table.stride(0), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE_SIZE=PAGE, BLOCK_N=64, EARLIER=earlier,
        num_warps=4)


_compiled = None


def _kernel():
    """The Triton kernel, defined on first use: importing triton costs a second, and only CUDA
    decode steps (or the interpreter, in tests) need it."""
    global _compiled
    if _compiled is not None:
        return _compiled
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(Q, K, V, Table, Lengths, Out, Lse, EarlierOut, scale,
                     stride_qr, stride_qh, stride_qg, stride_kp, stride_kt, stride_kh, stride_tr,
                     stride_or, stride_oh, stride_og, stride_lr, stride_lh,
                     GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, EARLIER: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        in_group = g < GROUP
        in_dim = d < HEAD_DIM
        q = tl.load(Q + row * stride_qr + head * stride_qh + g[:, None] * stride_qg + d[None, :],
                    mask=in_group[:, None] & in_dim[None, :], other=0.0)
        length = tl.load(Lengths + row)
        in_out = in_group[:, None] & in_dim[None, :]
        o = row * stride_or + head * stride_oh + g[:, None] * stride_og + d[None, :]
        if EARLIER:
            # Start from the earlier part's state: its maximum is its log-sum-exp and its
            # normalised output weighs 1 (0 where it saw nothing, log-sum-exp -inf).
            top = tl.load(Lse + row * stride_lr + head * stride_lh + g, mask=in_group, other=float("-inf"))
            total = tl.where(top == float("-inf"), 0.0, 1.0)
            acc = tl.load(EarlierOut + o, mask=in_out, other=0.0)
        else:
            top = tl.full([BLOCK_G], float("-inf"), tl.float32)
            total = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(0, length, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            seen = n < length
            page = tl.load(Table + row * stride_tr + n // PAGE_SIZE, mask=seen, other=0).to(tl.int64)
            at = page * stride_kp + (n % PAGE_SIZE) * stride_kt + head * stride_kh
            mask = seen[:, None] & in_dim[None, :]
            k = tl.load(K + at[:, None] + d[None, :], mask=mask, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # float32, as the matrix-product path
            scores = tl.where(seen[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            shrink = tl.exp(top - new_top)
            weights = tl.exp(scores - new_top[:, None])
            total = total * shrink + tl.sum(weights, 1)
            v = tl.load(V + at[:, None] + d[None, :], mask=mask, other=0.0)
            # Weights in [0, 1] in half precision, the product summed in float32: as matmul_part.
            acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)
            top = new_top
        tl.store(Out + o, (acc / total[:, None]).to(Out.dtype.element_ty), mask=in_out)
        if not EARLIER:
            tl.store(Lse + row * stride_lr + head * stride_lh + g, top + tl.log(total), mask=in_group)

    _compiled = paged_decode
    return _compiled
