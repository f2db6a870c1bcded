"""What the model would say next, and how temperature reshapes it: `personas explain`.

The numbers are the model's real logits at the position after the prompt (and after each token
of one greedy continuation), turned into softmax(logits / T) in float64. Temperature 0 is
greedy: all probability on the argmax. Entropy is over the full vocabulary, in nats.
Top-k/top-p are sampling filters, not part of the model's distribution, so they are not applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.load import LoadedModel
from ..model.tokens import token_text


@dataclass(frozen=True)
class TokenProb:
    """One token of a next-token distribution, with its probability at one temperature."""

    token: str  # the token's text, leading space included
    id: int
    prob: float


@dataclass(frozen=True)
class Distribution:
    """softmax(logits / T) at one position: its entropy and its likeliest tokens."""

    entropy: float  # nats, over the whole vocabulary
    top: list[TokenProb]  # by falling probability (for T = 0: by falling logit)


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float64; T = 0 gives the greedy one-hot."""
    logits = logits.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).double()
    return torch.softmax(logits / temperature, dim=-1)


def entropy(probs: torch.Tensor) -> float:
    return float(torch.special.entr(probs).sum())  # entr(p) = -p ln p, and 0 at p = 0


def distribution(logits: torch.Tensor, temperature: float, top_k: int, tokenizer) -> Distribution:
    probs = probabilities(logits, temperature)
    # At T = 0 every probability but one is 0: order by logit so the runners-up still show.
    order = torch.topk(logits.double() if temperature == 0 else probs, min(top_k, probs.shape[-1])).indices
    return Distribution(entropy(probs), [TokenProb(token_text(tokenizer, int(i)), int(i), float(probs[i]))
                                         for i in order])


@torch.inference_mode()
def greedy_logits(model: LoadedModel, prompt_ids: Sequence[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """The logits at the position after the prompt and after each of `steps` greedy tokens, and
    those greedy tokens. One forward pass for the prompt, then one per token, with a KV cache."""
    from transformers import DynamicCache

    net = model.model
    cache = DynamicCache(config=net.config)
    ids = torch.tensor([list(prompt_ids)], device=net.device)
    out = net(input_ids=ids, cache=cache, use_cache=True)
    logits = [out.logits[0, -1].float().cpu()]
    chosen: list[int] = []
    for _ in range(steps):
        chosen.append(int(logits[-1].argmax()))
        if chosen[-1] in model.eos_ids:  # the turn is over: nothing follows
            break
        out = net(input_ids=torch.tensor([[chosen[-1]]], device=net.device), cache=cache, use_cache=True)
        logits.append(out.logits[0, -1].float().cpu())
    return logits, chosen


@torch.inference_mode()
def logits_after(model: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    net = model.model
    out = net(input_ids=torch.tensor([list(ids)], device=net.device))
    return out.logits[0, -1].float().cpu()


def explain(model: LoadedModel, prompt_ids: Sequence[int], temperatures: Sequence[float], top_k: int,
            steps: int) -> list[dict]:
    """One object per temperature: the first token's distribution, then `steps` more along the
    greedy continuation (the same tokens at every temperature: greedy ignores T)."""
    logits, chosen = greedy_logits(model, prompt_ids, steps)
    tokenizer = model.tokenizer
    report = []
    for t in temperatures:
        first = distribution(logits[0], t, top_k, tokenizer)
        following = []
        for k, step_logits in enumerate(logits[1:], start=1):
            d = distribution(step_logits, t, top_k, tokenizer)
            following.append({"step": k + 1, "after": model.decode(chosen[:k]), "entropy": d.entropy,
                              "top": [vars(p) for p in d.top]})
        report.append({"temperature": t, "entropy": first.entropy, "top": [vars(p) for p in first.top],
                       "steps": following})
    return report
