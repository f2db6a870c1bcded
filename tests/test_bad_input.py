"""The bad-input corpus (tests/corpus/): one line on stderr, the right exit status, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from personas.cli import main

CORPUS = Path(__file__).resolve().parent / "corpus"

# (arguments, expected exit status, text the one error line must contain)
CASES = [
    (["generate", "--file", "broken.toml"], 2, "broken.toml:3: invalid TOML"),
    (["generate", "--file", "unknown-key.toml"], 2, "unknown-key.toml:3: persona 'a': unknown key 'exampels'"),
    (["generate", "--file", "bad-name.toml"], 2, "persona name 'two words' is not allowed"),
    (["generate", "--file", "empty.toml"], 2, "no personas defined"),
    (["generate", "--file", "not-utf8.toml"], 2, "not UTF-8 text"),
    (["generate", "--file", "bad-defaults.toml"], 2, "bad-defaults.toml:2: defaults.temperatures.0"),
    (["generate", "--file", "no-prompt.toml"], 2, "persona 'a' has no default prompt"),
    (["generate", "--file", "missing.toml"], 2, "persona file not found"),
    (["generate", "--file", "ok.toml", "--prompts-file", "prompts-bad.jsonl"], 2, "prompts-bad.jsonl:2: not valid JSON"),
    (["generate", "--file", "ok.toml", "--prompts-file", "prompts-not-utf8.txt"], 2, "prompts-not-utf8.txt:2: not UTF-8"),
    (["generate", "--file", "ok.toml", "--prompts-file", "prompts-empty.txt"], 2, "no prompts in"),
    (["generate", "--file", "ok.toml", "--prompts-file", "nowhere.txt"], 2, "cannot read prompts file"),
    (["generate", "--file", "ok.toml", "--prompt", ""], 2, "the prompt is empty"),
    (["generate", "--file", "ok.toml", "-t", "-1"], 2, "temperature -1.0 is not allowed"),
    (["generate", "--file", "ok.toml", "-n", "0"], 2, "-n 0 is not allowed"),
    (["generate", "--file", "ok.toml", "--top-k", "-3"], 2, "--top-k -3 is not allowed"),
    (["generate", "--file", "ok.toml", "--model", "no/such/dir/"], 2, "not found"),
    (["generate", "--file", "ok.toml", "--model", "ok.toml"], 2, "is not a .gguf file"),
    (["generate", "--file", "ok.toml", "--model", "corrupt-model"], 1, "cannot load 'corrupt-model'"),
    (["generate", "--file", "ok.toml", "--output", "no/dir/out.json"], 2, "does not exist"),
    (["generate", "--file", "ok.toml", "--resume", "--output", "o.jsonl"], 2, "--resume needs"),
    (["render", "zz", "--file", "ok.toml"], 2, "unknown persona 'zz'"),
    (["serve", "--file", "ok.toml"], 2, "serve needs one transport — pass --stdio or --http"),
]


@pytest.fixture(scope="module")
def corrupt_model(tmp_path_factory, tiny_llama_dir) -> Path:
    """A model folder whose weights file is garbage: the tokenizer loads, the weights cannot."""
    import shutil

    folder = tmp_path_factory.mktemp("corrupt") / "corrupt-model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    return folder


@pytest.mark.parametrize("args,status,message", CASES, ids=[" ".join(a) for a, _, _ in CASES])
def test_bad_input(args, status, message, monkeypatch, capsys, tmp_path, corrupt_model):
    work = tmp_path / "work"
    work.mkdir()
    for f in CORPUS.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    (work / "corrupt-model").symlink_to(corrupt_model, target_is_directory=True)
    monkeypatch.chdir(work)
    assert main(args) == status
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert err.rstrip("\n").splitlines()[-1] == errors[0], "the error is the last word"
    assert "Traceback" not in err and " — " in errors[0]


def test_every_corpus_file_is_used():
    used = {a for args, _, _ in CASES for a in args}
    assert {f.name for f in CORPUS.iterdir()} - used - {"README.md"} == set()
