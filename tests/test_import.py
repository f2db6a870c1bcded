"""`personas import`: character cards (V1, V2, V3; JSON and PNG), TinyTroupe agents, PersonaHub
lines. Cards are built here with Pillow (a real PNG writer, independent of our reader); every
imported persona is read back by the real loader, rendered, and sampled on the tiny model."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from personas.cli import main
from personas.dialogue.chat import chat_opener
from personas.generate.request import Request, plan, sample_records
from personas.library.load import load_library
from personas.library.sources import MAX_CHUNK_BYTES, example_exchanges, toml_name
from personas.model.choice import resolve_model
from personas.model.load import load_model
from personas.model.prompt import Dialog, llama2_text
from personas.sampling.grid import Settings

EXISTING = """# My personas. This comment must survive an import.
[defaults]
max_new_tokens = 32  # and so must this one

[personas.pirate]
system = "You are a pirate."  # a trailing comment
prompt = "Ahoy?"
"""

V2 = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
    "name": "Seraphina", "description": "{{char}} guards a forest glade.", "personality": "kind, protective",
    "scenario": "{{user}} wakes up in {{char}}'s glade.", "first_mes": "*{{char}} smiles* You're awake, {{user}}.",
    "mes_example": "<START>\n{{user}}: Who are you?\n{{char}}: I am {{char}}.\nI found you hurt.\n"
                   "<start>\n{{User}}: Where am I?\n{{Char}}: Safe, {{user}}.",
    "creator_notes": "NOTES FOR BROWSERS ONLY", "system_prompt": "{{original}} Stay in character.", "tags": [],
    "creator": "me", "character_version": "1", "alternate_greetings": ["Hi"], "extensions": {},
    "post_history_instructions": "NEVER IN A PROMPT"}}
V3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {
    **V2["data"], "name": "Seraphina the Third", "nickname": "Sera", "description": "{{char}} is the newer card.",
    "group_only_greetings": [], "assets": []}}
V1 = {"name": "Old Tom", "description": "A lighthouse keeper.", "personality": "gruff", "scenario": "",
      "first_mes": "Mind the rocks.", "mes_example": "{{user}}: Hello\n{{char}}: Hmph."}
AGENT = {"type": "TinyPerson", "persona": {
    "name": "Oscar", "age": 30, "nationality": "German", "residence": "", "style": None,
    "occupation": {"title": "Architect", "organization": "Awesome Inc.", "description": "designs houses"},
    "personality": {"traits": ["curious", "calm"], "big_five": {"openness": "high"}},
    "beliefs": ["Form follows function."], "skills": ["CAD"], "favourite_tea": "Earl Grey"}}
HUB = '{"persona": "A chemistry teacher who loves puns."}\n\n{"persona": "A retired sailor in Lisbon."}\n' \
      '{"persona": "A beekeeper."}\n'


def card_png(path: Path, chunks: dict[str, dict | bytes | str]) -> Path:
    info = PngInfo()
    for keyword, value in chunks.items():
        data = value if isinstance(value, (str, bytes)) else base64.b64encode(json.dumps(value).encode()).decode()
        info.add_text(keyword, data if isinstance(data, str) else data.decode("latin-1"))
    Image.new("RGB", (3, 3), "green").save(path, pnginfo=info)
    return path


@pytest.fixture
def library_file(tmp_path) -> Path:
    path = tmp_path / "personas.toml"
    path.write_text(EXISTING)
    return path


def run_import(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["import", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_cards_agents_and_hub_lines_are_added_keeping_the_file(tmp_path, library_file, capsys):
    sources = [card_png(tmp_path / "sera.png", {"chara": V2}), tmp_path / "v3.png", tmp_path / "tom.json",
               tmp_path / "oscar.agent.json", tmp_path / "hub.jsonl"]
    card_png(sources[1], {"chara": V2 | {"data": V2["data"] | {"name": "Old V2"}}, "ccv3": V3})
    sources[2].write_text(json.dumps(V1))
    sources[3].write_text(json.dumps(AGENT))
    sources[4].write_text(HUB)
    status, out, err = run_import(capsys, *map(str, sources), "--file", str(library_file))
    assert status == 0, err
    text = library_file.read_text()
    assert text.startswith(EXISTING), "every existing line, comment and its order kept"
    assert "NOTES FOR BROWSERS ONLY" not in text and "NEVER IN A PROMPT" not in text
    library = load_library(library_file)
    assert out.splitlines()[0] == (f"added seraphina: character card V2 from {sources[0]} "
                                   f"({len(library.get('seraphina').system)} characters of system context, "
                                   "2 examples, an opener)")
    assert list(library.personas) == ["pirate", "seraphina", "seraphina-the-third", "old-tom", "oscar",
                                      "persona-1", "persona-2", "persona-3"]

    sera = library.get("seraphina")
    assert sera.system == ("Stay in character.\n\nDescription: Seraphina guards a forest glade.\n\n"
                           "Personality: kind, protective\n\nScenario: User wakes up in Seraphina's glade.")
    assert [(e.user, e.assistant) for e in sera.examples] == [
        ("Who are you?", "I am Seraphina.\nI found you hurt."), ("Where am I?", "Safe, User.")]
    assert sera.opener == "*Seraphina smiles* You're awake, User."
    third = library.get("seraphina-the-third")
    assert "Sera is the newer card." in third.system, "V3 preferred over V2 in one PNG; {{char}} is the nickname"
    assert library.get("old-tom").system == "Description: A lighthouse keeper.\n\nPersonality: gruff"
    assert [(e.user, e.assistant) for e in library.get("old-tom").examples] == [("Hello", "Hmph.")]
    assert library.get("oscar").system == (
        "You are Oscar.\nAge: 30\nNationality: German\nOccupation: title: Architect; organization: Awesome Inc.; "
        "description: designs houses\nPersonality: traits: curious; calm; big five (openness: high)\n"
        "Beliefs: Form follows function.\nSkills: CAD\nFavourite tea: Earl Grey")
    assert library.get("persona-2").system == "Your persona: A retired sailor in Lisbon."


def test_imported_personas_render_and_generate(tmp_path, tiny_llama_dir, capsys):
    target = tmp_path / "new.toml"  # created: it did not exist
    sources = [card_png(tmp_path / "sera.png", {"chara": V2}), tmp_path / "oscar.json", tmp_path / "hub.jsonl"]
    sources[1].write_text(json.dumps(AGENT))
    sources[2].write_text(HUB)
    assert run_import(capsys, *map(str, sources), "--file", str(target), "--limit", "1")[0] == 0
    library = load_library(target)
    assert list(library.personas) == ["seraphina", "oscar", "persona-1"]
    assert main(["render", "seraphina", "--prompt", "Hello?", "--template", "llama2", "--raw", "--file", str(target)]) == 0
    rendered = capsys.readouterr().out
    assert rendered == llama2_text(Dialog.for_persona(library.get("seraphina"), "Hello?"))
    assert "<<SYS>>\nStay in character." in rendered and "[/INST] I am Seraphina.\nI found you hurt. </s>" in rendered
    model = load_model(resolve_model(str(tiny_llama_dir)), device="cpu")
    request = Request(personas=list(library.personas.values()), prompts=["Hello?"], seed=1,
                      settings=Settings(max_new_tokens=4))
    records = []
    sample_records(request.settings, model, plan(request, model), records.append)
    assert sorted(r.persona for r in records) == ["oscar", "persona-1", "seraphina"]


def test_name_and_force(tmp_path, library_file, capsys):
    card = card_png(tmp_path / "sera.png", {"chara": V2})
    assert run_import(capsys, str(card), "--file", str(library_file), "--name", "pirate")[0] == 2
    assert library_file.read_text() == EXISTING, "refused: a persona of that name exists"
    status, out, _ = run_import(capsys, str(card), "--file", str(library_file), "--name", "pirate", "--force")
    assert status == 0 and out.startswith("replaced pirate: ")
    text = library_file.read_text()
    assert text.startswith("# My personas. This comment must survive an import.\n[defaults]\n"
                           "max_new_tokens = 32  # and so must this one\n")
    assert load_library(library_file).get("pirate").opener.startswith("*Seraphina smiles*")
    hub = tmp_path / "hub.jsonl"
    hub.write_text(HUB)
    assert run_import(capsys, str(hub), "--file", str(library_file), "--name", "sailor")[0] == 0
    assert [n for n in load_library(library_file).personas if n.startswith("sailor")] == ["sailor-1", "sailor-2",
                                                                                          "sailor-3"]


def test_a_persona_opener_starts_a_chat_without_one():
    library_personas = [type("P", (), {"opener": None})(), type("P", (), {"opener": "Mind the rocks."})()]
    assert chat_opener(library_personas, None) == "Mind the rocks."
    assert chat_opener(library_personas, "Given.") == "Given."
    assert chat_opener(library_personas[:1], None) is None


def test_example_exchanges_and_names():
    assert example_exchanges("{{char}}: Hi first\n{{user}}: Q\n{{char}}: A\n{{user}}: unanswered", "Bot") == (("Q", "A"),)
    assert example_exchanges("{{user}}: one\n{{user}}: two\n{{char}}: both", "Bot") == (("one\ntwo", "both"),)
    assert toml_name("  Sera Phina!  (v2) ") == "sera-phina-v2"


def png_with_chunk(path: Path, kind: bytes, body: bytes, crc: int | None = None) -> Path:
    """A minimal PNG written by hand, for chunks Pillow would refuse to write."""
    def chunk(k: bytes, b: bytes, c: int | None = None) -> bytes:
        return struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b) if c is None else c)
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(kind, body, crc) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def b64(obj) -> bytes:
    return base64.b64encode(json.dumps(obj).encode())


BAD = {
    "no card chunk": (lambda d: card_png(d / "plain.png", {"Comment": "just a picture"}), "no character card in this PNG"),
    "corrupt PNG": (lambda d: png_with_chunk(d / "bad.png", b"tEXt", b"chara\0" + b64(V2), crc=1), "checksum is wrong"),
    "truncated PNG": (lambda d: d.joinpath("cut.png").write_bytes(
        card_png(d / "whole.png", {"chara": V2}).read_bytes()[:60]) and d / "cut.png", "cut short"),
    "bad base64": (lambda d: png_with_chunk(d / "b64.png", b"tEXt", b"chara\0@@not base64@@"), "not base64"),
    "malformed JSON": (lambda d: d.joinpath("m.json").write_text('{"spec": "chara_card_v2", ') and d / "m.json",
                       "not valid JSON"),
    "card without a name": (lambda d: d.joinpath("n.json").write_text(json.dumps(
        {**V2, "data": {**V2["data"], "name": "  "}})) and d / "n.json", "without a name"),
    "unknown spec": (lambda d: d.joinpath("s.json").write_text(json.dumps({**V2, "spec": "chara_card_v9"}))
                     and d / "s.json", "unknown card spec 'chara_card_v9'"),
    "chunk over 8 MB": (lambda d: png_with_chunk(d / "big.png", b"tEXt", b"chara\0" + b"A" * (MAX_CHUNK_BYTES + 1)),
                        "more than 8 MB"),
    "zTXt bomb": (lambda d: png_with_chunk(d / "bomb.png", b"zTXt", b"chara\0\0" + zlib.compress(
        b"A" * (MAX_CHUNK_BYTES + 10), 9)), "inflates past 8 MB"),
    "not a card": (lambda d: d.joinpath("x.json").write_text('{"hello": 1}') and d / "x.json",
                   "neither a character card nor a TinyTroupe agent"),
    "hub line without persona": (lambda d: d.joinpath("h.jsonl").write_text('{"persona": "ok"}\n{"text": "no"}\n')
                                 and d / "h.jsonl", "h.jsonl:2"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_refused_and_the_file_untouched(case, tmp_path, library_file, capsys):
    make, message = BAD[case]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(V1))
    before = library_file.read_bytes()
    status, out, err = run_import(capsys, str(good), str(make(tmp_path)), "--file", str(library_file))
    assert status == 2 and out == ""
    assert err.startswith("Error: ") and message in err and err.count("\n") == 1 and " — " in err, err
    assert library_file.read_bytes() == before, "nothing half-written: the good source before it was not added either"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".personas.toml.")], "no temporary file left"
