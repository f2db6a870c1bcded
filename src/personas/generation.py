"""From a request (personas, prompts, temperatures, n, seed) to records, on a loaded model.

This is the core behind `personas generate`; it validates the request's values, builds the
grid, checks every prompt fits the model's context, and turns samples into records.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .engine import LoadedModel
from .errors import InputError
from .persona import Persona
from .prompt import Dialog
from .record import Record
from .sampling import Job, Row, Sample, Settings, build_grid, generate_grid

DEFAULT_TEMPERATURES = (0.7,)
DEFAULT_N = 1
DEFAULT_MAX_NEW_TOKENS = 128
# Rows per generate call unless --batch-size says otherwise: bigger grids run in chunks of this
# many rows so memory stays bounded (a prompts file, a busy server).
CHUNK_ROWS = {"cpu": 64, "cuda": 256}


@dataclass(frozen=True)
class Spec:
    """One persona × prompt cell; a prompts-file line may set its own temperatures, n, seed, id."""

    persona: Persona
    prompt: str
    temperatures: tuple[float, ...] | None = None
    n: int | None = None
    seed: int | None = None
    id: str | int | None = None


@dataclass(frozen=True)
class Request:
    personas: Sequence[Persona]
    prompts: Sequence[str] = ()  # empty: each persona's own prompt
    specs: Sequence[Spec] = ()  # when given (a prompts file), these cells replace personas × prompts
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES
    n: int = DEFAULT_N
    seed: int = field(default_factory=lambda: secrets.randbelow(2**31))
    settings: Settings = Settings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    template: str | None = None  # "llama2" | "model"; None: the model's own choice
    truncate: bool = False  # drop examples (oldest first) from prompts too long for the context
    on_truncate: Callable[[str, int, int], None] = field(default=lambda _p, _d, _n: None, compare=False)

    def __post_init__(self) -> None:
        # Everything that can be checked without a model is checked here, before a slow load.
        validate_values(self.temperatures, self.n, self.settings)
        for spec in cells(self):
            validate_values(spec.temperatures or self.temperatures, spec.n or self.n, self.settings)


def validate_values(temperatures: Sequence[float], n: int, settings: Settings) -> None:
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


def cells(request: Request) -> list[Spec]:
    """Each persona × prompt cell of the request, in order."""
    if request.specs:
        return list(request.specs)
    out = []
    for persona in request.personas:
        prompts = list(request.prompts) or ([persona.prompt] if persona.prompt else [])
        if not prompts:
            raise InputError(f"persona '{persona.name}' has no default prompt",
                             "pass --prompt TEXT or add prompt = \"...\" to the persona")
        for prompt in prompts:
            if not prompt.strip():
                raise InputError("the prompt is empty", "pass a non-empty --prompt")
            out.append(Spec(persona, prompt))
    return out


def plan(request: Request, model: LoadedModel) -> list[Row]:
    jobs = []
    for spec in cells(request):
        ids = fitted_prompt_ids(spec.persona, spec.prompt, request, model)
        jobs.append(Job(spec.persona.name, spec.prompt, ids, spec.temperatures, spec.n, spec.seed, spec.id))
    return build_grid(jobs, request.temperatures, request.n, request.seed)


def fitted_prompt_ids(persona: Persona, prompt: str, request: Request, model: LoadedModel) -> tuple[int, ...]:
    """The prompt's ids, checked against the model's context; with `truncate`, examples are
    dropped (oldest first) until it fits — and `on_truncate` says so. Never silently."""
    ids, dropped = fit_dialog(Dialog.for_persona(persona, prompt), model, request.template,
                              request.settings.max_new_tokens, request.truncate, who=f"persona '{persona.name}'")
    if dropped:
        request.on_truncate(persona.name, dropped, len(ids))
    return tuple(ids)


def fit_dialog(dialog: Dialog, model: LoadedModel, template: str | None, max_new_tokens: int,
               truncate: bool, who: str) -> tuple[list[int], int]:
    """(the dialog's ids, how many exchanges were dropped to fit the model's context).

    Exchanges go oldest first (a persona's examples, then a conversation's earliest lines), only
    with `truncate`; a dialog that still does not fit is refused with the token counts.
    """
    limit = model.context_length
    room = (limit - max_new_tokens) if limit else None
    ids = model.prompt_ids(dialog, template)
    dropped = 0
    while room is not None and len(ids) > room and truncate and dialog.examples:
        dialog = Dialog(dialog.system, dialog.examples[1:], dialog.user)
        ids = model.prompt_ids(dialog, template)
        dropped += 1
    if room is not None and len(ids) > room:
        raise InputError(
            f"{who}: the prompt is {len(ids)} tokens"
            + (f" (after dropping all {dropped} exchanges)" if dropped else "")
            + f" and {max_new_tokens} new tokens are asked for, but the model's context is {limit} tokens",
            "shorten the prompt" + ("" if dropped else ", pass --truncate to drop examples")
            + " or lower --max-new-tokens",
        )
    return ids, dropped


def to_record(sample: Sample, model: LoadedModel) -> Record:
    row = sample.row
    return Record(persona=row.persona, prompt=row.prompt, temperature=row.temperature,
                  sample=row.sample, seed=row.seed, text=model.decode(list(sample.token_ids)),
                  new_tokens=len(sample.token_ids), finish_reason=sample.finish_reason,
                  model=model.label, id=row.id)


def run(settings: Settings, model: LoadedModel, rows: Sequence[Row],
        on_record: Callable[[Record], None],
        on_step: Callable[[int], None] = lambda _: None,
        on_split: Callable[[int, int], None] = lambda _a, _b: None) -> None:
    """Sample `rows` on the model (the CUDA fast path where it is safe); records as they finish."""
    sample_rows(settings, model, rows, lambda s: on_record(to_record(s, model)), on_step, on_split)


def sample_rows(settings: Settings, model: LoadedModel, rows: Sequence[Row],
                on_sample: Callable[[Sample], None],
                on_step: Callable[[int], None] = lambda _: None,
                on_split: Callable[[int, int], None] = lambda _a, _b: None) -> None:
    from .fastpath import usable

    generate_grid(model.model, rows, settings, eos_ids=model.eos_ids, pad_id=model.pad_id,
                  on_sample=on_sample, on_step=on_step, on_split=on_split,
                  graph_safe=usable(model.model, model.gptq_kernel))
