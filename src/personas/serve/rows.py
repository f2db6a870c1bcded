"""A chat-completions request made into the engine's rows, on the loaded model: one
implementation for `serve --http` and `batch`, so the same body samples the same choices."""

from __future__ import annotations

from ..errors import InputError
from ..library.load import Library
from ..model.load import LoadedModel, fit_dialog
from ..sampling.grid import Row, Settings, TokenizedCell, build_grid, resolve_rules
from .openai import BASE_MODEL, ApiError, ChatPlan, ChatRequest, plan_request


def base_names(loaded: LoadedModel) -> tuple[str, ...]:
    """The names that ask for the model itself rather than a persona."""
    return (BASE_MODEL, loaded.label)


def plan_rows(chat: ChatRequest, library: Library, loaded: LoadedModel,
              seed_default: int | None) -> tuple[ChatPlan, list[Row], int]:
    """(the plan, its n rows, the prompt's length in tokens); raises ApiError for a request that
    cannot run: an unknown persona, a bad value, a conversation too long for the context.

    The rows are seeded as `generate --seed S --prompt TEXT` seeds its samples: the same request
    answers the same, and a one-turn request answers as generate does.
    """
    plan = plan_request(chat, library, seed_default, base_names(loaded))
    try:
        ids, _ = fit_dialog(plan.dialog, loaded, None, plan.max_tokens, truncate=False,
                            who=f"persona '{plan.persona.name}'")
    except InputError as e:
        raise ApiError(400, f"{e.what} — shorten the conversation or lower max_tokens", param="messages",
                       code="context_length_exceeded") from None
    try:
        rules = resolve_rules(plan.rules, loaded.tokenizer)
    except InputError as e:
        raise ApiError(400, str(e), param="logit_bias") from None
    cell = TokenizedCell(plan.persona.name, plan.dialog.user, tuple(ids), (plan.temperature,), plan.n, plan.seed,
                         None, plan.max_tokens, rules)
    return plan, build_grid([cell], [plan.temperature], plan.n, plan.seed), len(ids)


def plan_settings(plan: ChatPlan) -> Settings:
    """How the engine samples the plan's rows."""
    return Settings(max_new_tokens=plan.max_tokens, min_new_tokens=plan.min_tokens, top_p=plan.top_p,
                    top_k=plan.top_k)
