"""Encoding a chunk's prompts once where they repeat: the prompt work shared between rows.

A grid repeats each prompt temperatures × n times, and rows of one persona (a prompts file, a
game's turn) share its system context and examples. Two ways to encode shared text once:

* distinct prompts: rows with identical prompts share one prefill of it (all but the last
  token), copied to each of them;
* a common prefix: rows whose prompts differ but start alike (the same persona) share one
  prefill of that start. Their ids are laid out as [prefix][padding][rest], so the prefix sits
  in the same columns of every row; positions come from the attention mask, so the padding in
  the middle changes nothing but the columns.

`plan_sharing` picks the one that saves more prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...sampling.grid import Row
from ..job import common_prefix


def padded(rows: Sequence[Row], chunk: list[int], pad_id: int, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): each row as [its first `prefix` tokens][padding][the rest],
    so the rest ends in the last column, where generation starts. `prefix = 0` is plain
    left padding."""
    rests = [rows[i].prompt_ids[prefix:] for i in chunk]
    width = prefix + max(len(rest) for rest in rests)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(chunk), width), dtype=torch.long)
    for r, (i, rest) in enumerate(zip(chunk, rests)):
        if prefix:
            input_ids[r, :prefix] = torch.tensor(rows[i].prompt_ids[:prefix])
            attention[r, :prefix] = 1
        input_ids[r, width - len(rest):] = torch.tensor(rest)
        attention[r, width - len(rest):] = 1
    return input_ids, attention


def left_padded(rows: Sequence[Row], chunk: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return padded(rows, chunk, pad_id)


def distinct_prompts(rows: Sequence[Row], chunk: list[int]) -> tuple[list[int], list[int]]:
    """(the first chunk position of each distinct prompt, each row's index among them)."""
    distinct = list(dict.fromkeys(rows[i].prompt_ids for i in chunk))
    firsts = [next(r for r, i in enumerate(chunk) if rows[i].prompt_ids == p) for p in distinct]
    return firsts, [distinct.index(rows[i].prompt_ids) for i in chunk]


@dataclass(frozen=True)
class Sharing:
    """How a chunk's prompt work is shared: not at all, per distinct prompt, or a common prefix."""

    kind: str  # "none" | "distinct" | "prefix"
    prefix: int = 0  # for "prefix": the shared tokens


def plan_sharing(rows: Sequence[Row], chunk: list[int]) -> Sharing:
    """The strategy that encodes fewer prompt tokens (ties: distinct prompts, the older one)."""
    prompts = [rows[i].prompt_ids for i in chunk]
    if len(chunk) < 2:
        return Sharing("none")
    firsts, _ = distinct_prompts(rows, chunk)
    by_distinct = sum(len(p) - 1 for p in prompts) - sum(len(prompts[f]) - 1 for f in firsts)
    prefix = common_prefix(prompts)
    by_prefix = (len(chunk) - 1) * prefix
    if by_prefix > by_distinct:
        return Sharing("prefix", prefix)
    return Sharing("distinct") if by_distinct > 0 else Sharing("none")


def shared_cache(model: Any, rows: Sequence[Row], chunk: list[int], sharing: Sharing,
                 input_ids: torch.Tensor, attention: torch.Tensor) -> Any | None:
    """A KV cache holding the shared prompt work for every row of the chunk (None: nothing
    shared); `generate` continues from it and encodes only the columns after it."""
    from transformers import DynamicCache

    if sharing.kind == "none":
        return None
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        if sharing.kind == "prefix":
            ids = input_ids[:1, :sharing.prefix].to(model.device)
            model(input_ids=ids, cache=cache, use_cache=True)
            cache.reorder_cache(torch.zeros(len(chunk), dtype=torch.long, device=model.device))
            return cache
        firsts, which = distinct_prompts(rows, chunk)
        ids, mask = input_ids[firsts, :-1].to(model.device), attention[firsts, :-1].to(model.device)
        # The same positions generate derives from the attention mask (pads get a dummy 1).
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache.reorder_cache(torch.tensor(which, device=model.device))
    return cache
