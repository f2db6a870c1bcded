"""The batched grid on a tiny real Llama: shape, per-row determinism, greedy rows, temperature."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from personas.model.choice import resolve_model
from personas.model.load import load_model
from personas.generate.request import Request, plan, sample_records
from personas.library.schema import Example, Persona
from personas.sampling.chooser import _mul32, counter_uniform
from personas.sampling.eager import RowSampler
from personas.sampling.grid import Row, Settings, TokenizedCell, build_grid, derive_seed
from personas.sampling.scheduler import generate_grid

PERSONAS = [
    Persona(name="a", system="You are a pirate.", prompt="Hello there",
            examples=[Example(user="How are you?", assistant="I am fine.")]),
    Persona(name="b", prompt="Tell me about the quick brown fox and the lazy dog"),
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(resolve_model(str(tiny_llama_dir)), device="cpu")


def collect(model, rows, settings):
    out = {}
    generate_grid(model.model, rows, settings, eos_ids=model.eos_ids, pad_id=model.pad_id,
                  on_sample=lambda s: out.__setitem__((s.row.persona, s.row.prompt, s.row.temperature, s.row.sample), s))
    return out


def test_grid_has_a_row_per_persona_prompt_temperature_sample(tiny):
    request = Request(personas=PERSONAS, prompts=["one", "two", "three"], temperatures=[0, 0.5, 1.5],
                      n=4, seed=1, settings=Settings(max_new_tokens=4))
    rows = plan(request, tiny)
    assert len(rows) == 2 * 3 * 3 * 4
    records = []
    sample_records(request.settings, tiny, rows, records.append)
    assert len(records) == len(rows)
    assert {(r.persona, r.prompt, r.temperature, r.sample) for r in records} == {
        (r.persona, r.prompt, r.temperature, r.sample) for r in rows}
    assert all(r.finish_reason in ("stop", "length") and r.model == tiny.label for r in records)


def test_a_rows_text_does_not_depend_on_its_batch(tiny):
    settings = Settings(max_new_tokens=12)
    request = Request(personas=PERSONAS, temperatures=[0.0, 0.8, 1.5], n=3, seed=5, settings=settings)
    rows = plan(request, tiny)
    together = collect(tiny, rows, settings)
    one_by_one = collect(tiny, rows, Settings(max_new_tokens=12, max_batch=1))
    reversed_mix = collect(tiny, list(reversed(rows))[:7], Settings(max_new_tokens=12, max_batch=3))
    assert {k: s.token_ids for k, s in together.items()} == {k: s.token_ids for k, s in one_by_one.items()}
    for key, sample in reversed_mix.items():
        assert sample.token_ids == together[key].token_ids
    # ... and a different seed really gives different samples.
    other = collect(tiny, plan(Request(personas=PERSONAS, temperatures=[1.5], n=3, seed=6, settings=settings), tiny),
                    settings)
    assert [s.token_ids for s in other.values()] != [together[k].token_ids for k in other]


def test_greedy_rows_are_identical_and_match_plain_greedy_generate(tiny):
    settings = Settings(max_new_tokens=10)
    request = Request(personas=PERSONAS[:1], temperatures=[0.0, 1.0], n=3, seed=3, settings=settings)
    rows = plan(request, tiny)
    samples = collect(tiny, rows, settings)
    greedy = {s.token_ids for k, s in samples.items() if k[2] == 0.0}
    assert len(greedy) == 1
    ids = torch.tensor([rows[0].prompt_ids])
    plain = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=10, eos_token_id=tiny.eos_ids, pad_token_id=tiny.pad_id)
    expected = [t for t in plain[0, ids.shape[1]:].tolist() if t not in tiny.eos_ids]
    assert list(greedy.pop()) == expected


def test_seed_is_shared_across_temperatures_and_distinct_across_samples():
    rows = build_grid([TokenizedCell("a", "p", (1, 2))], [0.2, 1.0], 3, seed=9)
    seeds = {(r.temperature, r.sample): r.seed for r in rows}
    assert seeds[(0.2, 1)] == seeds[(1.0, 1)]
    assert len({seeds[(0.2, k)] for k in (1, 2, 3)}) == 3
    assert derive_seed(9, "a", "p", 1) == seeds[(0.2, 1)] < 2**63


# --- the sampler itself, on fixed logits ----------------------------------------------------------


def draw(logits: torch.Tensor, temperature: float, rows: int, settings=Settings(), step0: int = 0):
    """Sample `rows` independent tokens (one per seed) from the same logits at one temperature."""
    batch = logits.expand(rows, -1).clone()
    chosen = []
    sampler = RowSampler(torch.full((rows,), temperature), torch.arange(rows, dtype=torch.long) * 7919 + 11,
                         prompt_length=0, settings=settings, eos_ids=[10**6],
                         on_finish=lambda *_: None, on_step=lambda _: None)
    out = sampler(torch.zeros((rows, step0), dtype=torch.long), batch)
    assert torch.isfinite(out).sum(dim=-1).eq(1).all(), "exactly one token left finite per row"
    chosen = out.argmax(dim=-1)
    return Counter(chosen.tolist())


def entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_higher_temperature_flattens_the_distribution():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    entropies = [entropy(draw(logits, t, 4000)) for t in (0.25, 1.0, 4.0)]
    assert entropies[0] < entropies[1] < entropies[2]
    assert draw(logits, 0.0, 50) == Counter({0: 50}), "temperature 0 is greedy"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_samples_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 20000
    counts = draw(logits, temperature, n)
    expected = torch.softmax(logits[0] / temperature, dim=-1).tolist()
    chi2 = sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(expected))
    assert chi2 < 20.5, (counts, expected)  # 4 degrees of freedom: p < 0.0005 to fail by chance


def test_top_k_and_top_p_restrict_the_choices():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, -2.0]])
    assert set(draw(logits, 5.0, 2000, Settings(top_k=2))) == {0, 1}
    p = torch.softmax(logits[0], -1)
    assert p[0] + p[1] < 0.8 < p[0] + p[1] + p[2]
    assert set(draw(logits, 1.0, 2000, Settings(top_p=0.8))) == {0, 1, 2}


# --- the counter-based uniforms -------------------------------------------------------------------


def test_mul32_matches_python_integers():
    rng = random.Random(0)
    xs = [rng.randrange(2**32) for _ in range(2000)] + [0, 1, 2**32 - 1]
    for m in (0x21F0AAAD, 0x735A2D97, 2**32 - 1, 1):
        got = _mul32(torch.tensor(xs, dtype=torch.long), m).tolist()
        assert got == [(x * m) % 2**32 for x in xs]


def test_counter_uniform_is_uniform_and_a_pure_function():
    seeds = torch.arange(50000, dtype=torch.long) * 104729 + 2**40
    u = counter_uniform(seeds, step=3)
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    histogram = torch.histc(u.float(), bins=20, min=0, max=1)
    assert (histogram - 2500).abs().max() < 250
    perm = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(0))
    assert torch.equal(counter_uniform(seeds[perm], 3), u[perm]), "same (seed, step), same number"
    assert torch.equal(counter_uniform(seeds[17:18], 3), u[17:18]), "independent of the batch"
    assert not torch.equal(counter_uniform(seeds, 4), u), "the step changes the number"
    nearby = counter_uniform(torch.tensor([5, 6], dtype=torch.long), 0)
    assert abs(nearby[0] - nearby[1]) > 1e-3, "adjacent seeds are not correlated"


def test_sharing_plan_picks_the_strategy_that_encodes_fewer_tokens():
    from personas.sampling.prefill import Sharing, common_prefix, padded, plan_sharing

    def rows_of(*prompts):
        return [Row("p", "x", 1.0, k, k, tuple(p)) for k, p in enumerate(prompts)]

    same = rows_of([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4])
    assert plan_sharing(same, [0, 1, 2]) == Sharing("distinct")
    alike = rows_of([1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 7, 8])
    assert common_prefix([r.prompt_ids for r in alike]) == 3
    assert plan_sharing(alike, [0, 1, 2]) == Sharing("prefix", 3)
    assert plan_sharing(rows_of([1, 2], [3, 4]), [0, 1]) == Sharing("none")
    assert common_prefix([(5, 6), (5, 6)]) == 1  # each row keeps its last token to feed generate
    ids, mask = padded(alike, [0, 1, 2], pad_id=0, prefix=3)
    assert ids.tolist() == [[1, 2, 3, 0, 4, 5], [1, 2, 3, 0, 0, 9], [1, 2, 3, 4, 7, 8]]
    assert mask.tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]]


def test_rows_sharing_a_persona_prefix_give_the_same_text_as_alone(tiny):
    # One persona, many different prompts, one sample each: only the system context and the
    # examples are shared, so the chunk takes the common-prefix strategy.
    from personas.sampling.prefill import plan_sharing

    settings = Settings(max_new_tokens=10)
    request = Request(personas=PERSONAS[:1], prompts=["one", "two fox", "three lazy dogs", "Hello there"],
                      temperatures=[1.0], n=1, seed=8, settings=settings)
    rows = plan(request, tiny)
    assert plan_sharing(rows, list(range(len(rows)))).kind == "prefix"
    together = collect(tiny, rows, settings)
    alone = collect(tiny, rows, Settings(max_new_tokens=10, max_batch=1))
    assert {k: s.token_ids for k, s in together.items()} == {k: s.token_ids for k, s in alone.items()}
