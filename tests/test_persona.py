"""Persona files: the shipped library, and every validation error with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from personas.errors import ExitStatus, InputError, PersonaFileError
from personas.library.load import find_library_file, load_library, parse_library

REPO = Path(__file__).resolve().parents[1]


def parse(text: str):
    return parse_library(text, Path("p.toml"))


def error_of(text: str) -> str:
    with pytest.raises(PersonaFileError) as info:
        parse(text)
    assert info.value.exit_status == ExitStatus.BAD_INPUT
    return str(info.value)


def test_shipped_library():
    library = load_library(REPO / "personas.toml")
    assert len(library.personas) >= 5
    customer = library.get("customer")
    assert customer.prompt == "Recall a memorable day out with your Galaxy Rider mountain bike in 50 words or less."
    assert "perennially satisfied" in customer.system
    for persona in library.personas.values():
        assert 1 <= len(persona.examples) <= 3, persona.name
        assert persona.system and persona.prompt and persona.description, persona.name
    assert library.defaults.temperatures == [0.2, 1.0]


def test_full_schema_parses():
    library = parse('''
[defaults]
model = "embedded"
max_new_tokens = 32
temperatures = [0, 0.5]
n = 2
seed = 7
top_p = 0.9
top_k = 40

[personas.a]
system = "S"
prompt = "P"
examples = [ { user = "u", assistant = "a" } ]

[personas.b]
prompt = "only a prompt"
''')
    assert library.defaults.model == "embedded" and library.defaults.seed == 7
    assert library.get("a").examples[0].assistant == "a"
    assert library.get("b").system is None and library.get("b").examples == []


def test_examples_as_array_of_tables():
    library = parse('[personas.a]\nprompt = "p"\n[[personas.a.examples]]\nuser = "u"\nassistant = "a"\n')
    assert library.get("a").examples[0].user == "u"


def test_unknown_persona_key_names_key_and_line():
    message = error_of('[personas.a]\nprompt = "p"\nexampels = []\n')
    assert message.startswith("p.toml:3: persona 'a': unknown key 'exampels'")
    assert "known keys: description, system, prompt, examples" in message


def test_unknown_example_key_points_at_the_examples_line():
    message = error_of('[personas.a]\nprompt = "p"\n\nexamples = [\n  { user = "u", asistant = "a" },\n]\n')
    assert message.startswith("p.toml:4: persona 'a': ")
    assert "examples.0: unknown key 'asistant' — known keys: user, assistant" in message


def test_missing_assistant():
    message = error_of('[personas.a]\nexamples = [ { user = "u" } ]\n')
    assert "p.toml:2: persona 'a': examples.0.assistant: missing" in message


def test_empty_system_is_rejected():
    assert "persona 'a': system: must not be empty" in error_of('[personas.a]\nsystem = "  "\n')


def test_wrong_type():
    message = error_of('[personas.a]\nprompt = 3\n')
    assert message.startswith("p.toml:2: persona 'a': prompt:")


def test_unknown_top_level_key():
    message = error_of('[persona.a]\nprompt = "p"\n')
    assert "p.toml:1: unknown key 'persona'" in message


def test_bad_defaults():
    message = error_of('[defaults]\n\ntemperatures = [-1]\n[personas.a]\nprompt = "p"\n')
    assert message.startswith("p.toml:3: defaults.temperatures.0:")
    assert "p.toml:2: defaults: unknown key 'n_samples'" in error_of('[defaults]\nn_samples = 3\n[personas.a]\nprompt="p"\n')


def test_invalid_toml_gives_line():
    message = error_of('[personas.a]\nprompt = "p"\nsystem = \n')
    assert message.startswith("p.toml:3: invalid TOML:")


def test_no_personas():
    assert "no personas defined" in error_of('[defaults]\nn = 1\n')
    assert "no personas defined" in error_of('')


def test_bad_persona_name():
    assert "persona name 'has space' is not allowed" in error_of('[personas."has space"]\nprompt = "p"\n')


def test_persona_not_a_table():
    assert "persona 'a' must be a table" in error_of('[personas]\na = "oops"\n')


def test_unknown_persona_suggests_close_names():
    library = load_library(REPO / "personas.toml")
    with pytest.raises(InputError) as info:
        library.get("custmer")
    assert "unknown persona 'custmer'" in str(info.value)
    assert "did you mean 'customer'?" in str(info.value)
    with pytest.raises(InputError, match="known personas: customer, pirate"):
        library.get("zzzzzz")


def test_not_utf8(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[personas.a]\nprompt = "caf\xe9"\n')
    with pytest.raises(PersonaFileError, match="not UTF-8"):
        load_library(path)


def test_file_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PERSONAS_FILE", raising=False)
    with pytest.raises(InputError, match="persona file not found: nope.toml"):
        find_library_file(Path("nope.toml"))
    # No file here: falls back to the shipped library of the source tree.
    assert find_library_file(None) == REPO / "personas.toml"
    (tmp_path / "personas.toml").write_text('[personas.x]\nprompt = "p"\n')
    assert find_library_file(None) == tmp_path / "personas.toml"
    monkeypatch.setenv("PERSONAS_FILE", str(tmp_path / "other.toml"))
    (tmp_path / "other.toml").write_text('[personas.y]\nprompt = "p"\n')
    assert find_library_file(None) == tmp_path / "other.toml"
