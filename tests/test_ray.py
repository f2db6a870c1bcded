"""`generate --ray`: the grid on Ray workers, on a real local Ray runtime with 2 CPUs and the tiny
model. One runtime (`ray start --head`) serves the tests after the first, which starts its own
with `--ray local`; every address is on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env, run_cli

ray = pytest.importorskip("ray")

PERSONAS = """
[personas.sailor]
system = "You are an old sailor."
[personas.cook]
system = "You are a ship's cook."
"""
PROMPTS = "\n".join(f"Tell me about the {thing}." for thing in
                    ("sea", "fox", "dog", "day", "bike", "rain", "tea", "shop", "trail", "climb")) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ray-job")
    (folder / "personas.toml").write_text(PERSONAS)
    (folder / "prompts.txt").write_text(PROMPTS)
    return folder / "personas.toml", folder / "prompts.txt"


def job(files, model: Path, *extra: str) -> list[str]:
    personas, prompts = files
    return ["generate", "--file", str(personas), "--prompts-file", str(prompts), "--model", str(model),
            "-t", "0.5", "-t", "1.5", "-n", "2", "--max-new-tokens", "12", "--seed", "5", "--format", "jsonl", *extra]


def keyed(stdout: str) -> dict[tuple, str]:
    rows = [json.loads(line) for line in stdout.splitlines()]
    keys = [(r["persona"], r["id"], r["temperature"], r["sample"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)), "no row written twice"
    return {k: r["text"] for k, r in zip(keys, rows)}


def processes_using(folder: str) -> list[str]:
    """The command lines of this machine's live processes that hold a file under `folder` open:
    each of a Ray runtime's processes writes its logs under the runtime's folder, whatever it
    later calls itself (its command line and environment may be rewritten)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if any(os.readlink(fd).startswith(folder + "/") for fd in (entry / "fd").iterdir()):
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # not a process, one that ended meanwhile, or another user's
            continue
    return found


def test_local_runtime_gives_the_same_rows_and_texts_as_one_process_then_stops(files, tiny_llama_dir, cache_dir):
    """Same rows as one process; and every process of the runtime it started (under RAY_TMPDIR)
    ends with it."""
    alone = run_cli(job(files, tiny_llama_dir), cache_dir)
    assert alone.returncode == 0, alone.stderr
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        spread = run_cli(job(files, tiny_llama_dir, "--ray", "local", "--ray-workers", "2"), cache_dir,
                         RAY_TMPDIR=ray_tmp)
        assert spread.returncode == 0, spread.stderr
        assert "2 Ray workers ready" in spread.stderr
        expected = keyed(alone.stdout)
        assert len(expected) == 2 * 10 * 2 * 2
        assert keyed(spread.stdout) == expected
        if Path("/proc").is_dir():  # Linux's view of processes and their open files
            deadline = time.monotonic() + 10  # processes killed as the CLI ended may take a moment to go
            while (left := processes_using(ray_tmp)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not left, f"the runtime's processes outlived the run: {left}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_more_workers_than_a_local_runtime_has_room_for_is_refused_not_waited_on(files, tiny_llama_dir, cache_dir):
    """Each worker holds a CPU (a GPU where there is one) for its life; Ray would leave the ones it
    has no room for waiting forever, and the run with them."""
    too_many = (os.cpu_count() or 1) + 1
    result = run_cli(job(files, tiny_llama_dir, "--ray", "local", "--ray-workers", str(too_many)), cache_dir,
                     timeout=180)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: --ray-workers {too_many} asks for {too_many} workers of one "), line
    assert "or fewer" in line and not result.stdout


def test_each_worker_is_handed_one_equal_share_of_the_rows():
    """A worker's engine keeps its slots full only while rows wait for them, so one worker takes
    the whole job as one process would, and several split it evenly — not chunks of a batch."""
    from personas.generate.ray import share_rows

    assert share_rows(4096, 1) == 4096
    assert share_rows(4096, 2) == 2048
    assert share_rows(7, 3) == 3  # shares of 3, 3 and 1
    assert share_rows(1, 4) == 1


def test_auto_on_ray_asks_the_cluster_for_a_gpu_not_this_machine():
    """The cluster's machines load the model: `auto` is theirs to answer, and asking this machine
    would import torch (seconds) before the runtime could start."""
    from personas.generate.ray import auto_choice

    on_gpus, on_cpus = auto_choice({"CPU": 16.0, "GPU": 2.0}), auto_choice({"CPU": 2.0})
    assert (on_gpus.label, on_gpus.reason) == ("llama2-13b-gptq", "the Ray cluster has a GPU")
    assert (on_cpus.label, on_cpus.reason) == ("embedded", "no GPU in the Ray cluster")
    check = ("import sys; from personas.cli.loading import model_options; from personas.library.schema import Defaults; "
             "options = model_options(Defaults(), None, on_ray=sys.argv[1] == 'ray'); "
             "print(options.choice is None, 'torch' in sys.modules)")
    for on_ray, expected in (("ray", "True False"), ("here", "False True")):
        said = subprocess.run([sys.executable, "-c", check, on_ray], capture_output=True, text=True, timeout=120,
                              cwd=REPO, env={**os.environ, "PERSONAS_MODEL": "auto"})
        assert said.stdout.split() == expected.split(), said.stderr


def test_workers_loading_on_the_cpu_hold_no_gpu(files, tiny_llama_dir):
    """`--device cpu` on a cluster with GPUs: each worker holds a CPU, not a GPU it would not use.
    The runtime here declares 1 GPU (Ray's resources are counts it schedules by) and 2 CPUs, so
    2 workers fit only as CPU workers."""
    from personas.generate.ray import RayPool
    from personas.generate.request import Request, plan
    from personas.library.schema import Persona
    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.sampling.grid import Settings

    choice = resolve_model(str(tiny_llama_dir))
    settings = Settings(max_new_tokens=4)
    request = Request(personas=[Persona(name="sailor", system="You are an old sailor.")],
                      prompts=["Ahoy?", "Where to?"], seed=3, settings=settings)
    rows = plan(request, load_model(choice, tokenizer_only=True))
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    samples, short = [], []
    try:
        with RayPool("local", None, choice, {"device": "cpu"},
                     on_short=lambda *said: short.append(said)) as pool:
            assert not pool.on_gpu and len(pool.actors) == 2 and not short
            pool.sample([(settings, rows)], samples.append)
            with RayPool("local", None, choice, {"device": None}) as on_gpus:
                assert on_gpus.on_gpu and len(on_gpus.actors) == 1, "otherwise one worker per GPU"
    finally:
        ray.shutdown()
    assert sorted(s.row.seed for s in samples) == sorted(r.seed for r in rows)


@pytest.fixture(scope="module")
def runtime(cache_dir):
    """One Ray runtime with 2 CPUs for the rest of the module; `--ray auto` finds it."""
    env = cli_env(cache_dir)
    ray_cli = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:  # a free port for the head's GCS
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "2",
                              "--include-dashboard", "false", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    yield "auto"
    subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_a_killed_worker_loses_no_row_and_writes_none_twice(runtime, tiny_llama_dir):
    from personas.generate.request import Request, plan
    from personas.generate.ray import RayPool
    from personas.library.schema import Persona
    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.sampling.grid import Settings

    choice = resolve_model(str(tiny_llama_dir))
    tokenizer = load_model(choice, tokenizer_only=True)
    settings = Settings(max_new_tokens=16, min_new_tokens=16, max_batch=1)  # a chunk is one row
    request = Request(personas=[Persona(name="sailor", system="You are an old sailor.")],
                      prompts=[f"Question {i}?" for i in range(12)], seed=3, settings=settings)
    rows = plan(request, tokenizer)
    pids, lost, samples = [], [], []

    def on_sample(sample) -> None:
        samples.append(sample)
        if len(samples) == 3:
            os.kill(pids[0], signal.SIGKILL)  # mid-run: it holds a chunk now

    try:
        with RayPool(runtime, 2, choice, {"device": "cpu"}, on_workers=pids.extend,
                     on_lost=lambda left, requeued: lost.append((left, requeued))) as pool:
            pool.sample([(settings, rows)], on_sample)
    finally:
        ray.shutdown()  # this process leaves the runtime (which the fixture stops)
    assert len(lost) == 1 and lost[0][0] == 1, "one worker died, one was left"
    assert sorted(s.row.seed for s in samples) == sorted(r.seed for r in rows), "every row exactly once"
    assert all(len(s.token_ids) == 16 for s in samples)


def test_a_worker_imports_torch_with_the_cycle_collector_paused_then_frozen(runtime, tiny_llama_dir):
    """As the CLI's own process does (test_cli.py): a worker's imports of torch and the engine run
    with the collector paused, then what they made is frozen out of its passes."""
    from personas.generate.ray import RayPool
    from personas.model.choice import resolve_model

    try:
        with RayPool(runtime, 1, resolve_model(str(tiny_llama_dir)), {"device": "cpu"}) as pool:
            pool.wait_ready()
            # A lambda travels by value; a function of this module would need the module there.
            enabled, frozen = ray.get(pool.actors[0].__ray_call__.remote(
                lambda _worker: (__import__("gc").isenabled(), __import__("gc").get_freeze_count())))
    finally:
        ray.shutdown()  # this process leaves the runtime (which the fixture stops)
    assert enabled and frozen > 100_000, (enabled, frozen)  # torch's objects, among others


def test_the_default_model_on_a_cluster_without_gpus_is_the_embedded_one(files, runtime, cache_dir):
    """No --model on a cluster of CPUs (the fixture's): its workers load the embedded model, and the
    run says why."""
    personas, _ = files
    result = run_cli(["generate", "sailor", "--file", str(personas), "-p", "Ahoy?", "-n", "2", "--max-new-tokens", "6",
                      "--seed", "1", "--format", "jsonl", "--ray", runtime, "--ray-workers", "1"], cache_dir,
                     PERSONAS_MODEL="auto")
    assert result.returncode == 0, result.stderr
    assert "model: embedded (no GPU in the Ray cluster)" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and {r["model"] for r in rows} == {"embedded"}


def test_a_cluster_short_of_room_says_the_run_waits_for_it(files, runtime, tiny_llama_dir, cache_dir):
    """A joined cluster may grow (an autoscaler), so more workers than it has room for are not
    refused; but the wait is said, never silent. The fixture's runtime has 2 CPUs."""
    process = subprocess.Popen([sys.executable, "-m", "personas",
                                *job(files, tiny_llama_dir, "--ray", runtime, "--ray-workers", "3")],
                               cwd=REPO, env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(process.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120  # the warning comes as the pool is made, before any load
    while time.monotonic() < deadline and not any("room for" in line for line in said):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    reader.join(timeout=10)
    assert any("the Ray cluster has room for 2 of the 3 workers (one CPU each) now" in line for line in said), said
    assert process.returncode == 130, said


def test_interrupt_keeps_finished_rows_and_resume_completes_them(files, runtime, tiny_llama_dir, cache_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    many = job(files, tiny_llama_dir, "--ray", runtime, "--max-new-tokens", "48", "--batch-size", "2",
               "--output", str(out))
    process = subprocess.Popen([sys.executable, "-m", "personas", *many], cwd=REPO, env=cli_env(cache_dir),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "Error: interrupted"
    partial = keyed(out.read_text())  # every line whole, none twice
    assert 4 <= len(partial) < 80
    resumed = run_cli([*many, "--resume"], cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(partial)} samples already in" in resumed.stderr
    everything = keyed(out.read_text())
    assert len(everything) == 80
    alone = run_cli(job(files, tiny_llama_dir, "--max-new-tokens", "48"), cache_dir)
    assert everything == keyed(alone.stdout), "interrupted + resumed on Ray = one uninterrupted process"


def test_an_answer_format_on_ray_answers_as_one_process(files, runtime, tiny_llama_dir, cache_dir):
    """--json-schema travels with the rows: the workers' engines follow it, the driver parses it."""
    schema = '{"type": "object", "properties": {"w": {"enum": ["fox", "dog", "sea"]}}, "required": ["w"], ' \
             '"additionalProperties": false}'
    alone = run_cli(job(files, tiny_llama_dir, "--json-schema", schema), cache_dir)
    spread = run_cli(job(files, tiny_llama_dir, "--json-schema", schema, "--ray", runtime), cache_dir)
    assert alone.returncode == 0 and spread.returncode == 0, alone.stderr + spread.stderr
    assert keyed(spread.stdout) == keyed(alone.stdout)
    records = [json.loads(line) for line in spread.stdout.splitlines()]
    assert all(r["json"]["w"] in ("fox", "dog", "sea") for r in records)


def test_a_batch_file_on_ray_answers_as_one_process(files, runtime, tiny_llama_dir, cache_dir, tmp_path):
    """`batch --ray`: the same answers as one process, stop strings found in finished samples as the
    engine finds them token by token; log-probabilities are refused there, on their own line."""
    personas, _ = files

    def body(i: int) -> dict:
        system = [{"role": "system", "content": "You keep bees."}] if i % 3 == 0 else []
        return {"model": "base" if system else ("sailor", "cook")[i % 2], "seed": i, "n": 1 + i % 2,
                "max_tokens": 10, "messages": system + [{"role": "user", "content": f"Question {i}?"}],
                **({"stop": ["e"]} if i % 4 == 0 else {})}

    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i)}
             for i in range(24)]
    lines.append({"custom_id": "lp", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "cook", "messages": [{"role": "user", "content": "Hi"}], "logprobs": True}})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["batch", str(source), "--file", str(personas), "--model", str(tiny_llama_dir)]
    alone = run_cli(common, cache_dir)
    spread = run_cli([*common, "--ray", runtime, "--batch-size", "4"], cache_dir)
    assert alone.returncode == 0, alone.stderr
    assert spread.returncode == 1 and "1 of 25 requests was refused (line 25 of" in spread.stderr, spread.stderr

    def answers(stdout: str) -> dict:
        out = {}
        for item in map(json.loads, stdout.splitlines()):
            body = item["response"]["body"]
            out[item["custom_id"]] = body.get("error", {}).get("param") if "error" in body else (
                [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]], body["usage"])
        return out

    on_ray, expected = answers(spread.stdout), answers(alone.stdout)
    assert on_ray.pop("lp") == "logprobs" and expected.pop("lp")
    assert on_ray == expected
    assert any(reason == "stop" for choices, _ in expected.values() for _, reason in choices)


def test_unreachable_cluster_fails_within_seconds(files, tiny_llama_dir, cache_dir):
    started = time.monotonic()
    result = run_cli(job(files, tiny_llama_dir, "--ray", "127.0.0.1:1"), cache_dir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: cannot reach the Ray cluster at '127.0.0.1:1'")
    assert time.monotonic() - started < 60  # interpreter and tokenizer included; the refusal itself is immediate


def test_without_the_ray_package_says_how_to_install_it(files, tiny_llama_dir, cache_dir):
    hide_ray = ("import sys; sys.modules['ray'] = None\n"  # Python's way of making a module unimportable
                "from personas.cli import main; raise SystemExit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", hide_ray, *job(files, tiny_llama_dir, "--ray", "local")],
                            cwd=REPO, env=cli_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "Error: --ray needs the ray package, which is not installed — pip install 'personas[ray]'\n"
