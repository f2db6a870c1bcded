"""The per-row logits rules: what each row allows before the chooser draws its token.

Every rule is a pure function of the row's own settings, prompt and tokens, applied to its
logits before the Gumbel-max choice, so a row's text does not depend on the rows beside it.
The order, on each row's logits:

1. logit_bias — OpenAI's: added to the raw logits; a bias of -100 bans the token (-inf);
2. repetition_penalty — transformers' (`RepetitionPenaltyLogitsProcessor`): a token seen in the
   prompt or the new tokens has its logit divided by the penalty if positive, multiplied if not;
3. frequency_penalty and presence_penalty — OpenAI's: minus count × frequency, minus presence
   once the token has appeared among the new tokens;
4. DRY — llama.cpp's and koboldcpp's: minus multiplier × base^(n − allowed_length) for a token
   that would extend a repeat of n ≥ allowed_length tokens (the matches are found on the host,
   `dry_penalties`);
5. the end of turn at -inf before min_new_tokens;
6. temperature, then top-k and top-p (the warpers' rules), then min_p (transformers'
   `MinPLogitsWarper`: tokens under min_p × the top token's probability dropped).

Rules a row does not use leave its logits exactly as they were (x / 1, x − 0, + 0). None of the
tensor functions synchronises with the host, so they run inside a captured CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch

BAN = -100.0  # a logit_bias that bans its token


def forbid_early_end(logits: torch.Tensor, end_ids: torch.Tensor, generated: torch.Tensor,
                     min_new: torch.Tensor) -> None:
    """In place: the end-of-turn ids at -inf in the rows that have fewer than `min_new` new tokens."""
    early = (generated < min_new)[:, None]
    logits[:, end_ids] = logits[:, end_ids].masked_fill(early, float("-inf"))


# top-k / top-p, per row.
#
# transformers' TopKLogitsWarper and TopPLogitsWarper take one value for the whole batch; the
# engine's slots each keep their own (a server's requests differ). These masks follow the
# warpers' rules exactly (tests compare them): top-k drops scores below the k-th largest, top-p
# drops the smallest tokens whose cumulative probability stays <= 1 - p, always keeping the best.


def top_k_top_p_mask(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`scores` (rows, vocabulary) with the tokens outside each row's top-k and top-p at -inf.

    top_k: (rows,) int64, 0 = off; top_p: (rows,) float, 1.0 = off. One sort serves both, and
    nothing synchronises with the host, so it runs inside a CUDA graph.
    """
    vocabulary = scores.shape[-1]
    ascending, order = scores.sort(dim=-1)
    keep = torch.where(top_k > 0, top_k.clamp(1, vocabulary), torch.full_like(top_k, vocabulary))
    kth_largest = ascending.gather(1, (vocabulary - keep)[:, None])
    ascending = ascending.masked_fill(ascending < kth_largest, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p.to(cumulative.dtype))[:, None]
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def min_p_mask(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`scores` (rows, vocabulary; tempered) with each row's tokens under min_p × its top token's
    probability at -inf. min_p: (rows,), 0 = off. The top token always stays."""
    probs = scores.softmax(dim=-1)
    floor = min_p.to(probs.dtype)[:, None] * probs.amax(dim=-1, keepdim=True)
    return scores.masked_fill(probs < floor, float("-inf"))


def apply_bias_and_penalties(logits: torch.Tensor, bias_ids: torch.Tensor, bias_values: torch.Tensor,
                             counts: torch.Tensor, prompt_seen: torch.Tensor, repetition: torch.Tensor,
                             frequency: torch.Tensor, presence: torch.Tensor, dry_ids: torch.Tensor,
                             dry_values: torch.Tensor) -> torch.Tensor:
    """Rules 1–4 on `logits` (rows, vocabulary), float32; returns the new logits.

    bias_ids/bias_values (rows, K): each row's biased tokens (unused entries: token 0, bias 0;
    a ban is -inf); counts (rows, vocabulary): each token's count among the new tokens;
    prompt_seen (rows, vocabulary) bool: the tokens of the prompt; repetition, frequency,
    presence (rows,): 1, 0, 0 are off; dry_ids/dry_values (rows, D): each row's DRY penalties."""
    logits = logits.float().scatter_add(1, bias_ids, bias_values)
    seen = prompt_seen | (counts > 0)
    penalty = repetition[:, None]
    logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    logits = logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]
    return logits.scatter_add(1, dry_ids, -dry_values)


def bias_entries(logit_bias: Sequence[tuple[int, float]], width: int) -> tuple[list[int], list[float]]:
    """A row's logit_bias as `width` (token, bias) entries for the device: -100 as -inf, padded with
    (0, 0.0)."""
    ids = [token for token, _ in logit_bias] + [0] * (width - len(logit_bias))
    values = [float("-inf") if bias <= BAN else float(bias) for _, bias in logit_bias] + [0.0] * (width - len(logit_bias))
    return ids, values


# DRY ("Don't Repeat Yourself"), as llama.cpp and koboldcpp define it. Written here, on the host:
# finding every earlier occurrence of the context's tail is a string search per row, which no
# tensor library offers, and it touches a few hundred tokens a row, not the vocabulary.

DRY_MAX_EXPONENT = 64.0  # past this the penalty is already far beyond any logit


def dry_penalties(context: Sequence[int], multiplier: float, base: float, allowed_length: int,
                  breakers: Collection[int]) -> dict[int, float]:
    """token -> the amount DRY subtracts from its logit, for the row whose tokens so far are
    `context` (prompt and new tokens).

    For each earlier position i where the context's last token occurs, the match length n is how
    many tokens ending at i equal the tokens ending at the context's end; emitting the token that
    followed i would repeat that sequence once more, so it is penalised multiplier ×
    base^(n − allowed_length) when n ≥ allowed_length (the longest match per token counts). A
    match never runs across a breaker token, and a breaker is never penalised."""
    if not multiplier or len(context) < 2:
        return {}
    last = len(context) - 1
    if context[last] in breakers:
        return {}
    longest: dict[int, int] = {}
    for i in range(last - 1, -1, -1):
        if context[i] != context[last]:
            continue
        following = context[i + 1]
        if following in breakers:
            continue
        n = 1
        while n <= i and context[i - n] == context[last - n] and context[last - n] not in breakers:
            n += 1
        if n > longest.get(following, 0):
            longest[following] = n
    return {token: multiplier * base ** min(n - allowed_length, DRY_MAX_EXPONENT)
            for token, n in longest.items() if n >= allowed_length}


def dry_entries(penalties: dict[int, float], width: int) -> tuple[list[int], list[float]]:
    """The `width` largest DRY penalties as (token, amount) entries for the device, padded with
    (0, 0.0)."""
    top = sorted(penalties.items(), key=lambda item: -item[1])[:width]
    return ([t for t, _ in top] + [0] * (width - len(top)),
            [min(v, math.inf) for _, v in top] + [0.0] * (width - len(top)))
