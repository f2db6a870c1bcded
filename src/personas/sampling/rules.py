"""The per-row logits rules: what each row allows before the chooser draws its token.

Every rule is a pure function of the row's own settings and tokens, applied to its logits as
-inf masks (or additions) before the Gumbel-max choice, so a row's text does not depend on the
rows beside it. Order: the end of turn is forbidden before min_new_tokens (on the raw logits),
then temperature, then top-k/top-p (on the tempered scores).

None of these synchronises with the host, so they run inside a captured CUDA graph.
"""

from __future__ import annotations

import torch


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


