"""Each slot's logits rules (min_p, penalties, logit_bias, DRY) on the device, and DRY's matches
found on the host. The rules themselves are sampling/rules.py's; this keeps their per-slot state.

Made only once a row uses a rule, so rows that use none pay nothing: their steps run graphs
captured without them. A slot whose row uses none holds values that leave its logits as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..sampling.grid import DRY_ALLOWED_LENGTH, DRY_BASE, DRY_BREAKERS, MAX_LOGIT_BIAS, Rules
from ..sampling.rules import apply_bias_and_penalties, bias_entries, dry_entries, dry_penalties
from .job import Job, Placement
from .pages import Slot

DRY_WIDTH = 64  # the most tokens DRY penalises in one row and step (the largest penalties)


class SlotRules:
    """The rule tensors of `slots` slots."""

    def __init__(self, slots: int, vocabulary: int, device: torch.device):
        def per_slot(value: float) -> torch.Tensor:
            return torch.full((slots,), value, device=device)

        self.device = device
        self.counts = torch.zeros((slots, vocabulary), device=device)  # each token's count among the new tokens
        self.prompt_seen = torch.zeros((slots, vocabulary), dtype=torch.bool, device=device)  # the prompt's tokens
        self.repetition, self.frequency, self.presence, self.min_p = (per_slot(v) for v in (1.0, 0.0, 0.0, 0.0))
        self.bias_ids = torch.zeros((slots, MAX_LOGIT_BIAS), dtype=torch.long, device=device)
        self.bias_values = torch.zeros((slots, MAX_LOGIT_BIAS), device=device)  # -inf bans; 0 pads
        self.dry_ids = torch.zeros((slots, DRY_WIDTH), dtype=torch.long, device=device)  # written before each step
        self.dry_values = torch.zeros((slots, DRY_WIDTH), device=device)

    def place(self, placed: Sequence[Placement], dry: Mapping[Slot, dict[int, float]]) -> None:
        """The placed rows' rules into their slots, their counts cleared, their prompts' tokens
        marked; `dry`: their DRY penalties over their prompts."""
        device = self.device
        jobs = [p.job for p in placed]
        index = torch.tensor([p.slot for p in placed], device=device)
        for tensor, values in ((self.repetition, [j.rules.repetition_penalty or 1.0 for j in jobs]),
                               (self.frequency, [j.rules.frequency_penalty or 0.0 for j in jobs]),
                               (self.presence, [j.rules.presence_penalty or 0.0 for j in jobs]),
                               (self.min_p, [j.rules.min_p or 0.0 for j in jobs])):
            tensor[index] = torch.tensor(values, dtype=torch.float32, device=device)
        biases = [bias_entries(j.rules.logit_bias or (), MAX_LOGIT_BIAS) for j in jobs]
        self.bias_ids[index] = torch.tensor([ids for ids, _ in biases], device=device)
        self.bias_values[index] = torch.tensor([values for _, values in biases], device=device)
        self.counts[index] = 0.0
        self.prompt_seen[index] = False
        rows = torch.cat([torch.full((len(j.row.prompt_ids),), i, device=device) for i, j in enumerate(jobs)])
        tokens = torch.tensor([t for j in jobs for t in j.row.prompt_ids], device=device)
        self.prompt_seen[index[rows], tokens] = True
        self.set_dry({p.slot: dry.get(p.slot, {}) for p in placed})

    def set_dry(self, penalties: Mapping[Slot, dict[int, float]]) -> None:
        """Each named slot's DRY penalties for its next choice (the others keep theirs)."""
        if not penalties:
            return
        entries = [dry_entries(p, DRY_WIDTH) for p in penalties.values()]
        index = torch.tensor(list(penalties), device=self.device)
        self.dry_ids[index] = torch.tensor([ids for ids, _ in entries], device=self.device)
        self.dry_values[index] = torch.tensor([values for _, values in entries], device=self.device)

    def apply(self, logits: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the logits after logit_bias, the penalties and DRY; each row's min_p) for the slots
        `pick` takes."""
        logits = apply_bias_and_penalties(logits, pick(self.bias_ids), pick(self.bias_values), pick(self.counts),
                                          pick(self.prompt_seen), pick(self.repetition), pick(self.frequency),
                                          pick(self.presence), pick(self.dry_ids), pick(self.dry_values))
        return logits, pick(self.min_p)

    def count(self, slots: int | torch.Tensor | None, active: torch.Tensor, chosen: torch.Tensor) -> None:
        """Each chosen token once more in its slot's counts, for busy slots (`active` 1); `slots`:
        all (None), the first N, or these indices. No host synchronisation."""
        add = active.float()[:, None]
        if slots is None or isinstance(slots, int):
            self.counts[:slots].scatter_add_(1, chosen[:, None], add)
        else:
            self.counts.index_put_((slots, chosen), add[:, 0], accumulate=True)


class Dry:
    """DRY's penalties for rows' next choices, from their tokens so far (sampling/rules.py)."""

    def __init__(self, tokenizer: Any, vocabulary: int):
        self.tokenizer, self.vocabulary = tokenizer, vocabulary
        self.breaker_ids: dict[tuple[str, ...], frozenset[int]] = {}

    def penalties(self, jobs: Mapping[Slot, Job]) -> dict[Slot, dict[int, float]]:
        """Each job's penalties that uses DRY, by slot."""
        return {b: self.of(job.context, job.rules) for b, job in jobs.items() if job.rules.dry}

    def of(self, context: Sequence[int], rules: Rules) -> dict[int, float]:
        """token -> DRY's penalty for the next token after `context`, under `rules`."""
        if not rules.dry:
            return {}
        return dry_penalties(context, rules.dry_multiplier, rules.dry_base or DRY_BASE,
                             rules.dry_allowed_length or DRY_ALLOWED_LENGTH,
                             self.breakers(rules.dry_sequence_breakers or DRY_BREAKERS))

    def breakers(self, breakers: tuple[str, ...]) -> frozenset[int]:
        """The tokens whose text holds one of the breakers (found once per set of breakers)."""
        if breakers not in self.breaker_ids:
            texts = self.tokenizer.batch_decode([[i] for i in range(self.vocabulary)])
            self.breaker_ids[breakers] = frozenset(i for i, text in enumerate(texts) if any(b in text for b in breakers))
        return self.breaker_ids[breakers]
