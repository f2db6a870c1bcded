"""The decode engine: a fixed set of slots decoding together, refilled from a queue as rows end.

    submit(rows) ──► Scheduler: queue ──► admit: Pages, Runner.place ──► Runner.decode: one token
                           ▲                                                  for every slot
                           └──────────── a row ends: deliver, free ◄──────────────────┘

This file is the public face and composes the rooms: scheduler.py (queue, admission, refill,
preemption, the rows' tokens), pages.py, prefix_pool.py, sizing.py, runner.py (the device side:
prefill, the decode step, CUDA graphs), decoder.py and kernels/. docs/engine.md tells the story.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from ..model.dense_gptq import drop_dense
from ..model.load import LoadedModel
from ..sampling.grammar import GrammarTokenizer
from ..sampling.grid import Row, Sample, Settings
from .config import EngineConfig
from .decoder import Decoder
from .job import EngineStats, Job, Prefix, TokenListener
from .kernels.cpu_layers import CpuLayers
from .pages import PAGE, Pages, Slot, round_up
from .prefix_pool import PrefixPool
from .runner import Chosen, Placement, Runner
from .scheduler import Scheduler
from .sizing import Sizing, is_out_of_memory
from .slot_rules import Dry


class Engine:
    """Slots, a queue and a prefix pool over one loaded model. `submit` rows, then `step` (or
    `run`) until `busy` is False; each row's Sample goes to its `deliver` as soon as it ends.

    on_split(old, new) hears the slots halved after an out-of-memory; on_dense(bytes) hears the
    dense copies of GPTQ weights this engine made, and 0 when it drops them."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), *,
                 on_split: Callable[[int, int], None] = lambda _old, _new: None,
                 on_dense: Callable[[int], None] = lambda _bytes: None):
        self.loaded, self.config = loaded, config
        self.on_split, self.on_dense = on_split, on_dense
        decoder = Decoder(loaded.model, layer_kernels=config.layer_kernels)
        self.device = decoder.device
        vocabulary = loaded.model.get_output_embeddings().out_features
        # On the CPU, the layers of a model whose projections are all GGUF blocks run as one C
        # call a pass (decode steps and prompts); None: the decoder's modules.
        cpu_layers = CpuLayers.of(decoder) if config.layer_kernels and self.device.type == "cpu" else None
        self.pool = PrefixPool(decoder, cpu_layers)
        self.scheduler = Scheduler(self.pool, loaded.eos_ids)
        # llguidance's view of the tokenizer, made on a row's first answer format and once. Not a
        # method of this engine: the runner holding one would make a reference cycle, and an engine
        # in a cycle keeps its slots and captured graphs on the GPU until the garbage collector
        # runs, while the next engine sizes itself from the memory free now.
        grammar_tokenizer = functools.cache(lambda: GrammarTokenizer(loaded.tokenizer, vocabulary, loaded.eos_ids))
        self.runner = Runner(decoder, self.pool, graphs=config.graphs, end_ids=loaded.eos_ids, pad_id=loaded.pad_id,
                             vocabulary=vocabulary, grammar_tokenizer=grammar_tokenizer, cpu_layers=cpu_layers)
        self.sizing = Sizing(loaded, decoder, vocabulary, expect_more=config.expect_more, max_pages=config.max_pages)
        self.slot_cap = config.slot_cap(self.device.type)  # halved by each out-of-memory back-off
        self.dense_weights = config.dense_weights  # False once an out-of-memory dropped the copies
        self.dense_made = False  # this engine made the model's dense copies (it drops them before any slot)
        self.slot_count = 0  # 0: not allocated
        self.span = 0  # the most positions one row's page table can address
        self.pages = Pages(0)
        self.stats = EngineStats()
        self.dry = Dry(loaded.tokenizer, vocabulary)

    # --- the public face ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    @property
    def rows_waiting(self) -> int:
        """Rows queued or decoding."""
        return self.scheduler.rows_waiting

    @property
    def jobs(self) -> dict[Slot, Job]:
        """The rows decoding now, by slot."""
        return self.scheduler.running

    def submit(self, rows: Iterable[Row], settings: Settings, deliver: Callable[[Sample], None], *,
               on_token: TokenListener | None = None, logprobs: bool = False) -> list[Job]:
        """Queue rows. `deliver` gets each row's Sample when it ends; `on_token`, if given, each new
        token as it is chosen (with its log-probabilities when `logprobs`). Returns the rows'
        jobs, which `cancel` takes."""
        return self.scheduler.submit(rows, settings, deliver, on_token=on_token, logprobs=logprobs)

    def cancel(self, jobs: Iterable[Job]) -> int:
        """Drop rows, queued or decoding, without delivering them (a client went away; a stop
        string was found). Returns how many were still here."""
        gone = set(jobs)
        queued = self.scheduler.cancel_queued(gone)
        slots = [b for b, job in self.jobs.items() if job in gone]
        for b in slots:
            self._free(b)
        with torch.inference_mode():  # the slot tensors were made in inference mode
            self.runner.clear(slots)
        return queued + len(slots)

    def run(self, on_step: Callable[[int], None] = lambda _: None) -> None:
        while self.busy:
            self.step()
            on_step(self.stats.steps)

    def step(self) -> None:
        """Admit what fits, then one decode step for every slot; back off on out-of-memory."""
        try:
            with torch.inference_mode():
                self._admit()
                if self.jobs:
                    self._decode_step()
        except Exception as error:
            if not is_out_of_memory(error) or self.slot_count <= 1:
                raise
            self._back_off()

    # --- slots and pages ---------------------------------------------------------------------------

    def _allocate(self) -> None:
        queued = self.scheduler.queue
        need = max(j.cache_need for j in queued)
        # A page table can address the model's context: later rows longer than the first ones
        # then need no new tables (without a known context, twice the first rows' length).
        self.span = round_up(max(need, self.loaded.context_length or 2 * need), PAGE)
        self._ensure_prefixes(j.prefix for j in queued)
        # A job sizes the pool for the rows it has; a server for rows twice as long (a longer row
        # preempts others, and one longer than the whole pool waits for the rows in flight).
        row_positions = min(2 * need, self.span) if self.config.expect_more else need
        sizing = (self.slot_cap, queued, self.rows_waiting, self.span, row_positions)
        made = self.sizing.choose_dense(self.dense_weights, *sizing, self.pool.capacity)
        if made:
            self.dense_made = True
            self.on_dense(made)
        self.slot_count, page_count = self.sizing.layout(*sizing, self.pool.capacity)
        self.pages = Pages(page_count)
        self.runner.allocate(self.slot_count, page_count, self.span)

    def _release_slots(self) -> None:
        self.runner.release()
        self.pages = Pages(0)
        self.slot_count = 0

    def _admit(self) -> None:
        queue = self.scheduler.queue
        if not queue:
            return
        if not self.slot_count:
            self._allocate()
        if queue[0].cache_need > self.span or queue[0].pages > self.pages.usable:
            if self.jobs:
                return  # a longer row waits until the rows in flight end, then the pool grows
            self._release_slots()
            self._allocate()
            if queue[0].pages > self.pages.usable:
                raise torch.OutOfMemoryError(f"one row needs {queue[0].cache_need} cache positions; "
                                             f"the memory free holds {PAGE * self.pages.usable}")
        admitted = self.scheduler.admissions(self.slot_count, len(self.pages.free), self.span)
        if admitted:
            self._place(admitted)

    def _place(self, admitted: Sequence[tuple[Slot, Job]]) -> None:
        """Give the admitted rows their slots and pages, then the runner their tensors."""
        self._ensure_prefixes(job.prefix for _, job in admitted)
        placed, previous, holder = [], None, []
        for b, job in admitted:
            self.jobs[b] = job
            # The same prompt as the row before it: its prompt-only pages are read, not copied.
            shared = holder[:job.prompt_pages] if job.prompt == previous else []
            pages = self.pages.take(b, shared, job.first_pages - len(shared),
                                    written=len(job.suffix) - job.starts_in_decode)
            if job.prompt != previous:
                previous, holder = job.prompt, pages
            placed.append(Placement(b, job, pages, len(shared)))
        started = time.perf_counter()
        # Rows with suffixes to encode come back with their first tokens on the host, so the
        # device is done with them; a row whose suffix is one token leaves it to the decode step.
        chosen = self.runner.place(placed, self.scheduler.slot_prefixes(self.slot_count),
                                   masks=self.scheduler.masks_needed(), rules=self.scheduler.rules_needed(),
                                   dry=self.dry.penalties(dict(admitted)))
        self.stats.prompt_seconds += time.perf_counter() - started
        self._take(chosen)

    def _ensure_prefixes(self, prefixes: Iterable[Prefix]) -> None:
        """A pass over each shared prefix not yet in the pool, its time counted as prompt time."""
        started = time.perf_counter()
        made = [self.pool.ensure(prefix) for prefix in dict.fromkeys(prefixes)]
        if not any(made):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per new prefix: its passes' time, not their launch
        self.stats.prompt_seconds += time.perf_counter() - started

    def _grow(self) -> None:
        """A new page for each row about to write past its last one; when none is left, the
        row that has done the least is preempted (possibly the one asking)."""
        added = []
        for b in self.pages.needing_a_page():
            while not self.pages.free and b in self.jobs:
                self._preempt(self.scheduler.least_done())
            if b in self.jobs:
                added.append((b, *self.pages.grow(b)))
        self.runner.set_pages(added)

    def _preempt(self, b: Slot) -> None:
        """Back to the front of the queue, its pages freed; it reruns from its prompt later."""
        self.scheduler.requeue(self.jobs[b])  # holds its prefix again before _free releases it
        self._free(b)
        self.runner.clear([b])
        self.stats.preemptions += 1

    def _back_off(self) -> None:
        """Out of memory: rows in flight go back to the front of the queue (nothing was delivered
        for them, and their seeds make the rerun identical); the dense copies this engine made
        go first, else the slots are halved."""
        old = self.slot_count
        self.scheduler.requeue_all()
        self._release_slots()
        if self.dense_made:
            # A slower step with every slot beats a fast one with half of them.
            drop_dense(self.loaded.model)
            self.dense_made, self.dense_weights = False, False
            self.on_dense(0)
            return
        self.slot_cap = max(1, old // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.on_split(old, self.slot_cap)

    # --- one step ----------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        self._grow()
        if not self.jobs:
            return
        busy = list(self.jobs)
        self.stats.last_batch = len(busy)
        self.stats.rows_decoded += len(busy)
        self.runner.refresh_prefixes(self.scheduler.slot_prefixes(self.slot_count))
        rules = self.scheduler.rules_needed()
        if rules:
            self.runner.rules.set_dry(self.dry.penalties(self.jobs))
        chosen = self.runner.decode(busy, max(self.pages.written.values()) + 1, self.scheduler.masks_needed(),
                                    self.scheduler.logprobs_needed(), rules)
        self.stats.steps += 1
        self.pages.advance(busy)
        self._take(chosen)

    def _take(self, chosen: Chosen) -> None:
        """Record each slot's new token; deliver and free the rows that ended (an answer whose
        format is complete ends there)."""
        grammar = self.runner.grammar
        complete = grammar.consume(chosen.tokens) if grammar is not None and grammar.active else set()
        ended = self.scheduler.record(chosen.tokens, chosen.logprobs, complete)
        for b, reason in ended:
            self.stats.positions_held += PAGE * self.pages.own[b]
            self.stats.rows_delivered += 1
            job = self._free(b)
            job.deliver(Sample(job.row, tuple(job.tokens), reason))
        self.runner.clear([b for b, _ in ended])

    def _free(self, b: Slot) -> Job:
        """Take slot b's row out: its pages back to the pool, its prefix released."""
        job = self.jobs.pop(b)
        self.pages.release(b)
        self.pool.release(job.prefix)
        return job
