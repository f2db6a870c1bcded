"""What temperature does, made visible: diversity stats, next-token distributions, divergence, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, run_cli

from personas.cli import main
from personas.diagnostics.distributions import explain, greedy_logits, logits_after, probabilities
from personas.model.tokens import token_text
from personas.diagnostics.diverge import END_OF_TURN, divergence, first_branch
from personas.diagnostics.diversity import by_temperature, cell_stats, distinct_n
from personas.library.schema import Persona
from personas.model.prompt import Dialog
from personas.sampling.grid import Row, Sample

# --- diversity on hand-made samples ---------------------------------------------------------------


def test_distinct_n_counts_distinct_ngrams_over_all_ngrams():
    assert distinct_n(["a b c", "a b d"], 1) == 4 / 6
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert distinct_n(["The cat", "the CAT"], 1) == 2 / 4  # words are compared lower-cased
    assert distinct_n(["same words here"] * 3, 2) == 2 / 6
    assert distinct_n(["one", ""], 2) == 0.0  # no word pairs at all
    assert distinct_n([], 1) == 0.0


def record(persona: str, t: float, text: str, tokens: int) -> dict:
    return {"persona": persona, "prompt": "p", "temperature": t, "text": text, "new_tokens": tokens}


def test_cell_stats_per_persona_prompt_and_temperature():
    records = [record("a", 0.0, "x y", 2), record("a", 0.0, " x y ", 2), record("a", 1.0, "x y", 3),
               record("a", 1.0, "z w", 5), record("b", 1.0, "q", 1)]
    stats = cell_stats(records)
    assert [(s.persona, s.temperature, s.unique, s.n, s.mean_tokens) for s in stats] == [
        ("a", 0.0, 1, 2, 2.0), ("a", 1.0, 2, 2, 4.0), ("b", 1.0, 1, 1, 1.0)]
    assert stats[0].distinct_1 == 0.5 and stats[1].distinct_1 == 1.0 and stats[1].distinct_2 == 1.0
    footer = by_temperature(stats)
    assert [(f.temperature, f.cells) for f in footer] == [(0.0, 1), (1.0, 2)]
    assert footer[1].unique_share == (2 / 2 + 1 / 1) / 2 and footer[1].mean_tokens == 2.5


# --- next-token distributions on a tiny real model ------------------------------------------------


PIRATE = Persona(name="pirate", system="You are a pirate.", prompt="Hello there, how are you today?")


def prompt_ids(model) -> list[int]:
    return model.prompt_ids(Dialog.for_persona(PIRATE, PIRATE.prompt))


def test_probabilities_are_the_softmax_of_the_models_own_logits(tiny):
    ids = prompt_ids(tiny)
    with torch.no_grad():
        direct = tiny.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    report = explain(tiny, ids, [0.5, 1.0, 2.0], top_k=8, steps=0)
    for entry in report:
        expected = torch.softmax(direct / entry["temperature"], dim=-1)
        for p in entry["top"]:
            assert p["prob"] == pytest.approx(float(expected[p["id"]]), abs=1e-6)
        assert [p["prob"] for p in entry["top"]] == sorted((p["prob"] for p in entry["top"]), reverse=True)
        assert entry["entropy"] == pytest.approx(float(-(expected * expected.log()).sum()), abs=1e-5)
        assert len(entry["top"]) == 8 and entry["steps"] == []


def test_entropy_rises_with_temperature_and_zero_is_greedy_one_hot(tiny):
    report = explain(tiny, prompt_ids(tiny), [0, 0.3, 0.7, 1.0, 1.5, 3.0], top_k=3, steps=0)
    entropies = [e["entropy"] for e in report]
    assert entropies[0] == 0.0
    assert all(a < b for a, b in zip(entropies, entropies[1:])), entropies
    greedy = report[0]["top"]
    assert [p["prob"] for p in greedy] == [1.0, 0.0, 0.0]
    assert greedy[0]["id"] == report[3]["top"][0]["id"]  # the argmax leads at every temperature
    assert math.log(len(tiny.tokenizer)) > entropies[-1]  # never above the uniform's


def test_the_steps_follow_one_greedy_continuation(tiny):
    ids = prompt_ids(tiny)
    logits, chosen = greedy_logits(tiny, ids, 3)
    assert len(chosen) == 3 and len(logits) == 4
    for k in range(1, 4):  # the cached step's logits equal a fresh pass over prompt + greedy tokens
        fresh = logits_after(tiny, [*ids, *chosen[:k]])
        assert torch.allclose(logits[k], fresh, atol=1e-4)
        assert chosen[k - 1] == int(logits[k - 1].argmax())
    report = explain(tiny, ids, [1.0], top_k=4, steps=3)
    assert [s["step"] for s in report[0]["steps"]] == [2, 3, 4]
    assert report[0]["steps"][1]["after"] == tiny.decode(chosen[:2])


def test_token_text_keeps_the_leading_space_on_the_real_llama_vocabulary(llama_tokenizer):
    the = llama_tokenizer.convert_tokens_to_ids("▁the")
    assert token_text(llama_tokenizer, the) == " the"
    assert token_text(llama_tokenizer, llama_tokenizer.convert_tokens_to_ids("the")) == "the"
    assert token_text(llama_tokenizer, 2) == "</s>"


# --- where samples diverge ------------------------------------------------------------------------


def test_first_branch():
    assert first_branch([[1, 2, 3], [1, 2, 4], [1, 2, 3]]) == 2
    assert first_branch([[1, 2], [1, 2, 5]]) == 2  # one ended where the other went on
    assert first_branch([[1, 2], [1, 2]]) is None
    assert first_branch([[7]]) is None


def test_divergence_reports_the_shared_text_and_the_drawn_tokens_with_probabilities(tiny):
    ids = tuple(prompt_ids(tiny))
    row = Row("pirate", PIRATE.prompt, 0.8, 1, 5, ids)
    a, b, c = tiny.tokenizer.encode(" fox quick brown", add_special_tokens=False)[:3]
    samples = [Sample(row, (a, b, c), "length"), Sample(row, (a, b, a), "length"), Sample(row, (a, b), "stop"),
               Sample(row, (a, b, c, c), "length")]
    d = divergence(tiny, samples)
    assert d.position == 2 and d.prefix == tiny.decode([a, b]) and d.n == 4
    expected = probabilities(logits_after(tiny, [*ids, a, b]), 0.8)
    drawn = {x["id"]: x for x in d.alternatives if x["count"]}
    assert {i: x["count"] for i, x in drawn.items()} == {c: 2, a: 1, tiny.eos_ids[0]: 1}
    assert drawn[tiny.eos_ids[0]]["token"] == END_OF_TURN
    for x in d.alternatives:
        assert x["prob"] == pytest.approx(float(expected[x["id"]]), abs=1e-9)
    assert [x["count"] > 0 for x in d.alternatives] == [True] * 3 + [False] * 3
    same = divergence(tiny, [Sample(row, (a, b), "stop")] * 3)
    assert same.position is None and same.prefix == tiny.decode([a, b])


# --- the CLI --------------------------------------------------------------------------------------


def test_stats_file_diverge_and_plot_from_generate(tiny_llama_dir, cache_dir, tmp_path):
    (tmp_path / "p.toml").write_text('[personas.fox]\nsystem = "You are a fox."\nprompt = "Hello there"\n'
                                     '[personas.dog]\nprompt = "How are you today?"\n')
    args = ["generate", "--file", str(tmp_path / "p.toml"), "--model", str(tiny_llama_dir), "-t", "0", "-t", "1.5",
            "-n", "3", "--seed", "2", "--max-new-tokens", "6"]
    result = run_cli([*args, "--format", "jsonl", "--stats-file", str(tmp_path / "stats.json"), "--diverge",
                      "--plot", str(tmp_path / "d.png")], cache_dir)
    assert result.returncode == 0, result.stderr
    samples = [json.loads(x) for x in result.stdout.splitlines()]
    assert len(samples) == 12 and all("distinct_1" not in s for s in samples)  # the samples are unchanged
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [(s["persona"], s["temperature"]) for s in stats] == [("fox", 0.0), ("fox", 1.5), ("dog", 0.0), ("dog", 1.5)]
    assert list(stats[0])[:8] == ["persona", "prompt", "temperature", "distinct_1", "distinct_2", "unique", "n",
                                  "mean_tokens"]
    mine = cell_stats([s for s in samples if s["persona"] == "fox" and s["temperature"] == 1.5])[0]
    assert (stats[1]["distinct_1"], stats[1]["unique"], stats[1]["n"]) == (mine.distinct_1, mine.unique, 3)
    assert stats[0]["unique"] == 1 and stats[0]["diverge"]["position"] is None  # greedy never branches
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = run_cli([*args, "--format", "table", "--diverge"], cache_dir)
    assert table.returncode == 0, table.stderr
    assert "diversity" in table.stdout and "distinct-1" in table.stdout
    assert table.stdout.index("Where the samples diverge") > table.stdout.index("distinct-1")


def test_explain_json_and_plot(tiny_llama_dir, cache_dir, tmp_path):
    result = run_cli(["explain", "pirate", "--model", str(tiny_llama_dir), "-t", "0", "-t", "1", "--top-k", "4",
                      "--steps", "2", "--plot", str(tmp_path / "e.png")], cache_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [e["temperature"] for e in report] == [0.0, 1.0]
    assert list(report[0]) == ["temperature", "entropy", "top", "steps"]
    assert list(report[1]["top"][0]) == ["token", "id", "prob"] and len(report[1]["top"]) == 4
    assert [s["step"] for s in report[1]["steps"]] == [2, 3]
    assert (tmp_path / "e.png").stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["generate", "--diverge", "--format", "jsonl"], "--diverge with --format jsonl needs --stats-file"),
    (["generate", "--plot", "d.jpg"], "the picture is written as PNG"),
    (["generate", "--stats-file", "no/dir/s.json"], "does not exist"),
    (["explain", "pirate", "-t", "-1"], "temperature -1.0 is not allowed"),
    (["explain", "pirate", "--format", "csv"], "unknown format 'csv'"),
    (["explain", "pirat"], "did you mean 'pirate'?"),
])
def test_diagnostics_bad_input(args, message, capsys):
    assert main([*args, "--file", str(REPO / "personas.toml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


@pytest.mark.slow
def test_explain_end_to_end_on_the_embedded_model(embedded_ready):
    result = run_cli(["explain", "customer", "-t", "0.2", "-t", "1.0", "-t", "1.5", "--steps", "1"], embedded_ready)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report[0]["entropy"] < report[1]["entropy"] < report[2]["entropy"]
    assert report[0]["top"][0]["id"] == report[2]["top"][0]["id"]
    assert sum(p["prob"] for p in report[0]["top"]) <= 1.0 + 1e-9
