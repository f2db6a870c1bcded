"""From a request (personas, prompts, temperatures, n, seed) to records, on a loaded model.

This is the core behind `personas generate`: it validates the request's values, builds the
grid, checks every prompt fits the model's context, and turns samples into records.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..library.schema import BUILT_IN, Persona
from ..model.load import LoadedModel, fit_dialog
from ..model.prompt import Dialog
from ..record import Record
from ..sampling.grid import (NO_RULES, Row, Rules, Sample, Settings, TokenizedCell, build_grid, check_rules,
                             resolve_rules, rules_from, validate_values)


@dataclass(frozen=True)
class Cell:
    """One persona × prompt cell; a prompts-file line may set its own temperatures, n, seed, id,
    max_new_tokens and logits rules."""

    persona: Persona
    prompt: str
    temperatures: tuple[float, ...] | None = None
    n: int | None = None
    seed: int | None = None
    id: str | int | None = None
    max_new_tokens: int | None = None
    rules: Rules | None = None


@dataclass(frozen=True)
class Request:
    """What `generate` is asked for: the cells (personas × prompts, or a prompts file's lines),
    the temperatures and samples per cell, the base seed, and how to sample."""

    personas: Sequence[Persona]
    prompts: Sequence[str] = ()  # empty: each persona's own prompt
    cells: Sequence[Cell] = ()  # when given (a prompts file), these replace personas × prompts
    temperatures: Sequence[float] = tuple(BUILT_IN.temperatures)
    n: int = BUILT_IN.n
    seed: int = field(default_factory=lambda: secrets.randbelow(2**31))
    settings: Settings = Settings()
    template: str | None = None  # "llama2" | "model"; None: the model's own choice
    truncate: bool = False  # drop examples (oldest first) from prompts too long for the context
    on_truncate: Callable[[str, int, int], None] = field(default=lambda _p, _d, _n: None, compare=False)

    def __post_init__(self) -> None:
        # Everything that can be checked without a model is checked here, before a slow load.
        validate_values(self.temperatures, self.n, self.settings)
        for cell in self.cells:
            validate_values(cell.temperatures or self.temperatures, cell.n or self.n, self.settings)
            if cell.rules is not None:
                check_rules(cell.rules, name=lambda field: field)
        all_cells(self)  # personas without a prompt, empty prompts


def all_cells(request: Request) -> list[Cell]:
    """Each persona × prompt cell of the request, in order."""
    if request.cells:
        return list(request.cells)
    out = []
    for persona in request.personas:
        prompts = list(request.prompts) or ([persona.prompt] if persona.prompt else [])
        if not prompts:
            raise InputError(f"persona '{persona.name}' has no default prompt",
                             "pass --prompt TEXT or add prompt = \"...\" to the persona")
        for prompt in prompts:
            if not prompt.strip():
                raise InputError("the prompt is empty", "pass a non-empty --prompt")
            out.append(Cell(persona, prompt))
    return out


def plan(request: Request, model: LoadedModel) -> list[Row]:
    """The request's rows, each prompt tokenized and fitted to the model's context, each with its
    rules (`cell_rules`)."""
    cells = []
    for cell in all_cells(request):
        limit = cell.max_new_tokens or request.settings.max_new_tokens
        ids = fitted_prompt_ids(cell.persona, cell.prompt, request, model, limit)
        cells.append(TokenizedCell(cell.persona.name, cell.prompt, ids, cell.temperatures, cell.n, cell.seed, cell.id,
                                   cell.max_new_tokens, cell_rules(cell, request, model)))
    return build_grid(cells, request.temperatures, request.n, request.seed)


def cell_rules(cell: Cell, request: Request, model: LoadedModel) -> Rules | None:
    """A cell's logits rules: its line's own, over the command's flags, over its persona's, over
    the file's `[defaults]` — each rule from the first that sets it; token texts turned into the
    model's ids. None when nothing sets any."""
    settings = request.settings
    rules = (cell.rules or NO_RULES).over(settings.rules).over(rules_from(cell.persona)).over(settings.file_rules)
    return resolve_rules(rules, model.tokenizer)


def fitted_prompt_ids(persona: Persona, prompt: str, request: Request, model: LoadedModel,
                      max_new_tokens: int) -> tuple[int, ...]:
    """The prompt's ids, checked against the model's context with room for `max_new_tokens`;
    with `truncate`, examples are dropped (oldest first) until it fits — and `on_truncate` says
    so. Never silently."""
    ids, dropped = fit_dialog(Dialog.for_persona(persona, prompt), model, request.template,
                              max_new_tokens, request.truncate, who=f"persona '{persona.name}'")
    if dropped:
        request.on_truncate(persona.name, dropped, len(ids))
    return tuple(ids)


def to_record(sample: Sample, model: LoadedModel) -> Record:
    row = sample.row
    text = model.decode(list(sample.token_ids))
    answer_format = row.rules.answer_format if row.rules is not None else None
    asked_json = answer_format is not None and answer_format.is_json
    return Record(persona=row.persona, prompt=row.prompt, temperature=row.temperature,
                  sample=row.sample, seed=row.seed, text=text,
                  new_tokens=len(sample.token_ids), finish_reason=sample.finish_reason,
                  model=model.label, id=row.id, json=parsed_json(text, sample.finish_reason) if asked_json else None,
                  asked_json=asked_json)


def parsed_json(text: str, finish_reason: str) -> Any:
    """A JSON answer's value; None for one cut short by max_new_tokens (never half an object)."""
    if finish_reason != "stop":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # the format allowed an end here, so this is not expected
        return None


def sample_records(settings: Settings, model: LoadedModel, rows: Sequence[Row],
                   on_record: Callable[[Record], None],
                   on_step: Callable[[int], None] = lambda _: None,
                   on_split: Callable[[int, int], None] = lambda _a, _b: None) -> None:
    """Sample `rows` on the model; each record as its row finishes."""
    # Imported here: the engine brings torch, which a command refused for its input never needs.
    from ..engine.loop import sample_rows

    sample_rows(settings, model, rows, lambda s: on_record(to_record(s, model)), on_step, on_split)
