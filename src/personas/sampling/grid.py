"""The grid: every persona × prompt × temperature × sample as a row with its own seed, and the
values a grid may take. Pure Python (no torch), so it can be checked before a model loads.

How the randomness is keyed: each row's seed comes from `--seed`, the persona, the prompt and
the sample's index (not the temperature: sample k at T=0.2 and at T=1.0 share their random
numbers, so what differs between temperature columns is the temperature alone). The chooser
(chooser.py) turns a row's seed into its noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import InputError
from ..library.schema import BUILT_IN

# The most rows decoding at once unless --batch-size says otherwise: the engine's slots (on a GPU
# fewer when the memory free after loading holds fewer rows), the chunks of the older loops, and
# the rows handed to a Ray worker at a time. The CPU is bound by the linear layers' products, which
# two cores run faster with more rows at once (docs/performance.md).
BATCH_SIZE = {"cpu": 256, "cuda": 512}
# The most alternatives a token's log-probabilities come with (OpenAI's limit for top_logprobs).
TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Row:
    """One sample to draw: its prompt ids, temperature and seed, and where it sits in the grid."""

    persona: str
    prompt: str
    temperature: float
    sample: int  # 1-based index within (persona, prompt, temperature)
    seed: int
    prompt_ids: tuple[int, ...]
    id: str | int | None = None  # the input line's id (prompts files, serve)
    max_new_tokens: int | None = None  # this row's own limit (a prompts-file line); None: the grid's

    def limit(self, settings: Settings) -> int:
        """How many new tokens this row may have."""
        return self.max_new_tokens if self.max_new_tokens is not None else settings.max_new_tokens


@dataclass(frozen=True)
class Settings:
    """How every row of a grid is sampled, besides its own temperature and seed."""

    max_new_tokens: int = BUILT_IN.max_new_tokens
    min_new_tokens: int = 0
    top_p: float | None = None
    top_k: int | None = None
    max_batch: int | None = None  # rows decoding at once; None: BATCH_SIZE for the device
    fast_path: bool = True  # on CUDA: the decode step as captured CUDA graphs
    # GPTQ products of many rows through dense half-precision copies of the weights
    # (model/dense_gptq.py); None: the engine decides from the rows and the memory.
    dense_weights: bool | None = None


@dataclass(frozen=True)
class Sample:
    """A finished row: its new tokens and why it stopped."""

    row: Row
    token_ids: tuple[int, ...]  # the new tokens, without the end-of-turn token
    finish_reason: str  # "stop": the model ended its turn; "length": max_new_tokens reached


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under softmax(logits / T), and the likeliest tokens'.

    T = 0 is greedy: all probability on the argmax (as `explain` shows it), so the chosen token
    has 0 and every other -inf; `top` is then ordered by logit.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), likeliest first


@dataclass(frozen=True)
class TokenizedCell:
    """One persona × prompt cell of the grid, with its prompt already tokenized.

    temperatures, n, seed and max_new_tokens override the grid's own for this cell (a
    prompts-file line).
    """

    persona: str
    prompt: str
    prompt_ids: tuple[int, ...]
    temperatures: tuple[float, ...] | None = None
    n: int | None = None
    seed: int | None = None
    id: str | int | None = None
    max_new_tokens: int | None = None


def batch_size(max_batch: int | None, device_type: str) -> int:
    """The most rows decoding at once: --batch-size, else the device's default."""
    return max_batch or BATCH_SIZE.get(device_type, BATCH_SIZE["cpu"])


def derive_seed(base_seed: int, *parts: object) -> int:
    """A 63-bit seed from the user's seed and a row's place; stable across runs and machines."""
    digest = hashlib.blake2b(repr((base_seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_grid(cells: Iterable[TokenizedCell], temperatures: Sequence[float], n: int, seed: int) -> list[Row]:
    rows = []
    for cell in cells:
        base = cell.seed if cell.seed is not None else seed
        # An input line's id is part of its rows' place, so two lines with the same prompt differ.
        place = (cell.persona, cell.prompt) if cell.id is None else (cell.persona, cell.prompt, cell.id)
        for t in cell.temperatures or temperatures:
            for k in range(1, (cell.n or n) + 1):
                rows.append(Row(cell.persona, cell.prompt, t, k, derive_seed(base, *place, k), cell.prompt_ids,
                                cell.id, cell.max_new_tokens))
    return rows


def validate_values(temperatures: Sequence[float], n: int, settings: Settings) -> None:
    """Refuse values no grid can take, before any slow work."""
    if not temperatures:
        raise InputError("no temperature given", "pass --temp T (e.g. --temp 0.7)")
    for t in temperatures:
        check_temperature(t)
    if n < 1:
        raise InputError(f"-n {n} is not allowed", "ask for at least 1 sample")
    if settings.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {settings.max_new_tokens} is not allowed", "use 1 or more")
    if settings.min_new_tokens > settings.max_new_tokens:
        raise InputError("--min-new-tokens is larger than --max-new-tokens", "lower it")
    if settings.top_p is not None and not 0 < settings.top_p <= 1:
        raise InputError(f"--top-p {settings.top_p} is not allowed", "use a value in (0, 1]")
    if settings.top_k is not None and settings.top_k < 0:
        raise InputError(f"--top-k {settings.top_k} is not allowed", "use 0 (off) or more")


def check_temperature(t: float) -> None:
    if not math.isfinite(t) or t < 0:
        raise InputError(f"temperature {t} is not allowed", "use a finite number >= 0 (0 = greedy)")
