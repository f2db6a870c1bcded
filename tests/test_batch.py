"""`personas batch`: OpenAI Batch API files through the real CLI, on a tiny random Llama; its
answers against a real `serve --http` process (the official `openai` client) and `generate`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env, interrupt_once_decoding, make_tiny_llama, run_cli

TWO = REPO / "tests" / "data" / "two.toml"


def line(custom_id: str, body: dict, **envelope) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body,
                       **envelope})


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# Named personas, inline ones (model "base": the messages as they stand), n > 1, seeds, a stop
# string, log-probabilities, an answer format — and three requests refused on their own merits.
BODIES = {
    "named": {"model": "a", "messages": user("Hello there"), "temperature": 0.9, "n": 3, "seed": 5,
              "max_tokens": 12},
    "inline": {"model": "base", "messages": [{"role": "system", "content": "You are a grocer."}] + user("Any fruit?"),
               "seed": 7, "n": 2, "max_tokens": 16, "temperature": 1.0},
    "stop": {"model": "b", "messages": user("Tell me a story"), "seed": 3, "max_tokens": 24, "stop": ["e"],
             "temperature": 1.0},
    "logprobs": {"model": "a", "messages": user("How is the sea?"), "seed": 9, "max_tokens": 8, "logprobs": True,
                 "top_logprobs": 2, "temperature": 0.7},
    "schema": {"model": "a", "messages": user("Hello there"), "seed": 4, "n": 2, "max_tokens": 40, "temperature": 1.0,
               "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {
                   "type": "object", "properties": {"w": {"enum": ["fox", "dog"]}}, "required": ["w"],
                   "additionalProperties": False}}}},
    "unknown-persona": {"model": "nobody", "messages": user("Hi")},
    "bad-value": {"model": "a", "messages": user("Hi"), "top_p": 7},
    "bad-schema": {"model": "a", "messages": user("Hi"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}},
}


def write_batch(path: Path, bodies: dict[str, dict]) -> Path:
    path.write_text("".join(line(custom_id, body) + "\n" for custom_id, body in bodies.items()))
    return path


def read_output(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for text in path.read_text().splitlines():
        item = json.loads(text)
        assert item["custom_id"] not in out, "each custom_id is answered once"
        out[item["custom_id"]] = item
    return out


@pytest.fixture(scope="module")
def answered(tiny_llama_dir, cache_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    output = folder / "out.jsonl"
    result = run_cli(["batch", str(write_batch(folder / "in.jsonl", BODIES)), "-o", str(output), "--model",
                      str(tiny_llama_dir), "--file", str(TWO)], cache_dir)
    return result, read_output(output)


def test_good_requests_are_answered_and_bad_ones_get_error_lines(answered):
    result, out = answered
    assert result.returncode == 1, result.stderr
    assert "3 of 8 requests were refused (lines 6, 7, 8 of" in result.stderr
    assert set(out) == set(BODIES)
    for custom_id in ("named", "inline", "stop", "logprobs", "schema"):
        item = out[custom_id]
        assert item["id"].startswith("batch_req_") and item["error"] is None
        response = item["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion" and body["id"] == response["request_id"]
        assert len(body["choices"]) == BODIES[custom_id].get("n", 1)
        assert body["model"] == BODIES[custom_id]["model"]
    assert out["unknown-persona"]["response"]["status_code"] == 404
    assert out["unknown-persona"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert out["bad-value"]["response"]["status_code"] == 400
    assert out["bad-value"]["response"]["body"]["error"]["param"] == "top_p"
    assert out["bad-schema"]["response"]["status_code"] == 400
    assert out["bad-schema"]["response"]["body"]["error"]["param"] == "response_format"
    for choice in out["schema"]["response"]["body"]["choices"]:
        assert json.loads(choice["message"]["content"])["w"] in ("fox", "dog") and choice["finish_reason"] == "stop"
    stopped = out["stop"]["response"]["body"]["choices"][0]
    assert "e" not in stopped["message"]["content"] and stopped["finish_reason"] == "stop"
    logprobs = out["logprobs"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert logprobs and all(len(entry["top_logprobs"]) == 2 for entry in logprobs)


def test_answers_equal_the_servers_and_generates(answered, tiny_llama_dir, cache_dir):
    from test_serve_http import Server

    _, out = answered
    server = Server(cache_dir, "--model", str(tiny_llama_dir), "--file", str(TWO))
    try:
        server.wait_ready()
        client = server.client()
        for custom_id in ("named", "inline", "stop", "logprobs", "schema"):
            theirs = client.chat.completions.create(**BODIES[custom_id]).model_dump()
            ours = out[custom_id]["response"]["body"]
            assert [c["message"]["content"] for c in ours["choices"]] == \
                   [c["message"]["content"] for c in theirs["choices"]], custom_id
            assert [c["finish_reason"] for c in ours["choices"]] == [c["finish_reason"] for c in theirs["choices"]]
            assert ours["usage"] == {k: theirs["usage"][k] for k in ("prompt_tokens", "completion_tokens",
                                                                     "total_tokens")}
            if BODIES[custom_id].get("logprobs"):
                mine, served = ours["choices"][0]["logprobs"]["content"], theirs["choices"][0]["logprobs"]["content"]
                assert [e["token"] for e in mine] == [e["token"] for e in served]
                assert all(abs(a["logprob"] - b["logprob"]) < 1e-3 for a, b in zip(mine, served))
    finally:
        server.stop()
    # A one-turn request to a persona answers as generate does with the same prompt, temperature and seed.
    result = run_cli(["generate", "a", "--prompt", "Hello there", "--temp", "0.9", "-n", "3", "--seed", "5",
                      "--max-new-tokens", "12", "--model", str(tiny_llama_dir), "--file", str(TWO), "-f", "jsonl"],
                     cache_dir)
    assert result.returncode == 0, result.stderr
    generated = [json.loads(text)["text"] for text in result.stdout.splitlines()]
    assert [c["message"]["content"] for c in out["named"]["response"]["body"]["choices"]] == generated


@pytest.mark.parametrize("text, what", [
    ("not json", "not valid JSON"),
    (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}), "custom_id is missing"),
    (line("x", {"model": "a"}, url="/v1/embeddings"), "url '/v1/embeddings' is not served"),
    (line("first", {"model": "a", "messages": user("Hi")}), "custom_id 'first' repeats line 1"),
])
def test_a_line_that_is_no_batch_request_stops_the_run_before_the_model_loads(text, what, tmp_path, cache_dir):
    path = tmp_path / "in.jsonl"
    path.write_text(line("first", {"model": "a", "messages": user("Hi")}) + "\n" + text + "\n")
    # The model named does not exist: a run that got as far as loading it would say so instead.
    result = run_cli(["batch", str(path), "--model", str(tmp_path / "no-model"), "--file", str(TWO)], cache_dir)
    assert result.returncode == 2, result.stderr
    assert f"{path}:2" in result.stderr and what in result.stderr, result.stderr
    assert result.stdout == ""


def test_vllms_documented_example_file_runs_with_the_model_renamed(tmp_path, cache_dir):
    """vLLM's examples/offline_inference/openai_batch/openai_example_batch.jsonl, `model` set to
    'base' (its max_completion_tokens of 1000 needs a longer context than the default tiny model's)."""
    model = make_tiny_llama(tmp_path / "model", context=2048)
    path = tmp_path / "example.jsonl"
    path.write_text("\n".join(
        line(f"request-{i}", {"model": "base", "messages": [{"role": "system", "content": system},
                                                             {"role": "user", "content": "Hello world!"}],
                              "max_completion_tokens": 1000})
        for i, system in ((1, "You are a helpful assistant."), (2, "You are an unhelpful assistant."))) + "\n")
    result = run_cli(["batch", str(path), "--model", str(model), "--seed", "1"], cache_dir)
    assert result.returncode == 0, result.stderr
    out = [json.loads(text) for text in result.stdout.splitlines()]
    assert sorted(item["custom_id"] for item in out) == ["request-1", "request-2"]
    assert all(item["response"]["status_code"] == 200 for item in out)


def test_interrupted_run_resumes_to_the_same_answers(tiny_llama_dir, cache_dir, tmp_path):
    bodies = {f"q{i}": {"model": "a" if i % 2 else "base", "messages": user(f"Question number {i}"), "seed": i,
                        "max_tokens": 48, "min_tokens": 48} for i in range(120)}
    source = write_batch(tmp_path / "in.jsonl", bodies)
    whole = tmp_path / "whole.jsonl"
    args = ["--model", str(tiny_llama_dir), "--file", str(TWO), "--batch-size", "8"]
    assert run_cli(["batch", str(source), "-o", str(whole), *args], cache_dir).returncode == 0

    interrupted = tmp_path / "interrupted.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "personas", "batch", str(source), "-o", str(interrupted), *args],
                               cwd=REPO, env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if interrupted.exists() and interrupted.read_text().count("\n") >= 10:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    partial = read_output(interrupted)  # every line written is whole
    assert 10 <= len(partial) < len(bodies)

    resumed = run_cli(["batch", str(source), "-o", str(interrupted), "--resume", *args], cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(partial)} requests already answered" in resumed.stderr
    texts = lambda out: {k: [c["message"]["content"] for c in v["response"]["body"]["choices"]]  # noqa: E731
                         for k, v in out.items()}
    assert texts(read_output(interrupted)) == texts(read_output(whole))


def test_stdin_and_stdout(tiny_llama_dir, cache_dir, tmp_path):
    text = line("only", {"model": "a", "messages": user("Hi"), "max_tokens": 4, "seed": 1}) + "\n"
    result = subprocess.run([sys.executable, "-m", "personas", "batch", "-", "--model", str(tiny_llama_dir),
                             "--file", str(TWO)], input=text, cwd=REPO, env=cli_env(cache_dir),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (item,) = [json.loads(t) for t in result.stdout.splitlines()]
    assert item["custom_id"] == "only" and item["response"]["status_code"] == 200


def test_resume_needs_an_output_file(tmp_path, cache_dir):
    path = write_batch(tmp_path / "in.jsonl", {"x": {"model": "a", "messages": user("Hi")}})
    result = run_cli(["batch", str(path), "--resume", "--file", str(TWO)], cache_dir)
    assert result.returncode == 2 and "--resume needs --output FILE" in result.stderr


def test_inline_personas_store_their_system_text_once(tiny):
    """Ten batch lines with one system text and no persona: the pool holds that text's prefix once
    and each row only its own suffix; the texts equal each request run alone (a private copy)."""
    from personas.engine.engine import Engine, EngineConfig
    from personas.library.load import load_library
    from personas.serve.batch import BatchLine, BatchRun

    library = load_library(TWO)
    system = "You are a lighthouse keeper who answers every question in one short sentence."
    lines = [BatchLine(i + 1, f"q{i}", {"model": "base", "seed": i, "max_tokens": 6, "min_tokens": 6,
                                        "messages": [{"role": "system", "content": system}] + user(f"Question {i}?")})
             for i in range(10)]

    def run(batch: list[BatchLine], seen: dict | None = None) -> dict[str, list[str]]:
        engine = Engine(tiny, EngineConfig(expect_more=True))
        step = engine.step

        def observed_step() -> None:  # the pool and the rows' prompts after the first step
            step()
            if seen is not None and not seen:
                seen.update(spans=dict(engine.pool.spans), end=engine.pool.end,
                            prompts=[(job.prefix, job.suffix) for job in engine.jobs.values()])

        engine.step = observed_step
        out: list[dict] = []
        BatchRun(tiny, library, engine, out.append).run(iter(batch))
        return {o["custom_id"]: [c["message"]["content"] for c in o["response"]["body"]["choices"]] for o in out}

    seen: dict = {}
    together = run(lines, seen)
    (prefix,) = seen["spans"]  # one prefix in the pool, stored once
    assert seen["end"] == len(prefix)
    assert len(seen["prompts"]) == len(lines) and {p for p, _ in seen["prompts"]} == {prefix}
    assert len(prefix) > len(tiny.tokenizer.encode(system, add_special_tokens=False))
    assert all(len(suffix) < 12 for _, suffix in seen["prompts"])  # each row: its own question only
    alone = {}
    for line in lines:
        alone.update(run([line]))
    assert together == alone


def test_parquet_output_is_typed_read_by_datasets_and_written_atomically(answered, tiny_llama_dir, cache_dir,
                                                                         tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, jsonl = answered
    target = tmp_path / "out.parquet"
    source = write_batch(tmp_path / "in.jsonl", BODIES)
    result = run_cli(["batch", str(source), "-f", "parquet", "-o", str(target), "--model", str(tiny_llama_dir),
                      "--file", str(TWO)], cache_dir)
    assert result.returncode == 1, result.stderr  # three requests refused, as in JSONL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.parquet"], "no temporary file left"
    table = pq.read_table(target)
    assert table.schema.field("status_code").type == pa.int32()
    assert table.schema.field("contents").type == pa.list_(pa.string())
    assert table.schema.field("completion_tokens").type == pa.int64()
    rows = {r["custom_id"]: r for r in table.to_pylist()}
    assert set(rows) == set(BODIES)
    for custom_id, line in jsonl.items():
        body = line["response"]["body"]
        assert rows[custom_id]["status_code"] == line["response"]["status_code"]
        if "error" in body:
            assert rows[custom_id]["error_message"] == body["error"]["message"] and rows[custom_id]["contents"] is None
        else:  # the same seeds: the same texts as the JSONL run
            assert rows[custom_id]["contents"] == [c["message"]["content"] for c in body["choices"]]
            assert json.loads(rows[custom_id]["response"])["usage"] == body["usage"]
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_files=str(target), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == len(BODIES) and loaded.features["prompt_tokens"].dtype == "int64"
    refused = run_cli(["batch", str(source), "-f", "parquet", "--file", str(TWO)], cache_dir)
    assert refused.returncode == 2 and "pass --output FILE.parquet" in refused.stderr


def test_ten_thousand_lines_of_inline_personas(tiny_llama_dir, cache_dir, tmp_path):
    """A data-scale file: 10,000 requests, 50 system texts given inline, one token each — every
    custom_id answered exactly once (the benchmark runs 100,000 on the embedded model)."""
    source = tmp_path / "in.jsonl"
    with source.open("w") as f:
        for i in range(10_000):
            f.write(line(f"r{i}", {"model": "base", "max_tokens": 1, "seed": i, "messages": [
                {"role": "system", "content": f"You are persona {i % 50}, who keeps a lighthouse."},
                {"role": "user", "content": f"Question {i}: what do you see?"}]}) + "\n")
    output = tmp_path / "out.jsonl"
    result = run_cli(["batch", str(source), "-o", str(output), "--model", str(tiny_llama_dir)], cache_dir)
    assert result.returncode == 0, result.stderr
    out = read_output(output)
    assert set(out) == {f"r{i}" for i in range(10_000)}
    assert all(item["response"]["body"]["usage"]["completion_tokens"] <= 1 for item in out.values())


def test_an_interrupted_parquet_run_leaves_no_file(tiny_llama_dir, cache_dir, tmp_path):
    bodies = {f"q{i}": {"model": "a", "messages": user(f"Question {i}?"), "seed": i, "max_tokens": 40,
                        "min_tokens": 40} for i in range(200)}
    source = write_batch(tmp_path / "in.jsonl", bodies)
    target = tmp_path / "out.parquet"
    status, stderr = interrupt_once_decoding(["batch", str(source), "-f", "parquet", "-o", str(target), "--model",
                                              str(tiny_llama_dir), "--file", str(TWO), "--batch-size", "2"], cache_dir)
    assert status == 130, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"], "neither the file nor its temporary copy"
