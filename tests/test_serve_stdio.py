"""`personas serve --stdio`: a round trip with a malformed line, batching of lines sent together,
requests joining a running batch, and a failed decode step answered while the server goes on."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import REPO, cli_env, make_tiny_llama

from personas.serve.stdio import batches

TWO = REPO / "tests" / "data" / "two.toml"


def test_serve_round_trip_with_bad_lines(tiny_llama_dir, cache_dir):
    requests = [
        json.dumps({"persona": "a", "n": 2, "temperatures": [0, 1], "seed": 3, "id": "x", "max_new_tokens": 5}),
        "not json",
        json.dumps({"persona": "zz"}),
        "",
        json.dumps({"persona": "b", "prompt": "hi", "max_new_tokens": 3, "colour": "red"}),
        json.dumps({"persona": "b", "max_new_tokens": 3}),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "personas", "serve", "--stdio", "--file", str(TWO), "--model", str(tiny_llama_dir)],
        input=("\n".join(requests) + "\n").encode() + b'{"persona": "caf\xe9"}\n',
        capture_output=True, env=cli_env(cache_dir), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    out = [json.loads(line) for line in result.stdout.decode().splitlines()]
    errors = {o["line"]: o["error"] for o in out if "error" in o}
    assert set(errors) == {2, 3, 5, 7}
    assert errors[2].startswith("not valid JSON") and "unknown persona 'zz'" in errors[3]
    assert errors[5] == "colour: unknown key" and errors[7] == "the line is not UTF-8 text"
    samples = [o for o in out if "error" not in o]
    assert sorted((o["id"], o["temperature"], o["sample"]) for o in samples if o["id"] == "x") == [
        ("x", 0.0, 1), ("x", 0.0, 2), ("x", 1.0, 1), ("x", 1.0, 2)]
    assert [o["id"] for o in samples if o["id"] != "x"] == [6], "a request without id is named by its line"
    assert all(o["new_tokens"] <= (5 if o["id"] == "x" else 3) for o in samples)
    assert "Traceback" not in result.stderr.decode()


def test_lines_sent_together_form_one_batch_and_later_ones_another():
    def arriving():
        yield b"1"
        yield b"2"
        time.sleep(0.5)
        yield b"3"

    assert [[n for n, _ in batch] for batch in batches(arriving())] == [[1, 2], [3]]


def test_a_request_arriving_mid_decode_joins_the_running_batch(tiny_llama_dir):
    """The second line arrives while the first one's rows decode; its short answers come back
    before the first request's long ones end (it does not wait for them)."""
    from personas.serve.stdio import serve
    from personas.library.load import load_library
    from personas.model.choice import resolve_model
    from personas.model.load import load_model

    model = load_model(resolve_model(str(tiny_llama_dir)), device="cpu")
    library = load_library(TWO)
    written: list[dict] = []

    def arriving():
        yield json.dumps({"persona": "a", "n": 8, "temperatures": [1.0], "seed": 1, "id": "long",
                          "max_new_tokens": 400}).encode()
        time.sleep(0.1)  # the first request decodes meanwhile
        yield json.dumps({"persona": "b", "n": 1, "seed": 1, "id": "short", "max_new_tokens": 2}).encode()

    assert serve(arriving(), library, model, seed=0, write=written.append) == 2
    ids = [w["id"] for w in written]
    assert ids.count("long") == 8 and ids.count("short") >= 1
    assert max(i for i, x in enumerate(ids) if x == "short") < max(i for i, x in enumerate(ids) if x == "long")


def test_a_failed_step_answers_its_request_with_an_error_and_the_server_goes_on(tmp_path, cache_dir):
    """A checkpoint whose embedding is smaller than its tokenizer: a prompt with later ids fails
    inside the decode step (IndexError), for real — the same failure the HTTP server's test uses."""
    broken = make_tiny_llama(tmp_path / "broken", vocab_size=400)
    server = subprocess.Popen(
        [sys.executable, "-m", "personas", "serve", "--stdio", "--file", str(TWO), "--model", str(broken),
         "--device", "cpu"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=cli_env(cache_dir), cwd=REPO)

    def ask(request: dict) -> dict:
        server.stdin.write((json.dumps(request) + "\n").encode())
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    try:
        failed = ask({"persona": "a", "prompt": "Galaxy Rider", "max_new_tokens": 4, "id": "doomed"})
        assert failed["line"] == 1 and failed["error"].startswith("decoding failed: IndexError")
        answered = ask({"persona": "b", "prompt": "a b c", "max_new_tokens": 3, "id": "after"})
        assert answered["id"] == "after" and "error" not in answered and answered["new_tokens"] <= 3
        server.stdin.close()
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
    stderr = server.stderr.read().decode()
    assert stderr.count("decoding failed") == 1 and "Traceback" not in stderr

