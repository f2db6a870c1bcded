"""--output FILE: atomic json/csv/parquet, streamed jsonl, --resume, and signals that keep what was written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_env, interrupt_once_decoding, run_cli

from personas.cli import main


def gen(model_dir, *extra: str) -> list[str]:
    return ["generate", "a", "b", "--file", str(PERSONA_FILE), "--model", str(model_dir), "-t", "0", "-t", "1",
            "-n", "3", "--seed", "5", "--max-new-tokens", "6", *extra]


PERSONA_FILE = REPO / "tests" / "data" / "two.toml"


def test_json_output_is_written_whole_and_atomically(tmp_path, tiny_llama_dir, cache_dir):
    target = tmp_path / "out.json"
    target.write_text("previous results\n")
    result = run_cli(gen(tiny_llama_dir, "--format", "json", "--output", str(target)), cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    rows = json.loads(target.read_text())
    assert len(rows) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "no temporary file left behind"


def test_parquet_is_typed_read_back_by_pyarrow_and_datasets_and_written_atomically(tmp_path, tiny_llama_dir,
                                                                                   cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = tmp_path / "out.parquet"
    jsonl = run_cli(gen(tiny_llama_dir, "--format", "jsonl"), cache_dir)
    result = run_cli(gen(tiny_llama_dir, "--format", "parquet", "--output", str(target)), cache_dir)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"], "no temporary file left behind"
    table = pq.read_table(target)
    assert table.schema.names == ["persona", "prompt", "temperature", "sample", "seed", "text", "new_tokens",
                                  "finish_reason", "model"]
    assert table.schema.field("temperature").type == pa.float64() and table.schema.field("seed").type == pa.int64()
    assert table.schema.field("new_tokens").type == pa.int64() and table.schema.field("text").type == pa.string()
    expected = sorted((r["persona"], r["temperature"], r["sample"], r["seed"], r["text"])
                      for r in map(json.loads, jsonl.stdout.splitlines()))
    assert sorted(zip(*(table.column(c).to_pylist() for c in ("persona", "temperature", "sample", "seed", "text")))) \
        == expected
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_files=str(target), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 12 and loaded.features["seed"].dtype == "int64"
    # Parquet is binary: not to a terminal or a pipe, and not as a half-written file.
    refused = run_cli(gen(tiny_llama_dir, "--format", "parquet"), cache_dir)
    assert refused.returncode == 2 and "pass --output FILE.parquet" in refused.stderr


def test_an_interrupted_parquet_run_leaves_no_file(tmp_path, tiny_llama_dir, cache_dir):
    target = tmp_path / "out.parquet"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"hello {i}\n" for i in range(200)))
    status, stderr = interrupt_once_decoding(gen(tiny_llama_dir, "--prompts-file", str(prompts), "--batch-size", "2",
                                                 "--max-new-tokens", "40", "--format", "parquet",
                                                 "--output", str(target)), cache_dir)
    assert status == 130, stderr
    assert list(tmp_path.iterdir()) == [prompts], "neither the file nor its temporary copy"


def test_failed_run_leaves_the_previous_file_alone(tmp_path, tiny_llama_dir, capsys):
    target = tmp_path / "out.csv"
    target.write_text("previous results\n")
    status = main(gen(tiny_llama_dir, "--format", "csv", "--output", str(target), "--max-new-tokens", "4000"))
    assert status == 2 and "context is 512 tokens" in capsys.readouterr().err
    assert target.read_text() == "previous results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_unwritable_output_is_bad_input(tmp_path, tiny_llama_dir, capsys):
    assert main(gen(tiny_llama_dir, "--output", str(tmp_path / "no" / "such" / "out.jsonl"))) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(gen(tiny_llama_dir, "--output", str(tmp_path / "x.json"), "--resume", "-f", "json")) == 2


def test_resume_needs_a_seed(tmp_path, tiny_llama_dir, capsys):
    args = [a for a in gen(tiny_llama_dir, "--output", str(tmp_path / "o.jsonl"), "--resume") if a not in ("--seed", "5")]
    assert main(args) == 2 and "fixed seed" in capsys.readouterr().err


def test_resume_completes_a_torn_jsonl_without_duplicates(tmp_path, tiny_llama_dir, cache_dir):
    full = tmp_path / "full.jsonl"
    assert run_cli(gen(tiny_llama_dir, "-f", "jsonl", "--output", str(full)), cache_dir).returncode == 0
    lines = full.read_text().splitlines()
    assert len(lines) == 12

    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])  # killed mid-line
    result = run_cli(gen(tiny_llama_dir, "-f", "jsonl", "--output", str(partial), "--resume"), cache_dir)
    assert result.returncode == 0, result.stderr
    assert "5 samples already in" in result.stderr and "7 to go" in result.stderr
    resumed = [json.loads(line) for line in partial.read_text().splitlines()]
    key = lambda r: (r["persona"], r["temperature"], r["sample"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, map(json.loads, lines))), "each row once"
    assert {key(r): r["text"] for r in resumed} == {key(json.loads(x)): json.loads(x)["text"] for x in lines}


@pytest.mark.slow
def test_sigterm_exits_143_and_keeps_the_finished_rows(tmp_path, embedded_ready):
    target = tmp_path / "out.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about day {i} of your holiday.\n" for i in range(40)))
    # Small batches, so samples reach the file one batch at a time while the run goes on.
    process = subprocess.Popen(
        [sys.executable, "-m", "personas", "generate", "toddler", "--prompts-file", str(prompts), "-t", "1.0",
         "--seed", "1", "--batch-size", "2", "--max-new-tokens", "24", "-f", "jsonl", "--output", str(target)],
        cwd=REPO, env=cli_env(embedded_ready), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if target.is_file() and target.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.splitlines()[-1] == "Error: terminated" and "Traceback" not in err
    lines = target.read_text().splitlines()
    assert 2 <= len(lines) < 40
    assert all(json.loads(line)["persona"] == "toddler" for line in lines), "every written line is whole"


def test_a_closed_pipe_ends_quietly_with_141(tiny_llama_dir, cache_dir):
    # 800 lines (~170 KB): more than the pipe holds, so personas is still writing when `head`
    # has gone. With 120 lines (26 KB) everything could fit in the pipe first and exit 0 — as
    # happened once the CPU decoded all rows in one wave.
    command = (f"{sys.executable} -m personas generate a b --file {PERSONA_FILE} --model {tiny_llama_dir} "
               "-n 400 -t 1 --seed 1 --max-new-tokens 3 -f jsonl | head -1; exit ${PIPESTATUS[0]}")
    result = subprocess.run(["bash", "-c", command], env=cli_env(cache_dir), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 141, result.stderr
    assert json.loads(result.stdout)["persona"] in ("a", "b")
    assert "Traceback" not in result.stderr and "Error" not in result.stderr


def test_jsonl_output_is_untouched_when_the_run_fails_before_any_sample(tmp_path, capsys):
    target = tmp_path / "out.jsonl"
    target.write_text('{"earlier": "results"}\n')
    assert main(["generate", "a", "--file", str(PERSONA_FILE), "--model", "someone/not-cached",
                 "-f", "jsonl", "--output", str(target)]) == 1
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    assert target.read_text() == '{"earlier": "results"}\n'
