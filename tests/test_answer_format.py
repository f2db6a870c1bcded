"""Answer formats (library/answer_format.py, sampling/grammar.py, engine/slot_grammar.py): every
sample valid for its JSON schema, regex or grammar — with the real llguidance, real models and
the real `jsonschema` validator; the draw exact over the allowed tokens; rows independent of
what shares their batch; the formats wherever users give them (flags, persona files, prompts
files, Ray; the server's are in test_serve_http.py)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections import Counter
import jsonschema
import pytest
import torch
from conftest import REPO, run_cli

from personas.engine.engine import Engine, EngineConfig
from personas.library.answer_format import AnswerFormat, checked, from_response_format, schema_value
from personas.sampling.grammar import GrammarTokenizer, allow_only, byte_bias, words_for
from personas.sampling.grid import Row, Rules, Settings

TWO = REPO / "tests" / "data" / "two.toml"

# The nested schema of the issue (also the benchmark's): a bounded string, a bounded integer, an
# enum, an array of 1–3 strings, a nested object, no other keys.
NESTED = json.loads((REPO / "tests" / "data" / "nested.schema.json").read_text())


# --- formats, checked before anything runs ----------------------------------------------------------


def test_bad_formats_are_refused_naming_the_problem():
    for fmt, words in ((AnswerFormat.json_schema({"type": "nonsense"}), "Invalid type: nonsense"),
                       (AnswerFormat.json_schema({"type": "string", "format": "weird"}), "Unknown format: weird"),
                       (AnswerFormat("regex", "[a-"), "unclosed character class"),
                       (AnswerFormat("lark", "start: x\nx: 'a' |"), "line 2 column 4")):
        with pytest.raises(ValueError, match=re.escape(words)):
            checked(fmt)
    assert checked(AnswerFormat.json_schema(NESTED)).is_json
    assert not checked(AnswerFormat("regex", "(yes|no)")).is_json


def test_openais_response_format_and_the_forms_of_a_schema(tmp_path):
    assert from_response_format(None) is None and from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == AnswerFormat.json_object()
    named = from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": NESTED, "strict": True}})
    assert named == AnswerFormat.json_schema(NESTED)
    for bad, words in (({"type": "json_schema"}, "needs"), ({"type": "xml"}, "not supported"), ("json", "object")):
        with pytest.raises(ValueError, match=words):
            from_response_format(bad)
    (tmp_path / "s.json").write_text(json.dumps(NESTED))
    assert schema_value("s.json", tmp_path) == schema_value(json.dumps(NESTED)) == NESTED
    with pytest.raises(ValueError, match="not valid JSON"):
        schema_value("{oops")
    with pytest.raises(ValueError, match="cannot read"):
        schema_value("missing.json", tmp_path)


def test_the_mask_allows_exactly_the_bits_llguidance_set(tiny):
    grammar = GrammarTokenizer(tiny.tokenizer, 420, tiny.eos_ids)
    matchers = [grammar.matcher(AnswerFormat("regex", "(fox|dog) jumps")), grammar.matcher(AnswerFormat.json_object())]
    bitmask = torch.full((3, words_for(420)), -1, dtype=torch.int32)
    grammar.fill([(m, i) for i, m in enumerate(matchers)], bitmask)
    logits = torch.randn(3, 420)
    masked = allow_only(logits, bitmask, byte_bias(torch.device("cpu")))
    words = bitmask.tolist()
    for row in range(3):
        for token in range(420):
            allowed = (words[row][token // 32] >> (token % 32)) & 1
            assert (masked[row, token] == logits[row, token]) if allowed else masked[row, token] == float("-inf")
    texts = {tiny.tokenizer.decode([t]) for t in range(420) if masked[0, t] > float("-inf")}
    assert texts and all("fox jumps".startswith(t) or "dog jumps".startswith(t) for t in texts)
    assert torch.equal(masked[2], logits[2]), "a row without a format keeps every token"


# --- in the engine, on the tiny Llama ----------------------------------------------------------------

PROMPTS = ["Hello there, how are you today?", "Recall a memorable day out with your bike.",
           "The quick brown fox jumps over the lazy dog."]
ANSWER = r"(yes|no), the (fox|dog|bike) [a-z]{2,8}( [a-z]{2,8}){0,3}\."


def rows_of(model, rules=None, temperatures=(0.0, 1.0), n=3, base=0, prompts=PROMPTS) -> list[Row]:
    tok = model.tokenizer
    rows = []
    for p, prompt in enumerate(prompts):
        ids = tuple([tok.bos_token_id] + tok.encode(f"pirate: {prompt}", add_special_tokens=False))
        for t in temperatures:
            for k in range(1, n + 1):
                rows.append(Row("pirate", prompt, t, k, 7919 * (p + base) + k, ids, id=base + p, rules=rules))
    return rows


def run(model, rows, settings=Settings(max_new_tokens=40), slots=None) -> dict:
    engine = Engine(model, EngineConfig(max_slots=slots))
    samples = {}
    engine.submit(rows, settings, lambda s: samples.__setitem__((s.row.id, s.row.temperature, s.row.sample), s))
    with torch.inference_mode():
        while engine.busy:
            engine.step()
    return samples


def text_of(model, sample) -> str:
    return model.decode(list(sample.token_ids))


def test_every_constrained_row_matches_and_ends_where_its_format_does(tiny):
    got = run(tiny, rows_of(tiny, Rules(answer_format=AnswerFormat("regex", ANSWER))))
    assert len(got) == 18
    for sample in got.values():
        assert sample.finish_reason == "stop" and re.fullmatch(ANSWER, text_of(tiny, sample)), text_of(tiny, sample)
    assert len({text_of(tiny, s) for s in got.values()}) > 3, "the seeds still choose"


def test_top_k_top_p_min_p_and_min_new_tokens_compose_with_the_mask(tiny):
    rules = Rules(answer_format=AnswerFormat("regex", ANSWER), min_p=0.05)
    settings = Settings(max_new_tokens=40, min_new_tokens=6, top_k=5, top_p=0.9)
    for sample in run(tiny, rows_of(tiny, rules, temperatures=(1.5,)), settings).values():
        assert re.fullmatch(ANSWER, text_of(tiny, sample)) and len(sample.token_ids) >= 6


def test_free_rows_do_not_change_beside_constrained_ones_nor_constrained_rows_in_a_crowd(tiny):
    fmt = Rules(answer_format=AnswerFormat.json_object())
    free = rows_of(tiny)
    constrained = rows_of(tiny, fmt, base=10)
    alone = run(tiny, free)
    beside = run(tiny, free + constrained)
    assert {k: alone[k].token_ids for k in alone} == {k: beside[k].token_ids for k in alone}
    one = constrained[4]  # T = 1.0
    by_itself = run(tiny, [one])
    crowd = constrained + rows_of(tiny, fmt, n=4, base=20, temperatures=(1.0,))
    assert len(crowd) == 30 and len(free + crowd) >= 40
    in_forty = run(tiny, free + crowd, slots=40)
    key = (one.id, one.temperature, one.sample)
    assert by_itself[key].token_ids == in_forty[key].token_ids
    assert in_forty[key].finish_reason == "stop"
    json.loads(text_of(tiny, in_forty[key]))


def test_preempted_rows_rerun_their_format_from_its_start(tiny):
    """A pool too small for every row's longest cache: rows are preempted mid-answer and rerun
    from their prompt with a fresh matcher, and answer as they do with room to spare."""
    long = Rules(answer_format=AnswerFormat("regex", r"[a-z]{2,6}( [a-z]{2,6}){10,30}\."))
    limits = [40, 9, 25, 33, 2, 17, 38, 4]
    rows = [dataclasses.replace(r, max_new_tokens=limits[i % len(limits)])
            for i, r in enumerate(rows_of(tiny, long, temperatures=(1.0,), n=4))]
    settings = Settings(max_new_tokens=64)
    roomy = run(tiny, rows, settings)
    engine = Engine(tiny, EngineConfig(max_slots=8, max_pages=16))
    got = {}
    engine.submit(rows, settings, lambda s: got.__setitem__((s.row.id, s.row.temperature, s.row.sample), s))
    with torch.inference_mode():
        while engine.busy:
            engine.step()
    assert engine.stats.preemptions > 0
    assert {k: s.token_ids for k, s in got.items()} == {k: s.token_ids for k, s in roomy.items()}


def test_the_draw_is_softmax_over_the_allowed_tokens(tiny):
    """5,000 rows' first token under a format with several openings: the counts match
    softmax(logits / T) restricted to the tokens the format allows (chi-square, p > 1e-4)."""
    choices = ["fox", "dog", "bike", "tea", "shop", "sea"]
    rules = Rules(answer_format=AnswerFormat("regex", "(" + "|".join(choices) + ") jumps"))
    temperature = 1.3
    ids = tuple([tiny.tokenizer.bos_token_id] + tiny.tokenizer.encode("pirate: Hello there", add_special_tokens=False))
    rows = [Row("pirate", "x", temperature, k, 1_000_003 * k, ids, id=0, rules=rules) for k in range(1, 5001)]
    got = run(tiny, rows, Settings(max_new_tokens=1))
    counts = Counter(s.token_ids[0] for s in got.values())
    # The allowed openings, found without llguidance: the tokens whose text starts an answer.
    allowed = [t for t in range(len(tiny.tokenizer)) if (text := tiny.tokenizer.decode([t]))
               and any(f"{c} jumps".startswith(text) for c in choices)]
    assert set(counts) <= set(allowed)
    with torch.no_grad():
        logits = tiny.model(torch.tensor([ids])).logits[0, -1].float()
    probs = (logits[allowed] / temperature).softmax(-1).double()
    expected = {t: 5000 * p for t, p in zip(allowed, probs.tolist())}
    big = [t for t in allowed if expected[t] >= 5]
    cells = [(counts[t], expected[t]) for t in big]
    cells.append((5000 - sum(c for c, _ in cells), 5000 - sum(e for _, e in cells)))
    cells = [(c, e) for c, e in cells if e > 0]
    assert len(cells) >= 3, "the test needs several likely openings"
    statistic = sum((c - e) ** 2 / e for c, e in cells)
    p_value = torch.special.gammaincc(torch.tensor((len(cells) - 1) / 2, dtype=torch.float64),
                                      torch.tensor(statistic / 2, dtype=torch.float64)).item()
    assert p_value > 1e-4, (statistic, cells)


# --- where users give them ----------------------------------------------------------------------------


def test_a_persona_files_schema_its_defaults_and_a_prompts_file_line(tmp_path, tiny_llama_dir, cache_dir):
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}
    (tmp_path / "verdict.json").write_text(json.dumps(small))
    (tmp_path / "p.toml").write_text(
        "[defaults]\njson_schema = '''{\"type\": \"object\", \"properties\": {\"n\": {\"type\": \"integer\", "
        "\"minimum\": 0, \"maximum\": 99}}, "
        "\"required\": [\"n\"], \"additionalProperties\": false}'''\n"
        "[personas.judge]\nsystem = \"You judge.\"\nprompt = \"Hello there\"\njson_schema = \"verdict.json\"\n"
        "[personas.counter]\nprompt = \"Hello there\"\n")
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(line) for line in (
        {"prompt": "Hello there", "persona": "judge", "id": "own"},
        {"prompt": "Hello there", "persona": "counter", "id": "line",
         "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {
             "type": "object", "properties": {"w": {"enum": ["fox", "dog"]}}, "required": ["w"],
             "additionalProperties": False}}}},
        {"prompt": "Hello there", "persona": "counter", "id": "free", "json_schema": None},
    )) + "\n")
    common = ["--file", str(tmp_path / "p.toml"), "--model", str(tiny_llama_dir), "--seed", "3", "-t", "1.0", "-n", "4",
              "--max-new-tokens", "64", "-f", "jsonl"]
    result = run_cli(["generate", *common], cache_dir)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    for r in records:
        schema = small if r["persona"] == "judge" else {"type": "object", "required": ["n"]}
        assert r["finish_reason"] == "stop" and r["json"] == json.loads(r["text"])
        jsonschema.validate(r["json"], schema)
    result = run_cli(["generate", "--prompts-file", str(tmp_path / "lines.jsonl"), *common], cache_dir)
    assert result.returncode == 0, result.stderr
    by_id = {}
    for r in map(json.loads, result.stdout.splitlines()):
        by_id.setdefault(r["id"], []).append(r)
    assert all("ok" in r["json"] for r in by_id["own"])
    assert all(r["json"]["w"] in ("fox", "dog") for r in by_id["line"])
    assert all("n" in r["json"] for r in by_id["free"]), "null keeps the persona's, as for every rule"
    as_csv = run_cli(["generate", "judge", *common[:-2], "-f", "csv"], cache_dir)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == 4 and all(json.loads(row["json"]) == json.loads(row["text"]) for row in rows)
    # The command's flag goes over the persona's own, and under a line's own.
    result = run_cli(["generate", "judge", *common, "--regex", "(fox|dog)"], cache_dir)
    assert {json.loads(line)["text"] for line in result.stdout.splitlines()} <= {"fox", "dog"}
    assert "json" not in json.loads(result.stdout.splitlines()[0])
    result = run_cli(["generate", "--prompts-file", str(tmp_path / "lines.jsonl"), *common, "--json-schema",
                      json.dumps(small)], cache_dir)
    assert result.returncode == 0, result.stderr
    for r in map(json.loads, result.stdout.splitlines()):
        assert ("w" in r["json"]) if r["id"] == "line" else (set(r["json"]) == {"ok"}), r


def test_bad_formats_exit_2_before_the_model_loads(tmp_path, cache_dir):
    (tmp_path / "p.toml").write_text("[personas.x]\nprompt = \"hi\"\n\njson_schema = '{\"type\": \"nonsense\"}'\n")
    (tmp_path / "lines.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "hi", "response_format": {"type": "xml"}}\n')
    (tmp_path / "ok.toml").write_text("[personas.x]\nprompt = \"hi\"\n")
    (tmp_path / "bad.lark").write_text("start: x\nx: 'a' |\n")
    missing_model = ["--model", str(tmp_path / "no-such-model")]  # never reached
    cases = [
        (["generate", "--file", str(tmp_path / "p.toml")], "p.toml:4", "Invalid type: nonsense"),
        (["generate", "--file", str(tmp_path / "ok.toml"), "--prompts-file", str(tmp_path / "lines.jsonl")],
         "lines.jsonl:2", "'xml' is not supported"),
        (["generate", "--file", str(tmp_path / "ok.toml"), "--json-schema", '{"type": "object", "required": 3}'],
         "--json-schema", "refused"),
        (["generate", "--file", str(tmp_path / "ok.toml"), "--regex", "(a"], "--regex", "unclosed"),
        (["generate", "--file", str(tmp_path / "ok.toml"), "--grammar", str(tmp_path / "bad.lark")],
         "--grammar", "line 2 column 4"),
        (["generate", "--file", str(tmp_path / "ok.toml"), "--json", "--regex", "a"], "cannot be combined", ""),
    ]
    for args, where, what in cases:
        result = run_cli([*args, *missing_model], cache_dir)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("Error: ") and where in line and what in line, line


def compact(text: str) -> bool:
    """No whitespace in a JSON text outside its strings."""
    inside = escaped = False
    for char in text:
        if inside:
            escaped, inside = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            inside = True
        elif char.isspace():
            return False
    return True


def test_compact_sees_whitespace_outside_strings_only():
    assert compact('{"a":"x: y\\" z","b":[1,2]}') and not compact('{"a": 1}') and not compact('{"a":1,\n"b":2}')


@pytest.mark.slow
def test_the_embedded_model_answers_200_of_200_valid_for_the_nested_schema(embedded_ready, tmp_path):
    (tmp_path / "nested.json").write_text(json.dumps(NESTED))
    for temperature, n in (("1.0", "200"), ("0", "1")):
        result = run_cli(["generate", "customer", "--prompt", "Describe yourself.", "--json-schema",
                          str(tmp_path / "nested.json"), "-t", temperature, "-n", n, "--seed", "11",
                          "--max-new-tokens", "256", "-f", "jsonl"], embedded_ready)
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(records) == int(n)
        for r in records:
            assert r["finish_reason"] == "stop", r["text"]
            jsonschema.validate(json.loads(r["text"]), NESTED)
            assert r["json"] == json.loads(r["text"])
            assert compact(r["text"]), "compact by default"
        assert len({r["text"] for r in records}) > 0.9 * len(records)


@pytest.mark.slow
def test_the_embedded_model_follows_a_regex_and_a_grammar(embedded_ready, tmp_path):
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    (tmp_path / "answer.lark").write_text(
        'start: verdict " because " reason "."\nverdict: "yes" | "no" | "maybe"\nreason: /[a-z ]{3,40}/\n')
    for flag, value, check in (("--regex", date, lambda t: re.fullmatch(date, t)),
                               ("--grammar", str(tmp_path / "answer.lark"),
                                lambda t: re.fullmatch(r"(yes|no|maybe) because [a-z ]{3,40}\.", t))):
        result = run_cli(["generate", "customer", "--prompt", "When did you last ride?", flag, value, "-t", "1.0",
                          "-t", "0", "-n", "20", "--seed", "2", "--max-new-tokens", "64", "-f", "jsonl"], embedded_ready)
        assert result.returncode == 0, result.stderr
        texts = [json.loads(line)["text"] for line in result.stdout.splitlines()]
        assert len(texts) == 40 and all(check(t) for t in texts), texts


def test_a_grammar_tokenizer_needs_a_fast_tokenizer():
    with pytest.raises(ValueError, match="fast tokenizer"):
        GrammarTokenizer(object(), 10, [0])



@pytest.mark.gpu
def test_on_cuda_the_split_graphs_equal_the_eager_step(tiny_cuda):
    """On the card, steps with constrained rows replay two graphs — the forward pass, then the
    choice reading the masks filled meanwhile — and give the eager engine's tokens."""
    fmt = Rules(answer_format=AnswerFormat("regex", ANSWER))
    free, constrained = rows_of(tiny_cuda), rows_of(tiny_cuda, fmt, base=10)
    texts = {}
    for graphs in (True, False):
        engine = Engine(tiny_cuda, EngineConfig(max_slots=40, graphs=graphs))
        got = {}
        engine.submit(free + constrained, Settings(max_new_tokens=40),
                      lambda s: got.__setitem__((s.row.id, s.row.temperature, s.row.sample), s))
        with torch.inference_mode():
            while engine.busy:
                engine.step()
        if graphs:
            assert any(key.grammar for key in engine.runner.graphs) and engine.runner.graphs
            assert all(g.choice is not None for key, g in engine.runner.graphs.items() if key.grammar)
        texts[graphs] = {k: s.token_ids for k, s in got.items()}
        for k, s in got.items():
            if k[0] >= 10:
                assert s.finish_reason == "stop" and re.fullmatch(ANSWER, text_of(tiny_cuda, s))
    assert texts[True] == texts[False]


def test_a_server_keeps_only_its_latest_compiled_formats(tiny, monkeypatch):
    from personas.sampling import grammar as module

    monkeypatch.setattr(module, "COMPILED_FORMATS", 3)
    compiler = GrammarTokenizer(tiny.tokenizer, 420, tiny.eos_ids)
    formats = [AnswerFormat("regex", f"(fox|dog){{{k}}}") for k in range(1, 6)]
    for fmt in formats:
        compiler.matcher(fmt)
    compiler.matcher(formats[2])  # used again: kept
    compiler.matcher(AnswerFormat.json_object())
    assert list(compiler.compiled) == [formats[4], formats[2], AnswerFormat.json_object()]
