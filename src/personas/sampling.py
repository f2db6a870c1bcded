"""The grid: every persona × prompt × temperature × sample in one batched `generate`.

How the randomness works, because it is the point of the tool:

* Each row has its own seed, derived from `--seed`, the persona, the prompt and the sample's
  index (not the temperature: sample k at T=0.2 and at T=1.0 share their random numbers, so what
  differs between temperature columns is the temperature alone).
* At every step a row draws ONE uniform number from a counter-based generator keyed by
  (row seed, step), and picks the token where that number falls in the cumulative distribution
  softmax(logits / T) (after top-k/top-p). No shared random stream is advanced, so a row's text
  does not depend on which other rows share its batch, on the batch size, or on the device.
* Temperature 0 rows take the argmax.

transformers has no per-row temperature or per-row generator, so the choice is made in a
logits processor (`RowSampler`) that leaves only the chosen token finite; `generate` then runs
greedy and simply takes it. Top-k/top-p reuse transformers' own warpers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from .prefill import padded, plan_sharing, shared_cache


@dataclass(frozen=True)
class Row:
    persona: str
    prompt: str
    temperature: float
    sample: int  # 1-based index within (persona, prompt, temperature)
    seed: int
    prompt_ids: tuple[int, ...]
    id: str | int | None = None  # the input line's id (prompts files, serve)


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    top_p: float | None = None
    top_k: int | None = None
    max_batch: int | None = None  # rows per generate call; None = the whole grid
    fast_path: bool = True  # on CUDA: static cache + CUDA graph decoding (fastpath.py)


@dataclass(frozen=True)
class Sample:
    row: Row
    token_ids: tuple[int, ...]  # the new tokens, without the end-of-turn token
    finish_reason: str  # "stop": the model ended its turn; "length": max_new_tokens reached


@dataclass(frozen=True)
class Job:
    """One persona × prompt cell of the grid, with its prompt already tokenized.

    temperatures, n and seed override the grid's own for this cell (a prompts-file line).
    """

    persona: str
    prompt: str
    prompt_ids: tuple[int, ...]
    temperatures: tuple[float, ...] | None = None
    n: int | None = None
    seed: int | None = None
    id: str | int | None = None


def derive_seed(base_seed: int, *parts: object) -> int:
    """A 63-bit seed from the user's seed and a row's place; stable across runs and machines."""
    digest = hashlib.blake2b(repr((base_seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_grid(jobs: Iterable[Job], temperatures: Sequence[float], n: int, seed: int) -> list[Row]:
    rows = []
    for job in jobs:
        base = job.seed if job.seed is not None else seed
        # An input line's id is part of its rows' place, so two lines with the same prompt differ.
        place = (job.persona, job.prompt) if job.id is None else (job.persona, job.prompt, job.id)
        for t in job.temperatures or temperatures:
            for k in range(1, (job.n or n) + 1):
                rows.append(Row(job.persona, job.prompt, t, k, derive_seed(base, *place, k), job.prompt_ids, job.id))
    return rows


# --- a counter-based uniform per (seed, step) ----------------------------------------------------
#
# torch's generators are per-device streams, and one generator per row would mean one kernel
# launch per row per step. Instead, hash (seed, step) with a 32-bit integer mixer evaluated in
# int64 so it is exact on every device: products are kept below 2**63 by splitting the
# multiplicand into 16-bit halves.

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for 0 <= x < 2**32, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    cross = ((lo * (m >> 16) + hi * (m & 0xFFFF)) & 0xFFFF) << 16
    return (lo * (m & 0xFFFF) + cross) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mixer (the 'lowbias32' constants from Chris Wellons' hash prospector)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per seed, a pure function of (seed, step).

    `step` may be a one-element device tensor, so a captured CUDA graph can advance it.
    """
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    steps = step.expand_as(seeds) if isinstance(step, torch.Tensor) else torch.full_like(seeds, step)
    h = _mix32(lo ^ _mix32(hi ^ _mix32(steps & _MASK32)))
    a = _mix32(h ^ 0x5BD1E995) >> 5  # 27 bits
    b = _mix32(h ^ 0x1B873593) >> 6  # 26 bits
    return (a * 67108864 + b).double() / 9007199254740992.0  # (a·2**26 + b) / 2**53


class TokenChooser:
    """Each row's next token from its scores: temperature, top-k/top-p, one counter uniform.

    Pure tensor code with no host synchronisation, so it also runs inside a CUDA graph.
    """

    def __init__(self, temperatures: torch.Tensor, seeds: torch.Tensor, settings: Settings):
        self.greedy = temperatures == 0
        self.divisor = torch.where(self.greedy, torch.ones_like(temperatures), temperatures)[:, None]
        self.seeds = seeds
        self.warpers = LogitsProcessorList()
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor,
                 step: int | torch.Tensor) -> torch.Tensor:
        logits = self.warpers(input_ids, scores.float() / self.divisor)
        cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
        target = counter_uniform(self.seeds, step).to(cdf.dtype) * cdf[:, -1]
        sampled = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
        sampled = sampled.clamp_(max=scores.shape[-1] - 1)
        return torch.where(self.greedy, scores.argmax(dim=-1), sampled)


class RowSampler(LogitsProcessor):
    """Chooses each row's next token (per-row temperature and seed) and reports finished rows."""

    def __init__(self, temperatures: torch.Tensor, seeds: torch.Tensor, prompt_length: int,
                 settings: Settings, eos_ids: Sequence[int],
                 on_finish: Callable[[int, list[int]], None], on_step: Callable[[int], None]):
        self.choose = TokenChooser(temperatures, seeds, settings)
        self.prompt_length = prompt_length
        self.eos_ids = torch.tensor(list(eos_ids), device=seeds.device)
        self.done = torch.zeros_like(self.choose.greedy)
        self.on_finish, self.on_step = on_finish, on_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        chosen = self.choose(input_ids, scores, step)

        finished = torch.isin(chosen, self.eos_ids) & ~self.done
        if finished.any():
            for i in finished.nonzero().flatten().tolist():
                self.on_finish(i, input_ids[i, self.prompt_length:].tolist())
            self.done |= finished
        self.on_step(step + 1)

        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, chosen[:, None], 0.0)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def generate_grid(
    model: Any,
    rows: Sequence[Row],
    settings: Settings,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    on_sample: Callable[[Sample], None],
    on_step: Callable[[int], None] = lambda _: None,
    on_split: Callable[[int, int], None] = lambda _a, _b: None,
    graph_safe: bool = False,
) -> None:
    """Sample every row; `on_sample` gets each one as soon as it is finished.

    The whole grid goes in one `generate` (or `max_batch`-row chunks). On out-of-memory the
    failing chunk is halved and retried, down to one row; rows already delivered are not
    generated again, so nothing is lost and nothing is written twice. `graph_safe` (the model
    is on CUDA with a kernel that survives graph capture) enables the CUDA-graph fast path.
    """
    from . import fastpath

    fast = settings.fast_path and graph_safe
    generate_chunk = fastpath.generate_chunk_graphed if fast else _generate_chunk
    delivered: set[int] = set()

    def deliver(index: int, sample: Sample) -> None:
        if index not in delivered:
            delivered.add(index)
            on_sample(sample)

    if not rows:
        return
    size = settings.max_batch or len(rows)
    # Chunks of similar prompts: little padding, and identical prompts share one prefill.
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i].prompt_ids), rows[i].prompt_ids))
    pending = [order[i:i + size] for i in range(0, len(rows), size)]
    while pending:
        chunk = [i for i in pending.pop(0) if i not in delivered]
        if not chunk:
            continue
        try:
            generate_chunk(model, rows, chunk, settings, eos_ids, pad_id, deliver, on_step)
        except Exception as e:
            if not is_out_of_memory(e) or len(chunk) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(chunk) // 2
            on_split(len(chunk), half)
            pending[:0] = [chunk[:half], chunk[half:]]


def _generate_chunk(model: Any, rows: Sequence[Row], chunk: list[int], settings: Settings,
                    eos_ids: Sequence[int], pad_id: int,
                    deliver: Callable[[int, Sample], None], on_step: Callable[[int], None]) -> None:
    device = model.device
    sharing = plan_sharing(rows, chunk)
    input_ids, attention = padded(rows, chunk, pad_id, sharing.prefix)
    width = input_ids.shape[1]

    def finished(r: int, tokens: list[int]) -> None:
        deliver(chunk[r], Sample(rows[chunk[r]], tuple(tokens), "stop"))

    sampler = RowSampler(
        temperatures=torch.tensor([rows[i].temperature for i in chunk], dtype=torch.float32, device=device),
        seeds=torch.tensor([rows[i].seed for i in chunk], dtype=torch.long, device=device),
        prompt_length=width, settings=settings, eos_ids=eos_ids, on_finish=finished, on_step=on_step,
    )
    past = shared_cache(model, rows, chunk, sharing, input_ids, attention)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None,
        do_sample=False, num_beams=1, repetition_penalty=1.0,
        eos_token_id=list(eos_ids), pad_token_id=pad_id,
    )
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                cache=past, generation_config=config,
                                logits_processor=LogitsProcessorList([sampler]))
    # Rows that sampled an end-of-turn were delivered as they finished; the rest ran out of room.
    for r, i in enumerate(chunk):
        deliver(i, Sample(rows[i], tuple(output[r, width:].tolist()), "length"))
