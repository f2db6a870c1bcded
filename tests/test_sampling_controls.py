"""The sampling controls where users give them: persona files (a persona's own, `[defaults]`),
prompts-file and `serve --stdio` lines, and the flags — which wins where, what is refused and how
— run as the real CLI on the tiny model, and their effect on the embedded model's greedy pirate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, cli_env, run_cli

PERSONAS = """
[defaults]
logit_bias = {{ "{defaults}" = 100 }}

[personas.a]
system = "You are a pirate."
prompt = "Hello there"

[personas.b]
system = "You are a fox."
prompt = "Hello there"
logit_bias = {{ "{persona}" = 100 }}
"""


@pytest.fixture(scope="module")
def forced(tiny_llama_dir):
    """Four tokens of the tiny model's vocabulary and what greedy writes when one is forced."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = {word: tokenizer.encode(word, add_special_tokens=False)[0] for word in ("fox", "dog", "tea", "bike")}
    return ids, lambda word: tokenizer.decode([ids[word]] * 6).strip()


def generate(args, files, model, cache):
    result = run_cli(["generate", *args, "--file", str(files / "p.toml"), "--model", str(model), "-t", "0",
                      "--max-new-tokens", "6", "--min-new-tokens", "6", "-f", "jsonl"], cache)
    return result


def test_a_line_wins_over_the_flags_over_the_persona_over_defaults(tmp_path, tiny_llama_dir, cache_dir, forced):
    ids, text_of = forced
    (tmp_path / "p.toml").write_text(PERSONAS.format(defaults=ids["fox"], persona=ids["dog"]))
    lines = [{"prompt": "Hello there", "persona": "a", "id": "line", "logit_bias": {str(ids["tea"]): 100}},
             {"prompt": "Hello there", "persona": "a", "id": "a"},
             {"prompt": "Hello there", "persona": "b", "id": "b"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["--prompts-file", str(tmp_path / "q.jsonl")]
    plain = generate(args, tmp_path, tiny_llama_dir, cache_dir)
    assert plain.returncode == 0, plain.stderr
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in plain.stdout.splitlines()}
    assert texts == {"line": text_of("tea"), "a": text_of("fox"), "b": text_of("dog")}
    flagged = generate([*args, "--logit-bias", f"{ids['bike']}=100"], tmp_path, tiny_llama_dir, cache_dir)
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in flagged.stdout.splitlines()}
    assert texts == {"line": text_of("tea"), "a": text_of("bike"), "b": text_of("bike")}


def test_bad_values_are_refused_with_file_and_line(tmp_path, tiny_llama_dir, cache_dir):
    bad = tmp_path / "p.toml"
    bad.write_text('[personas.a]\nprompt = "Hello"\npresence_penalty = 5\n')
    result = run_cli(["generate", "--file", str(bad), "--model", str(tiny_llama_dir)], cache_dir)
    assert result.returncode == 2 and f"{bad}:3: persona 'a': presence_penalty" in result.stderr
    (tmp_path / "ok.toml").write_text('[personas.a]\nprompt = "Hello"\n')
    lines = tmp_path / "q.jsonl"
    lines.write_text('{"prompt": "hi"}\n{"prompt": "hi", "min_p": 3}\n')
    result = run_cli(["generate", "--file", str(tmp_path / "ok.toml"), "--prompts-file", str(lines),
                      "--model", str(tiny_llama_dir)], cache_dir)
    assert result.returncode == 2 and f"{lines}:2: min_p" in result.stderr
    (tmp_path / "bias.toml").write_text('[defaults]\nlogit_bias = { "Galaxy Rider" = 5 }\n[personas.a]\nprompt = "Hi"\n')
    result = run_cli(["generate", "--file", str(tmp_path / "bias.toml"), "--model", str(tiny_llama_dir)], cache_dir)
    assert result.returncode == 2 and "logit_bias: 'Galaxy Rider' is not one token of this model" in result.stderr
    assert result.stderr.count("\n") < 6 and "Traceback" not in result.stderr


def test_serve_stdio_lines_take_the_rules(tmp_path, tiny_llama_dir, cache_dir, forced):
    ids, text_of = forced
    (tmp_path / "p.toml").write_text('[personas.a]\nprompt = "Hello"\n')
    requests = [{"persona": "a", "max_new_tokens": 6, "temperatures": [0], "logit_bias": {str(ids["tea"]): 100},
                 "id": "tea"},
                {"persona": "a", "frequency_penalty": 9, "id": "bad"}]
    result = subprocess.run([sys.executable, "-m", "personas", "serve", "--stdio", "--file", str(tmp_path / "p.toml"),
                             "--model", str(tiny_llama_dir)],
                            input="".join(json.dumps(r) + "\n" for r in requests).encode(), capture_output=True,
                            env=cli_env(cache_dir), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    out = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [o["text"] for o in out if o.get("id") == "tea"][0].startswith(text_of("tea")[:3])
    assert any(o.get("line") == 2 and "frequency_penalty" in o["error"] for o in out)


def repeated_share(text: str) -> float:
    """The share of a text's words that repeat an earlier word."""
    words = text.lower().replace(",", " ").split()
    return 1 - len(set(words)) / len(words)


@pytest.mark.slow
def test_presence_penalty_lowers_the_greedy_pirates_repetition(embedded_ready, capsys):
    texts = {}
    for penalty in ("0", "2"):
        result = run_cli(["generate", "pirate", "-t", "0", "-n", "1", "--seed", "7", "--max-new-tokens", "40",
                          "-f", "jsonl", "--presence-penalty", penalty], embedded_ready)
        assert result.returncode == 0, result.stderr
        texts[penalty] = json.loads(result.stdout)["text"]
    with capsys.disabled():  # measured, not only asserted: the numbers show in the test log
        print(f"\n  greedy pirate, repeated words: {repeated_share(texts['0']):.0%} without a penalty, "
              f"{repeated_share(texts['2']):.0%} with presence_penalty 2")
    assert repeated_share(texts["2"]) < repeated_share(texts["0"])
