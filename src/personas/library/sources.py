"""Personas from where people keep them: Character Card V1/V2/V3 (JSON, or inside a PNG),
TinyTroupe agent specifications, and PersonaHub's one-line personas (JSONL).

Each reader returns `Imported` personas (what `edit.add_personas` writes into a persona file).
Every problem is an `InputError` naming the source, raised before anything is written.

Character Card mapping (the V2 and V3 specs, as SillyTavern and card sites use them):
`system` is the card's `system_prompt` (its `{{original}}` placeholder dropped: there is no
frontend prompt to put there), then `description`, `personality` and `scenario`, each labelled,
blank ones skipped; `examples` come from `mes_example`, cut at `<START>` and split into
exchanges by the `{{user}}:` / `{{char}}:` line prefixes; `first_mes` becomes the opener;
`{{char}}` is the card's name (V3: its nickname if set) and `{{user}}` is "User". The card's
`creator_notes` are for people browsing cards and never reach a prompt; neither do
`post_history_instructions`, alternate greetings, lorebooks or assets.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .schema import NAME_PATTERN

MAX_CHUNK_BYTES = 8 * 2**20  # a card chunk larger than this is refused (a decompression-bomb guard)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")  # V3 first: when a PNG carries both, V3 is the newer card
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
USER_NAME = "User"


@dataclass(frozen=True)
class Imported:
    """A persona read from a card, an agent or a PersonaHub line, ready to be written as
    `[personas.NAME]`. `kind` and `source` say where it came from (for messages)."""

    name: str
    kind: str
    source: str
    system: str
    examples: tuple[tuple[str, str], ...] = ()
    opener: str | None = None
    description: str | None = None


def toml_name(text: str) -> str:
    """A persona name from free text: lower case, spaces as '-', only letters, digits, '_', '-', '.'."""
    name = re.sub(r"\s+", "-", text.strip().lower())
    name = re.sub(r"[^a-z0-9_.-]", "", name)
    return re.sub(r"^[^a-z0-9]+", "", name)


def _fail(source: str, what: str, todo: str) -> InputError:
    return InputError(f"{source}: {what}", todo)


# --- Character Cards ---------------------------------------------------------------------------


def png_text_chunks(data: bytes, source: str) -> dict[str, bytes]:
    """The card-bearing text chunks of a PNG (keyword -> value bytes).

    Written here rather than through Pillow: only the text chunks matter, the image is never
    decoded, and each chunk's declared length is checked against MAX_CHUNK_BYTES before it is
    read (or inflated, for zTXt), which Pillow does only with a process-wide setting.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise _fail(source, "not a PNG file (its signature is missing)", "give a card as .png or .json")
    chunks: dict[str, bytes] = {}
    at = len(PNG_SIGNATURE)
    while at < len(data):
        if at + 8 > len(data):
            raise _fail(source, "the PNG is cut short", "the file is damaged; export the card again")
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        crc = data[at + 8 + length:at + 12 + length]
        if kind in (b"tEXt", b"zTXt") and length > MAX_CHUNK_BYTES:
            raise _fail(source, f"a text chunk of {length} bytes (more than {MAX_CHUNK_BYTES >> 20} MB)",
                        "this is not a character card one can trust; refusing it")
        if len(body) < length or len(crc) < 4:
            raise _fail(source, "the PNG is cut short", "the file is damaged; export the card again")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise _fail(source, f"a damaged PNG chunk ({kind.decode('latin-1')}: its checksum is wrong)",
                        "the file is damaged; export the card again")
        if kind in (b"tEXt", b"zTXt"):
            keyword, _, value = body.partition(b"\0")
            name = keyword.decode("latin-1").lower()
            if name in CARD_KEYWORDS:
                chunks[name] = value if kind == b"tEXt" else _inflate(value[1:], source)
        if kind == b"IEND":
            break
        at += 12 + length
    return chunks


def _inflate(compressed: bytes, source: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        value = inflater.decompress(compressed, MAX_CHUNK_BYTES)
    except zlib.error:
        raise _fail(source, "a compressed text chunk that does not inflate", "export the card again") from None
    if inflater.unconsumed_tail:
        raise _fail(source, f"a compressed text chunk that inflates past {MAX_CHUNK_BYTES >> 20} MB",
                    "this is not a character card one can trust; refusing it")
    return value


def card_from_png(data: bytes, source: str) -> dict:
    chunks = png_text_chunks(data, source)
    for keyword in CARD_KEYWORDS:
        if keyword in chunks:
            try:
                text = base64.b64decode(chunks[keyword], validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise _fail(source, f"its '{keyword}' chunk is not base64 of UTF-8 text",
                            "the card is damaged; export it again") from None
            return _json_object(text, f"{source} ('{keyword}' chunk)")
    raise _fail(source, "no character card in this PNG (no 'ccv3' or 'chara' text chunk)",
                "export the card as PNG or JSON from your card tool")


def _json_object(text: str, source: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(source, f"not valid JSON ({e.msg} at line {e.lineno})", "check the file") from None
    if not isinstance(value, dict):
        raise _fail(source, "not a JSON object", "a card or agent is one JSON object")
    return value


def card_fields(card: dict, source: str) -> tuple[str, dict]:
    """(kind, the card's fields) for a V1 (bare fields), V2 or V3 card."""
    spec = card.get("spec")
    if spec is None:
        if not any(k in card for k in V1_FIELDS):
            raise _fail(source, "neither a character card nor a TinyTroupe agent",
                        "cards have spec 'chara_card_v2'/'chara_card_v3' or the V1 fields; agents have type 'TinyPerson'")
        return "character card V1", card
    if spec not in ("chara_card_v2", "chara_card_v3"):
        raise _fail(source, f"unknown card spec {spec!r}", "supported: chara_card_v2, chara_card_v3 and V1 cards")
    data = card.get("data")
    if not isinstance(data, dict):
        raise _fail(source, f"a {spec} card without its 'data' object", "the card is damaged; export it again")
    return ("character card V3" if spec == "chara_card_v3" else "character card V2"), data


def _text(fields: dict, key: str) -> str:
    value = fields.get(key)
    return value.strip() if isinstance(value, str) else ""


def _macros(text: str, char: str) -> str:
    text = re.sub(r"\{\{\s*char\s*\}\}", lambda _: char, text, flags=re.IGNORECASE)
    return re.sub(r"\{\{\s*user\s*\}\}", USER_NAME, text, flags=re.IGNORECASE)


_SPEAKER = re.compile(r"^\s*\{\{\s*(user|char)\s*\}\}\s*:\s?", re.IGNORECASE)


def example_exchanges(mes_example: str, char: str) -> tuple[tuple[str, str], ...]:
    """`mes_example` as (user, answer) exchanges: blocks cut at `<START>`, messages begun by
    `{{user}}:` or `{{char}}:` lines (a line without a prefix continues the message before it).
    Consecutive messages of one side are joined; an answer with no question before it in its
    block is dropped, as is a question that gets no answer."""
    exchanges = []
    for block in re.split(r"<START>", mes_example, flags=re.IGNORECASE):
        messages: list[list] = []  # [side, lines]
        for line in block.splitlines():
            if speaker := _SPEAKER.match(line):
                side = speaker.group(1).lower()
                text = line[speaker.end():]
                if messages and messages[-1][0] == side:
                    messages[-1][1].append(text)
                else:
                    messages.append([side, [text]])
            elif messages:
                messages[-1][1].append(line)
        texts = [(side, _macros("\n".join(lines).strip(), char)) for side, lines in messages]
        for (side, text), (next_side, answer) in zip(texts, texts[1:]):
            if side == "user" and next_side == "char" and text and answer:
                exchanges.append((text, answer))
    return tuple(exchanges)


def persona_from_card(card: dict, source: str) -> Imported:
    kind, fields = card_fields(card, source)
    name = _text(fields, "name")
    if not name:
        raise _fail(source, f"a {kind} without a name", "give the card a name")
    char = _text(fields, "nickname") or name
    system_prompt = re.sub(r"\{\{\s*original\s*\}\}", "", _text(fields, "system_prompt"), flags=re.IGNORECASE).strip()
    parts = [system_prompt] if system_prompt else []
    for label, key in (("Description", "description"), ("Personality", "personality"), ("Scenario", "scenario")):
        if value := _text(fields, key):
            parts.append(f"{label}: {value}")
    if not parts:
        raise _fail(source, f"the {kind} '{name}' says nothing about its character",
                    "fill in its description, personality or system prompt")
    opener = _macros(_text(fields, "first_mes"), char) or None
    return Imported(name=name, kind=kind, source=source, system=_macros("\n\n".join(parts), char),
                    examples=example_exchanges(_text(fields, "mes_example"), char), opener=opener,
                    description=f"{kind} '{name}' from {Path(source).name}")


# --- TinyTroupe ----------------------------------------------------------------------------------

# The persona fields in the order a reader meets a person; any others follow, in the file's order.
TINYTROUPE_ORDER = ("age", "gender", "nationality", "residence", "education", "occupation", "personality", "style",
                    "long_term_goals", "beliefs", "preferences", "skills", "behaviors", "health", "relationships",
                    "other_facts")


def _describe(value: Any) -> str:
    """A JSON value as readable text: a list as '; '-joined items, an object as 'key: value'
    pairs joined by '; ' (nested ones in parentheses), blanks left out."""
    if isinstance(value, dict):
        parts = []
        for key, item in value.items():
            if text := _describe(item):
                label = key.replace("_", " ")
                parts.append(f"{label} ({text})" if isinstance(item, dict) else f"{label}: {text}")
        return "; ".join(parts)
    if isinstance(value, list):
        return "; ".join(text for text in map(_describe, value) if text)
    return "" if value is None else str(value).strip()


def persona_from_agent(spec: dict, source: str) -> Imported:
    persona = spec.get("persona")
    if not isinstance(persona, dict):
        raise _fail(source, "a TinyPerson without its 'persona' object", "check the agent file")
    name = _describe(persona.get("name"))
    if not name:
        raise _fail(source, "a TinyPerson without a name", "give the persona a name")
    lines = [f"You are {name}."]
    keys = [k for k in TINYTROUPE_ORDER if k in persona] + [
        k for k in persona if k not in TINYTROUPE_ORDER and k != "name"]
    for key in keys:
        if text := _describe(persona[key]):
            lines.append(f"{key.replace('_', ' ').capitalize()}: {text}")
    return Imported(name=name, kind="TinyTroupe agent", source=source, system="\n".join(lines),
                    description=f"TinyTroupe agent '{name}' from {Path(source).name}")


# --- PersonaHub ----------------------------------------------------------------------------------


def personas_from_hub_lines(text: str, source: str, prefix: str, limit: int | None) -> list[Imported]:
    """One persona per JSONL line `{"persona": "..."}`, named PREFIX-1, PREFIX-2, …"""
    out: list[Imported] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(out) >= limit:
            break
        where = f"{source}:{number}"
        item = _json_object(line, where)
        persona = item.get("persona")
        if not isinstance(persona, str) or not persona.strip():
            raise _fail(where, "no 'persona' text on this line", 'write one {"persona": "..."} object per line')
        out.append(Imported(name=f"{prefix}-{len(out) + 1}", kind="PersonaHub persona", source=where,
                            system=f"Your persona: {persona.strip()}", description=persona.strip()[:80]))
    if not out:
        raise _fail(source, "no personas in this file", 'write one {"persona": "..."} object per line')
    return out


# --- any source ----------------------------------------------------------------------------------


def read_source(path: Path, name: str | None = None, limit: int | None = None) -> list[Imported]:
    """The personas in one file, told apart by its content: a PNG, a JSON card or agent, or
    PersonaHub JSONL. `name` renames a single persona (for PersonaHub: the prefix)."""
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _fail(source, f"cannot read it ({e.strerror})", "check the path") from None
    if data.startswith(PNG_SIGNATURE):
        found = [persona_from_card(card_from_png(data, source), source)]
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _fail(source, "neither a PNG nor UTF-8 text", "give a card (.png or .json), an agent (.json) "
                        "or PersonaHub lines (.jsonl)") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1 and all(line.lstrip().startswith("{") and line.rstrip().endswith("}") for line in lines) \
                and _is_hub_line(lines[0]):
            return personas_from_hub_lines(text, source, name or "persona", limit)
        if len(lines) == 1 and _is_hub_line(lines[0]):
            return personas_from_hub_lines(text, source, name or "persona", limit)
        obj = _json_object(text, source)
        found = [persona_from_agent(obj, source) if obj.get("type") == "TinyPerson" else persona_from_card(obj, source)]
    if name is not None:
        return [Imported(**{**found[0].__dict__, "name": name})]
    key = toml_name(found[0].name)
    if not key:
        raise _fail(source, f"the name {found[0].name!r} has no letters or digits to make a persona name of",
                    "pass --name NAME")
    return [Imported(**{**found[0].__dict__, "name": key})]


def _is_hub_line(line: str) -> bool:
    try:
        item = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(item, dict) and "persona" in item and isinstance(item["persona"], str)


def read_sources(paths: Iterable[Path], name: str | None = None, limit: int | None = None) -> list[Imported]:
    """Every source's personas, in order; `name` only with a single source."""
    paths = list(paths)
    if name is not None and len(paths) > 1:
        raise InputError("--name goes with one source", "import the files one at a time to name each")
    if name is not None and not re.match(NAME_PATTERN, name):
        raise InputError(f"--name {name!r} is not allowed",
                         "use letters, digits, '_', '-' and '.', starting with a letter or digit")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit} is not allowed", "use 1 or more")
    return [p for path in paths for p in read_source(path, name, limit)]
