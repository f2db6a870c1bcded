"""The decode engine: a fixed set of slots decoding together, refilled from a queue as rows end.

    submit(rows) ──► queue ──► admit: prefill into free slots ──► step: one token for every slot
                                 ▲                                         │
                                 └──────── a row ends: deliver, free ◄─────┘

* Slots and pages. Up to B rows decode at once (at most `CUDA_SLOTS`, or `CPU_SLOTS`;
  --batch-size caps it). A row's own keys and values — its suffix, then its new tokens — live in
  pages of `PAGE` positions from one pool sized from the memory free after loading. A row takes
  the pages of its suffix when admitted and one more page each `PAGE` tokens as it grows, so
  rows in flight hold what they use, not what they might use (rows of 16–256 new tokens each
  reserving 256 left a third of the pool idle). When the pool runs dry the row that has done the
  least is preempted: its pages freed, it goes back to the front of the queue and later reruns
  (its seed makes the rerun identical). A row that ends frees its slot and its pages at once and
  the next queued rows are prefilled while the others keep decoding. A row whose prompt is one
  token past its prefix (a grid's rows) needs no prefill: it enters the next decode step with
  that token.
* Prefixes, stored once. Rows of one persona share the start of their prompts (the system
  context and examples). That prefix's keys and values live once in the prefix pool; a row's
  pages hold only its own suffix. The decoder (decoder.py) reads each prefix once per step for
  all rows that share it, and each row's pages only as far as its own length
  (paged_attention.py).
* One step, one graph. On CUDA the decode step — forward pass, choosing, bookkeeping — is
  captured as a CUDA graph per (prefix span, masks, log-probabilities, leading slots) and
  replayed: rows' lengths and page tables are device tensors, so growing rows need no new
  graph, and a step computes only the leading slots (a power of two) that hold rows. On the CPU
  the same step runs eagerly, over the busy slots.
* Listeners and cancelling. A row may have a listener told each token as it is chosen (with its
  log-probabilities: the server's streaming and `logprobs`); rows can be cancelled, queued or
  decoding (a client went away, a stop string was found).
* Same rows, same semantics. Each row keeps its seed (the chooser's noise is keyed by seed, step
  and token id, so the batch around it does not matter), temperature, top-k/top-p,
  min_new_tokens and max_new_tokens.

The host reads the chosen tokens after every step (B integers): that is how rows end on time and
refill starts at once, for the price of one small copy per step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.dense_gptq import DENSE_MIN_ROWS, dense_bytes, drop_dense, has_dense, make_dense
from ..model.load import LoadedModel
from .chooser import choose, token_logprobs, token_salts
from .decoder import Decoder, Part
from .grid import Row, Sample, Settings, TokenLogprob
from .paged_attention import PAGE, PagedPart, flat_positions, gather
from .prefix_attention import PrefixPart
from .prefill import common_prefix

CUDA_SLOTS = 512  # the most slots on a GPU; fewer when memory is short
# The most slots on the CPU. The CPU is bound by the linear layers' products, which two cores run
# faster with more rows at once (docs/performance.md: 256 slots against 64, 1.14× on a prompts file).
CPU_SLOTS = 256
SPAN = 32  # the prefix pool is read in spans of this many positions
POOL_STEP = 256  # the prefix pool grows by at least this many positions
PREFILL_TOKENS = {"cuda": 4096, "cpu": 2048}  # prompt tokens per prefill pass
SLOT_WORKSPACE_PER_TOKEN_OF_VOCABULARY = 56  # bytes: logits, float32 scores, noise (int64, float64)
HEADROOM = 0.9  # the share of free memory the slots and pages may take
SINK_PAGE = 0  # never given to a row: idle slots write and read it, so a step needs no branches
REFILL_SHARE = 8  # refill when 1/REFILL_SHARE of the slots are free (see _admit)
TOP_LOGPROBS = 20  # the most alternatives a token's log-probabilities come with (OpenAI's limit)

TokenListener = Callable[[Row, int, "TokenLogprob | None"], None]
Rows = int | torch.Tensor | None  # which slots a step computes: all (None), the first N, or these indices


def picker(rows: Rows) -> Callable[[torch.Tensor], torch.Tensor]:
    """Take `rows` of a per-slot tensor: slicing for the first N (a view, so graphs capture it),
    index_select for an index tensor."""
    if rows is None:
        return lambda t: t
    if isinstance(rows, int):
        return lambda t: t[:rows]
    return lambda t: t.index_select(0, rows)


def put(target: torch.Tensor, rows: Rows, value: torch.Tensor) -> None:
    """Write per-row values back into a per-slot tensor, in place."""
    if rows is None:
        target.copy_(value)
    elif isinstance(rows, int):
        target[:rows].copy_(value)
    else:
        target[rows] = value


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass(eq=False)
class Job:
    """A row inside the engine: the row, its sampling rules, and where its sample goes."""

    row: Row
    max_new: int
    min_new: int
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    deliver: Callable[[Sample], None]
    prefix: tuple[int, ...] = ()  # the start of its prompt kept in the prefix pool
    tokens: list[int] = field(default_factory=list)
    on_token: TokenListener | None = None  # told each new token as it is chosen (streaming)
    logprobs: bool = False  # on_token gets each token's log-probabilities
    reported: int = 0  # tokens already given to on_token (a rerun after a back-off repeats none)

    @property
    def suffix(self) -> tuple[int, ...]:
        return self.row.prompt_ids[len(self.prefix):]

    @property
    def starts_in_decode(self) -> bool:
        """Its suffix is one token: no prefill pass, the first decode step takes it (see
        Engine._prefill)."""
        return len(self.row.prompt_ids) - len(self.prefix) == 1

    @property
    def cache_need(self) -> int:
        """Positions its own cache must hold: its suffix and its new tokens."""
        return len(self.suffix) + self.max_new

    @property
    def pages(self) -> int:
        """Pages its own cache spans at its longest."""
        return -(-self.cache_need // PAGE)

    @property
    def first_pages(self) -> int:
        """Pages it takes when admitted: its suffix and its first new token's position."""
        return len(self.suffix) // PAGE + 1

    @property
    def prompt_pages(self) -> int:
        """Its pages that hold only prompt: a row with the same prompt, admitted with it, reads
        these instead of its own copy (the n samples of one prompt)."""
        return len(self.suffix) // PAGE


class PrefixPool:
    """The prefixes of the rows queued or in flight, each stored once, back to back.

    keys/values: per layer (kv_heads, capacity, head_dim). A prefix is computed when the first
    row that needs it is admitted and dropped when its last row is delivered; the space of
    dropped prefixes is reclaimed by compacting when a new one does not fit.
    """

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.spans: dict[tuple[int, ...], tuple[int, int]] = {}  # prefix -> (start, length)
        self.users: dict[tuple[int, ...], int] = {}  # prefix -> rows queued or in flight
        self.end = 0
        self.version = 0  # changes whenever spans move or the tensors are replaced

    def hold(self, prefix: tuple[int, ...]) -> None:
        if prefix:
            self.users[prefix] = self.users.get(prefix, 0) + 1

    def release(self, prefix: tuple[int, ...]) -> None:
        if not prefix:
            return
        self.users[prefix] -= 1
        if not self.users[prefix]:
            del self.users[prefix]
            if self.spans.pop(prefix, None) is not None:
                self.version += 1

    def ensure(self, prefix: tuple[int, ...]) -> None:
        """Compute and store `prefix` unless it is here."""
        if not prefix or prefix in self.spans:
            return
        if self.end + len(prefix) > self.capacity:
            self._compact()
        if self.end + len(prefix) > self.capacity:
            self._grow(round_up(self.end + len(prefix), POOL_STEP))
        start = self.end
        self._compute(prefix, start)
        self.spans[prefix] = (start, len(prefix))
        self.end = start + len(prefix)
        self.version += 1

    def read_length(self) -> int:
        """Positions a step reads: up to the last live prefix, in whole spans."""
        return min(self.capacity, round_up(self.end, SPAN)) if self.spans else 0

    def bias(self, prefixes: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """(len(prefixes), capacity): 0 over each row's own prefix, -inf elsewhere."""
        bias = torch.full((len(prefixes), self.capacity), float("-inf"), device=self.decoder.device)
        for row, prefix in enumerate(prefixes):
            if prefix:
                start, length = self.spans[prefix]
                bias[row, start:start + length] = 0.0
        return bias

    def spans_of(self, prefixes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(starts, lengths), int32 (len(prefixes),): each row's prefix span (length 0: none)."""
        spans = [self.spans[prefix] if prefix else (0, 0) for prefix in prefixes]
        starts, lengths = zip(*spans) if spans else ((), ())
        return (torch.tensor(starts, dtype=torch.int32, device=self.decoder.device),
                torch.tensor(lengths, dtype=torch.int32, device=self.decoder.device))

    def parts(self, bias: torch.Tensor, length: int) -> list[Part] | None:
        """Per layer, the pool as the matrix-product attention reads it: its first `length`
        positions and each row's 0 / -inf bias."""
        if not length:
            return None
        return [Part(k[:, :length], v[:, :length], bias[:, :length], shared=True)
                for k, v in zip(self.keys, self.values)]

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
        for prefix, (start, length) in sorted(self.spans.items(), key=lambda item: item[1][0]):
            if start != at:
                for tensor in self.keys + self.values:
                    tensor[:, at:at + length] = tensor[:, start:start + length].clone()
                self.spans[prefix] = (at, length)
            at += length
        self.end = at
        self.version += 1

    def _compute(self, prefix: tuple[int, ...], start: int) -> None:
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


class Engine:
    """Slots, a queue and a prefix pool over one loaded model. `submit` rows, then `step` (or
    `run`) until `busy` is False; each row's Sample goes to its `deliver` as soon as it ends."""

    def __init__(self, loaded: LoadedModel, *, max_slots: int | None = None, graphs: bool = False,
                 expect_more: bool = False, on_split: Callable[[int, int], None] = lambda _old, _new: None,
                 max_pages: int | None = None, layer_kernels: bool = True, dense_weights: bool | None = None,
                 on_dense: Callable[[int], None] = lambda _bytes: None):
        """expect_more: rows will keep arriving (a server), so size the slots for the cap and the
        memory, not for the rows queued when the first step runs. max_pages: at most this many
        pages in the pool (memory shared with something else; tests force preemption with it).
        layer_kernels: on CUDA, the fused Triton kernels for the layers' small steps (off: the
        modules' own, for comparisons). dense_weights: products of many rows through dense
        copies of a GPTQ model's weights (model/dense_gptq.py) — None: on CUDA when the slots
        are many and the memory left after the copies still holds them (`_choose_dense`);
        on_dense is told the bytes when this engine makes them, and 0 when it drops them."""
        self.loaded = loaded
        self.decoder = Decoder(loaded.model, layer_kernels=layer_kernels)
        self.device = self.decoder.device
        self.graphs_enabled = graphs and self.device.type == "cuda"
        self.max_slots = max_slots
        self.max_pages = max_pages
        self.dense_weights = dense_weights
        self.dense_made = False  # this engine made the model's dense copies (it drops them before any slot)
        self.on_dense = on_dense
        self.expect_more = expect_more
        self.on_split = on_split
        self.eos_ids = list(loaded.eos_ids)
        self.pad_id = loaded.pad_id
        self.vocabulary = loaded.model.get_output_embeddings().weight.shape[0]
        self.pool = PrefixPool(self.decoder)
        self.queue: deque[Job] = deque()
        self.seen: dict[str, tuple[int, ...]] = {}  # persona -> a prompt of theirs seen before
        self.slot_count = 0  # 0: not allocated
        self.span = 0  # the most positions one row's page table can address
        self.page_count = 0  # pages in the pool, the sink page included
        self.free_pages: list[int] = []
        self.page_users: list[int] = []  # page -> rows whose tables hold it
        self.pages_of: dict[int, list[int]] = {}  # slot -> the pages its table holds
        self.jobs: dict[int, Job] = {}  # slot -> its row
        self.filled: dict[int, int] = {}  # slot -> positions of its cache written
        self.graphs: dict[tuple[int, bool, bool, int], Any] = {}  # (prefix span, masks, logprobs, slots)
        self.graph_pool = None
        self.steps = 0  # decode steps taken (progress)
        self.last_batch = 0  # rows the last step decoded
        self.rows_decoded = 0  # rows summed over steps (the mean batch: rows_decoded / steps)
        self.own_pages: dict[int, int] = {}  # slot -> pages its row took (not read from a row with its prompt)
        self.positions_held = 0  # own pages × PAGE of each row delivered, summed (the mean cache per row)
        self.rows_delivered = 0
        self.preemptions = 0  # rows preempted for pages, to rerun later

    # --- queueing ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.jobs)

    @property
    def rows_waiting(self) -> int:
        return len(self.queue) + len(self.jobs)

    def submit(self, rows: Iterable[Row], settings: Settings, deliver: Callable[[Sample], None], *,
               on_token: TokenListener | None = None, logprobs: bool = False) -> list[Job]:
        """Queue rows; each persona's rows share the longest prompt start they have in common
        (with a prompt of that persona seen before, so one request at a time still shares).

        `deliver` gets each row's Sample when it ends; `on_token`, if given, each new token as it
        is chosen (with its log-probabilities when `logprobs`). Returns the rows' jobs, which
        `cancel` takes."""
        by_persona: dict[str, list[Row]] = {}
        for row in rows:
            by_persona.setdefault(row.persona, []).append(row)
        jobs = []
        for persona, members in by_persona.items():
            prompts = list(dict.fromkeys(r.prompt_ids for r in members))
            if persona in self.seen:
                prompts.append(self.seen[persona])
            self.seen[persona] = members[0].prompt_ids
            shared = common_prefix(prompts)
            for row in members:
                job = Job(row, row.limit(settings), settings.min_new_tokens, settings.top_k or 0,
                          settings.top_p if settings.top_p is not None else 1.0, deliver,
                          prefix=row.prompt_ids[:shared], on_token=on_token, logprobs=logprobs)
                self.pool.hold(job.prefix)
                jobs.append(job)
        # Longest rows first, so the last steps are not a few long rows decoding alone; identical
        # prompts next to each other, so one prefill serves them all and they share its pages.
        self.queue.extend(sorted(jobs, key=lambda j: (-j.max_new, j.prefix, j.suffix)))
        return jobs

    def cancel(self, jobs: Iterable[Job]) -> int:
        """Drop rows, queued or decoding, without delivering them (a client went away; a stop
        string was found). Returns how many were still here."""
        gone = set(jobs)
        queued = [job for job in self.queue if job in gone]
        if queued:
            self.queue = deque(job for job in self.queue if job not in gone)
            for job in queued:
                self.pool.release(job.prefix)
        slots = [b for b, job in self.jobs.items() if job in gone]
        for b in slots:
            self._free(b)
        with torch.inference_mode():  # the slot tensors were made in inference mode
            self._clear_slots(slots)
        return len(queued) + len(slots)

    # --- running -------------------------------------------------------------------------------

    def run(self, on_step: Callable[[int], None] = lambda _: None) -> None:
        while self.busy:
            self.step()
            on_step(self.steps)

    def step(self) -> None:
        """Admit what fits, then one decode step for every slot; halve the slots on out-of-memory."""
        try:
            with torch.inference_mode():
                self._admit()
                if self.jobs:
                    self._decode_step()
        except Exception as error:
            if not is_out_of_memory(error) or self.slot_count <= 1:
                raise
            self._back_off()

    def _back_off(self) -> None:
        """Out of memory: rows in flight go back to the front of the queue (nothing was delivered
        for them, and their seeds make the rerun identical), and the slots are halved."""
        old = self.slot_count
        for job in reversed(list(self.jobs.values())):
            job.tokens.clear()
            self.queue.appendleft(job)
        self.jobs.clear()
        self.filled.clear()
        self.pages_of.clear()
        self.own_pages.clear()
        self._release_slots()
        if self.dense_made:
            # The dense copies this engine made go before any slot does: a slower step with every
            # slot beats a fast one with half of them.
            drop_dense(self.loaded.model)
            self.dense_made, self.dense_weights = False, False
            self.on_dense(0)
            return
        self.max_slots = max(1, old // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.on_split(old, self.max_slots)

    # --- slots ---------------------------------------------------------------------------------

    def _release_slots(self) -> None:
        self.cache_keys = self.cache_values = []
        self.free_pages, self.page_users, self.page_count = [], [], 0
        self._drop_graphs()
        self.slot_count = 0

    def _drop_graphs(self) -> None:
        """Forget every captured graph, and their memory pool with them: once its last graph is
        gone the allocator releases the pool, and capturing into the old handle then fails an
        internal assert (met serving requests whose longer prompts regrew the slots)."""
        self.graphs.clear()
        self.graph_pool = None

    def _slots_wanted(self) -> int:
        """The cap (--batch-size, else the device's), or fewer when fewer rows wait (a job)."""
        cap = self.max_slots or (CUDA_SLOTS if self.device.type == "cuda" else CPU_SLOTS)
        return cap if self.expect_more else max(1, min(cap, self.rows_waiting))

    def _memory_pages(self, slots: int, row_positions: int) -> int:
        """CUDA: the pages the memory free now holds beside `slots` slots' workspace and one
        prefill pass."""
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        d = self.decoder
        per_slot = self.vocabulary * SLOT_WORKSPACE_PER_TOKEN_OF_VOCABULARY + 4 * (self.span // PAGE)
        # A prefill pass: its MLP activations and its attention scores over the pool and itself.
        intermediate = getattr(self.loaded.model.config, "intermediate_size", 4 * d.heads * d.head_dim)
        prefill = PREFILL_TOKENS["cuda"] * (6 * intermediate + 8 * d.heads * (self.pool.capacity + row_positions))
        budget = HEADROOM * free - prefill - slots * per_slot
        return max(0, int(budget // (PAGE * d.kv_bytes_per_token())))

    def _pages_per_row(self, row_positions: int) -> int:
        """The pages a row is expected to hold: a job's rows are known — their mean length; a
        server's are not — `row_positions`."""
        if self.expect_more:
            return -(-row_positions // PAGE)
        return -(-sum(job.pages for job in self.queue) // len(self.queue))

    def _slots_and_pages(self, row_positions: int) -> tuple[int, int]:
        """How many slots and pages: the cap, the rows waiting, each of `row_positions` at most,
        and on CUDA the memory free now (pages then are what is left after the slots' workspace);
        a job takes no more slots than its pages hold rows of its mean length."""
        slots = self._slots_wanted()
        row_pages = -(-row_positions // PAGE)
        pages = 1 + slots * row_pages  # every slot busy with the longest row, and the sink page
        if self.max_pages:
            pages = max(1 + row_pages, min(pages, self.max_pages))
        if self.device.type == "cuda":
            # At least one longest row: if even that does not fit, allocating fails and backs off.
            pages = max(1 + row_pages, min(pages, self._memory_pages(slots, row_positions)))
        if not self.expect_more:
            # More slots than the pages hold rows of the job's mean length only preempt each
            # other, and a preempted row reruns from its prompt (the fixed bulk job in an 80 GB
            # card's memory with the dense copies forced: docs/performance.md). Rows shorter than
            # the mean leave room, so a ragged job may still preempt a few.
            slots = max(1, min(slots, (pages - 1) // self._pages_per_row(row_positions)))
        return slots, pages

    def _choose_dense(self, row_positions: int) -> None:
        """Whether products of many rows go through dense copies of the GPTQ weights.

        Asked for (True) or refused (False) by the caller; by default (None) on CUDA when the
        slots are at least DENSE_MIN_ROWS — fewer rows per step never reach the copies — and the
        memory left after the copies (2 bytes a weight: 25 GB for a 13B) still holds a row for
        every slot. Copies that cost rows ran out of memory at the first refill in two runs of
        three in an 80 GB card's memory (docs/performance.md); where memory is plenty, a product
        of 512 rows through the copy runs about twice as fast as through Marlin."""
        model = self.loaded.model
        if self.dense_weights is False:
            if has_dense(model):
                drop_dense(model)
            return
        cost = dense_bytes(model)
        if not cost:
            return  # not GPTQ, or the copies are there
        if self.dense_weights is None:
            slots = self._slots_wanted()
            if self.device.type != "cuda" or slots < DENSE_MIN_ROWS:
                return
            pages_after = self._memory_pages(slots, row_positions) - cost // (PAGE * self.decoder.kv_bytes_per_token())
            if pages_after < 1 + slots * self._pages_per_row(row_positions):
                return
        self.on_dense(make_dense(model))
        self.dense_made = True

    def _allocate(self) -> None:
        d = self.decoder
        need = max(j.cache_need for j in self.queue)
        # A page table can address the model's context: later rows longer than the first ones
        # then need no new tables (without a known context, twice the first rows' length).
        self.span = round_up(max(need, self.loaded.context_length or 2 * need), PAGE)
        for prefix in dict.fromkeys(j.prefix for j in self.queue if j.prefix):
            self.pool.ensure(prefix)
        # A job sizes the pool for the rows it has; a server for rows twice as long (a longer row
        # preempts others, and one longer than the whole pool waits for the rows in flight).
        row_positions = min(2 * need, self.span) if self.expect_more else need
        self._choose_dense(row_positions)
        B, pages = self._slots_and_pages(row_positions)
        self.slot_count, self.page_count = B, pages
        shape = (pages, PAGE, d.kv_heads, d.head_dim)
        self.cache_keys = [torch.zeros(shape, dtype=d.dtype, device=self.device) for _ in range(d.layer_count)]
        self.cache_values = [torch.zeros(shape, dtype=d.dtype, device=self.device) for _ in range(d.layer_count)]
        self.free_pages = list(range(pages - 1, SINK_PAGE, -1))  # popped from the end: low pages first
        self.page_users = [0] * pages
        self.table = torch.full((B, self.span // PAGE), SINK_PAGE, dtype=torch.int32, device=self.device)
        longs = lambda: torch.zeros(B, dtype=torch.long, device=self.device)  # noqa: E731
        self.tok, self.pos, self.write_at, self.generated, self.active = (longs() for _ in range(5))
        self.seeds, self.top_k, self.min_new = longs(), longs(), longs()
        self.temperatures = torch.ones(B, device=self.device)
        self.top_p = torch.ones(B, device=self.device)
        k = min(TOP_LOGPROBS, self.vocabulary)
        self.chosen_logprob = torch.zeros(B, device=self.device)
        self.top_logprobs = torch.zeros((B, k), device=self.device)
        self.top_logprob_ids = torch.zeros((B, k), dtype=torch.long, device=self.device)
        self.prefix_bias = self.pool.bias([()] * B)
        self.prefix_starts, self.prefix_lengths = self.pool.spans_of([()] * B)
        self.prefix_version = self.pool.version
        self.first_row = torch.zeros(B, dtype=torch.long, device=self.device)
        self.salts = token_salts(self.vocabulary, self.device)
        self.eos = torch.tensor(self.eos_ids, device=self.device)
        self.tok.fill_(self.pad_id)

    def _admit(self) -> None:
        if not self.queue:
            return
        if not self.slot_count:
            self._allocate()
        if self.queue[0].cache_need > self.span or self.queue[0].pages > self.page_count - 1:
            if self.jobs:
                return  # a longer row waits until the rows in flight end, then the pool grows
            self._release_slots()
            self._allocate()
            if self.queue[0].pages > self.page_count - 1:
                raise torch.OutOfMemoryError(f"one row needs {self.queue[0].cache_need} cache positions; "
                                             f"the memory free holds {PAGE * (self.page_count - 1)}")
        free = [b for b in range(self.slot_count) if b not in self.jobs]
        # Pages kept for the rows in flight to grow into (each crosses into a new page every
        # PAGE steps): admitting into those would only preempt someone at the next step.
        budget = len(self.free_pages) - -(-len(self.jobs) // PAGE)
        fits, previous = 0, None
        for job in self.queue:
            prompt = (job.prefix, job.suffix)
            cost = job.first_pages - (job.prompt_pages if prompt == previous else 0)
            if fits == len(free) or cost > budget or job.cache_need > self.span:
                break
            fits, budget, previous = fits + 1, budget - cost, prompt
        # A prefill pass reads every weight, as a decode step does: refilling one slot per step
        # would nearly double the cost of each step. While rows decode, wait until an eighth of
        # the slots (or the whole queue) can be refilled in one pass — but rows whose suffix is
        # one token need no pass (see _prefill): those at the front join the next step at once.
        if self.jobs and fits < min(len(self.queue), max(1, self.slot_count // REFILL_SHARE)):
            fits = next((k for k in range(fits) if not self.queue[k].starts_in_decode), fits)
        if fits:
            self._prefill([(free.pop(0), self.queue.popleft()) for _ in range(fits)])

    def _refresh_prefix_bias(self) -> None:
        """Rebuild the slots' prefix masks and spans after the pool changed (a prefix added,
        moved, dropped)."""
        if self.pool.version == self.prefix_version:
            return
        prefixes = [self.jobs[b].prefix if b in self.jobs else () for b in range(self.slot_count)]
        bias = self.pool.bias(prefixes)
        for held, new in zip((self.prefix_starts, self.prefix_lengths), self.pool.spans_of(prefixes)):
            held.copy_(new)  # in place: captured graphs read these tensors
        if bias.shape == self.prefix_bias.shape:
            self.prefix_bias.copy_(bias)
        else:
            self._drop_graphs()  # new pool tensors: the captured graphs read the old ones
            self.prefix_bias = bias
        self.prefix_version = self.pool.version

    def _prefill(self, taken: list[tuple[int, Job]]) -> None:
        """Give the new rows their slots and pages; encode their suffixes and choose their first
        tokens — except rows whose suffix is one token, which the next decode step takes as it is.

        A one-token suffix (every row of a grid, where a persona's rows share all of their prompt
        but its last token) needs no pass of its own: written at its slot's first position, that
        token is exactly what a decode step computes, so such rows enter the step with it as
        their current token and the step chooses their first token. On a GPU that step is mostly
        a replayed graph, many times cheaper than an eager prefill pass (docs/performance.md), and
        rows refilled mid-run wait for no pass."""
        for _, job in taken:
            self.pool.ensure(job.prefix)
        device = self.device
        table = torch.full((len(taken), self.table.shape[1]), SINK_PAGE, dtype=torch.int32)
        previous, holder = None, []
        for i, (b, job) in enumerate(taken):
            self.jobs[b] = job
            prompt = (job.prefix, job.suffix)
            # The same prompt as the row before it: its prompt-only pages are read, not copied.
            shared = holder[:job.prompt_pages] if prompt == previous else []
            own = [self.free_pages.pop() for _ in range(job.first_pages - len(shared))]
            pages = self.pages_of[b] = shared + own
            self.own_pages[b] = len(own)
            for page in pages:
                self.page_users[page] += 1
            if prompt != previous:
                previous, holder = prompt, pages
            table[i, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        slots = [b for b, _ in taken]
        jobs = [job for _, job in taken]
        index = torch.tensor(slots, device=device)
        self.table[index] = table.to(device)
        self._refresh_prefix_bias()
        self.temperatures[index] = torch.tensor([j.row.temperature for j in jobs], dtype=torch.float32, device=device)
        self.seeds[index] = torch.tensor([j.row.seed for j in jobs], device=device)
        self.top_k[index] = torch.tensor([j.top_k for j in jobs], device=device)
        self.top_p[index] = torch.tensor([j.top_p for j in jobs], dtype=torch.float32, device=device)
        self.min_new[index] = torch.tensor([j.min_new for j in jobs], device=device)
        self.generated[index] = 0
        self.active[index] = 1
        self.prefix_bias[index] = self.pool.bias([j.prefix for j in jobs])
        self.prefix_starts[index], self.prefix_lengths[index] = self.pool.spans_of([j.prefix for j in jobs])
        # Where the next step writes and reads: a one-token suffix at its first position, as its
        # current token; other rows after their encoded suffix, with their first token.
        one_token = [j.starts_in_decode for j in jobs]
        self.tok[index] = torch.tensor([j.suffix[0] if one else self.pad_id for j, one in zip(jobs, one_token)],
                                       device=device)
        self.pos[index] = torch.tensor([len(j.row.prompt_ids) - one for j, one in zip(jobs, one_token)], device=device)
        self.write_at[index] = torch.tensor([len(j.suffix) - one for j, one in zip(jobs, one_token)], device=device)
        for b, job, one in zip(slots, jobs, one_token):
            self.filled[b] = len(job.suffix) - one
        encoded = [(b, job) for (b, job), one in zip(taken, one_token) if not one]
        if encoded:
            self._encode_and_choose(encoded)

    def _encode_and_choose(self, taken: list[tuple[int, Job]]) -> None:
        """Encode the rows' suffixes (identical prompts once) and choose their first tokens."""
        device = self.device
        distinct: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for b, job in taken:
            distinct.setdefault((job.prefix, job.suffix), []).append(b)
        items = list(distinct.items())
        budget = PREFILL_TOKENS.get(device.type, PREFILL_TOKENS["cpu"])
        logits_of: dict[int, torch.Tensor] = {}
        start = 0
        while start < len(items):
            end = start + 1
            while end < len(items) and (end + 1 - start) * max(len(s) for (_, s), _ in items[start:end + 1]) <= budget:
                end += 1
            chunk = items[start:end]
            logits = self._encode_suffixes(chunk)
            for row, (_, slots) in enumerate(chunk):
                for b in slots:
                    logits_of[b] = logits[row]
            start = end
        slots = [b for b, _ in taken]
        index = torch.tensor(slots, device=device)
        logits = torch.stack([logits_of[b] for b in slots])
        chosen = self._choose(logits, index)
        logprobs = None
        if any(job.logprobs for _, job in taken):
            self._keep_logprobs(logits, chosen, index)
            logprobs = self._read_logprobs(slots)
        first = chosen.tolist()
        self.tok[index] = torch.tensor(first, device=device)
        self.generated[index] = 1
        self._take(dict(zip(slots, first)), logprobs)

    def _encode_suffixes(self, chunk: list[tuple[tuple[tuple[int, ...], tuple[int, ...]], list[int]]]) -> torch.Tensor:
        """One prefill pass over distinct suffixes; their keys go to their first slot, then are
        copied to the slots with the same prompt. Returns each suffix's last logits."""
        d, device = self.decoder, self.device
        suffixes = [suffix for (_, suffix), _ in chunk]
        starts = [len(prefix) for (prefix, _), _ in chunk]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            ids[row, :len(suffix)] = torch.tensor(suffix)
        positions = torch.tensor(starts)[:, None] + torch.arange(width)[None, :]
        firsts = torch.tensor([slots[0] for _, slots in chunk], device=device)
        # Causal within the suffix; a padded query sees garbage, and nothing reads its output.
        causal = torch.full((width, width), float("-inf"), device=device).triu_(1)[None]
        # Where each suffix position goes in its first slot's pages; padding goes nowhere (a
        # short row's pages may end before the longest suffix does).
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        written = torch.arange(width, device=device)[None, :] < lengths[:, None]
        at = flat_positions(self.table[firsts], torch.arange(width, device=device).expand(len(chunk), width))[written]

        def own(layer: int, k: torch.Tensor, v: torch.Tensor) -> Part:
            for pool, fresh in ((self.cache_keys[layer], k), (self.cache_values[layer], v)):
                pool.view(-1, *pool.shape[2:])[at] = fresh.transpose(1, 2)[written]
            return Part(k, v, causal, shared=False)

        bias = self.pool.bias([prefix for (prefix, _), _ in chunk])
        logits = d.run(ids.to(device), positions.to(device), own, self.pool.parts(bias, self.pool.read_length()),
                       torch.tensor([len(s) - 1 for s in suffixes], device=device))
        # The other slots with the same prompt read the first slot's prompt-only pages as their
        # own (see _prefill): they take copies of the positions after those only.
        copies = [(slots[0], b, PAGE * (len(self.pages_of[b]) - self.own_pages[b]), len(suffix))
                  for ((_, suffix), slots) in chunk for b in slots[1:]]
        copies = [(a, b, start, n) for a, b, start, n in copies if start < n]
        if copies:
            source = torch.cat([flat_positions(self.table[a:a + 1], torch.arange(start, n, device=device)[None])[0]
                                for a, _, start, n in copies])
            target = torch.cat([flat_positions(self.table[b:b + 1], torch.arange(start, n, device=device)[None])[0]
                                for _, b, start, n in copies])
            for pool in self.cache_keys + self.cache_values:
                flat = pool.view(-1, *pool.shape[2:])
                flat[target] = flat[source]
        return logits

    def _choose(self, logits: torch.Tensor, slots: Rows = None, masks: bool | None = None) -> torch.Tensor:
        """The next token of each slot (all slots, or `slots`) from its logits and rules."""
        pick = picker(slots)
        generated, min_new = pick(self.generated), pick(self.min_new)
        # Before min_new_tokens, ending the turn is not an option.
        early = (generated < min_new)[:, None]
        logits[:, self.eos] = logits[:, self.eos].masked_fill(early, float("-inf"))
        if masks is None:
            masks = self._masks_needed()
        top_k, top_p = (pick(self.top_k), pick(self.top_p)) if masks else (None, None)
        return choose(logits, pick(self.temperatures), pick(self.seeds), generated, self.salts, top_k, top_p)

    def _masks_needed(self) -> bool:
        return any(job.top_k or job.top_p < 1.0 for job in self.jobs.values())

    def _logprobs_needed(self) -> bool:
        return any(job.logprobs for job in self.jobs.values())

    def _keep_logprobs(self, logits: torch.Tensor, chosen: torch.Tensor, rows: Rows) -> None:
        """The chosen tokens' log-probabilities and the likeliest alternatives, into the slots'
        buffers (all slots, or `rows`)."""
        values = token_logprobs(logits, picker(rows)(self.temperatures), chosen, self.top_logprobs.shape[1])
        for buffer, value in zip((self.chosen_logprob, self.top_logprobs, self.top_logprob_ids), values):
            put(buffer, rows, value)

    def _read_logprobs(self, slots: Iterable[int]) -> dict[int, tuple[float, tuple[tuple[int, float], ...]]]:
        """slot -> (its chosen token's log-probability, its top (id, log-probability) pairs)."""
        chosen, top, ids = (t.tolist() for t in (self.chosen_logprob, self.top_logprobs, self.top_logprob_ids))
        return {b: (chosen[b], tuple(zip(ids[b], top[b]))) for b in slots}

    # --- one decode step -----------------------------------------------------------------------

    def _decode(self, prefix_span: int, masks: bool, logprobs: bool, rows: Rows = None, own_span: int = 0) -> None:
        """The next token of every slot, or of `rows` (the first N slots; or, eagerly only, a
        tensor of slot indices), written to `tok`; all state advanced on the device.

        On CUDA each row's own part is read through its pages by the paged kernel; on the CPU
        the rows' first `own_span` positions are gathered for the ordinary attention."""
        pick = picker(rows)
        table, write_at = pick(self.table), pick(self.write_at)
        lengths = write_at + 1  # the new token's own position included
        write = flat_positions(table, write_at)
        if self.device.type == "cuda":
            def part(keys: torch.Tensor, values: torch.Tensor) -> Any:
                return PagedPart(keys, values, table, lengths)
        else:
            positions = torch.arange(own_span, device=self.device)
            at = flat_positions(table, positions.expand(len(write), own_span))  # once for every layer
            bias = torch.zeros(at.shape, device=self.device).masked_fill_(
                positions[None, :] >= lengths[:, None], float("-inf"))[:, None]

            def part(keys: torch.Tensor, values: torch.Tensor) -> Any:
                return Part(gather(keys, at), gather(values, at), bias, shared=False)

        def own(layer: int, k: torch.Tensor, v: torch.Tensor) -> Any:
            keys, values = self.cache_keys[layer], self.cache_values[layer]
            keys.view(-1, *keys.shape[2:])[write] = k[:, :, 0]
            values.view(-1, *values.shape[2:])[write] = v[:, :, 0]
            return part(keys, values)

        if not prefix_span:
            shared = None
        elif self.decoder.layer_kernels:
            shared = self.pool.prefix_parts(pick(self.prefix_starts), pick(self.prefix_lengths))
        else:
            shared = self.pool.parts(pick(self.prefix_bias), prefix_span)
        logits = self.decoder.run(pick(self.tok)[:, None], pick(self.pos)[:, None], own, shared,
                                  self.first_row[:len(write)])
        chosen = self._choose(logits, rows, masks=masks)
        if logprobs:
            self._keep_logprobs(logits, chosen, rows)
        put(self.tok, rows, chosen)
        self.pos.add_(self.active)
        self.write_at.add_(self.active)
        self.generated.add_(self.active)

    def _grow(self) -> None:
        """A new page for each row about to write past its last one; when none is left, the
        row that has done the least is preempted (possibly the one asking)."""
        added = []
        for b in [b for b in self.jobs if self.filled[b] >= PAGE * len(self.pages_of[b])]:
            while not self.free_pages and b in self.jobs:
                self._preempt(min(self.jobs, key=lambda slot: (len(self.jobs[slot].tokens), -slot)))
            if b not in self.jobs:
                continue
            page = self.free_pages.pop()
            self.page_users[page] += 1
            self.pages_of[b].append(page)
            self.own_pages[b] += 1
            added.append((b, len(self.pages_of[b]) - 1, page))
        if added:
            slots, columns, pages = (torch.tensor(values, device=self.device) for values in zip(*added))
            self.table[slots, columns] = pages.to(torch.int32)

    def _preempt(self, b: int) -> None:
        """Back to the front of the queue, its pages freed; it reruns from its prompt later (its
        seed makes the rerun identical, and a listener is not told its tokens twice)."""
        job = self.jobs[b]
        self.pool.hold(job.prefix)  # still waiting: its prefix stays in the pool
        self._free(b)
        job.tokens.clear()
        self.queue.appendleft(job)
        self._clear_slots([b])
        self.preemptions += 1

    def _decode_step(self) -> None:
        self._grow()
        if not self.jobs:
            return
        self.last_batch = len(self.jobs)
        self.rows_decoded += len(self.jobs)
        self._refresh_prefix_bias()
        # Rows take the lowest free slots, so the busy ones sit near the front: a graph computes
        # the first `leading` slots only (a server's 512 slots with 128 rows busy computed all 512,
        # at 46% of a prompts file's speed). Powers of two keep the graphs few.
        leading = min(self.slot_count, max(16, 1 << max(self.jobs).bit_length()))
        key = (self.pool.read_length(), self._masks_needed(), self._logprobs_needed(), leading)
        if not self.graphs_enabled:
            # Eagerly, only the slots in use are computed, each read as far as the longest of them.
            busy = None if len(self.jobs) == self.slot_count else torch.tensor(sorted(self.jobs), device=self.device)
            self._decode(*key[:3], rows=busy, own_span=max(self.filled.values()) + 1)
        elif key in self.graphs:
            self.graphs[key].replay()
        else:
            with torch.inference_mode():
                first = self.graph_pool is None
                if first:
                    self._decode(*key)  # eager once: warms every kernel, and is this step
                    self.graph_pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.graph_pool):
                    self._decode(*key)  # recorded, not run
                if not first:
                    graph.replay()  # later keys: capture, then run it
            self.graphs[key] = graph
        self.steps += 1
        chosen = self.tok.tolist()
        for b in self.jobs:
            self.filled[b] += 1
        self._take({b: chosen[b] for b in self.jobs}, self._read_logprobs(self.jobs) if key[2] else None)

    def _take(self, chosen: dict[int, int],
              logprobs: dict[int, tuple[float, tuple[tuple[int, float], ...]]] | None = None) -> None:
        """Record each slot's new token (and tell its listener); deliver and free the rows that ended."""
        ended = []
        for b, token in chosen.items():
            job = self.jobs[b]
            if token in self.eos_ids:
                ended.append((b, "stop"))
                continue
            job.tokens.append(token)
            if job.on_token is not None and len(job.tokens) > job.reported:
                job.reported += 1
                told = None
                if job.logprobs and logprobs is not None:
                    told = TokenLogprob(token, *logprobs[b])
                job.on_token(job.row, token, told)
            if len(job.tokens) >= job.max_new:
                ended.append((b, "length"))
        if not ended:
            return
        for b, reason in ended:
            self.positions_held += PAGE * self.own_pages[b]
            self.rows_delivered += 1
            job = self._free(b)
            job.deliver(Sample(job.row, tuple(job.tokens), reason))
        self._clear_slots([b for b, _ in ended])

    def _free(self, b: int) -> Job:
        """Take slot b's row out: its pages back to the pool, its prefix released."""
        job = self.jobs.pop(b)
        del self.filled[b], self.own_pages[b]
        for page in self.pages_of.pop(b):
            self.page_users[page] -= 1
            if not self.page_users[page]:
                self.free_pages.append(page)
        self.pool.release(job.prefix)
        return job

    def _clear_slots(self, slots: list[int]) -> None:
        """Reset freed slots' state so the next step computes nothing that reaches a row."""
        if not slots:
            return
        index = torch.tensor(slots, device=self.device)
        for tensor in (self.active, self.write_at, self.pos, self.generated):
            tensor[index] = 0
        self.tok[index] = self.pad_id
        self.table[index] = SINK_PAGE
        self.prefix_bias[index] = float("-inf")
        self.prefix_starts[index] = 0
        self.prefix_lengths[index] = 0
