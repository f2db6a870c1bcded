"""What a persona file holds: personas, their few-shot examples, and the `[defaults]` table."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .answer_format import from_schema

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class Strict(BaseModel):
    """A TOML table: unknown keys are errors, and the values never change once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Example(Strict):
    """One few-shot exchange: what the user said and how the persona answered."""

    user: str
    assistant: str

    _check = field_validator("user", "assistant")(not_blank)


Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class RuleFields(Strict):
    """The logits rules a table may set beside temperature (README: Sampling controls; the
    rules themselves: sampling/rules.py). logit_bias maps a token — its text, or its id written
    as digits — to a bias in [-100, 100]; -100 bans it."""

    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Bias] | None = Field(default=None, max_length=300)
    dry_multiplier: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    dry_base: float | None = Field(default=None, gt=1, allow_inf_nan=False)
    dry_allowed_length: int | None = Field(default=None, ge=1)
    dry_sequence_breakers: list[Annotated[str, Field(min_length=1)]] | None = None
    # Every answer valid JSON for this schema: given as a table, JSON text or a file's path
    # (relative to the file that names it); kept as the schema's JSON text, checked by llguidance.
    json_schema: str | None = None

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, value: Any, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return from_schema(value, (info.context or {}).get("folder")).source


class Persona(RuleFields):
    """`[personas.NAME]`: a system context, few-shot examples, a default prompt, and optionally
    this persona's own logits rules (RuleFields)."""

    name: str
    description: str | None = None  # one line for `personas list`
    system: str | None = None
    prompt: str | None = None  # used when no --prompt is given
    examples: list[Example] = Field(default_factory=list)
    temperature: Temperature | None = None  # this persona's voice in `chat` (not used by `generate`)
    opener: str | None = None  # a first line for `chat` when no --opener is given (a card's first_mes)

    _check = field_validator("system", "prompt", "description", "opener")(not_blank)


class Defaults(RuleFields):
    """`[defaults]`: what commands use when a flag is not given (the rules too).

    `pick` is the one place where a value falls back: the flag (or a request's own field), else
    this table's value, else the built-in one (`BUILT_IN`).
    """

    model: str | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperatures: list[Temperature] | None = Field(default=None, min_length=1)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)

    def pick(self, key: str, given: Any = None) -> Any:
        """`given` if it is set, else this table's `key`, else the built-in value (may be None)."""
        for value in (given, getattr(self, key), getattr(BUILT_IN, key)):
            if value is not None:
                return value
        return None


# personas' own fallbacks, where neither a flag nor [defaults] says anything (model: `auto`,
# resolved by model.choice; seed: a random one, printed).
BUILT_IN = Defaults(max_new_tokens=128, temperatures=[0.7], n=1)
