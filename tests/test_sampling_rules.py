"""The per-row logits rules (sampling/rules.py) against their references on the same logits:
transformers' MinPLogitsWarper and RepetitionPenaltyLogitsProcessor, OpenAI's documented
frequency/presence formula, DRY as llama.cpp defines it (checked against a brute-force search),
logit_bias with -100 as a ban, and the order they compose in."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from personas.errors import InputError
from personas.sampling.chooser import choose, token_salts
from personas.sampling.grid import Rules, check_rules, rules_from, token_key
from personas.sampling.rules import (apply_bias_and_penalties, bias_entries, dry_entries, dry_penalties,
                                     min_p_mask)

VOCABULARY = 300


def neutral(rows: int, logits: torch.Tensor, **given) -> torch.Tensor:
    """apply_bias_and_penalties with every rule off but those `given`."""
    args = dict(bias_ids=torch.zeros((rows, 1), dtype=torch.long), bias_values=torch.zeros((rows, 1)),
                counts=torch.zeros((rows, VOCABULARY)), prompt_seen=torch.zeros((rows, VOCABULARY), dtype=torch.bool),
                repetition=torch.ones(rows), frequency=torch.zeros(rows), presence=torch.zeros(rows),
                dry_ids=torch.zeros((rows, 1), dtype=torch.long), dry_values=torch.zeros((rows, 1)))
    args.update(given)
    return apply_bias_and_penalties(logits, **args)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.9])
def test_min_p_drops_what_transformers_warper_drops(min_p):
    torch.manual_seed(0)
    scores = torch.randn(6, VOCABULARY) * 3
    ours = min_p_mask(scores, torch.full((6,), min_p))
    if min_p == 0:
        assert torch.equal(ours, scores)
        return
    theirs = MinPLogitsWarper(min_p)(None, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], scores[~torch.isinf(ours)])


def test_min_p_per_row_and_the_top_token_always_stays():
    scores = torch.tensor([[5.0, 4.9, 0.0], [5.0, 4.9, 0.0]])
    out = min_p_mask(scores, torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], scores[0])
    assert out[1, 0] == 5.0 and torch.isinf(out[1, 1:]).all()


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_transformers_processor(penalty):
    torch.manual_seed(1)
    logits = torch.randn(3, VOCABULARY) * 4
    prompt = torch.randint(0, VOCABULARY, (3, 12))
    generated = torch.randint(0, VOCABULARY, (3, 5))
    seen = torch.zeros((3, VOCABULARY), dtype=torch.bool).scatter_(1, prompt, True)
    counts = torch.zeros((3, VOCABULARY)).scatter_add_(1, generated, torch.ones(3, 5))
    ours = neutral(3, logits, prompt_seen=seen, counts=counts, repetition=torch.full((3,), penalty))
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.cat([prompt, generated], 1), logits.clone())
    assert torch.equal(ours, theirs)


def test_frequency_and_presence_follow_openais_formula():
    torch.manual_seed(2)
    logits = torch.randn(2, VOCABULARY)
    generated = [[3, 3, 3, 7, 9], [9, 9]]
    counts = torch.zeros((2, VOCABULARY))
    for row, tokens in enumerate(generated):
        for t in tokens:
            counts[row, t] += 1
    frequency, presence = torch.tensor([0.5, -1.0]), torch.tensor([1.5, 2.0])
    ours = neutral(2, logits, counts=counts, frequency=frequency, presence=presence)
    # mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    expected = logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]
    assert torch.equal(ours, expected)
    assert ours[0, 3] == pytest.approx(float(logits[0, 3]) - 3 * 0.5 - 1.5)
    assert ours[0, 4] == logits[0, 4]  # never generated: untouched (the prompt does not count)


def test_logit_bias_adds_and_minus_100_bans():
    logits = torch.zeros((1, VOCABULARY))
    ids, values = bias_entries(((5, 2.5), (7, -100.0), (9, -99.0)), 4)
    out = neutral(1, logits, bias_ids=torch.tensor([ids]), bias_values=torch.tensor([values]))
    assert out[0, 5] == 2.5 and out[0, 9] == -99.0 and out[0, 7] == float("-inf")
    assert out[0, 0] == 0.0  # the padding entry (token 0, bias 0) changes nothing


def test_the_rules_compose_in_the_documented_order():
    """bias, then repetition, then frequency/presence, then DRY: (2 + 2) / 2 − 1 × 0.5 − 1 − 0.25."""
    logits = torch.zeros((1, VOCABULARY))
    logits[0, 4] = 2.0
    ids, values = bias_entries(((4, 2.0),), 1)
    dry_ids, dry_values = dry_entries({4: 0.25}, 1)
    counts = torch.zeros((1, VOCABULARY))
    counts[0, 4] = 1
    out = neutral(1, logits, bias_ids=torch.tensor([ids]), bias_values=torch.tensor([values]), counts=counts,
                  repetition=torch.tensor([2.0]), frequency=torch.tensor([0.5]), presence=torch.tensor([1.0]),
                  dry_ids=torch.tensor([dry_ids]), dry_values=torch.tensor([dry_values]))
    assert out[0, 4] == pytest.approx(2.0 - 0.5 - 1.0 - 0.25)


def brute_force_dry(context, multiplier, base, allowed, breakers):
    """DRY by its definition: for each token t, the longest n such that the n tokens before t's
    would-be place, followed by t, already occur earlier in the context; a match never holds a
    breaker, and t may not be one."""
    out = {}
    for t in set(context):
        if t in breakers:
            continue
        seq = list(context) + [t]
        best = 0
        for end in range(len(context) - 1):  # an earlier t at `end + 1`, the match ending at `end`
            if context[end + 1] != t:
                continue
            n = 0
            while n <= end and seq[end - n] == seq[len(seq) - 2 - n] and seq[len(seq) - 2 - n] not in breakers:
                n += 1
            best = max(best, n)
        if best >= allowed:
            out[t] = multiplier * base ** (best - allowed)
    return out


def test_dry_on_a_hand_built_sequence():
    # "a b c d a b c": emitting d again would repeat "a b c d" — a match of 3 (a b c).
    a, b, c, d = 10, 11, 12, 13
    assert dry_penalties([a, b, c, d, a, b, c], 0.8, 1.75, 2, set()) == {d: pytest.approx(0.8 * 1.75)}
    # A breaker (here b) cuts the match: only "c" before d matches, below the allowed length 2.
    assert dry_penalties([a, b, c, d, a, b, c], 0.8, 1.75, 2, {b}) == {}
    assert dry_penalties([a, b, c, d, a, b, c], 0.8, 1.75, 1, {b}) == {d: pytest.approx(0.8)}
    # The last token a breaker: nothing to extend.
    assert dry_penalties([a, b, c, d, a, b, c], 0.8, 1.75, 2, {c}) == {}
    assert dry_penalties([a, b, c, d, a, b, c], 0.0, 1.75, 2, set()) == {}


@pytest.mark.parametrize("seed", range(20))
def test_dry_equals_a_brute_force_search(seed):
    rng = random.Random(seed)
    context = [rng.randrange(6) for _ in range(rng.randrange(2, 40))]
    breakers = {5} if seed % 2 else set()
    expected = brute_force_dry(context, 1.0, 1.5, 2, breakers)
    got = dry_penalties(context, 1.0, 1.5, 2, breakers)
    assert got.keys() == expected.keys() and all(got[t] == pytest.approx(expected[t]) for t in got)


def test_min_p_in_the_chooser_never_draws_a_dropped_token():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0] + [-5.0] * (VOCABULARY - 4)] * 64)
    salts = token_salts(VOCABULARY, torch.device("cpu"))
    drawn = set()
    for step in range(40):
        chosen = choose(logits.clone(), torch.ones(64), torch.arange(64), step, salts, min_p=torch.full((64,), 0.3))
        drawn |= set(chosen.tolist())
    assert drawn == {0, 1}  # softmax: 0.72, 0.27, …; 0.3 × 0.72 keeps the first two only


def test_rules_layer_field_by_field_and_their_ranges_are_checked():
    line, flags, persona = Rules(min_p=0.1), Rules(min_p=0.5, presence_penalty=1.0), Rules(frequency_penalty=0.2)
    merged = line.over(flags).over(persona)
    assert (merged.min_p, merged.presence_penalty, merged.frequency_penalty) == (0.1, 1.0, 0.2)
    assert not Rules().used and not Rules(repetition_penalty=1.0).used and Rules(logit_bias=((1, 2.0),)).used
    for bad in (Rules(min_p=1.5), Rules(repetition_penalty=0), Rules(frequency_penalty=2.5),
                Rules(presence_penalty=float("nan")), Rules(logit_bias=((3, 101.0),)), Rules(dry_base=1.0),
                Rules(dry_allowed_length=0), Rules(dry_multiplier=-1), Rules(logit_bias=tuple((i, 1.0) for i in range(301)))):
        with pytest.raises(InputError):
            check_rules(bad)
    assert token_key("123") == 123 and token_key("Aye") == "Aye" and token_key(" 12") == 12

    class Table:
        logit_bias = {"7": -100, " the": 3}
        dry_sequence_breakers = ["\n"]

    assert rules_from(Table()) == Rules(logit_bias=((7, -100.0), (" the", 3.0)), dry_sequence_breakers=("\n",))
