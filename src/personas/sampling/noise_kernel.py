"""The Gumbel-max choice on CUDA as one Triton kernel: noise made, added and reduced in registers.

chooser.py's `noisy_argmax` makes the noise as ~25 elementwise torch operations over (rows ×
vocabulary) int64 and float64 tensors, each one a pass through GPU memory: at 512 rows of a
128,256-token vocabulary each pass moves about a gigabyte, and the choice costs milliseconds a
step (docs/performance.md). This kernel computes the very same numbers — the same integer hash in
int64, the same uniform, the same float64 logarithms, the same sum with the tempered score — for
a block of the vocabulary at a time, and writes only each block's best score and its token; a
torch reduction over the few blocks then picks each row's token. Equal scores keep the lowest
token id, as `argmax` does, so the choice is the torch path's token for token (tested on a GPU).
"""

from __future__ import annotations

import torch

# The vocabulary a program reduces. Big enough that the second reduction is small (32 blocks of a
# 128k vocabulary), small enough that a 16-row step still fills the GPU.
BLOCK = 4096


def fused_noisy_argmax(tempered: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                       salts: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of tempered (rows, vocabulary) float32 + the Gumbel noise of
    chooser.counter_uniform under the rows' keys (`first`, `second`: chooser.row_keys), per row."""
    best, at = _run(tempered, first, second, salts, None)
    # Blocks are in token order: the first block holding the row's best score holds its lowest token.
    return at.gather(1, best.argmax(dim=1, keepdim=True))[:, 0]


def fused_noisy_scores(tempered: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                       salts: torch.Tensor) -> torch.Tensor:
    """The (rows, vocabulary) float64 scores the kernel reduces, written out: what tests compare
    with the torch path's noise + tempered, bit for bit."""
    scores = torch.empty(tempered.shape, dtype=torch.float64, device=tempered.device)
    _run(tempered, first, second, salts, scores)
    return scores


def _run(tempered, first, second, salts, scores):
    import triton

    rows, vocabulary = tempered.shape
    blocks = triton.cdiv(vocabulary, BLOCK)
    best = torch.empty((rows, blocks), dtype=torch.float64, device=tempered.device)
    at = torch.empty((rows, blocks), dtype=torch.int64, device=tempered.device)
    if rows:
        _kernel()[(rows, blocks)](tempered, first, second, salts, best, at, best if scores is None else scores,
                                  vocabulary, tempered.stride(0), BLOCK=BLOCK, WRITE_SCORES=scores is not None,
                                  num_warps=8)
    return best, at


_compiled = None


def _kernel():
    """Defined on first use, as the engine's kernels are: importing triton costs a second."""
    global _compiled
    if _compiled is not None:
        return _compiled
    import triton
    import triton.language as tl

    @triton.jit
    def _noisy_block_max(Tempered, First, Second, Salts, Best, At, Scores, vocabulary, stride_row,
                         BLOCK: tl.constexpr, WRITE_SCORES: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        token = block * BLOCK + tl.arange(0, BLOCK)
        inside = token < vocabulary
        first = tl.load(First + row)
        second = tl.load(Second + row)
        salt = tl.load(Salts + token, mask=inside, other=0)
        # chooser.counter_uniform: 32 high bits, 20 low bits, the last bit 1; u = k / 2**53.
        # (chooser.mix32 written out: a jitted helper defined here would not be found by name.)
        # In int64 as there: every product stays below 2**63, so it is exact.
        high = first ^ salt
        high = high ^ (high >> 16)
        high = (high * 0x21F0AAAD) & 0xFFFFFFFF
        high = high ^ (high >> 15)
        high = (high * 0x735A2D97) & 0xFFFFFFFF
        high = high ^ (high >> 15)
        low = (((high ^ second) * 0x2C1B3C6D) & 0xFFFFFFFF) >> 12
        k = (high << 21) | (low << 1) | 1
        u = k.to(tl.float64) * (2.0 ** -53)
        noise = -tl.log(-tl.log(u))
        score = noise + tl.load(Tempered + row.to(tl.int64) * stride_row + token, mask=inside,
                                other=float("-inf")).to(tl.float64)
        score = tl.where(inside, score, float("-inf"))
        if WRITE_SCORES:
            tl.store(Scores + row.to(tl.int64) * vocabulary + token, score, mask=inside)
        best, index = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
        blocks = tl.num_programs(1)
        tl.store(Best + row * blocks + block, best)
        tl.store(At + row * blocks + block, block * BLOCK + index.to(tl.int64))

    _compiled = _noisy_block_max
    return _compiled
