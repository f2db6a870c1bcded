"""The prefix pool: the prompt starts that rows share, each stored once and read once per step.

Rows of one persona — or any rows whose prompts begin with the same ids, like one system text
on ten thousand batch lines — share the start of their prompts. That prefix's keys and values
live once here, back to back; a row's pages hold only the rest. The decoder reads each prefix
once per step for all rows that share it (decoder.py: the shared part of attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .decoder import Decoder, Part
from .kernels.cpu_layers import CpuLayers
from .kernels.prefix import PrefixPart
from .job import Prefix
from .pages import PAGE, pages_for, round_up

SPAN = 32  # the pool is read in spans of this many positions
POOL_STEP = 256  # the pool grows by at least this many positions

class Span(NamedTuple):
    """Where a prefix's positions lie in the pool."""

    start: int
    length: int


class PrefixPool:
    """The prefixes of the rows queued or in flight, each stored once, back to back.

    keys/values: per layer (kv_heads, capacity, head_dim). A prefix is computed when the first
    row that needs it is admitted and dropped when its last row is delivered; the space of
    dropped prefixes is reclaimed by compacting when a new one does not fit.
    """

    def __init__(self, decoder: Decoder, cpu_layers: CpuLayers | None = None):
        self.decoder, self.cpu_layers = decoder, cpu_layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.spans: dict[Prefix, Span] = {}
        self.users: dict[Prefix, int] = {}  # prefix -> rows queued or in flight
        self.end = 0
        self.version = 0  # changes whenever spans move or the tensors are replaced

    def hold(self, prefix: Prefix) -> None:
        if prefix:
            self.users[prefix] = self.users.get(prefix, 0) + 1

    def release(self, prefix: Prefix) -> None:
        if not prefix:
            return
        self.users[prefix] -= 1
        if not self.users[prefix]:
            del self.users[prefix]
            if self.spans.pop(prefix, None) is not None:
                self.version += 1

    def ensure(self, prefix: Prefix) -> bool:
        """Compute and store `prefix` unless it is here; whether a pass was made."""
        if not prefix or prefix in self.spans:
            return False
        if self.end + len(prefix) > self.capacity:
            self._compact()
        if self.end + len(prefix) > self.capacity:
            self._grow(round_up(self.end + len(prefix), POOL_STEP))
        start = self.end
        self._compute(prefix, start)
        self.spans[prefix] = Span(start, len(prefix))
        self.end = start + len(prefix)
        self.version += 1
        return True

    def read_length(self) -> int:
        """Positions a step reads: up to the last live prefix, in whole spans."""
        return min(self.capacity, round_up(self.end, SPAN)) if self.spans else 0

    def bias(self, prefixes: Sequence[Prefix]) -> torch.Tensor:
        """(len(prefixes), capacity): 0 over each row's own prefix, -inf elsewhere."""
        bias = torch.full((len(prefixes), self.capacity), float("-inf"), device=self.decoder.device)
        for row, prefix in enumerate(prefixes):
            if prefix:
                start, length = self.spans[prefix]
                bias[row, start:start + length] = 0.0
        return bias

    def spans_of(self, prefixes: Sequence[Prefix]) -> tuple[torch.Tensor, torch.Tensor]:
        """(starts, lengths), int32 (len(prefixes),): each row's prefix span (length 0: none)."""
        spans = [self.spans[prefix] if prefix else Span(0, 0) for prefix in prefixes]
        starts, lengths = zip(*spans) if spans else ((), ())
        return (torch.tensor(starts, dtype=torch.int32, device=self.decoder.device),
                torch.tensor(lengths, dtype=torch.int32, device=self.decoder.device))

    def parts(self, bias: torch.Tensor, length: int) -> list[Part] | None:
        """Per layer, the pool as the matrix-product attention reads it: its first `length`
        positions and each row's 0 / -inf bias."""
        if not length:
            return None
        visible = bias[:, :length]  # one tensor for every layer: the CPU makes its mask from it once
        return [Part(k[:, :length], v[:, :length], visible, shared=True) for k, v in zip(self.keys, self.values)]

    def prefix_parts(self, starts: torch.Tensor, lengths: torch.Tensor) -> list[PrefixPart]:
        """Per layer, the pool as the prefix kernel reads it: each row's span (CUDA decode)."""
        return [PrefixPart(k, v, starts, lengths) for k, v in zip(self.keys, self.values)]

    def _grow(self, capacity: int) -> None:
        d = self.decoder
        keys = [torch.zeros((d.kv_heads, capacity, d.head_dim), dtype=d.dtype, device=d.device)
                for _ in range(d.layer_count)]
        values = [torch.zeros_like(k) for k in keys]
        for old, new in zip(self.keys + self.values, keys + values):
            new[:, :self.end].copy_(old[:, :self.end])
        self.keys, self.values, self.capacity = keys, values, capacity
        self.version += 1

    def _compact(self) -> None:
        """Move the live prefixes to the front, in place."""
        at = 0
        for prefix, (start, length) in sorted(self.spans.items(), key=lambda item: item[1].start):
            if start != at:
                for tensor in self.keys + self.values:
                    tensor[:, at:at + length] = tensor[:, start:start + length].clone()
                self.spans[prefix] = Span(at, length)
            at += length
        self.end = at
        self.version += 1

    def _compute(self, prefix: Prefix, start: int) -> None:
        if self.cpu_layers is not None:
            self._compute_in_c(prefix, start)
            return
        d = self.decoder
        length = len(prefix)
        ids = torch.tensor([prefix], device=d.device)
        causal = torch.full((length, length), float("-inf"), device=d.device).triu_(1)[None]

        def own(layer: int, k: torch.Tensor, v: torch.Tensor) -> Part:
            self.keys[layer][:, start:start + length] = k[0]
            self.values[layer][:, start:start + length] = v[0]
            return Part(k, v, causal, shared=False)

        d.run(ids, torch.arange(length, device=d.device)[None], own, None,
              torch.tensor([length - 1], device=d.device))

    def _compute_in_c(self, prefix: Prefix, start: int) -> None:
        """`_compute` through the C layers, which write keys and values into pages: the prefix's
        go into pages of its own for the pass, then into the pool."""
        d, length = self.decoder, len(prefix)
        pages = pages_for(length)
        keys = [torch.empty((pages, PAGE, d.kv_heads, d.head_dim), dtype=d.dtype) for _ in range(d.layer_count)]
        values = [torch.empty_like(k) for k in keys]
        at = torch.arange(length)
        self.cpu_layers.prompt(torch.tensor(prefix), at, torch.arange(pages).expand(length, pages), at, keys, values,
                               None, last=None)
        for pool, written in zip(self.keys + self.values, keys + values):
            pool[:, start:start + length] = written.view(-1, d.kv_heads, d.head_dim)[:length].transpose(0, 1)
