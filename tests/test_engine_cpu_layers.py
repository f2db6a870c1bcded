"""A CPU decode step's layers as one C call (engine/kernels/cpu_layers.py, cpu_layers.c).

Tiny random models of each family the decoder runs — Llama 3's rotary scaling, Qwen 2's q/k/v
bias and tied head, Qwen 3's per-head norms, Mistral — with every linear layer quantized as a
GGUF file's Q4_1 / Q4_0 / Q8_0 blocks: the C layers run their decode steps and prompts, and
give the tokens and log-probabilities the decoder's modules give on the same block layers,
greedy text equal to `generate`'s up to near-ties, rows alone or sharing a prefix, rows refilled into slots
mid-run; a row's numbers do not depend on how its prompt was split; where a projection is not
blocks the modules run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_greedy_text, block_kernel_runs, greedy_with_margins
from test_block_weights import quantize_linear_layers
from test_engine_families import rows, tiny_family

from personas.engine.engine import Engine, EngineConfig
from personas.engine.kernels import cpu_layers
from personas.model.block_weights import save_blocks
from personas.model.choice import resolve_model
from personas.model.load import load_model
from personas.sampling.grid import Settings

pytestmark = pytest.mark.skipif(not block_kernel_runs(), reason="the block kernel needs AVX-512 VNNI and a C compiler")


@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3", "mistral"])
def block_family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp(f"blocks-{request.param}")
    tiny_family(request.param, directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    quantize_linear_layers(model, {"down_proj": "Q4_0", "lm_head": "Q8_0", "": "Q4_1"})
    model.save_pretrained(directory)
    save_blocks(model, directory)
    return request.param, load_model(resolve_model(str(directory)), device="cpu"), directory


def run(loaded, batch, tokens: int = 40, **config):
    """Each row's (tokens, log-probabilities of the chosen ones) and the engine."""
    engine = Engine(loaded, EngineConfig(**config))
    heard: dict[int, list[float]] = {}
    got = {}
    engine.submit(batch, Settings(max_new_tokens=tokens), lambda s: got.__setitem__(s.row.id, s.token_ids),
                  logprobs=True, on_token=lambda row, token, lp: heard.setdefault(row.id, []).append(lp.logprob))
    with torch.inference_mode():
        engine.run()
    return {i: (got[i], heard[i]) for i in got}, engine


def test_every_familys_block_model_decodes_through_the_c_layers(block_family):
    name, loaded, _ = block_family
    assert loaded.block_weights, name
    _, engine = run(loaded, rows(loaded, 0.0)[:1], tokens=2)
    assert engine.runner.cpu_layers is not None and engine.pool.cpu_layers is engine.runner.cpu_layers, name
    _, modules = run(loaded, rows(loaded, 0.0)[:1], tokens=2, layer_kernels=False)
    assert modules.runner.cpu_layers is None and modules.pool.cpu_layers is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_c_layers_give_the_modules_tokens_and_logprobs(block_family, temperature):
    name, loaded, _ = block_family
    batch = rows(loaded, temperature)
    c_layers, _ = run(loaded, batch)
    modules, _ = run(loaded, batch, layer_kernels=False)
    for row in batch:
        (tokens, logprobs), (c_tokens, c_logprobs) = modules[row.id], c_layers[row.id]
        if temperature == 0:
            # The C layers sum in another order than the modules: greedy texts may part at a
            # near-tie of generate's logits (conftest.NEAR_TIE), and are compared up to there.
            expected, logits = greedy_with_margins(loaded.model, row.prompt_ids, 40, loaded.eos_ids, loaded.pad_id)
            assert_same_greedy_text(tokens, expected, logits, loaded.eos_ids, (name, row.id, "modules"))
            assert_same_greedy_text(c_tokens, expected, logits, loaded.eos_ids, (name, row.id, "C layers"))
        else:
            assert c_tokens == tokens, (name, row.id)
        same = next((i for i, (a, b) in enumerate(zip(tokens, c_tokens)) if a != b), len(tokens))
        assert c_logprobs[:same] == pytest.approx(logprobs[:same], abs=2e-3), (name, row.id)
    # Two slots for eight rows: rows refilled mid-run, into pages others left, and a row's numbers
    # do not depend on which rows share its steps: the same as all in one go, to the bit.
    refilled, _ = run(loaded, batch, max_slots=2)
    assert refilled == c_layers, name


def test_greedy_text_through_the_c_layers_equals_generate_alone_and_sharing_a_prefix(block_family):
    name, loaded, _ = block_family
    greedy = rows(loaded, 0.0)
    together, _ = run(loaded, greedy)
    for row in greedy[:3]:
        alone, _ = run(loaded, [row])
        expected, logits = greedy_with_margins(loaded.model, row.prompt_ids, 40, loaded.eos_ids, loaded.pad_id)
        assert_same_greedy_text(together[row.id][0], expected, logits, loaded.eos_ids, (name, row.id, "together"))
        assert_same_greedy_text(alone[row.id][0], expected, logits, loaded.eos_ids, (name, row.id, "alone"))


def test_a_rows_numbers_are_the_same_however_its_prompt_is_split(block_family):
    # Alone, a row's prompt is a prefix of all but its last token, and that token goes through
    # its first decode step; together, the rows share their system text's start as a prefix and
    # encode the rest in one pass of many rows. The C layers compute each position the same way
    # in all three, so the samples and log-probabilities are equal to the last bit.
    name, loaded, _ = block_family
    for temperature in (0.0, 1.0):
        batch = rows(loaded, temperature)
        together, _ = run(loaded, batch)
        jobs = Engine(loaded, EngineConfig()).submit(batch, Settings(), lambda s: None)
        assert not any(job.starts_in_decode for job in jobs), name  # each rest goes through a pass of its own
        for row in batch[:3]:
            alone, _ = run(loaded, [row])
            assert alone[row.id] == together[row.id], (name, temperature, row.id)


def test_a_prompt_in_chunks_of_a_few_positions_gives_the_same_numbers(block_family, monkeypatch):
    # A long prompt goes through the C layers PROMPT_CHUNK positions a call, each call attending
    # to the keys the earlier ones wrote: chunks of 5 cut every prompt here many times over.
    name, loaded, _ = block_family
    batch = rows(loaded, 1.0)[:3]
    whole, _ = run(loaded, batch)
    monkeypatch.setattr(cpu_layers, "PROMPT_CHUNK", 5)
    assert run(loaded, batch)[0] == whole, name
    assert run(loaded, batch[:1])[0] == {batch[0].id: whole[batch[0].id]}, name


def test_a_model_whose_projections_are_not_all_blocks_decodes_through_the_modules(block_family):
    name, _, directory = block_family
    half = load_model(resolve_model(str(directory)), device="cpu", cpu_weights="float16")
    _, engine = run(half, rows(half, 0.0)[:1], tokens=2)
    assert engine.runner.cpu_layers is None, name
