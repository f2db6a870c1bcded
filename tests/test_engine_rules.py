"""The logits rules inside the engine (engine/slot_rules.py): greedy with a penalty equals
transformers' generate with its processor, a row's text does not depend on the rows beside it,
a ban holds over hundreds of samples, and the captured CUDA step equals the eager one (GPU)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from test_engine import grid_rows, run_engine

from personas.engine.engine import Engine, EngineConfig
from personas.sampling.grid import Rules, Settings

ALL_RULES = Rules(min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.4, presence_penalty=0.3,
                  logit_bias=((5, 2.0), (9, -100.0)), dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2,
                  dry_sequence_breakers=("\n",))


def texts(samples):
    return {key: sample.token_ids for key, sample in samples.items()}


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_with_a_repetition_penalty_equals_transformers_generate(tiny, penalty):
    rows = grid_rows(tiny, temperatures=(0.0,), n=1)
    got, _ = run_engine(tiny, rows, Settings(max_new_tokens=30, rules=Rules(repetition_penalty=penalty)))
    for row in rows:
        ids = torch.tensor([row.prompt_ids])
        out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                                  repetition_penalty=penalty, eos_token_id=tiny.eos_ids,
                                  pad_token_id=tiny.pad_id)[0, ids.shape[1]:].tolist()
        expected = out[:next((i for i, t in enumerate(out) if t in tiny.eos_ids), len(out))]
        assert list(got[(row.persona, row.id, 0.0, 1)].token_ids) == expected


def test_rules_change_the_texts_of_their_rows_only(tiny):
    """Rows with every rule beside rows with none: the free rows' texts are those of a run without
    the ruled rows, and a ruled row's text is the same alone and among 40."""
    free = grid_rows(tiny, personas=("pirate",), n=5)
    ruled = [dataclasses.replace(r, persona="grocer", rules=ALL_RULES) for r in grid_rows(tiny, personas=("grocer",), n=5)]
    settings = Settings(max_new_tokens=20)
    together, _ = run_engine(tiny, free + ruled, settings)
    alone_free, _ = run_engine(tiny, free, settings)
    assert {k: v for k, v in texts(together).items() if k[0] == "pirate"} == texts(alone_free)
    one = ruled[3]
    alone, _ = run_engine(tiny, [one], settings)
    key = (one.persona, one.id, one.temperature, one.sample)
    assert together[key].token_ids == alone[key].token_ids
    # The rules did something: the same rows without them sample other texts.
    plain = [dataclasses.replace(r, rules=None) for r in ruled]
    without, _ = run_engine(tiny, plain, settings)
    assert sum(without[k].token_ids != together[k].token_ids for k in without) > len(plain) // 2


def test_the_grids_rules_apply_to_rows_without_their_own(tiny):
    rows = grid_rows(tiny, personas=("pirate",), n=4)
    via_settings, _ = run_engine(tiny, rows, Settings(max_new_tokens=16, rules=ALL_RULES))
    via_rows, _ = run_engine(tiny, [dataclasses.replace(r, rules=ALL_RULES) for r in rows], Settings(max_new_tokens=16))
    assert texts(via_settings) == texts(via_rows)


def test_a_banned_token_never_appears_in_200_samples(tiny):
    rows = grid_rows(tiny, personas=("pirate",), temperatures=(1.0,), n=50)
    settings = Settings(max_new_tokens=12)
    free, _ = run_engine(tiny, rows, settings)
    favourite, count = Counter(t for s in free.values() for t in s.token_ids).most_common(1)[0]
    assert count > 50, "the token to ban is common without the ban"
    banned, _ = run_engine(tiny, rows, dataclasses.replace(settings, rules=Rules(logit_bias=((favourite, -100.0),))))
    assert len(banned) == 200 and all(favourite not in s.token_ids for s in banned.values())


def test_rows_without_rules_make_no_rule_tensors(tiny):
    _, engine = run_engine(tiny, grid_rows(tiny, n=2), Settings(max_new_tokens=8))
    assert engine.runner.rules is None
    _, engine = run_engine(tiny, grid_rows(tiny, n=2), Settings(max_new_tokens=8, rules=Rules(min_p=0.1)))
    assert engine.runner.rules is not None


@pytest.mark.gpu
def test_the_captured_step_with_rules_equals_the_eager_step(tiny_cuda):
    rows = grid_rows(tiny_cuda, n=3)
    ruled = [dataclasses.replace(r, rules=ALL_RULES) if i % 2 else r for i, r in enumerate(rows)]
    settings = Settings(max_new_tokens=32)
    got = {}
    for graphs in (False, True):
        engine = Engine(tiny_cuda, EngineConfig(max_slots=8, graphs=graphs))
        samples = {}
        engine.submit(ruled, settings, lambda s: samples.__setitem__((s.row.persona, s.row.id, s.row.temperature,
                                                                      s.row.sample), s.token_ids))
        with torch.inference_mode():
            engine.run()
        got[graphs] = samples
        if graphs:
            assert any(key.rules for key in engine.runner.graphs), "a step with the rules was captured"
    assert got[True] == got[False]
