"""A user's GGUF file is converted once into the cache and later starts read the copy: a tiny
random Llama written as a real Q4_0 GGUF (gguf-py) with the real Llama-2 vocabulary."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TESTDATA, run_cli

from personas.model.choice import resolve_model
from personas.model.gguf_cache import gguf_checkpoint
from personas.model.load import load_model
from personas.model.plain_llama import PlainCausalLM

VOCABULARY = TESTDATA / "ggml-vocab-llama-spm.gguf"
LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] "
                   "+ ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
# Larger weights than a real model's, so that a tiny model's tokens vary.
TINY = dict(layers=2, hidden=64, mlp=128, heads=4, kv_heads=2, vocabulary_file=VOCABULARY, tokenizer_keys=None,
            template=LLAMA2_TEMPLATE, rope_theta=10000.0, context=512, scale=0.3, embedding_scale=1.0)


def write_tiny_gguf(out: Path, seed: int = 0) -> Path:
    """The benchmarks' random GGUF writer, at a tiny shape with the Llama-2 vocabulary."""
    if not VOCABULARY.is_file():
        pytest.skip(f"the real Llama-2 vocabulary is not here ({VOCABULARY})")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from random_gguf import write_gguf

    write_gguf(out, TINY, "Q4_0", seed)
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_0.gguf")


def test_the_copy_holds_exactly_the_dequantized_weights_and_later_starts_read_it(tiny_gguf, cache_dir):
    from transformers import AutoModelForCausalLM

    said: list[str] = []
    choice = resolve_model(str(tiny_gguf))
    loaded = load_model(choice, device="cpu", status=said.append, engine_only=True)
    assert any(line.startswith("converting tiny-llama.Q4_0.gguf") for line in said)
    assert isinstance(loaded.model, PlainCausalLM), "the copy is a plain safetensors folder"
    folder, name = gguf_checkpoint(tiny_gguf)
    assert name is None and Path(folder).parent == cache_dir / "models"
    assert json.loads((Path(folder) / "personas-source.json").read_text())["path"] == str(tiny_gguf.resolve())

    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    copy = AutoModelForCausalLM.from_pretrained(folder)
    for (key, a), (_, b) in zip(sorted(direct.state_dict().items()), sorted(copy.state_dict().items())):
        assert torch.equal(a, b), key

    said.clear()
    again = load_model(choice, device="cpu", status=said.append, engine_only=True)
    assert not any("converting" in line for line in said)
    assert again.prompt_ids(loaded_dialog()) == loaded.prompt_ids(loaded_dialog())


def loaded_dialog():
    from personas.model.prompt import Dialog

    return Dialog("You keep a lighthouse.", (("How are you?", "Windswept."),), "What do you see?")


def test_a_changed_file_is_converted_again_replacing_its_old_copy(tiny_gguf, tmp_path):
    moved = tmp_path / "changing.gguf"
    moved.write_bytes(tiny_gguf.read_bytes())
    first, _ = gguf_checkpoint(moved)
    write_tiny_gguf(moved, seed=1)  # the same size, other weights
    os.utime(moved, ns=(moved.stat().st_atime_ns, moved.stat().st_mtime_ns + 10**9))
    said: list[str] = []
    second, _ = gguf_checkpoint(moved, said.append)
    assert said and second == first, "one copy per file, replaced"
    from safetensors.torch import load_file

    reread = load_file(str(Path(second) / "model.safetensors"))
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(str(moved.parent), gguf_file=moved.name).state_dict()
    assert torch.equal(reread["model.layers.0.mlp.up_proj.weight"], direct["model.layers.0.mlp.up_proj.weight"])
    leftovers = [p for p in Path(second).parent.iterdir() if p.name.startswith(".converting-")]
    assert not leftovers


def test_a_tokenizer_alone_reads_the_file_without_converting(tmp_path):
    fresh = tmp_path / "vocab-only.gguf"
    fresh.write_bytes(VOCABULARY.read_bytes()) if VOCABULARY.is_file() else pytest.skip("no vocabulary")
    assert gguf_checkpoint(fresh, convert=False) == (str(tmp_path), "vocab-only.gguf")
    loaded = load_model(resolve_model(str(fresh)), device="cpu", tokenizer_only=True)
    assert loaded.model is None and loaded.tokenizer.bos_token_id == 1


def test_generate_on_a_gguf_file_converts_once_and_answers_the_same(tiny_gguf, cache_dir, tmp_path):
    """Through the CLI: the first start converts (and says so), the second reads the copy."""
    gguf = tmp_path / "cli.gguf"
    gguf.write_bytes(tiny_gguf.read_bytes())
    args = ["generate", "customer", "--model", str(gguf), "-t", "0", "-t", "1", "-n", "2", "--seed", "4",
            "--max-new-tokens", "12", "--format", "jsonl"]
    first = run_cli(args, cache_dir)
    assert first.returncode == 0, first.stderr
    assert "converting cli.gguf" in first.stderr
    second = run_cli(args, cache_dir)
    assert second.returncode == 0, second.stderr
    assert "converting" not in second.stderr
    texts = [json.loads(line)["text"] for line in first.stdout.splitlines()]
    assert len(texts) == 4 and texts == [json.loads(line)["text"] for line in second.stdout.splitlines()]


def test_a_gguf_of_no_weights_or_no_gguf_at_all_is_refused_in_one_line(cache_dir, tmp_path):
    fresh = tmp_path / "vocab-only.gguf"
    fresh.write_bytes(VOCABULARY.read_bytes()) if VOCABULARY.is_file() else pytest.skip("no vocabulary")
    result = run_cli(["generate", "customer", "--model", str(fresh), "--max-new-tokens", "4"], cache_dir)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "'vocab-only.gguf' holds no weights" in errors[0] and "render --ids" in errors[0]
    assert "converting" not in result.stderr, "refused before the conversion is announced"
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a GGUF file at all" * 50)
    result = run_cli(["generate", "customer", "--model", str(garbage), "--max-new-tokens", "4"], cache_dir)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert result.returncode == 1 and len(errors) == 1 and "cannot read 'garbage.gguf' as a GGUF file" in errors[0]
