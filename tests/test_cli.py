"""The CLI as users meet it: real subprocesses on the embedded model, and every input error."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, block_kernel_runs, cli_env, run_cli
from typer.testing import CliRunner

from personas.cli import app, main

KEYS = ["persona", "prompt", "temperature", "sample", "seed", "text", "new_tokens", "finish_reason", "model"]
runner = CliRunner()


# --- commands that need no model ------------------------------------------------------------------


def test_list_shows_every_persona():
    result = runner.invoke(app, ["list", "--file", str(REPO / "personas.toml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("customer", "pirate", "critic", "scientist", "toddler", "noir"):
        assert name in result.stdout
    as_json = json.loads(runner.invoke(app, ["list", "--format", "json"]).stdout)
    assert as_json[0]["name"] == "customer" and len(as_json[0]["examples"]) == 2


def test_render_raw_llama2_is_exactly_the_text():
    result = runner.invoke(app, ["render", "customer", "--prompt", "Hi", "--template", "llama2", "--raw"])
    assert result.exit_code == 0
    assert result.stdout.startswith("<s>[INST] <<SYS>>\nYou are a perennially satisfied customer")
    assert result.stdout.endswith("</s><s>[INST] Hi [/INST]")
    assert result.stdout.count("<s>") == 3 and result.stdout.count("</s>") == 2


def test_render_ids_from_the_real_llama2_vocabulary(llama_vocab_dir, cache_dir):
    gguf = str(llama_vocab_dir / "ggml-vocab-llama-spm.gguf")
    result = run_cli(["render", "customer", "--prompt", "hello <s>", "--template", "llama2", "--ids",
                      "--model", gguf], cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    ids = [int(i) for i in result.stdout.split()]
    assert ids[0] == 1 and ids[1] != 1
    assert ids.count(1) == 3 and ids.count(2) == 2
    # "... hello <s> [/INST]": the typed <s> is the text pieces '▁<', 's', '>', not id 1.
    assert ids[-8:] == [22172, 529, 29879, 29958, 518, 29914, 25580, 29962]


# --- bad input: one line, the right exit status, never a traceback ---------------------------------


BAD = [
    (["generate", "nobody"], "unknown persona 'nobody'"),
    (["generate", "custmer"], "did you mean 'customer'?"),
    (["generate", "-t", "-1"], "temperature -1.0 is not allowed"),
    (["generate", "-t", "nan"], "temperature nan is not allowed"),
    (["generate", "-t", "inf"], "temperature inf is not allowed"),
    (["generate", "-n", "0"], "-n 0 is not allowed"),
    (["generate", "--top-p", "1.5"], "--top-p 1.5 is not allowed"),
    (["generate", "--format", "yaml"], "unknown format 'yaml' — choose one of: table, jsonl, json, csv"),
    (["generate", "--gptq-backend", "warp"], "unknown gptq backend 'warp'"),
    (["generate", "--cpu-weights", "int4"], "unknown cpu weights 'int4' — choose one of: float16, float32, gguf"),
    (["generate", "-t", "warm"], "Invalid value for '--temp' / '-t'"),
    (["generate", "--file", "missing.toml"], "persona file not found: missing.toml"),
    (["generate", "--prompt", "  "], "the prompt is empty"),
    (["generate", "--model", "./no/such/model"], "model './no/such/model' not found"),
    (["render", "customer", "--raw", "--ids"], "--raw and --ids cannot be combined"),
    (["generate", "--min-p", "2"], "--min-p 2.0 is not allowed"),
    (["generate", "--frequency-penalty", "3"], "--frequency-penalty 3.0 is not allowed"),
    (["generate", "--repetition-penalty", "0"], "--repetition-penalty 0.0 is not allowed"),
    (["generate", "--logit-bias", "Aye"], "--logit-bias 'Aye' is not TOKEN=BIAS"),
    (["generate", "--logit-bias", "Aye=200"], "the bias 200.0 of 'Aye' is not allowed"),
    (["generate", "--dry-base", "1"], "--dry-base 1.0 is not allowed"),
    (["chat", "pirate", "critic", "--presence-penalty", "-5"], "--presence-penalty -5.0 is not allowed"),
    (["play", "password", "--dry-allowed-length", "0"], "--dry-allowed-length 0 is not allowed"),
    (["explain", "pirate", "--min-p", "-1"], "--min-p -1.0 is not allowed"),
    (["frobnicate"], "No such command 'frobnicate'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    status = main(args)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("Error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert " — " in err, "says what to do"


def test_a_folder_that_is_no_model_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    """An existing folder with no config.json is bad input, refused as the options are read: the
    one line is all stderr holds, so with --ray no runtime was started for it and nothing loaded."""
    monkeypatch.chdir(REPO)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("weights go here")
    with_ray = [["--ray", "local"]] if importlib.util.find_spec("ray") else []
    for extra in [[], *with_ray]:
        status = main(["generate", "customer", "--model", str(empty), *extra])
        err = capsys.readouterr().err
        assert status == 2, err
        assert err == (f"Error: model folder '{empty}' holds no config.json: it is not a model — point --model at "
                       "a folder save_pretrained wrote (config.json, weights, tokenizer), a .gguf file or a hub id\n")


def test_broken_toml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[personas.a]\nprompt = "p"\nsystem = """never closed\n')
    assert main(["generate", "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {bad}:3: invalid TOML") and err.count("\n") == 1


def test_runtime_failure_is_exit_1(capsys):
    # A hub id that is not cached, offline: the model cannot load.
    assert main(["generate", "customer", "--model", "someone/not-cached"]) == 1
    err = capsys.readouterr().err
    *info, last = err.splitlines()
    assert last.startswith("Error: ") and "not in the local Hugging Face cache" in last and "--model embedded" in last
    assert not any(line.startswith("Error") for line in info) and "Traceback" not in err


def test_debug_shows_the_traceback(cache_dir):
    result = run_cli(["generate", "nobody"], cache_dir, PERSONAS_DEBUG="1")
    assert result.returncode != 0 and "Traceback" in result.stderr


# --- end to end on the embedded model --------------------------------------------------------------

E2E = ["generate", "customer", "pirate", "-t", "0", "-t", "1.0", "-n", "2", "--seed", "7", "--max-new-tokens", "24"]


@pytest.mark.slow
def test_jsonl_end_to_end(embedded_ready):
    result = run_cli([*E2E, "--format", "jsonl"], embedded_ready)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 * 2 * 2
    assert all(list(r) == KEYS for r in rows)
    assert {(r["persona"], r["temperature"], r["sample"]) for r in rows} == {
        (p, t, k) for p in ("customer", "pirate") for t in (0.0, 1.0) for k in (1, 2)}
    assert all(r["model"] == "embedded" and r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["text"].strip() and 0 < r["new_tokens"] <= 24 for r in rows)
    greedy = {r["persona"]: set() for r in rows}
    for r in rows:
        if r["temperature"] == 0:
            greedy[r["persona"]].add(r["text"])
    assert all(len(texts) == 1 for texts in greedy.values()), "greedy samples are identical"
    assert "loaded embedded on cpu" in result.stderr and "Traceback" not in result.stderr
    # The embedded GGUF's own blocks, all 121 products of a step, where this CPU runs their kernel.
    assert ("GGUF blocks for 121 layers" if block_kernel_runs() else "float16 weights") in result.stderr

    # The same seed prints the same texts, in any format.
    again = run_cli([*E2E, "--format", "json"], embedded_ready)
    assert again.returncode == 0, again.stderr
    by_key = {(r["persona"], r["temperature"], r["sample"]): r["text"] for r in rows}
    as_json = json.loads(again.stdout)
    assert {(r["persona"], r["temperature"], r["sample"]): r["text"] for r in as_json} == by_key
    assert [(r["persona"], r["temperature"], r["sample"]) for r in as_json] == sorted(
        by_key, key=lambda k: (["customer", "pirate"].index(k[0]), k[1], k[2])), "json is in grid order"


@pytest.mark.slow
def test_other_cpu_weights_on_request_give_the_same_greedy_answers(embedded_ready):
    """float16 weights change each weight by its last float16 bit, the GGUF blocks keep each row
    to 16 bits: on the embedded model's own prompts the greedy answers stay the float32 weights'
    (docs/performance.md counts 118 and 115 of 120 prompts alike over 64 tokens; these two are
    among them)."""
    greedy = ["generate", "customer", "pirate", "-t", "0", "--seed", "7", "--max-new-tokens", "24", "-f", "jsonl"]
    runs = {weights: run_cli([*greedy, "--cpu-weights", weights], embedded_ready)
            for weights in ("gguf", "float16", "float32")}
    assert all(run.returncode == 0 for run in runs.values()), [run.stderr for run in runs.values()]
    assert "float16 weights" in runs["float16"].stderr and "float16 weights" not in runs["float32"].stderr
    assert "GGUF blocks" not in runs["float16"].stderr + runs["float32"].stderr
    texts = [{r["persona"]: r["text"] for r in map(json.loads, run.stdout.splitlines())} for run in runs.values()]
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) == 2


@pytest.mark.slow
def test_table_and_csv_end_to_end(embedded_ready):
    table = run_cli([*E2E, "--format", "table"], embedded_ready)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    for text in ("persona / prompt", "T = 0 (greedy)", "T = 1", "customer", "pirate", "model: embedded"):
        assert text in out, text
    assert "×2" in out, "identical greedy samples are shown once with a count"

    as_csv = run_cli([*E2E, "--format", "csv"], embedded_ready)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert as_csv.returncode == 0 and len(rows) == 8 and list(rows[0]) == KEYS


@pytest.mark.slow
def test_default_format_off_a_terminal_is_jsonl_and_prompt_override(embedded_ready):
    result = run_cli(["generate", "toddler", "-p", "What is your favourite colour?", "-n", "1", "-t", "0.7",
                      "--max-new-tokens", "8"], embedded_ready)
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["prompt"] == "What is your favourite colour?" and row["temperature"] == 0.7
    assert "seed " in result.stderr and "--seed" in result.stderr, "a random seed is printed so it can be repeated"


@pytest.mark.slow
def test_render_with_the_models_template(embedded_ready):
    result = run_cli(["render", "customer", "--template", "model", "--raw", "--prompt", "Hi <|im_start|>"],
                     embedded_ready)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<|im_start|>system\nYou are a perennially satisfied customer")
    assert result.stdout.endswith("<|im_start|>user\nHi <|im_start|><|im_end|>\n<|im_start|>assistant\n")
    ids = run_cli(["render", "customer", "--template", "model", "--ids", "--prompt", "Hi <|im_start|>"],
                  embedded_ready)
    start = 1  # <|im_start|> in SmolLM2's vocabulary
    assert ids.stdout.split().count(str(start)) == 7, "6 messages + the generation prompt; the typed one is text"
    panel = run_cli(["render", "customer"], embedded_ready)
    assert panel.returncode == 0 and "tokens (tokenizer of" in panel.stdout


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_finished_rows_valid(embedded_ready):
    import signal
    import subprocess
    import sys

    from conftest import cli_env

    # 48 rows of up to 128 tokens: seconds of sampling after the first row is written, however
    # fast the machine (a fixed sleep after the load once outlasted a smaller job).
    process = subprocess.Popen(
        [sys.executable, "-m", "personas", "generate", "-t", "1.0", "-n", "8", "--max-new-tokens", "128",
         "--seed", "1", "-f", "jsonl"],
        cwd=REPO, env=cli_env(embedded_ready), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()  # a finished row: the run is into its sampling
    assert first, "the run ended before writing a row"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.splitlines()[-1] == "Error: interrupted" and "Traceback" not in err
    rows = [json.loads(line) for line in (first + out).splitlines()]
    assert 1 <= len(rows) < 48 and all(row["persona"] for row in rows)


def test_bare_command_shows_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out


def test_help_shows_toml_table_names_literally():
    # Rich reads "[defaults]" as markup and drops it unless escaped.
    for command, expected in [("generate", "[defaults].temperatures"), ("play", "[games]"), ("chat", "[defaults].seed")]:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and expected in result.stdout, (command, result.stdout)


def test_help_shows_no_value_after_flags_that_take_none():
    """Typer printed `<bool>` after every flag (`--resume <bool>`), as if it took a value."""
    for command in ("generate", "chat", "play", "explain", "serve", "list", "render", "import"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "<bool>" not in result.stdout, command
    generate = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--min-p" in generate and "<float>" in generate and "TOKEN=BIAS" in generate


def test_a_typer_without_the_wrapped_method_still_runs_the_cli(tmp_path):
    """The flag-type wrapper patches one of Typer's own methods; a Typer that lacks it must still
    import the CLI and run commands (only --help's type column would differ)."""
    script = ("import sys\nfrom typer.core import TyperOption\ndel TyperOption.display_type_rich\n"
              "from personas.cli import main\nsys.exit(main(['list']))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "customer" in result.stdout


AT_EXIT = ("import atexit, sys\natexit.register(lambda: sys.stderr.write('teardown ran\\n'))\n"
           "from personas.cli import run\nsys.argv[0] = 'personas'\nrun()\n")


def test_a_sampling_run_ends_without_the_interpreters_teardown_and_loses_no_output(tiny_llama_dir, cache_dir):
    """Once torch is loaded, `run` flushes both streams and ends the process at once (the teardown
    of torch and transformers costs a short run about a second); its output, block-buffered in a
    pipe here, and its exit status are whole. A command that never loaded torch exits normally."""
    env = {k: v for k, v in cli_env(cache_dir).items() if k != "PYTHONUNBUFFERED"}
    sampled = subprocess.run([sys.executable, "-c", AT_EXIT, "generate", "pirate", "--model", str(tiny_llama_dir),
                              "-p", "Hi", "-n", "3", "-t", "0.5", "-t", "1.0", "--max-new-tokens", "4",
                              "--format", "jsonl"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr
    assert "teardown ran" not in sampled.stderr
    assert [json.loads(line)["sample"] for line in sampled.stdout.splitlines()] == [1, 2, 3, 1, 2, 3]
    # The summary line, flushed: the prompts' passes apart, then the decode steps' own speed.
    assert re.search(r"6 samples, 24 new tokens in [\d.]+ s \(\d+ tokens/s; prompts [\d.]+ s, then [\d.]+ tokens/s\)$",
                     sampled.stderr.rstrip()), sampled.stderr
    refused = subprocess.run([sys.executable, "-c", AT_EXIT, "generate", "nobody"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "teardown ran" in refused.stderr, refused.stderr


COLLECTOR = ("import gc, sys\nfrom personas.cli import main\nstatus = main(sys.argv[1:])\n"
             "sys.stderr.write(f'collector: {gc.isenabled()} {gc.get_freeze_count()}\\n')\nraise SystemExit(status)\n")


def test_a_sampling_run_imports_torch_with_the_cycle_collector_paused_then_frozen(tiny_llama_dir, cache_dir):
    """Importing torch makes hundreds of cycle collections that find next to nothing: the CLI
    pauses the collector for those imports, then moves what they made out of its later passes
    (gc.freeze) and turns it back on. Bad input is refused before any of that."""
    sampled = subprocess.run([sys.executable, "-c", COLLECTOR, "generate", "pirate", "--model", str(tiny_llama_dir),
                              "-p", "Hi", "-n", "2", "--max-new-tokens", "4", "--format", "jsonl"],
                             cwd=REPO, env=cli_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr
    enabled, frozen = sampled.stderr.splitlines()[-1].removeprefix("collector: ").split()
    assert enabled == "True" and int(frozen) > 100_000, sampled.stderr  # torch's objects, among others
    refused = subprocess.run([sys.executable, "-c", COLLECTOR, "generate", "nobody"], cwd=REPO, env=cli_env(cache_dir),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1] == "collector: True 0", refused.stderr


# --- commands that only read TOML or format text pay for no torch ------------------------------

LIGHT = [["--help"], ["list"], ["render", "customer", "--template", "llama2", "--raw"]]
WHICH_HEAVY = ("import sys\nfrom personas.cli import main\nstatus = main(sys.argv[1:])\n"
               "sys.stderr.write('heavy: ' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules) + '\\n')\n"
               "raise SystemExit(status)\n")


@pytest.mark.parametrize("args", LIGHT, ids=[" ".join(a) for a in LIGHT])
def test_light_commands_import_neither_torch_nor_transformers(args, cache_dir):
    result = subprocess.run([sys.executable, "-c", WHICH_HEAVY, *args], cwd=REPO, env=cli_env(cache_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == "heavy: ", result.stderr
    assert result.stdout.strip()


REFUSED = [["generate", "nobody"], ["generate", "customer", "--model", "{folder}"],
           ["generate", "--prompts-file", "{prompts}"], ["batch", "{prompts}"]]


@pytest.mark.parametrize("args", REFUSED, ids=[" ".join(a) for a in REFUSED])
def test_sampling_commands_refuse_bad_input_before_importing_torch(args, cache_dir, tmp_path):
    """A command that will sample still reads and checks its input before torch and transformers
    (seconds of imports): bad input is refused at once."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "prompts.jsonl").write_text("{not json\n")
    args = [a.format(folder=tmp_path / "folder", prompts=tmp_path / "prompts.jsonl") for a in args]
    result = subprocess.run([sys.executable, "-c", WHICH_HEAVY, *args], cwd=REPO, env=cli_env(cache_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.splitlines()[-1] == "heavy: ", result.stderr
