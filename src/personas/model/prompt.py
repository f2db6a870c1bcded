"""Chat prompts, as text and as token ids. Pure strings and lists: no torch, no transformers.

Two formats:

* Llama-2 chat, exactly as Meta's reference builds it (`llama/generation.py`, `chat_completion`):
  the system context folds into the first user turn, each finished exchange is encoded on its own
  as `[INST] {user} [/INST] {answer} ` with BOS and EOS added as *ids*, and the open turn is
  `[INST] {user} [/INST]` with a BOS id. The text form writes those ids as `<s>`/`</s>` and equals
  the Hugging Face Llama-2-chat `chat_template`.
* Any other model: the tokenizer's own chat template.

Text from a persona or a user never becomes a control token: it is encoded with
`split_special_tokens=True`, so a typed `<s>` or `<|im_start|>` stays text.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"

TEMPLATES = ("llama2", "model")


@dataclass(frozen=True)
class Dialog:
    """What a persona's prompt is made of: system context, few-shot exchanges, the open question."""

    system: str | None
    examples: tuple[tuple[str, str], ...]
    user: str

    @classmethod
    def for_persona(cls, persona: Any, prompt: str) -> Dialog:
        return cls(
            system=persona.system,
            examples=tuple((e.user, e.assistant) for e in persona.examples),
            user=prompt,
        )


# --- Llama-2 -----------------------------------------------------------------------------------


def llama2_turns(dialog: Dialog) -> list[tuple[str, bool]]:
    """Each turn's text as Meta encodes it, and whether an EOS id follows it (finished exchange)."""
    users = [u for u, _ in dialog.examples] + [dialog.user]
    if dialog.system is not None:
        users[0] = B_SYS + dialog.system + E_SYS + users[0]
    turns = [
        (f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", True)
        for user, (_, answer) in zip(users, dialog.examples)
    ]
    turns.append((f"{B_INST} {users[-1].strip()} {E_INST}", False))
    return turns


def llama2_text(dialog: Dialog) -> str:
    """The prompt with BOS/EOS written as text: the Hugging Face Llama-2-chat template's output."""
    return "".join(BOS_TEXT + text + (EOS_TEXT if eos else "") for text, eos in llama2_turns(dialog))


def llama2_ids(dialog: Dialog, encode: Callable[[str], list[int]], bos_id: int,
               eos_id: int) -> list[int]:
    """Token ids as Meta's reference builds them: each turn encoded alone, BOS/EOS as ids."""
    ids: list[int] = []
    for text, eos in llama2_turns(dialog):
        ids += [bos_id, *encode(text)] + ([eos_id] if eos else [])
    return ids


# --- the model's own chat template -------------------------------------------------------------


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...
    def encode(self, text: str, **kwargs: Any) -> list[int]: ...


def messages(dialog: Dialog) -> list[dict[str, str]]:
    out = [{"role": "system", "content": dialog.system}] if dialog.system is not None else []
    for user, answer in dialog.examples:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    out.append({"role": "user", "content": dialog.user})
    return out


def chat_messages(dialog: Dialog, tokenizer: ChatTokenizer) -> list[dict[str, str]]:
    """The dialog's messages for the tokenizer's template. A template with no system role
    (Mistral's v0.1/v0.2 raise on one) gets the system text folded into the last user message,
    `system + "\n\n" + user`, as Mistral's own later templates place it."""
    msgs = messages(dialog)
    if msgs[0]["role"] == "system" and not _takes_system(tokenizer):
        system = msgs.pop(0)["content"]
        msgs[-1] = {"role": "user", "content": f"{system}\n\n{msgs[-1]['content']}"}
    return msgs


_TAKES_SYSTEM: dict[str, bool] = {}  # chat template text -> whether it renders a system message


def _takes_system(tokenizer: ChatTokenizer) -> bool:
    from jinja2.exceptions import TemplateError

    template = str(getattr(tokenizer, "chat_template", ""))
    if template not in _TAKES_SYSTEM:
        try:
            _render(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
            _TAKES_SYSTEM[template] = True
        except TemplateError:
            _TAKES_SYSTEM[template] = False
    return _TAKES_SYSTEM[template]


def _render(tokenizer: ChatTokenizer, msgs: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def template_text(dialog: Dialog, tokenizer: ChatTokenizer) -> str:
    return _render(tokenizer, chat_messages(dialog, tokenizer))


# Private-use code points: no persona text or chat template contains them.
_OPEN, _CLOSE = "\ue000", "\ue001"


def template_pieces(dialog: Dialog, tokenizer: ChatTokenizer) -> list[tuple[str, bool]]:
    """The rendered prompt split into (text, is_message_content) pieces.

    The template is rendered once with each message's content replaced by a marker, so the
    pieces the template wrote (which may hold control tokens) can be told apart from the
    persona's and user's text (which must not). If the template transforms content in a way the
    markers cannot follow (e.g. strips it), the stripped content is tried; failing that the
    whole text is one template piece, which is still the exact text, only without the guard.
    """
    msgs = chat_messages(dialog, tokenizer)
    real = _render(tokenizer, msgs)
    marked = _render(tokenizer, [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(msgs)])
    for transform in (lambda s: s, str.strip):
        pieces: list[tuple[str, bool]] = []
        rest = marked
        for i, m in enumerate(msgs):
            marker = f"{_OPEN}{i}{_CLOSE}"
            before, found, rest = rest.partition(marker)
            if not found:
                break
            pieces += [(before, False), (transform(m["content"]), True)]
        else:
            pieces.append((rest, False))
            pieces = [p for p in pieces if p[0]]
            if "".join(text for text, _ in pieces) == real:
                return pieces
    return [(real, False)]


_CONTROLS: "weakref.WeakKeyDictionary[Any, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def _controls(tokenizer: ChatTokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's control and added tokens, found once per tokenizer (a batch
    file asks for them on every line)."""
    if tokenizer not in _CONTROLS:
        found = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        found += [t for t in getattr(tokenizer, "get_added_vocab", dict)() if t not in found]
        _CONTROLS[tokenizer] = tuple(found)
    return _CONTROLS[tokenizer]


def template_ids(dialog: Dialog, tokenizer: ChatTokenizer) -> list[int]:
    """The rendered prompt's ids. Encoded whole — as the model saw its training prompts; pieces
    encoded apart split differently at their edges in SentencePiece vocabularies (Mistral's) —
    unless a message's text holds a control token's text, which is then kept text by encoding
    the pieces apart, the messages' with `split_special_tokens`."""
    pieces = template_pieces(dialog, tokenizer)
    controls = _controls(tokenizer)
    if not any(control in text for text, is_content in pieces if is_content for control in controls):
        return tokenizer.encode("".join(text for text, _ in pieces), add_special_tokens=False)
    ids: list[int] = []
    for text, is_content in pieces:
        ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=is_content)
    return ids


def is_llama2_chat_template(template: str | None) -> bool:
    """True for Llama-2-chat's own template (and for none at all, where Llama-2 is the default)."""
    return template is None or ("[INST]" in template and "<<SYS>>" in template)
