"""How many slots and cache pages an engine allocates, and whether it keeps dense copies of a
GPTQ model's weights: decided from the rows queued, the caps, and on CUDA the memory free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..model.dense_gptq import DENSE_MIN_ROWS, dense_bytes, drop_dense, has_dense, make_dense
from ..model.load import LoadedModel
from .config import HEADROOM, PREFILL_TOKENS, SLOT_WORKSPACE_PER_TOKEN_OF_VOCABULARY
from .decoder import Decoder
from .job import Job
from .pages import PAGE, ceil_div, pages_for


class Layout(NamedTuple):
    """What an allocation holds: decode slots, and cache pages (the sink page included)."""

    slots: int
    pages: int


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class Sizing:
    """The sizing rules for one engine's model and device. `cap` is the slot cap in force (the
    --batch-size, halved by each out-of-memory back-off)."""

    def __init__(self, loaded: LoadedModel, decoder: Decoder, vocabulary: int, *, expect_more: bool,
                 max_pages: int | None):
        self.loaded, self.decoder, self.device = loaded, decoder, decoder.device
        self.vocabulary = vocabulary
        self.expect_more = expect_more
        self.max_pages = max_pages

    def slots_wanted(self, cap: int, rows_waiting: int) -> int:
        """The cap, or fewer when fewer rows wait (a job; a server keeps the cap)."""
        return cap if self.expect_more else max(1, min(cap, rows_waiting))

    def memory_pages(self, slots: int, span: int, row_positions: int, pool_capacity: int) -> int:
        """CUDA: the pages the memory free now holds beside `slots` slots' workspace and one
        prefill pass."""
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        d = self.decoder
        per_slot = self.vocabulary * SLOT_WORKSPACE_PER_TOKEN_OF_VOCABULARY + 4 * (span // PAGE)
        # A prefill pass: its MLP activations and its attention scores over the pool and itself.
        intermediate = getattr(self.loaded.model.config, "intermediate_size", 4 * d.heads * d.head_dim)
        prefill = PREFILL_TOKENS["cuda"] * (6 * intermediate + 8 * d.heads * (pool_capacity + row_positions))
        budget = HEADROOM * free - prefill - slots * per_slot
        return max(0, int(budget // (PAGE * d.kv_bytes_per_token())))

    def pages_per_row(self, row_positions: int, queued: Sequence[Job]) -> int:
        """The pages a row is expected to hold: a job's rows are known — their mean length; a
        server's are not — `row_positions`."""
        if self.expect_more:
            return pages_for(row_positions)
        return ceil_div(sum(job.pages for job in queued), len(queued))

    def layout(self, cap: int, queued: Sequence[Job], rows_waiting: int, span: int, row_positions: int,
               pool_capacity: int) -> Layout:
        """How many slots and pages: the cap, the rows waiting, each of `row_positions` at most,
        and on CUDA the memory free now (pages then are what is left after the slots' workspace);
        a job takes no more slots than its pages hold rows of its mean length."""
        slots = self.slots_wanted(cap, rows_waiting)
        row_pages = pages_for(row_positions)
        pages = 1 + slots * row_pages  # every slot busy with the longest row, and the sink page
        if self.max_pages:
            pages = max(1 + row_pages, min(pages, self.max_pages))
        if self.device.type == "cuda":
            # At least one longest row: if even that does not fit, allocating fails and backs off.
            pages = max(1 + row_pages, min(pages, self.memory_pages(slots, span, row_positions, pool_capacity)))
        if not self.expect_more:
            # More slots than the pages hold rows of the job's mean length only preempt each
            # other, and a preempted row reruns from its prompt (docs/engine.md: preemption).
            # Rows shorter than the mean leave room, so a ragged job may still preempt a few.
            slots = max(1, min(slots, (pages - 1) // self.pages_per_row(row_positions, queued)))
        return Layout(slots, pages)

    def choose_dense(self, wanted: bool | None, cap: int, queued: Sequence[Job], rows_waiting: int, span: int,
                     row_positions: int, pool_capacity: int) -> int:
        """Make (or drop) dense copies of the GPTQ weights for products of many rows; returns the
        bytes made, 0 when none were.

        Asked for (True) or refused (False) by the caller; by default (None) on CUDA when the
        slots are at least DENSE_MIN_ROWS — fewer rows per step never reach the copies — and the
        memory left after the copies (2 bytes a weight) still holds a row for every slot: copies
        that cost rows run out of memory when the first rows refill (docs/engine.md)."""
        model = self.loaded.model
        if wanted is False:
            if has_dense(model):
                drop_dense(model)
            return 0
        cost = dense_bytes(model)
        if not cost:
            return 0  # not GPTQ, or the copies are there
        if wanted is None:
            slots = self.slots_wanted(cap, rows_waiting)
            if self.device.type != "cuda" or slots < DENSE_MIN_ROWS:
                return 0
            pages_after = (self.memory_pages(slots, span, row_positions, pool_capacity)
                           - cost // (PAGE * self.decoder.kv_bytes_per_token()))
            if pages_after < 1 + slots * self.pages_per_row(row_positions, queued):
                return 0
        return make_dense(model)
