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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import InputError
from ..library.answer_format import AnswerFormat
from ..library.schema import BUILT_IN
from ..model.tokens import token_id_of

# The most rows decoding at once unless --batch-size says otherwise: the engine's slots (on a GPU
# fewer when the memory free after loading holds fewer rows), the chunks of the older loops, and
# the rows handed to a Ray worker at a time. The CPU is bound by the linear layers' products, which
# two cores run faster with more rows at once (docs/performance.md).
BATCH_SIZE = {"cpu": 256, "cuda": 512}
# The most alternatives a token's log-probabilities come with (OpenAI's limit for top_logprobs).
TOP_LOGPROBS = 20


# DRY's sequence breakers unless told otherwise (llama.cpp's and koboldcpp's defaults): a repeat
# never runs across one of these.
DRY_BREAKERS = ("\n", ":", "\"", "*")
DRY_BASE = 1.75
DRY_ALLOWED_LENGTH = 2
# logit_bias's range (OpenAI's); a bias of -100 bans the token outright.
BIAS_LIMIT = 100.0
MAX_LOGIT_BIAS = 300  # tokens one row may bias (OpenAI's limit)


@dataclass(frozen=True)
class Rules:
    """A row's logits rules beside temperature and top-k/top-p (sampling/rules.py applies them).

    Each field None means "not given here": `over` takes another layer's value for it (a request
    line over the command's flags, over the persona, over `[defaults]`), and what is still None
    at the end is off. logit_bias holds (token, bias) pairs: a token's id, or its text until the
    model's tokenizer turns it into one (`with_token_ids`).
    """

    min_p: float | None = None  # drop tokens below min_p × the top token's probability (after T)
    repetition_penalty: float | None = None  # transformers': over the prompt and the new tokens
    frequency_penalty: float | None = None  # OpenAI's: minus this × the token's count so far
    presence_penalty: float | None = None  # OpenAI's: minus this once a token has appeared
    logit_bias: tuple[tuple[int | str, float], ...] | None = None
    dry_multiplier: float | None = None  # DRY (llama.cpp's): 0 = off
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: tuple[str, ...] | None = None
    # Every answer in this shape (a JSON schema, any JSON object, a regex, a grammar); the
    # engine's grammar masks, not a logits rule: `used` leaves it out.
    answer_format: AnswerFormat | None = None

    def over(self, under: Rules) -> Rules:
        """These rules, with `under`'s value wherever a field here is None."""
        return Rules(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(under, f.name)
                        for f in fields(self)})

    @property
    def used(self) -> bool:
        """Some rule changes the logits (the engine then runs them; otherwise they cost nothing)."""
        return bool(self.min_p or (self.repetition_penalty not in (None, 1.0)) or self.frequency_penalty
                    or self.presence_penalty or self.logit_bias or self.dry_multiplier)

    @property
    def dry(self) -> bool:
        return bool(self.dry_multiplier)

    def with_token_ids(self, token_id: Callable[[str], int]) -> Rules:
        """logit_bias with every token given as text turned into its id by `token_id`."""
        if not self.logit_bias:
            return self
        return replace(self, logit_bias=tuple((t if isinstance(t, int) else token_id(t), b) for t, b in self.logit_bias))


NO_RULES = Rules()


def resolve_rules(rules: Rules, tokenizer: Any) -> Rules | None:
    """`rules` with logit_bias's token texts as the tokenizer's ids (each id checked against its
    vocabulary); None when they set nothing. Raises InputError naming the token."""
    if rules == NO_RULES:
        return None
    rules = rules.with_token_ids(lambda text: token_id_of(tokenizer, text))
    for token, _ in rules.logit_bias or ():
        if token >= len(tokenizer):
            raise InputError(f"logit_bias: token id {token} is past this model's vocabulary ({len(tokenizer)} "
                             "tokens)", "use an id the model has (personas render --ids)")
    return rules


RULE_FIELDS = tuple(f.name for f in fields(Rules) if f.name != "answer_format")  # the keys of RuleFields


def token_key(key: str) -> int | str:
    """A logit_bias key: digits are a token id, anything else a token's text."""
    return int(key) if key.strip().isdigit() else key


def rules_from(table: object) -> Rules:
    """The rules a table sets (a persona, `[defaults]`, a prompts-file line, a request: anything
    with the fields of library.schema.RuleFields), logit_bias keys read by `token_key`, its
    json_schema as the answer format."""
    values = {name: getattr(table, name, None) for name in RULE_FIELDS}
    if values["logit_bias"] is not None:
        values["logit_bias"] = tuple((token_key(k), float(v)) for k, v in values["logit_bias"].items())
    if values["dry_sequence_breakers"] is not None:
        values["dry_sequence_breakers"] = tuple(values["dry_sequence_breakers"])
    schema = getattr(table, "json_schema", None)  # already checked: RuleFields keeps its JSON text
    return Rules(**values, answer_format=AnswerFormat("json_schema", schema) if schema is not None else None)


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
    rules: Rules | None = None  # this row's own rules (a line's, a persona's); None: the grid's

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
    # min_p, penalties, logit_bias, DRY: the command's flags (`rules`) go over a persona's own, which
    # go over the persona file's [defaults] (`file_rules`); a row's own rules go over all of them.
    rules: Rules = NO_RULES
    file_rules: Rules = NO_RULES


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
    rules: Rules | None = None


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
                                cell.id, cell.max_new_tokens, cell.rules))
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
    check_rules(settings.rules)


def check_rules(rules: Rules, name: Callable[[str], str] = lambda field: "--" + field.replace("_", "-")) -> None:
    """Refuse rule values out of their ranges; `name` says how the user wrote a field (a flag, a
    JSON key). OpenAI's ranges where OpenAI has the field."""

    def bad(field: str, value: object, allowed: str) -> InputError:
        return InputError(f"{name(field)} {value} is not allowed", f"use {allowed}")

    def finite(value: float) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if rules.min_p is not None and not (finite(rules.min_p) and 0 <= rules.min_p <= 1):
        raise bad("min_p", rules.min_p, "a value in [0, 1] (0 = off)")
    if rules.repetition_penalty is not None and not (finite(rules.repetition_penalty) and rules.repetition_penalty > 0):
        raise bad("repetition_penalty", rules.repetition_penalty, "a value > 0 (1 = off)")
    for field in ("frequency_penalty", "presence_penalty"):
        value = getattr(rules, field)
        if value is not None and not (finite(value) and -2 <= value <= 2):
            raise bad(field, value, "a value in [-2, 2] (0 = off)")
    if rules.logit_bias is not None:
        if len(rules.logit_bias) > MAX_LOGIT_BIAS:
            raise InputError(f"{name('logit_bias')} names {len(rules.logit_bias)} tokens",
                             f"bias at most {MAX_LOGIT_BIAS}")
        for token, value in rules.logit_bias:
            if not (finite(value) and -BIAS_LIMIT <= value <= BIAS_LIMIT):
                raise InputError(f"{name('logit_bias')}: the bias {value} of {token!r} is not allowed",
                                 f"use a value in [-{BIAS_LIMIT:g}, {BIAS_LIMIT:g}] (-100 bans the token)")
            if isinstance(token, int) and token < 0:
                raise InputError(f"{name('logit_bias')}: token id {token} is not allowed", "use a token id >= 0")
    if rules.dry_multiplier is not None and not (finite(rules.dry_multiplier) and rules.dry_multiplier >= 0):
        raise bad("dry_multiplier", rules.dry_multiplier, "a value >= 0 (0 = off)")
    if rules.dry_base is not None and not (finite(rules.dry_base) and rules.dry_base > 1):
        raise bad("dry_base", rules.dry_base, "a value > 1")
    if rules.dry_allowed_length is not None and not (isinstance(rules.dry_allowed_length, int)
                                                      and rules.dry_allowed_length >= 1):
        raise bad("dry_allowed_length", rules.dry_allowed_length, "a whole number >= 1")
    if rules.dry_sequence_breakers is not None and not all(isinstance(b, str) and b for b in rules.dry_sequence_breakers):
        raise InputError(f"{name('dry_sequence_breakers')}: every breaker must be non-empty text",
                         "drop the empty one")


def check_temperature(t: float) -> None:
    if not math.isfinite(t) or t < 0:
        raise InputError(f"temperature {t} is not allowed", "use a finite number >= 0 (0 = greedy)")
