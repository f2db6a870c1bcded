"""Choosing each row's next token: temperature, top-k/top-p, and noise keyed by the row's seed.

At every step a row draws ONE uniform number from a counter-based generator keyed by
(row seed, step), and picks the token where that number falls in the cumulative distribution
softmax(logits / T) (after top-k/top-p). No shared random stream is advanced, so a row's random
numbers do not depend on which other rows share its batch, on the batch size, or on the device.
Temperature 0 rows take the argmax. Top-k/top-p reuse transformers' own warpers.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from .grid import Settings

# --- a counter-based uniform per (seed, step) ----------------------------------------------------
#
# torch's generators are per-device streams, and one generator per row would mean one kernel
# launch per row per step. Instead, hash (seed, step) with a 32-bit integer mixer evaluated in
# int64 so it is exact on every device: products are kept below 2**63 by splitting the
# multiplicand into 16-bit halves.

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for 0 <= x < 2**32, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    cross = ((lo * (m >> 16) + hi * (m & 0xFFFF)) & 0xFFFF) << 16
    return (lo * (m & 0xFFFF) + cross) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mixer (the 'lowbias32' constants from Chris Wellons' hash prospector)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per seed, a pure function of (seed, step).

    `step` may be a one-element device tensor, so a captured CUDA graph can advance it.
    """
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    steps = step.expand_as(seeds) if isinstance(step, torch.Tensor) else torch.full_like(seeds, step)
    h = _mix32(lo ^ _mix32(hi ^ _mix32(steps & _MASK32)))
    a = _mix32(h ^ 0x5BD1E995) >> 5  # 27 bits
    b = _mix32(h ^ 0x1B873593) >> 6  # 26 bits
    return (a * 67108864 + b).double() / 9007199254740992.0  # (a·2**26 + b) / 2**53


class TokenChooser:
    """Each row's next token from its scores: temperature, top-k/top-p, one counter uniform.

    Pure tensor code with no host synchronisation, so it also runs inside a CUDA graph.
    """

    def __init__(self, temperatures: torch.Tensor, seeds: torch.Tensor, settings: Settings):
        self.greedy = temperatures == 0
        self.divisor = torch.where(self.greedy, torch.ones_like(temperatures), temperatures)[:, None]
        self.seeds = seeds
        self.warpers = LogitsProcessorList()
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor,
                 step: int | torch.Tensor) -> torch.Tensor:
        logits = self.warpers(input_ids, scores.float() / self.divisor)
        cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
        target = counter_uniform(self.seeds, step).to(cdf.dtype) * cdf[:, -1]
        sampled = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
        sampled = sampled.clamp_(max=scores.shape[-1] - 1)
        return torch.where(self.greedy, scores.argmax(dim=-1), sampled)
