"""The OpenAI chat-completions protocol, with personas as models: requests in, answers out.

Pure data and text, no HTTP and no torch: what a request asks for (`ChatRequest` → `ChatPlan`),
which conversation it is (`conversation`), and the JSON shapes of answers, stream chunks and
errors. `http.py` serves it; the decode engine runs it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError
from ..library.answer_format import from_response_format
from ..library.load import Library
from ..library.schema import Persona, RuleFields
from ..model.prompt import Dialog
from ..sampling.grid import TOP_LOGPROBS, Rules, rules_from

DEFAULT_TEMPERATURE = 0.7  # for a persona without its own `temperature`
MAX_CHOICES = 128
GREEDY_LOGPROB = -9999.0  # stands for -inf (JSON has none), as vLLM writes it


class ApiError(Exception):
    """A request the server answers with an error status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the request -----------------------------------------------------------------------------------


class TextPart(BaseModel):
    """A content part; only text parts are understood (a persona has no eyes)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise ApiError(400, f"content parts of type {', '.join(sorted(kinds))} are not supported: "
                           "send text", param="messages")
        return "".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(RuleFields):
    """The fields of OpenAI's chat-completions request that personas serves (plus vLLM's `top_k`,
    `min_tokens`, `min_p` and `repetition_penalty`, and llama.cpp's `dry_*`: the logits rules of
    RuleFields, with OpenAI's ranges where OpenAI has the field); any other field is accepted,
    ignored and logged."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: off (vLLM's convention)
    seed: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)  # no end of turn before this many tokens
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}};
    # checked in plan_request, so its error names `response_format`
    response_format: dict[str, Any] | None = None


def parse_request(body: bytes | dict[str, Any]) -> ChatRequest:
    """The request from its JSON body (or a batch line's decoded `body`); a 400 that names the
    field for anything wrong."""
    try:
        if isinstance(body, dict):
            return ChatRequest.model_validate(body)
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        if problem["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON ({problem['msg']})") from None
        if problem["type"] == "model_type":
            raise ApiError(400, "the body must be a JSON object") from None
        raise ApiError(400, f"{where}: {problem['msg']}", param=where or None) from None


@dataclass(frozen=True)
class ChatPlan:
    """What one chat-completions request runs: the persona, the conversation after the persona's
    own context, and how to sample its n choices."""

    persona: Persona
    dialog: Dialog
    n: int
    temperature: float
    seed: int
    max_tokens: int
    min_tokens: int
    top_p: float | None
    top_k: int | None
    stops: tuple[str, ...]
    logprobs: int | None  # None: no log-probabilities; else how many alternatives per token
    stream: bool
    include_usage: bool
    rules: Rules  # the request's own, over the persona's, over [defaults]; token texts not yet ids


BASE_MODEL = "base"  # the model itself: a request's own messages, no persona around them


def plan_request(request: ChatRequest, library: Library, seed_default: int | None = None,
                 base_names: Sequence[str] = (BASE_MODEL,)) -> ChatPlan:
    """Check a request against the library; raises ApiError (404 for an unknown persona).

    `model` names a persona of the library — or, when it is one of `base_names` ("base", the
    loaded model's own name) and no persona has that name, the model itself: the request's
    messages run as they stand, its system message the persona (personas given as data).
    What the request leaves out: temperature is the persona's, else 0.7; max_tokens, top_p and
    top_k come from the file's `[defaults]`, else personas' built-in values (as for `generate`);
    the seed is `seed_default` (serve --seed), else drawn at random.
    """
    if request.model in base_names and request.model not in library.personas:
        persona = Persona(name=request.model)
    else:
        try:
            persona = library.get(request.model)
        except InputError as e:  # its hint names the closest personas, or all of them
            raise ApiError(404, f"the model '{request.model}' does not exist: the models are this server's "
                           f"personas — {e.todo} — or '{BASE_MODEL}' for the model itself",
                           type="not_found_error", param="model", code="model_not_found") from None
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if any(not stop for stop in stops):
        raise ApiError(400, "stop: a stop string must not be empty", param="stop")
    defaults = library.defaults
    max_tokens = defaults.pick("max_new_tokens", request.max_completion_tokens or request.max_tokens)
    if request.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens ({request.min_tokens}) is more than max_tokens ({max_tokens})",
                       param="min_tokens")
    if request.top_logprobs and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    temperature = request.temperature
    if temperature is None:
        temperature = persona.temperature if persona.temperature is not None else DEFAULT_TEMPERATURE
    seed = request.seed if request.seed is not None else (
        seed_default if seed_default is not None else secrets.randbelow(2**31))
    top_k = defaults.pick("top_k", request.top_k)
    rules = rules_from(request).over(rules_from(persona)).over(rules_from(defaults))
    try:
        answer_format = from_response_format(request.response_format)
    except ValueError as e:
        raise ApiError(400, str(e), param="response_format") from None
    if answer_format is not None:
        rules = replace(rules, answer_format=answer_format)
    return ChatPlan(
        persona=persona, dialog=conversation(persona, request.messages), n=request.n, temperature=temperature,
        seed=seed, max_tokens=max_tokens, min_tokens=request.min_tokens, top_p=defaults.pick("top_p", request.top_p),
        top_k=top_k if top_k and top_k > 0 else None, stops=stops,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None, stream=request.stream,
        include_usage=bool(request.stream and request.stream_options and request.stream_options.include_usage),
        rules=rules)


def conversation(persona: Persona, messages: Sequence[Message]) -> Dialog:
    """The persona's dialog continued by the client's messages.

    System (and developer) messages are appended to the persona's system context; user and
    assistant turns follow the persona's examples as sent. The Llama-2 format has no place for
    two user turns in a row, so turns must alternate and end with the user's.
    """
    systems = [persona.system] if persona.system else []
    turns: list[tuple[str, str]] = []
    for message in messages:
        text = message.text()
        if message.role in ("system", "developer"):
            systems.append(text)
        else:
            turns.append((message.role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "messages must end with a user message", param="messages")
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ApiError(400, "user and assistant messages must alternate, starting with a user message",
                           param="messages")
    if not turns[-1][1].strip():
        raise ApiError(400, "the last user message is empty", param="messages")
    exchanges = tuple((turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2))
    return Dialog(system="\n\n".join(systems) if systems else None,
                  examples=tuple((e.user, e.assistant) for e in persona.examples) + exchanges,
                  user=turns[-1][1])


# --- the answer ------------------------------------------------------------------------------------


class ChoiceText:
    """One choice's text as its tokens arrive: decoded incrementally, cut at the first stop
    string, and released for streaming only where it can no longer change.

    Incremental decoding as vLLM does it: the new tokens are decoded together with the ones just
    before them, and only the difference is taken, so a word-initial token keeps its space. Text
    ending in an incomplete UTF-8 sequence waits for the next token. What streaming releases is
    the text stripped of leading space, holding back trailing space and whatever could still
    become a stop string; joined, the deltas equal `final()`.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decode = decode
        self.stops = tuple(stops)
        self.tokens: list[int] = []
        self.text = ""  # decoded so far, before any cut
        self.cut: int | None = None  # where the first stop string starts, once seen
        self.sent = 0  # characters released to the stream
        self._prefix_offset = self._read_offset = 0

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    def add(self, token: int) -> None:
        """Take one token; after a stop string is found, further tokens are ignored."""
        if self.stopped:
            return
        self.tokens.append(token)
        before = self.decode(self.tokens[self._prefix_offset:self._read_offset])
        now = self.decode(self.tokens[self._prefix_offset:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += now[len(before):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        found = [at for at in (self.text.find(stop, searched_from) for stop in self.stops) if at >= 0]
        if found:
            self.cut = min(found)

    def final(self) -> str:
        """The whole answer: the tokens decoded as one (as `generate` does), cut at the first stop
        string, stripped."""
        text = self.decode(self.tokens)
        if self.stops:
            found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
            if found:
                text = text[:min(found)]
        return text.strip()

    def delta(self, finished: bool = False) -> str:
        """Text not yet streamed that can no longer change (all of it, once `finished`)."""
        if finished:
            ready = self.final()
            if not ready.startswith(self._released()):
                return ""  # never seen in practice: incremental and whole decoding disagree
        else:
            visible = self.text[:self.cut].lstrip()
            if not self.stopped and self.stops:
                visible = visible[:max(0, len(visible) - max(len(s) for s in self.stops) + 1)]
            ready = visible.rstrip()
        out = ready[self.sent:]
        self.sent = max(self.sent, len(ready))
        return out

    def _released(self) -> str:
        return self.text[:self.cut].lstrip()[:self.sent]


class Choices:
    """A request's n choices as their tokens and samples arrive: each text cut at its first stop
    string, its log-probability entries, its finish reason; the chat.completion object once all
    have finished. The server builds its answers and streams with it, `batch` its output lines.
    """

    def __init__(self, plan: ChatPlan, decode: Callable[[list[int]], str], token_text: Callable[[int], str]):
        self.plan = plan
        self.texts = [ChoiceText(decode, plan.stops) for _ in range(plan.n)]
        self.finish: list[str | None] = [None] * plan.n
        self.logprobs: list[list[dict[str, Any]]] | None = (
            [[] for _ in range(plan.n)] if plan.logprobs is not None else None)
        self.token_text = token_text

    @property
    def watch_tokens(self) -> bool:
        """Whether each token must be seen as it comes (a stream, stop strings, log-probabilities),
        not only each finished sample."""
        return self.plan.stream or bool(self.plan.stops) or self.plan.logprobs is not None

    @property
    def done(self) -> bool:
        return all(self.finish)

    def add_token(self, i: int, token: int, logprob: Any | None) -> list[dict[str, Any]] | None:
        """Choice i's new token; returns its log-probability entries (None when not asked for).
        A choice that reaches a stop string finishes ("stop"): its row can be cancelled."""
        if self.finish[i]:
            return None
        text = self.texts[i]
        text.add(token)
        entries = None
        if self.logprobs is not None and logprob is not None:
            entries = [logprob_entry(token, logprob.logprob, logprob.top, self.plan.logprobs or 0, self.token_text)]
            self.logprobs[i].append(entries[0])
        if text.stopped:
            self.finish[i] = "stop"
        return entries

    def add_sample(self, i: int, token_ids: Sequence[int], finish_reason: str) -> None:
        """Choice i's row ended: its whole answer (its tokens were watched, or were not)."""
        if self.finish[i]:
            return  # ended by a stop string already
        self.texts[i].tokens = list(token_ids)
        self.finish[i] = finish_reason

    def completion_tokens(self) -> int:
        return sum(len(text.tokens) for text in self.texts)

    def completion(self, request_id: str, prompt_tokens: int) -> dict[str, Any]:
        choices = [answer_choice(i, text.final(), self.finish[i] or "stop",
                                 self.logprobs[i] if self.logprobs is not None else None)
                   for i, text in enumerate(self.texts)]
        return completion(request_id, self.plan.persona.name, choices, prompt_tokens, self.completion_tokens())


def logprob_entry(token_id: int, logprob: float, top: Sequence[tuple[int, float]], count: int,
                  text_of: Callable[[int], str]) -> dict[str, Any]:
    """One token of a choice's `logprobs.content`: its text, bytes, log-probability, and its
    `count` likeliest alternatives."""
    def entry(token: int, value: float) -> dict[str, Any]:
        text = text_of(token)
        return {"token": text, "logprob": value if value != float("-inf") else GREEDY_LOGPROB,
                "bytes": list(text.encode("utf-8"))}

    return {**entry(token_id, logprob), "top_logprobs": [entry(t, v) for t, v in top[:count]]}


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def completion(request_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def answer_choice(index: int, content: str, finish_reason: str,
                  logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": content},
            "logprobs": {"content": logprobs} if logprobs is not None else None, "finish_reason": finish_reason}


def chunk(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def chunk_choice(index: int, delta: dict[str, str], finish_reason: str | None = None,
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_entry(persona: Persona, created: int, context: int | None) -> dict[str, Any]:
    return {"id": persona.name, "object": "model", "created": created, "owned_by": "personas",
            "max_model_len": context}
