"""What the model would say next, and how temperature reshapes it: `personas explain`.

The numbers are the model's real logits at the position after the prompt (and after each token
of one greedy continuation), turned into softmax(logits / T) in float64. Temperature 0 is
greedy: all probability on the argmax. Entropy is over the full vocabulary, in nats.
Top-k/top-p are sampling filters, not part of the model's distribution, so they are not applied;
the other logits rules (min_p, the penalties, logit_bias, DRY) are, when asked for: they change
what the model's distribution becomes, which is what `explain` shows — the greedy continuation
then follows the changed logits too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..engine.slot_rules import Dry
from ..model.load import LoadedModel
from ..model.tokens import token_text
from ..sampling.grid import Rules
from ..sampling.rules import apply_bias_and_penalties, bias_entries, dry_entries


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


def probabilities(logits: torch.Tensor, temperature: float, min_p: float = 0.0) -> torch.Tensor:
    """softmax(logits / T) in float64, tokens under min_p × the top probability dropped and the
    rest renormalised; T = 0 gives the greedy one-hot."""
    logits = logits.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).double()
    probs = torch.softmax(logits / temperature, dim=-1)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


class RuledLogits:
    """The logits after a row's rules 1–4 (sampling/rules.py), for one sequence on the CPU: what
    the engine computes for a row, given its prompt and the tokens chosen so far."""

    def __init__(self, rules: Rules | None, prompt_ids: Sequence[int], tokenizer, vocabulary: int):
        self.rules, self.prompt_ids = rules, list(prompt_ids)
        self.dry = Dry(tokenizer, vocabulary) if rules is not None and rules.dry else None

    def __call__(self, logits: torch.Tensor, chosen: Sequence[int]) -> torch.Tensor:
        rules = self.rules
        if rules is None or not rules.used:
            return logits
        vocabulary = logits.shape[-1]
        counts = torch.zeros(vocabulary)
        for token in chosen:
            counts[token] += 1
        seen = torch.zeros(vocabulary, dtype=torch.bool)
        seen[self.prompt_ids] = True
        bias_ids, bias_values = bias_entries(rules.logit_bias or (), max(1, len(rules.logit_bias or ())))
        dry = self.dry.of(self.prompt_ids + list(chosen), rules) if self.dry else {}
        dry_ids, dry_values = dry_entries(dry, max(1, len(dry)))

        def one(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor([values], dtype=dtype)

        return apply_bias_and_penalties(
            logits[None], one(bias_ids, torch.long), one(bias_values), counts[None], seen[None],
            torch.tensor([rules.repetition_penalty or 1.0]), torch.tensor([rules.frequency_penalty or 0.0]),
            torch.tensor([rules.presence_penalty or 0.0]), one(dry_ids, torch.long), one(dry_values))[0]


def entropy(probs: torch.Tensor) -> float:
    return float(torch.special.entr(probs).sum())  # entr(p) = -p ln p, and 0 at p = 0


def distribution(logits: torch.Tensor, temperature: float, top_k: int, tokenizer, min_p: float = 0.0) -> Distribution:
    probs = probabilities(logits, temperature, min_p)
    # At T = 0 every probability but one is 0: order by logit so the runners-up still show.
    order = torch.topk(logits.double() if temperature == 0 else probs, min(top_k, probs.shape[-1])).indices
    return Distribution(entropy(probs), [TokenProb(token_text(tokenizer, int(i)), int(i), float(probs[i]))
                                         for i in order])


@torch.inference_mode()
def greedy_logits(model: LoadedModel, prompt_ids: Sequence[int], steps: int,
                  ruled: RuledLogits | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """The logits at the position after the prompt and after each of `steps` greedy tokens
    (after the rules, when `ruled`), and those greedy tokens. One forward pass for the prompt,
    then one per token, with a KV cache."""
    ruled = ruled or RuledLogits(None, prompt_ids, model.tokenizer, 0)
    from transformers import DynamicCache

    net = model.model
    cache = DynamicCache(config=net.config)
    ids = torch.tensor([list(prompt_ids)], device=net.device)
    out = net(input_ids=ids, cache=cache, use_cache=True)
    logits = [ruled(out.logits[0, -1].float().cpu(), [])]
    chosen: list[int] = []
    for _ in range(steps):
        chosen.append(int(logits[-1].argmax()))
        if chosen[-1] in model.eos_ids:  # the turn is over: nothing follows
            break
        out = net(input_ids=torch.tensor([[chosen[-1]]], device=net.device), cache=cache, use_cache=True)
        logits.append(ruled(out.logits[0, -1].float().cpu(), chosen))
    return logits, chosen


@torch.inference_mode()
def logits_after(model: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    net = model.model
    out = net(input_ids=torch.tensor([list(ids)], device=net.device))
    return out.logits[0, -1].float().cpu()


def explain(model: LoadedModel, prompt_ids: Sequence[int], temperatures: Sequence[float], top_k: int,
            steps: int, rules: Rules | None = None) -> list[dict]:
    """One object per temperature: the first token's distribution, then `steps` more along the
    greedy continuation (the same tokens at every temperature: greedy ignores T); with `rules`
    (token ids resolved), the distributions after them."""
    vocabulary = model.model.get_output_embeddings().out_features
    logits, chosen = greedy_logits(model, prompt_ids, steps, RuledLogits(rules, prompt_ids, model.tokenizer, vocabulary))
    tokenizer = model.tokenizer
    min_p = (rules.min_p or 0.0) if rules is not None else 0.0
    report = []
    for t in temperatures:
        first = distribution(logits[0], t, top_k, tokenizer, min_p)
        following = []
        for k, step_logits in enumerate(logits[1:], start=1):
            d = distribution(step_logits, t, top_k, tokenizer, min_p)
            following.append({"step": k + 1, "after": model.decode(chosen[:k]), "entropy": d.entropy,
                              "top": [vars(p) for p in d.top]})
        report.append({"temperature": t, "entropy": first.entropy, "top": [vars(p) for p in first.top],
                       "steps": following})
    return report
