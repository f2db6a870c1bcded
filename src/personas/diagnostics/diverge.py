"""Where the samples of one cell part ways (`generate --diverge`).

The samples of a persona × prompt × temperature cell start from the same prompt; they agree
token for token until the first position where one of them drew something else. That
position, the text they share before it, and the tokens drawn there — with the probability
the model gave each, softmax(logits / T) at that point — show the branching that temperature
caused. A sample that ended its turn there counts as drawing the end-of-turn token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..model.load import LoadedModel
from ..sampling.grid import Sample
from ..model.tokens import token_text
from .distributions import logits_after, probabilities

END_OF_TURN = "(end of turn)"
RUNNERS_UP = 3  # tokens no sample drew, shown for scale


@dataclass(frozen=True)
class Divergence:
    """Where the samples of one persona × prompt × temperature cell first part, and what they drew there."""

    persona: str
    prompt: str
    temperature: float
    n: int
    position: int | None  # index among the new tokens (from 0); None: all samples are identical
    prefix: str  # the text every sample shares before that position
    alternatives: list[dict]  # {token, id, prob, count}: what the samples drew there (count > 0),
    #                           then the likeliest tokens none drew (count 0), by falling prob


def first_branch(sequences: Sequence[Sequence[int]]) -> int | None:
    """The first index where the sequences differ (a shorter one differs where it ends)."""
    if len(sequences) < 2:
        return None
    for i in range(max(len(s) for s in sequences)):
        if len({s[i] if i < len(s) else None for s in sequences}) > 1:
            return i
    return None


def divergence(model: LoadedModel, samples: Sequence[Sample]) -> Divergence:
    """The branching of one cell's samples (all from one persona, prompt and temperature)."""
    row = samples[0].row
    tokens = [list(s.token_ids) for s in samples]
    position = first_branch(tokens)
    base = Divergence(row.persona, row.prompt, row.temperature, len(samples), position, "", [])
    if position is None:
        return replace(base, prefix=model.decode(tokens[0]))
    prefix = tokens[0][:position]
    eos = model.eos_ids[0]
    drawn = Counter(t[position] if position < len(t) else eos for t in tokens)
    probs = probabilities(logits_after(model, [*row.prompt_ids, *prefix]), row.temperature)
    runners_up = [int(i) for i in probs.topk(len(drawn) + RUNNERS_UP).indices if int(i) not in drawn][:RUNNERS_UP]
    alternatives = [
        {"token": END_OF_TURN if i == eos and i in drawn else token_text(model.tokenizer, i), "id": i,
         "prob": float(probs[i]), "count": drawn.get(i, 0)}
        for i in [*drawn, *runners_up]
    ]
    alternatives.sort(key=lambda a: (a["count"] == 0, -a["prob"]))
    return replace(base, prefix=model.decode(prefix), alternatives=alternatives)


def divergences(model: LoadedModel, samples: Sequence[Sample]) -> list[Divergence]:
    """One per cell with at least two samples, in the order cells first appear."""
    cells: dict[tuple, list[Sample]] = {}
    for s in samples:
        cells.setdefault((s.row.persona, s.row.prompt, s.row.temperature, s.row.id), []).append(s)
    return [divergence(model, sorted(group, key=lambda s: s.row.sample))
            for group in cells.values() if len(group) > 1]
