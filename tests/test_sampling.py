"""The batched grid on a tiny real Llama: shape, per-row determinism, greedy rows, temperature."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from personas.generate.request import Request, plan, sample_records
from personas.library.schema import Example, Persona
from personas.sampling import noise_cpu
from personas.sampling.chooser import (TokenChooser, counter_uniform, gumbel_noise, mix32, noisy_argmax, row_keys,
                                       token_salts, uniform_from_keys)
from personas.engine.chunked.eager import RowSampler
from personas.sampling.grid import Row, Settings, TokenizedCell, build_grid, derive_seed
from personas.engine.loop import generate_grid

PERSONAS = [
    Persona(name="a", system="You are a pirate.", prompt="Hello there",
            examples=[Example(user="How are you?", assistant="I am fine.")]),
    Persona(name="b", prompt="Tell me about the quick brown fox and the lazy dog"),
]


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


# --- the counter-based noise ------------------------------------------------------------------------


def lowbias32(x: int) -> int:
    """The reference mixer in Python integers."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    return x ^ (x >> 15)


def test_mix32_matches_python_integers():
    rng = random.Random(0)
    xs = [rng.randrange(2**32) for _ in range(5000)] + [0, 1, 2**31, 2**32 - 1]
    assert mix32(torch.tensor(xs, dtype=torch.long)).tolist() == [lowbias32(x) for x in xs]


def test_counter_uniform_is_uniform_and_a_pure_function_of_seed_step_and_token():
    salts = token_salts(1000, torch.device("cpu"))
    seeds = torch.arange(200, dtype=torch.long) * 104729 + 2**40
    u = counter_uniform(seeds, 3, salts)
    assert u.shape == (200, 1000) and u.dtype == torch.float64 and (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.003 and abs(u.var().item() - 1 / 12) < 0.001
    histogram = torch.histc(u.float(), bins=20, min=0, max=1)
    assert (histogram - 10000).abs().max() < 500
    perm = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(0))
    assert torch.equal(counter_uniform(seeds[perm], 3, salts), u[perm]), "same (seed, step, token), same number"
    assert torch.equal(counter_uniform(seeds[17:18], 3, salts), u[17:18]), "independent of the batch"
    assert torch.equal(counter_uniform(seeds, torch.tensor([3]), salts), u), "a device-tensor step is the same step"
    bigger = counter_uniform(seeds, 3, token_salts(1500, torch.device("cpu")))
    assert torch.equal(bigger[:, :1000], u), "keyed by token id: a token's number ignores the vocabulary's size"
    later = counter_uniform(seeds, 4, salts)
    assert abs(torch.corrcoef(torch.stack([u.flatten(), later.flatten()]))[0, 1].item()) < 0.01, "steps unrelated"
    columns = torch.corrcoef(u[:, :50].T)  # token t's numbers over rows vs token t' 's
    assert (columns - torch.eye(50)).abs().max() < 0.35, "tokens unrelated"
    neighbours = counter_uniform(torch.tensor([5, 6], dtype=torch.long), 0, salts)
    assert abs(torch.corrcoef(neighbours)[0, 1].item()) < 0.15, "adjacent seeds are not correlated"


def test_the_cpu_uniforms_come_from_one_pass_of_c_equal_to_the_torch_formula_bit_for_bit():
    """On the CPU one pass of C (sampling/noise_cpu.c) makes counter_uniform's numbers: the torch
    formula's, bit for bit, for any seeds, steps and tokens (a block of the vocabulary at an
    offset too), so the choice — here against a reference made of torch operations alone — is
    the same token with it as without it."""
    assert noise_cpu.available(), "the C compiler here builds the noise loop"
    generator = torch.Generator().manual_seed(3)
    seeds = torch.cat([torch.randint(0, 2**62, (35,), generator=generator), torch.tensor([0, 2**63 - 1])])
    whole = token_salts(50_000, torch.device("cpu"))
    for step in (0, 1, 2**31 + 5, 2**40 + 7):
        first, second = row_keys(seeds, step)
        for salts in (token_salts(1003, torch.device("cpu")), whole[12_345:20_000]):
            made = noise_cpu.counter_uniform(first, second, salts)
            assert made is not None and torch.equal(made, uniform_from_keys(first, second, salts)), step
            assert torch.equal(counter_uniform(seeds, step, salts), made)
    for rows in (1, 5, 37):  # one block of the vocabulary, and several
        tempered = torch.randn(rows, 50_000, generator=generator) * 2
        keys = row_keys(seeds[:rows], 9)
        reference = uniform_from_keys(*keys, whole).log_().neg_().log_().neg_().add_(tempered).argmax(dim=-1)
        assert torch.equal(noisy_argmax(tempered, seeds[:rows], 9, whole), reference), rows


def test_noise_reaches_past_the_cap_of_a_float32_exponential():
    """A float32 exponential never goes below 2**-24, so its Gumbel noise stops at -log(2**-24)
    ≈ 16.64 and tokens that need more are never drawn. Ours reaches ~36.7. Noise above 17 has
    probability ~4e-8 per draw; these 5e7 draws (fixed seeds: the same numbers every run) hold
    some, at the rates a Gumbel variable has them."""
    salts = token_salts(4096, torch.device("cpu"))
    draws = [gumbel_noise(torch.arange(k * 1024, (k + 1) * 1024, dtype=torch.long), 0, salts) for k in range(12)]
    above = {t: sum(int((g > t).sum()) for g in draws) for t in (12, 17)}
    expected = {t: 12 * 1024 * 4096 * -math.expm1(-math.exp(-t)) for t in (12, 17)}  # P(g > t) = 1 - e^(-e^-t)
    assert above[17] > 0, "noise beyond a float32 exponential's cap"
    assert abs(above[12] - expected[12]) < 6 * math.sqrt(expected[12])
    assert torch.isfinite(gumbel_noise(torch.arange(64, dtype=torch.long), 1, salts)).all()


def choose_many(logits: torch.Tensor, temperature: float, draws: int, settings=Settings(), chunk: int = 4000,
                first_seed: int = 11) -> torch.Tensor:
    """`draws` first tokens from the same logits, one per seed, through the real chooser."""
    chosen = []
    for start in range(0, draws, chunk):
        rows = min(chunk, draws - start)
        seeds = torch.arange(start, start + rows, dtype=torch.long) * 7919 + first_seed
        chooser = TokenChooser(torch.full((rows,), temperature), seeds, settings)
        chosen.append(chooser(None, logits.expand(rows, -1), 0))
    return torch.cat(chosen)


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square over the bins whose expected count is at least 5 (the rest pooled)."""
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2.double() / 2))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_first_tokens_of_a_tiny_model_follow_softmax_over_temperature(tiny, temperature):
    ids = plan(Request(personas=PERSONAS[:1], seed=1, settings=Settings(max_new_tokens=1)), tiny)[0].prompt_ids
    with torch.inference_mode():
        logits = tiny.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    draws = 20000
    observed = torch.bincount(choose_many(logits, temperature, draws), minlength=logits.shape[-1]).double()
    expected = torch.softmax(logits.double() / temperature, dim=-1) * draws
    assert (expected >= 5).sum() >= 4, "enough tokens in play for the test to mean something"
    assert chi_square_p(observed, expected) > 1e-4


def test_tokens_of_tiny_probability_are_drawn_at_their_rate():
    """The far tail, together: 4,000 tokens of probability 2**-17 each (3% of the mass), beside
    96 likely ones. Inverse-CDF or capped noise would draw them too rarely."""
    likely = torch.linspace(4.0, 0.0, 96)
    # Every tail token at 2**-17: their shared logit, solved from the likely ones' total.
    tail_logit = math.log(2**-17 / (1 - 4000 * 2**-17)) + torch.logsumexp(likely.double(), 0).item()
    logits = torch.cat([likely, torch.full((4000,), tail_logit)]).float()
    probs = torch.softmax(logits.double(), -1)
    assert abs(probs[96:].max().item() - 2**-17) < 1e-9 and (probs[96:] < 2**-16).all()
    draws = 100000
    chosen = choose_many(logits, 1.0, draws, chunk=5000)
    p = probs[96:].sum().item()
    drawn = int((chosen >= 96).sum())
    sigma = math.sqrt(draws * p * (1 - p))
    assert abs(drawn - draws * p) < 6 * sigma, (drawn, draws * p, sigma)


def test_a_logit_wobble_of_1e5_rarely_changes_a_draw():
    """What makes samples batch-independent: another batch computes the same logits with
    differences around 1e-5. A draw changes only if the two best noisy scores are that close."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8192, generator=generator) * 3
    wobbled = logits + (torch.rand(8192, generator=generator) - 0.5) * 2e-5
    a, b = choose_many(logits, 1.0, 5000), choose_many(wobbled, 1.0, 5000)
    assert (a != b).sum() <= 1
    assert len(set(a.tolist())) > 500, "the draws are spread over the vocabulary"


def test_sharing_plan_picks_the_strategy_that_encodes_fewer_tokens():
    from personas.engine.chunked.prefill import Sharing, common_prefix, padded, plan_sharing

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
    from personas.engine.chunked.prefill import plan_sharing

    settings = Settings(max_new_tokens=10)
    request = Request(personas=PERSONAS[:1], prompts=["one", "two fox", "three lazy dogs", "Hello there"],
                      temperatures=[1.0], n=1, seed=8, settings=settings)
    rows = plan(request, tiny)
    assert plan_sharing(rows, list(range(len(rows)))).kind == "prefix"
    together = collect(tiny, rows, settings)
    alone = collect(tiny, rows, Settings(max_new_tokens=10, max_batch=1))
    assert {k: s.token_ids for k, s in together.items()} == {k: s.token_ids for k, s in alone.items()}


def test_the_cpu_choice_in_blocks_of_the_vocabulary_equals_one_pass():
    """On the CPU the noise is made a block of the vocabulary at a time, wider for fewer rows: the
    tokens equal one pass over the whole vocabulary's scores, and of two equal best scores in
    different blocks the lower token wins, as argmax's."""
    vocabulary = 50_000
    salts = token_salts(vocabulary, torch.device("cpu"))
    generator = torch.Generator().manual_seed(5)
    for rows in (1, 3, 17, 40):
        tempered = torch.randn(rows, vocabulary, generator=generator) * 0.3
        tempered[:, ::5] = float("-inf")
        seeds = torch.randint(0, 2**62, (rows,), generator=generator)
        want = gumbel_noise(seeds, 9, salts).add_(tempered).argmax(dim=-1)
        assert noisy_argmax(tempered, seeds, 9, salts).tolist() == want.tolist(), rows
    tempered = torch.zeros(40, vocabulary)
    tempered[:, [9_000, 45_000]] = float("inf")
    assert set(noisy_argmax(tempered, torch.arange(40), 0, salts).tolist()) == {9_000}
