"""--prompts-file: plain text and JSONL, stdin, ids, per-line options, errors with file:line."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli

from personas.cli import main
from personas.model.choice import resolve_model
from personas.model.load import load_model
from personas.errors import InputError, PersonaFileError
from personas.generate.request import Request, plan
from personas.library.load import load_library
from personas.library.schema import Example, Persona
from personas.generate.prompts_file import parse_prompts
from personas.sampling.grid import Settings

TWO = REPO / "tests" / "data" / "two.toml"


@pytest.fixture(scope="module")
def library():
    return load_library(TWO)


def test_plain_text_lines_run_on_every_chosen_persona(library):
    specs = parse_prompts("p.txt", "first\n\n  second  \n", library, list(library.personas.values()))
    assert [(s.persona.name, s.prompt, s.id) for s in specs] == [
        ("a", "first", 1), ("b", "first", 1), ("a", "  second  ", 3), ("b", "  second  ", 3)]


def test_jsonl_lines_carry_their_own_options(library):
    text = "\n".join([
        json.dumps({"prompt": "hi", "persona": "b", "temperatures": [0, 0.5], "n": 2, "seed": 9, "id": "x"}),
        json.dumps({"prompt": "yo"}),
    ])
    specs = parse_prompts("p.jsonl", text, library, [library.get("a")])
    assert [(s.persona.name, s.prompt, s.temperatures, s.n, s.seed, s.id) for s in specs] == [
        ("b", "hi", (0.0, 0.5), 2, 9, "x"), ("a", "yo", None, None, None, 2)]


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "hi",}', "p.jsonl:2: not valid JSON"),
    ('{"prompt": "hi", "temp": 1}', "p.jsonl:2: temp: unknown key"),
    ('{"prompt": "  "}', "p.jsonl:2: prompt: must not be empty"),
    ('{"prompt": "hi", "persona": "aa"}', "p.jsonl:2: unknown persona 'aa'"),
    ('{"prompt": "hi", "temperatures": [-1]}', "p.jsonl:2: temperatures.0:"),
    ('{"prompt": "hi", "n": 0}', "p.jsonl:2: n:"),
    ('["hi"]', "p.jsonl:2: line: Input should be a valid dictionary"),
])
def test_jsonl_errors_name_file_and_line(library, line, message):
    with pytest.raises(PersonaFileError) as info:
        parse_prompts("p.jsonl", '{"prompt": "ok"}\n' + line, library, [library.get("a")])
    assert str(info.value).startswith(message)


def test_empty_file_is_an_error(library):
    with pytest.raises(InputError, match="no prompts in p.txt"):
        parse_prompts("p.txt", "\n\n", library, [library.get("a")])


def test_non_utf8_prompts_file(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\ncaf\xe9\n")
    assert main(["generate", "--file", str(TWO), "--prompts-file", str(bad)]) == 2
    assert "bad.txt:2: not UTF-8 text" in capsys.readouterr().err


def test_prompts_file_from_stdin_end_to_end(tiny_llama_dir, cache_dir):
    import subprocess
    import sys

    from conftest import cli_env

    lines = "\n".join(json.dumps({"prompt": f"question {i}", "id": f"q{i}"}) for i in range(3))
    result = subprocess.run(
        [sys.executable, "-m", "personas", "generate", "a", "--file", str(TWO), "--model", str(tiny_llama_dir),
         "--prompts-file", "-", "-n", "2", "-t", "0.5", "--seed", "1", "--max-new-tokens", "4", "-f", "jsonl"],
        input=lines, capture_output=True, text=True, env=cli_env(cache_dir), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted((r["id"], r["sample"]) for r in rows) == [(f"q{i}", k) for i in range(3) for k in (1, 2)]
    assert list(rows[0])[-1] == "id"


@pytest.mark.slow
def test_a_thousand_prompts_run_through_the_engine(tmp_path, tiny_llama_dir, cache_dir):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"Tell me about fox number {i}\n" for i in range(1000)))
    result = run_cli(["generate", "b", "--file", str(TWO), "--model", str(tiny_llama_dir), "--prompts-file",
                      str(prompts), "-n", "1", "-t", "1.0", "--seed", "2", "--max-new-tokens", "3", "-f", "jsonl"],
                     cache_dir)
    assert result.returncode == 0, result.stderr
    ids = sorted(json.loads(line)["id"] for line in result.stdout.splitlines())
    assert ids == list(range(1, 1001))


# --- memory: --truncate ---------------------------------------------


def test_a_jsonl_line_sets_its_own_max_new_tokens(tmp_path, tiny_llama_dir, cache_dir):
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "Hello there", "id": "short", "max_new_tokens": 2},
        {"prompt": "Hello there", "id": "long", "max_new_tokens": 9},
        {"prompt": "Hello there", "id": "default"},
    ]) + "\n")
    result = run_cli(["generate", "a", "--file", str(TWO), "--model", str(tiny_llama_dir), "--prompts-file",
                      str(lines), "-n", "3", "-t", "1.0", "--seed", "1", "--max-new-tokens", "5", "-f", "jsonl"],
                     cache_dir)
    assert result.returncode == 0, result.stderr
    longest: dict[str, int] = {}
    for record in map(json.loads, result.stdout.splitlines()):
        longest[record["id"]] = max(longest.get(record["id"], 0), record["new_tokens"])
    assert longest == {"short": 2, "long": 9, "default": 5}  # the tiny model rarely ends a turn
    lines.write_text('{"prompt": "hi", "max_new_tokens": 0}\n')
    bad = run_cli(["generate", "a", "--file", str(TWO), "--model", str(tiny_llama_dir), "--prompts-file", str(lines)],
                  cache_dir)
    assert bad.returncode == 2 and "lines.jsonl:1: max_new_tokens: Input should be greater than or equal to 1" in bad.stderr


def test_a_jsonl_line_carries_its_persona_inline(tmp_path, tiny_llama_dir, cache_dir, library):
    """A line with `system` and `examples` is its own persona: named as the TOML persona with that
    system and those examples, the same texts for the same prompt, id and seed (a row's seed
    follows its persona's name, prompt and id); `persona` is only its name."""
    a = library.get("a")
    inline = {"system": a.system, "examples": [e.model_dump() for e in a.examples]}

    def texts(*lines: dict) -> list[tuple[str, object, int, str]]:
        path = tmp_path / "lines.jsonl"
        path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        result = run_cli(["generate", "--file", str(TWO), "--model", str(tiny_llama_dir), "--prompts-file", str(path),
                          "-n", "2", "-t", "1.0", "--seed", "3", "--max-new-tokens", "8", "-f", "jsonl"], cache_dir)
        assert result.returncode == 0, result.stderr
        return sorted((r["persona"], r["id"], r["sample"], r["text"]) for r in map(json.loads, result.stdout.splitlines()))

    from_toml = texts({"persona": "a", "prompt": "Hello there", "id": "q"})
    assert texts({"persona": "a", "prompt": "Hello there", "id": "q", **inline}) == from_toml
    unnamed = texts({"prompt": "Hello there", "id": "q", **inline})
    assert {r[0] for r in unnamed} == {"inline"} and [r[3] for r in unnamed] != [r[3] for r in from_toml]
    (tmp_path / "bad.jsonl").write_text('{"system": "  ", "prompt": "hi"}\n')
    bad = run_cli(["generate", "--file", str(TWO), "--model", str(tiny_llama_dir), "--prompts-file",
                   str(tmp_path / "bad.jsonl")], cache_dir)
    assert bad.returncode == 2 and "bad.jsonl:1: system: must not be empty" in bad.stderr, bad.stderr


def test_truncate_drops_examples_and_says_so(tiny_llama_dir):
    model = load_model(resolve_model(str(tiny_llama_dir)), device="cpu")
    long = "the quick brown fox jumps over the lazy dog " * 20
    persona = Persona(name="wordy", prompt="Hello there",
                      examples=[Example(user=long, assistant=long), Example(user="hi", assistant="hello")])
    settings = Settings(max_new_tokens=64)
    with pytest.raises(InputError, match="pass --truncate to drop examples"):
        plan(Request(personas=[persona], settings=settings), model)
    notes = []
    rows = plan(Request(personas=[persona], settings=settings, truncate=True,
                        on_truncate=lambda *note: notes.append(note)), model)
    assert notes and notes[0][:2] == ("wordy", 1)
    assert len(rows[0].prompt_ids) + 64 <= 512
