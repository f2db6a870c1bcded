"""The model side of the engine: each slot's state as device tensors, prefill of newly admitted
rows, the decode step (captured as CUDA graphs and replayed), the choice and log-probabilities.

The scheduler decides which rows sit in which slots and which pages they hold; the runner puts
that on the device and runs the model over it. Read bottom-up: `_choose` and `_decode` are one
step's arithmetic, `decode` the step with its graphs, `place` a new row's way in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..sampling.chooser import choose, token_logprobs, token_salts
from ..sampling.grammar import GrammarTokenizer, allow_only
from ..sampling.grid import TOP_LOGPROBS
from ..sampling.rules import forbid_early_end
from .config import PREFILL_TOKENS
from .decoder import Decoder, Part
from .job import ChosenLogprobs, Placement, Prefix, Prompt
from .kernels.cpu_layers import CpuLayers
from .kernels.paged import PAGE, PagedPart, flat_positions, gather
from .pages import SINK_PAGE, Slot
from .prefix_pool import PrefixPool
from .slot_grammar import SlotGrammar
from .slot_rules import SlotRules

# Which slots a step computes: all (None), the first N (an int: a view, so graphs capture it), or
# these indices (a tensor; eager steps only).
SlotSelection = int | torch.Tensor | None


def picker(rows: SlotSelection) -> Callable[[torch.Tensor], torch.Tensor]:
    """Take `rows` of a per-slot tensor: slicing for the first N, index_select for an index tensor."""
    if rows is None:
        return lambda t: t
    if isinstance(rows, int):
        return lambda t: t[:rows]
    return lambda t: t.index_select(0, rows)


def put(target: torch.Tensor, rows: SlotSelection, value: torch.Tensor) -> None:
    """Write per-row values back into a per-slot tensor, in place."""
    if rows is None:
        target.copy_(value)
    elif isinstance(rows, int):
        target[:rows].copy_(value)
    else:
        target[rows] = value


class Chosen(NamedTuple):
    """What a step chose: each slot's token, and its log-probabilities when some row asked."""

    tokens: dict[Slot, int]
    logprobs: dict[Slot, ChosenLogprobs] | None = None


class GraphKey(NamedTuple):
    """What a captured decode step is specialised on; rows' lengths and page tables are device
    tensors, so growing rows reuse the same graph."""

    prefix_span: int  # positions of the prefix pool read
    masks: bool  # some row uses top-k/top-p
    logprobs: bool  # some row reports log-probabilities
    leading: int  # the first slots computed (a power of two)
    rules: bool = False  # some row uses min_p, a penalty, logit_bias or DRY
    grammar: bool = False  # some row follows an answer format (two graphs: forward, then choice)


class StepGraphs(NamedTuple):
    """A captured decode step: one graph, or — when rows follow answer formats — the forward pass
    and the choice, so the masks are filled on the host while the first runs."""

    forward: Any
    choice: Any = None


class PageCopy(NamedTuple):
    """Positions [start, end) of a prompt's keys, encoded into `source`'s pages, copied to `target`'s."""

    source: Slot
    target: Slot
    start: int
    end: int


@dataclass
class SlotTensors:
    """Each slot's state on the device, one entry per slot; idle slots hold harmless values (the
    sink page, no prefix) so a step computes every slot without branches."""

    table: torch.Tensor  # (slots, span / PAGE) int32: the pages of the slot's own cache
    tok: torch.Tensor  # the current token, the step's input
    pos: torch.Tensor  # its position in the whole prompt + answer (rotary)
    write_at: torch.Tensor  # its position in the slot's own cache
    generated: torch.Tensor  # new tokens so far (the chooser's step, min_new_tokens)
    active: torch.Tensor  # 1 for a busy slot: what advances the three above
    seeds: torch.Tensor
    temperatures: torch.Tensor
    top_k: torch.Tensor  # 0: off
    top_p: torch.Tensor  # 1.0: off
    min_new: torch.Tensor
    chosen_logprob: torch.Tensor
    top_logprobs: torch.Tensor  # (slots, TOP_LOGPROBS)
    top_logprob_ids: torch.Tensor
    prefix_bias: torch.Tensor  # (slots, pool capacity): 0 over the slot's prefix (the modules' attention)
    prefix_starts: torch.Tensor  # the slot's prefix span (the prefix kernel)
    prefix_lengths: torch.Tensor
    first_row: torch.Tensor  # zeros: each row's logits come from its only query


class Runner:
    """The slots' tensors and caches over one decoder; the CUDA graphs of its decode steps."""

    def __init__(self, decoder: Decoder, pool: PrefixPool, *, graphs: bool, end_ids: Sequence[int], pad_id: int,
                 vocabulary: int, grammar_tokenizer: Callable[[], GrammarTokenizer] | None = None,
                 cpu_layers: CpuLayers | None = None):
        self.decoder, self.pool, self.device = decoder, pool, decoder.device
        self.cpu_layers = cpu_layers  # the CPU's C layers (kernels/cpu_layers.py); None: the decoder's modules
        self.graphs_enabled = graphs and self.device.type == "cuda"
        self.end_ids, self.pad_id, self.vocabulary = list(end_ids), pad_id, vocabulary
        self.graphs: dict[GraphKey, StepGraphs] = {}
        self.graph_pool = None
        self.cache_keys: list[torch.Tensor] = []
        self.cache_values: list[torch.Tensor] = []
        self.slots: SlotTensors | None = None
        self.rules: SlotRules | None = None
        self.grammar_tokenizer = grammar_tokenizer  # made once, on a row's first answer format
        self.grammar: SlotGrammar | None = None
        self.prefix_version = -1

    # --- allocation ------------------------------------------------------------------------------

    def allocate(self, slot_count: int, page_count: int, span: int) -> None:
        """Caches of `page_count` pages, and the tensors of `slot_count` slots whose tables address
        `span` positions."""
        d, device, B = self.decoder, self.device, slot_count
        shape = (page_count, PAGE, d.kv_heads, d.head_dim)
        self.cache_keys = [torch.zeros(shape, dtype=d.dtype, device=device) for _ in range(d.layer_count)]
        self.cache_values = [torch.zeros(shape, dtype=d.dtype, device=device) for _ in range(d.layer_count)]
        longs = lambda: torch.zeros(B, dtype=torch.long, device=device)  # noqa: E731
        k = min(TOP_LOGPROBS, self.vocabulary)
        starts, lengths = self.pool.spans_of([()] * B)
        self.slots = SlotTensors(
            table=torch.full((B, span // PAGE), SINK_PAGE, dtype=torch.int32, device=device),
            tok=longs().fill_(self.pad_id), pos=longs(), write_at=longs(), generated=longs(), active=longs(),
            seeds=longs(), temperatures=torch.ones(B, device=device), top_k=longs(),
            top_p=torch.ones(B, device=device), min_new=longs(),
            chosen_logprob=torch.zeros(B, device=device), top_logprobs=torch.zeros((B, k), device=device),
            top_logprob_ids=torch.zeros((B, k), dtype=torch.long, device=device),
            prefix_bias=self.pool.bias([()] * B), prefix_starts=starts, prefix_lengths=lengths,
            first_row=longs())
        self.prefix_version = self.pool.version
        self.salts = token_salts(self.vocabulary, device)
        self.end = torch.tensor(self.end_ids, device=device)

    def release(self) -> None:
        self.cache_keys = self.cache_values = []
        self.slots = self.rules = None
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None
        self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget every captured graph, and their memory pool with them: once its last graph is
        gone the allocator releases the pool, and capturing into the old handle then fails an
        internal assert (met serving requests whose longer prompts regrew the slots)."""
        self.graphs.clear()
        self.graph_pool = None

    # --- slots in and out ------------------------------------------------------------------------

    def place(self, placed: Sequence[Placement], slot_prefixes: Sequence[Prefix], masks: bool, rules: bool,
              dry: dict[Slot, dict[int, float]]) -> Chosen:
        """Put newly admitted rows in their slots; encode their suffixes and choose their first
        tokens — except rows whose suffix is one token, which the next decode step takes as it is.
        Returns the first tokens chosen (the encoded rows'). `masks`: some row in the slots uses
        top-k/top-p; `rules`: some row uses the other logits rules; `dry`: the placed rows' DRY
        penalties over their prompts.

        A one-token suffix (every row of a grid, where a persona's rows share all of their prompt
        but its last token) needs no pass of its own: written at its slot's first position, that
        token is exactly what a decode step computes, so such rows enter the step with it as
        their current token and the step chooses their first token. On a GPU that step is mostly
        a replayed graph, many times cheaper than an eager prefill pass, and rows refilled
        mid-run wait for no pass."""
        s, device = self.slots, self.device
        table = torch.full((len(placed), s.table.shape[1]), SINK_PAGE, dtype=torch.int32)
        for i, p in enumerate(placed):
            table[i, :len(p.pages)] = torch.tensor(p.pages, dtype=torch.int32)
        jobs = [p.job for p in placed]
        index = torch.tensor([p.slot for p in placed], device=device)
        s.table[index] = table.to(device)
        self.refresh_prefixes(slot_prefixes)
        s.temperatures[index] = torch.tensor([j.row.temperature for j in jobs], dtype=torch.float32, device=device)
        s.seeds[index] = torch.tensor([j.row.seed for j in jobs], device=device)
        s.top_k[index] = torch.tensor([j.top_k for j in jobs], device=device)
        s.top_p[index] = torch.tensor([j.top_p for j in jobs], dtype=torch.float32, device=device)
        s.min_new[index] = torch.tensor([j.min_new for j in jobs], device=device)
        s.generated[index] = 0
        s.active[index] = 1
        s.prefix_bias[index] = self.pool.bias([j.prefix for j in jobs])
        s.prefix_starts[index], s.prefix_lengths[index] = self.pool.spans_of([j.prefix for j in jobs])
        # Where the next step writes and reads: a one-token suffix at its first position, as its
        # current token; other rows after their encoded suffix, with their first token.
        one = [j.starts_in_decode for j in jobs]
        s.tok[index] = torch.tensor([j.suffix[0] if o else self.pad_id for j, o in zip(jobs, one)], device=device)
        s.pos[index] = torch.tensor([len(j.row.prompt_ids) - o for j, o in zip(jobs, one)], device=device)
        s.write_at[index] = torch.tensor([len(j.suffix) - o for j, o in zip(jobs, one)], device=device)
        if rules and self.rules is None:
            # Made on first use: graphs captured before then never read them.
            self.rules = SlotRules(s.tok.shape[0], self.vocabulary, device)
        if self.rules is not None:
            self.rules.place(placed, dry)
        if self.grammar is None and any(j.rules.answer_format is not None for j in jobs):
            self.grammar = SlotGrammar(self.grammar_tokenizer(), s.tok.shape[0], self.vocabulary, device, self.end_ids)
        if self.grammar is not None:
            self.grammar.place(placed)
        encoded = [p for p, o in zip(placed, one) if not o]
        return self._encode_and_choose(encoded, masks, rules) if encoded else Chosen({})

    def set_pages(self, added: Sequence[tuple[Slot, int, int]]) -> None:
        """(slot, column, page): pages rows grew into, into their tables."""
        if added:
            slots, columns, pages = (torch.tensor(values, device=self.device) for values in zip(*added))
            self.slots.table[slots, columns] = pages.to(torch.int32)

    def clear(self, slots: Sequence[Slot]) -> None:
        """Reset freed slots' state so the next step computes nothing that reaches a row."""
        if not slots or self.slots is None:
            return
        s = self.slots
        index = torch.tensor(slots, device=self.device)
        for tensor in (s.active, s.write_at, s.pos, s.generated):
            tensor[index] = 0
        s.tok[index] = self.pad_id
        s.table[index] = SINK_PAGE
        s.prefix_bias[index] = float("-inf")
        s.prefix_starts[index] = 0
        s.prefix_lengths[index] = 0
        if self.grammar is not None:
            self.grammar.free(slots)

    def refresh_prefixes(self, slot_prefixes: Sequence[Prefix]) -> None:
        """Rebuild the slots' prefix masks and spans after the pool changed (a prefix added,
        moved, dropped); `slot_prefixes` is each slot's prefix, () for an idle one."""
        if self.pool.version == self.prefix_version:
            return
        s = self.slots
        bias = self.pool.bias(slot_prefixes)
        for held, new in zip((s.prefix_starts, s.prefix_lengths), self.pool.spans_of(slot_prefixes)):
            held.copy_(new)  # in place: captured graphs read these tensors
        if bias.shape == s.prefix_bias.shape:
            s.prefix_bias.copy_(bias)
        else:
            self.drop_graphs()  # new pool tensors: the captured graphs read the old ones
            s.prefix_bias = bias
        self.prefix_version = self.pool.version

    # --- prefill ---------------------------------------------------------------------------------

    def _encode_and_choose(self, placed: Sequence[Placement], masks: bool, rules: bool) -> Chosen:
        """Encode the rows' suffixes (identical prompts once) and choose their first tokens."""
        distinct: dict[Prompt, list[Placement]] = {}
        for p in placed:
            distinct.setdefault(p.job.prompt, []).append(p)
        groups = list(distinct.items())
        budget = PREFILL_TOKENS.get(self.device.type, PREFILL_TOKENS["cpu"])
        logits_of: dict[Slot, torch.Tensor] = {}
        start = 0
        while start < len(groups):
            end = start + 1
            while end < len(groups) and (end + 1 - start) * max(len(prompt.suffix) for prompt, _ in
                                                                 groups[start:end + 1]) <= budget:
                end += 1
            logits = self._encode_suffixes(groups[start:end])
            for row, (_, members) in enumerate(groups[start:end]):
                for p in members:
                    logits_of[p.slot] = logits[row]
            start = end
        slots = [p.slot for p in placed]
        index = torch.tensor(slots, device=self.device)
        logits = torch.stack([logits_of[b] for b in slots])
        allowed = self.grammar.now(slots) if self.grammar is not None and self.grammar.active else None
        chosen = self._choose(logits, index, masks=masks, rules=rules, allowed=allowed)
        if rules:
            self._count(index, chosen)
        logprobs = None
        if any(p.job.logprobs for p in placed):
            self._keep_logprobs(logits, chosen, index)
            logprobs = self.read_logprobs(slots)
        first = chosen.tolist()
        self.slots.tok[index] = torch.tensor(first, device=self.device)
        self.slots.generated[index] = 1
        return Chosen(dict(zip(slots, first)), logprobs)

    def _encode_suffixes(self, groups: Sequence[tuple[Prompt, list[Placement]]]) -> torch.Tensor:
        """One prefill pass over distinct suffixes; their keys go to their first slot, then are
        copied to the slots with the same prompt. Returns each suffix's last logits."""
        device, s = self.device, self.slots
        firsts = torch.tensor([members[0].slot for _, members in groups], device=device)
        if self.cpu_layers is not None:
            logits = self._suffixes_in_c(groups, firsts)
        else:
            logits = self._suffixes_through_modules(groups, firsts)
        # The other slots with the same prompt read the first slot's prompt-only pages as their
        # own (Placement.shared): they take copies of the positions after those only.
        copies = [PageCopy(members[0].slot, p.slot, PAGE * p.shared, len(prompt.suffix))
                  for prompt, members in groups for p in members[1:]]
        copies = [c for c in copies if c.start < c.end]
        if copies:
            def flat(slot: Slot, c: PageCopy) -> torch.Tensor:
                return flat_positions(s.table[slot:slot + 1], torch.arange(c.start, c.end, device=device)[None])[0]

            source = torch.cat([flat(c.source, c) for c in copies])
            target = torch.cat([flat(c.target, c) for c in copies])
            for pool in self.cache_keys + self.cache_values:
                flat_pool = pool.view(-1, *pool.shape[2:])
                flat_pool[target] = flat_pool[source]
        return logits

    def _suffixes_through_modules(self, groups: Sequence[tuple[Prompt, list[Placement]]],
                                  firsts: torch.Tensor) -> torch.Tensor:
        """The suffixes as a padded batch through the decoder's modules; each suffix's last logits."""
        d, device, s = self.decoder, self.device, self.slots
        suffixes = [prompt.suffix for prompt, _ in groups]
        starts = [len(prompt.prefix) for prompt, _ in groups]
        width = max(len(x) for x in suffixes)
        ids = torch.full((len(groups), width), self.pad_id, dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            ids[row, :len(suffix)] = torch.tensor(suffix)
        positions = torch.tensor(starts)[:, None] + torch.arange(width)[None, :]
        # Causal within the suffix; a padded query sees garbage, and nothing reads its output.
        causal = torch.full((width, width), float("-inf"), device=device).triu_(1)[None]
        # Where each suffix position goes in its first slot's pages; padding goes nowhere (a
        # short row's pages may end before the longest suffix does).
        lengths = torch.tensor([len(x) for x in suffixes], device=device)
        written = torch.arange(width, device=device)[None, :] < lengths[:, None]
        at = flat_positions(s.table[firsts], torch.arange(width, device=device).expand(len(groups), width))[written]

        def own(layer: int, k: torch.Tensor, v: torch.Tensor) -> Part:
            for pool, fresh in ((self.cache_keys[layer], k), (self.cache_values[layer], v)):
                pool.view(-1, *pool.shape[2:])[at] = fresh.transpose(1, 2)[written]
            return Part(k, v, causal, shared=False)

        bias = self.pool.bias([prompt.prefix for prompt, _ in groups])
        return d.run(ids.to(device), positions.to(device), own, self.pool.parts(bias, self.pool.read_length()),
                     torch.tensor([len(x) - 1 for x in suffixes], device=device))

    def _suffixes_in_c(self, groups: Sequence[tuple[Prompt, list[Placement]]], firsts: torch.Tensor) -> torch.Tensor:
        """The suffixes' positions as rows of the C layers, no padding: each row of a suffix
        reads its group's prefix span and its first slot's pages. Each suffix's last logits."""
        s = self.slots
        lengths = torch.tensor([len(prompt.suffix) for prompt, _ in groups])
        group_of = torch.repeat_interleave(torch.arange(len(groups)), lengths)
        own_at = torch.cat([torch.arange(n) for n in lengths.tolist()])  # positions in the slot's own pages
        ids = torch.tensor([token for prompt, _ in groups for token in prompt.suffix])
        positions = torch.tensor([len(prompt.prefix) for prompt, _ in groups])[group_of] + own_at
        prefix = None
        if any(prompt.prefix for prompt, _ in groups):
            starts, spans = self.pool.spans_of([prompt.prefix for prompt, _ in groups])
            prefix = (self.pool.keys, self.pool.values, starts[group_of], spans[group_of])
        return self.cpu_layers.prompt(ids, positions, s.table[firsts][group_of], own_at, self.cache_keys,
                                      self.cache_values, prefix, last=lengths.cumsum(0) - 1)

    # --- choosing --------------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, slots: SlotSelection, masks: bool, rules: bool = False,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of each slot (all slots, or `slots`) from its logits and rules (the
        order: sampling/rules.py), then its answer format's mask (`allowed`: the rows' bitmasks).
        `logits` keep the model's distribution but for the early end of turn (log-probabilities
        are read from them)."""
        s, pick = self.slots, picker(slots)
        generated = pick(s.generated)
        forbid_early_end(logits, self.end, generated, pick(s.min_new))
        min_p = None
        if rules:
            logits, min_p = self.rules.apply(logits, pick)
        if allowed is not None:
            logits = allow_only(logits, allowed, self.grammar.byte_bias)
        top_k, top_p = (pick(s.top_k), pick(s.top_p)) if masks else (None, None)
        return choose(logits, pick(s.temperatures), pick(s.seeds), generated, self.salts, top_k, top_p, min_p)

    def _count(self, slots: SlotSelection, chosen: torch.Tensor) -> None:
        self.rules.count(slots, picker(slots)(self.slots.active), chosen)

    def _keep_logprobs(self, logits: torch.Tensor, chosen: torch.Tensor, rows: SlotSelection) -> None:
        """The chosen tokens' log-probabilities and the likeliest alternatives, into the slots'
        buffers (all slots, or `rows`)."""
        s = self.slots
        values = token_logprobs(logits, picker(rows)(s.temperatures), chosen, s.top_logprobs.shape[1])
        for buffer, value in zip((s.chosen_logprob, s.top_logprobs, s.top_logprob_ids), values):
            put(buffer, rows, value)

    def read_logprobs(self, slots: Iterable[Slot]) -> dict[Slot, ChosenLogprobs]:
        """slot -> its chosen token's log-probability and its top (id, log-probability) pairs."""
        s = self.slots
        chosen, top, ids = (t.tolist() for t in (s.chosen_logprob, s.top_logprobs, s.top_logprob_ids))
        return {b: ChosenLogprobs(chosen[b], tuple(zip(ids[b], top[b]))) for b in slots}

    # --- the decode step -------------------------------------------------------------------------

    def decode(self, busy: Sequence[Slot], own_span: int, masks: bool, logprobs: bool, rules: bool = False) -> Chosen:
        """One token for every busy slot (returned in the order of `busy`); `own_span`: the most
        positions a busy slot's own cache holds, the new one included.

        Rows take the lowest free slots, so the busy ones sit near the front: a graph computes the
        first `leading` slots only, so a server's few busy rows do not pay for its many idle
        slots. Powers of two keep the graphs few. Rows that follow answer formats have their
        masks filled on the host while the forward pass runs."""
        slot_count = self.slots.tok.shape[0]
        leading = min(slot_count, max(16, 1 << max(busy).bit_length()))
        grammar = self.grammar is not None and self.grammar.active
        key = GraphKey(self.pool.read_length(), masks, logprobs, leading, rules, grammar)
        if grammar:
            self.grammar.start()
        if not self.graphs_enabled:
            # Eagerly, only the slots in use are computed, each read as far as the longest of them.
            rows = None if len(busy) == slot_count else torch.tensor(sorted(busy), device=self.device)
            self._decode(key.prefix_span, key.masks, key.logprobs, rows=rows, own_span=own_span, rules=rules,
                         grammar=grammar)
        elif key in self.graphs:
            self._replay(self.graphs[key], leading)
        else:
            with torch.inference_mode():
                first = self.graph_pool is None
                if first:
                    # eager once: warms every kernel, and is this step
                    self._decode(*key[:4], rules=rules, grammar=grammar)
                    self.graph_pool = torch.cuda.graph_pool_handle()
                graphs = self._capture(key)
                if not first:
                    self._replay(graphs, leading)  # later keys: capture, then run it
            self.graphs[key] = graphs
        chosen = self.slots.tok.tolist()
        return Chosen({b: chosen[b] for b in busy}, self.read_logprobs(busy) if logprobs else None)

    def _capture(self, key: GraphKey) -> StepGraphs:
        """Record the step `key` describes (recorded, not run): one graph, or with answer formats
        the forward pass and the choice, which reads the masks from their device buffer."""
        def recorded(step: Callable[[], Any]) -> tuple[Any, Any]:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                out = step()
            return graph, out

        if not key.grammar:
            return StepGraphs(recorded(lambda: self._decode(*key[:4], rules=key.rules))[0])
        forward, logits = recorded(lambda: self._forward(key.prefix_span, key.leading))
        choice, _ = recorded(lambda: self._advance(logits, key.masks, key.logprobs, key.leading, key.rules,
                                                   self.grammar.bits[:key.leading]))
        return StepGraphs(forward, choice)

    def _replay(self, graphs: StepGraphs, leading: int) -> None:
        graphs.forward.replay()
        if graphs.choice is not None:
            self.grammar.ready(leading)  # the forward pass runs on the device meanwhile
            graphs.choice.replay()

    def _decode(self, prefix_span: int, masks: bool, logprobs: bool, rows: SlotSelection = None,
                own_span: int = 0, rules: bool = False, grammar: bool = False) -> None:
        """The next token of every slot, or of `rows` (the first N slots; or, eagerly only, a
        tensor of slot indices), written to `tok`; all state advanced on the device. With
        `grammar`, the masks `SlotGrammar.start` began filling are waited for after the forward
        pass."""
        logits = self._forward(prefix_span, rows, own_span)
        allowed = None
        if grammar:
            count = self.slots.tok.shape[0] if rows is None or not isinstance(rows, int) else rows
            allowed = picker(rows)(self.grammar.ready(count))
        self._advance(logits, masks, logprobs, rows, rules, allowed)

    def _forward(self, prefix_span: int, rows: SlotSelection = None, own_span: int = 0) -> torch.Tensor:
        """The model's logits for every slot's current token (or `rows`'), its keys and values
        written to the cache.

        On CUDA each row's own part is read through its pages by the paged kernel; on the CPU
        the C layers read them the same way (kernels/cpu_layers.py), or, with the modules, the
        rows' first `own_span` positions are gathered for the ordinary attention."""
        s, pick = self.slots, picker(rows)
        table, write_at = pick(s.table), pick(s.write_at)
        if self.cpu_layers is not None:
            prefix = (self.pool.keys, self.pool.values, pick(s.prefix_starts), pick(s.prefix_lengths)) \
                if prefix_span else None
            return self.cpu_layers.logits(pick(s.tok), pick(s.pos), table, write_at, self.cache_keys,
                                          self.cache_values, prefix)
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
            shared = self.pool.prefix_parts(pick(s.prefix_starts), pick(s.prefix_lengths))
        else:
            shared = self.pool.parts(pick(s.prefix_bias), prefix_span)
        return self.decoder.run(pick(s.tok)[:, None], pick(s.pos)[:, None], own, shared, s.first_row[:len(write)])

    def _advance(self, logits: torch.Tensor, masks: bool, logprobs: bool, rows: SlotSelection, rules: bool,
                 allowed: torch.Tensor | None) -> None:
        """Choose each row's token from `logits`, keep what was asked of it, and advance the
        slots' state on the device."""
        s = self.slots
        chosen = self._choose(logits, rows, masks=masks, rules=rules, allowed=allowed)
        if logprobs:
            self._keep_logprobs(logits, chosen, rows)
        if rules:
            self._count(rows, chosen)
        put(s.tok, rows, chosen)
        s.pos.add_(s.active)
        s.write_at.add_(s.active)
        s.generated.add_(s.active)
