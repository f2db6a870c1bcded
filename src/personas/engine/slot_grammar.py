"""Each slot's answer format in the engine: its llguidance matcher, the bitmask of the tokens it
allows next (filled on the host, off the main thread, while the device runs the step's forward
pass), and that bitmask on the device, where the step's choice reads it. The masks themselves
are sampling/grammar.py's.

Made only once a row asks for a format, so rows that ask for none pay nothing: their steps run
graphs captured without a mask. A slot without a format keeps every bit set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..sampling.grammar import ALL_ALLOWED, GrammarTokenizer, byte_bias, words_for
from .job import Placement
from .pages import Slot


class SlotGrammar:
    """The matchers and bitmasks of `slots` slots."""

    def __init__(self, tokenizer: GrammarTokenizer, slots: int, vocabulary: int, device: torch.device,
                 end_ids: Iterable[int]):
        self.tokenizer, self.device, self.end_ids = tokenizer, device, set(end_ids)
        shape = (slots, words_for(vocabulary))
        on_cuda = device.type == "cuda"
        # Pinned, so the copy to the device is asynchronous; on the CPU the step reads it directly.
        self.host = torch.full(shape, ALL_ALLOWED, dtype=torch.int32, pin_memory=on_cuda)
        self.bits = torch.full(shape, ALL_ALLOWED, dtype=torch.int32, device=device) if on_cuda else self.host
        self.byte_bias = byte_bias(device)  # made before any graph captures a step that reads it
        self.matchers: dict[Slot, Any] = {}
        self.filler = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.pending: Future | None = None

    @property
    def active(self) -> bool:
        """Some slot's row follows a format."""
        return bool(self.matchers)

    def place(self, placed: Sequence[Placement]) -> None:
        """A fresh matcher for each placed row that asks for a format (a preempted row reruns
        from its prompt, so from a fresh one too)."""
        for p in placed:
            if p.job.rules.answer_format is not None:
                self.matchers[p.slot] = self.tokenizer.matcher(p.job.rules.answer_format)

    def free(self, slots: Iterable[Slot]) -> None:
        for b in slots:
            if self.matchers.pop(b, None) is not None:
                self.host[b] = ALL_ALLOWED

    # --- the masks -------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin filling every constrained slot's mask for the step's choice, on another thread:
        the caller launches the forward pass meanwhile, and `ready` waits for the fill."""
        pairs = [(matcher, b) for b, matcher in self.matchers.items()]
        self.pending = self.filler.submit(self.tokenizer.fill, pairs, self.host)

    def ready(self, rows: int) -> torch.Tensor:
        """The bitmasks on the device, once the fill `start` began is done; the first `rows` slots'
        are copied (asynchronously from pinned memory: the host buffer is written again only
        after the step's tokens are read back, which waits for the copy)."""
        self.pending.result()
        self.pending = None
        if self.bits is not self.host:
            self.bits[:rows].copy_(self.host[:rows], non_blocking=True)
        return self.bits

    def now(self, slots: Sequence[Slot]) -> torch.Tensor:
        """The masks of `slots` (newly placed rows, before their first choice), filled at once;
        (len(slots), words) on the device."""
        self.tokenizer.fill([(self.matchers[b], b) for b in slots if b in self.matchers], self.host)
        index = torch.tensor(list(slots))
        return self.host.index_select(0, index).to(self.device, non_blocking=True)

    # --- the tokens ------------------------------------------------------------------------------

    def consume(self, tokens: Mapping[Slot, int]) -> set[Slot]:
        """Each constrained slot's new token into its matcher; returns the slots whose answer is
        complete (the format allows nothing more: the row ends there, without drawing an end of
        turn). An end-of-turn token is the scheduler's to end the row."""
        complete = set()
        for b, token in tokens.items():
            matcher = self.matchers.get(b)
            if matcher is None or token in self.end_ids:
                continue
            if not matcher.consume_token(token):  # the mask allowed it: a failure here is a bug
                raise RuntimeError(f"the answer format refused token {token} that its mask allowed: "
                                   f"{matcher.get_error()}")
            if matcher.is_stopped():
                complete.add(b)
        return complete

    def close(self) -> None:
        if self.pending is not None:
            self.pending.result()
        self.filler.shutdown(wait=True)
