"""Choosing each row's next token: temperature, the rules' masks (rules.py), and noise keyed by
the row's seed.

The rule is Gumbel-max ("the exponential race"): the token is

    argmax over the vocabulary of  logits / T + g(row seed, step, token id)

where g is Gumbel noise, -log(-log u), and u is a uniform number that is a pure function of
(row seed, step, token id): a counter-based integer hash, not a stateful generator. Taking the
argmax of Gumbel-perturbed logits draws exactly from softmax(logits / T); top-k and top-p are
masks (-inf) applied before it, and temperature 0 takes the plain argmax.

Why this rule: the logits of one row differ by ~1e-5 from one batch to another (other rows
change the kernels' summation order). Inverse-CDF sampling (one uniform per step, located in the
cumulative distribution) flips whenever that uniform lands within ~1e-5 of any of the
vocabulary's tens of thousands of boundaries; Gumbel-max flips only when the two best noisy
scores are within ~1e-5 of each other. The noise is keyed by token id, never by rank, so a
near-tie that swaps two tokens' order does not swap their noise.

The uniform has 53 bits and the logarithms are taken in float64: a float32 exponential never
goes below 2**-24, which caps the Gumbel noise near 16.6 and starves the far tail of the
vocabulary; here the exponential reaches down to 2**-53 and the cap is near 36.7.
"""

from __future__ import annotations

import torch

from . import noise_cpu
from .grid import Settings
from .rules import min_p_mask, top_k_top_p_mask

# --- counter-based noise -----------------------------------------------------------------------
#
# torch's generators are per-device streams, and one generator per row would mean one kernel
# launch per row per step. Instead, hash (seed, step, token id) with a 32-bit integer mixer
# evaluated in int64 so that it is exact on every device: values stay below 2**32 and both
# multipliers below 2**31, so no product reaches 2**63.

MASK32 = 0xFFFFFFFF
_TOKEN_SALT = 0x632BE5AB  # any constant: it only decorrelates token ids from (seed, step) keys
_SECOND_KEY = 0x5BD1E995


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mixer ('lowbias32' from Chris Wellons' hash prospector), in place.

    `x` holds values in [0, 2**32) as int64; it is overwritten and returned.
    """
    x.bitwise_xor_(x >> 16)
    x.mul_(0x21F0AAAD).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 15)


def row_keys(seeds: torch.Tensor, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent 32-bit keys per row for this step, from the row's 63-bit seed.

    `step` may be a one-element device tensor, so a captured CUDA graph can advance it.
    """
    steps = step.expand_as(seeds) if isinstance(step, torch.Tensor) else torch.full_like(seeds, step)
    first = mix32((seeds & MASK32) ^ mix32(((seeds >> 32) & MASK32) ^ mix32(steps & MASK32)))
    return first, mix32(first ^ _SECOND_KEY)


def token_salts(vocab: int, device: torch.device) -> torch.Tensor:
    """Each token id hashed once: what makes one row's noise differ from token to token."""
    return mix32(torch.arange(vocab, dtype=torch.long, device=device) + _TOKEN_SALT)


# On the CPU one pass of C makes the uniforms (noise_cpu.py); False keeps the torch operations
# there too (benchmarks compare the two).
C_UNIFORMS_ON_CPU = True


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """(rows, vocabulary) float64 uniforms in (0, 1), each a pure function of (seed, step, token id).

    An odd 53-bit integer k: its high 32 bits a full mix of the token's salt under the row's
    first key; the next 20 bits a multiplicative hash of that under the second key (they only
    place u within its 2**-32 step, where a cheaper hash does as well and costs a third of a
    mix); the last bit 1. u = k / 2**53 is exact in float64 and lies strictly between 0 and 1.
    Distinct rows, steps and tokens give unrelated numbers; the same ones give the same number
    on any batch, device or machine.
    """
    first, second = row_keys(seeds, step)
    if salts.device.type == "cpu" and C_UNIFORMS_ON_CPU:
        made = noise_cpu.counter_uniform(first, second, salts)  # the same numbers, in one pass
        if made is not None:
            return made
    return uniform_from_keys(first, second, salts)


def uniform_from_keys(first: torch.Tensor, second: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """counter_uniform's numbers from the rows' keys, as torch operations (any device)."""
    high = mix32(first[:, None] ^ salts[None, :])
    low = (high ^ second[:, None]).mul_(0x2C1B3C6D).bitwise_and_(MASK32).bitwise_right_shift_(12)
    return (high << 21).bitwise_or_(low << 1).bitwise_or_(1).double().mul_(2.0 ** -53)


def gumbel_noise(seeds: torch.Tensor, step: int | torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """-log(-log u) per (row, token), in float64."""
    return counter_uniform(seeds, step, salts).log_().neg_().log_().neg_()


# On the CPU the noise is made a block of the vocabulary at a time: its uniforms (one pass of C,
# noise_cpu.py), two logarithms, the sum and the maximum then stay in cache (docs/performance.md).
# The numbers, and so the argmax, are the same. A block spans about CPU_NOISE_ELEMENTS of (rows ×
# tokens), at least CPU_NOISE_BLOCK tokens: few rows take the vocabulary in one block, since each
# block's passes pay a fixed overhead, which at one row outweighs the cache.
CPU_NOISE_BLOCK = 8192
CPU_NOISE_ELEMENTS = 131072


# On CUDA one Triton kernel makes the same numbers and reduces them (noise_kernel.py); False
# keeps the torch operations there too (benchmarks compare the two).
FUSED_NOISE_ON_CUDA = True


def noisy_argmax(tempered: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor,
                 salts: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of tempered scores + Gumbel noise, per row."""
    vocabulary = tempered.shape[-1]
    if tempered.is_cuda and FUSED_NOISE_ON_CUDA and tempered.dtype == torch.float32 and tempered.is_contiguous():
        from .noise_kernel import fused_noisy_argmax

        first, second = row_keys(seeds, step)
        return fused_noisy_argmax(tempered, first, second, salts)
    width = max(CPU_NOISE_BLOCK, CPU_NOISE_ELEMENTS // max(1, tempered.shape[0]))
    if tempered.device.type != "cpu":
        return gumbel_noise(seeds, step, salts).add_(tempered).argmax(dim=-1)
    # The scores are widened to float64 before the sum: the same sum as float32 added to float64,
    # where torch's addition of mixed types is several times slower on the CPU.
    if vocabulary <= width:
        return gumbel_noise(seeds, step, salts).add_(tempered.double()).argmax(dim=-1)
    best = index = None
    for start in range(0, vocabulary, width):
        block = slice(start, start + width)
        values, at = gumbel_noise(seeds, step, salts[block]).add_(tempered[:, block].double()).max(dim=-1)
        if best is None:
            best, index = values, at
        else:  # strictly greater: the first of equal maxima wins, as in argmax
            better = values > best
            best, index = torch.where(better, values, best), torch.where(better, at + start, index)
    return index


def choose(scores: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor,
           salts: torch.Tensor, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
           min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's next token: greedy where its temperature is 0, else Gumbel-max over
    logits / T with its top-k/top-p masks, then its min_p mask (pass none of them to skip the
    sort and softmax they need)."""
    greedy = temperatures == 0
    divisor = torch.where(greedy, torch.ones_like(temperatures), temperatures)[:, None]
    tempered = scores.float() / divisor
    if top_k is not None or top_p is not None:
        top_k = top_k if top_k is not None else torch.zeros_like(seeds)
        top_p = top_p if top_p is not None else torch.ones_like(temperatures)
        tempered = top_k_top_p_mask(tempered, top_k, top_p)
    if min_p is not None:
        tempered = min_p_mask(tempered, min_p)
    if scores.device.type == "cpu":  # no graph here to keep free of host synchronisation
        if bool(greedy.all()):  # the noise would be thrown away: skip making it
            return scores.argmax(dim=-1)
        if not bool(greedy.any()):
            return noisy_argmax(tempered, seeds, step, salts)
    return torch.where(greedy, scores.argmax(dim=-1), noisy_argmax(tempered, seeds, step, salts))


def token_logprobs(logits: torch.Tensor, temperatures: torch.Tensor, chosen: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each row's chosen token's log-probability, its k likeliest tokens' log-probabilities,
    their ids) under softmax(logits / T), the distribution `choose` draws from before top-k/top-p
    (those are filters, not the model's distribution). A row at T = 0 gets the greedy one-hot:
    0 for its chosen token, -inf elsewhere, its top ordered by logit. No host synchronisation.
    """
    greedy = temperatures == 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperatures), temperatures)[:, None]
    logprobs = scaled.log_softmax(dim=-1)
    top_ids = scaled.topk(k, dim=-1).indices
    top = logprobs.gather(1, top_ids)
    picked = logprobs.gather(1, chosen[:, None])[:, 0]
    one_hot = torch.where(top_ids == chosen[:, None], 0.0, float("-inf"))
    return (torch.where(greedy, torch.zeros_like(picked), picked), torch.where(greedy[:, None], one_hot, top),
            top_ids)


class TokenChooser:
    """The rows of one batch sharing one Settings: `choose` with the salts made once.

    Pure tensor code with no host synchronisation, so it also runs inside a CUDA graph (the
    token salts are made on the first call, which the graph path makes eagerly before capture).
    """

    def __init__(self, temperatures: torch.Tensor, seeds: torch.Tensor, settings: Settings):
        self.temperatures, self.seeds = temperatures, seeds
        self.greedy = temperatures == 0
        self.top_k = torch.full_like(seeds, settings.top_k) if settings.top_k else None
        self.top_p = (torch.full_like(temperatures, settings.top_p)
                      if settings.top_p is not None and settings.top_p < 1.0 else None)
        self.salts: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor,
                 step: int | torch.Tensor) -> torch.Tensor:
        if self.salts is None or self.salts.shape[0] != scores.shape[-1]:
            self.salts = token_salts(scores.shape[-1], scores.device)
        return choose(scores, self.temperatures, self.seeds, step, self.salts, self.top_k, self.top_p)
