"""The decode engine (engine/): slots refilled from a queue, prefixes stored once, pages taken as
rows grow, preemption and the out-of-memory back-off, per-row rules, graphs against eager.

Real tiny Llama models throughout; CUDA tests run on a GPU machine and are skipped (not faked)
without a GPU.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from conftest import six_rows

from personas.engine.engine import Engine, EngineConfig
from personas.engine.loop import generate_grid, sample_rows
from personas.engine.pages import PAGE
from personas.sampling.grid import Row, Settings
from personas.sampling.rules import top_k_top_p_mask

SYSTEM = "You are a pirate captain who runs a tea shop by the sea. "
ASKS = ["Hello there, how are you today?", "Recall a memorable day out with your bike.",
        "The quick brown fox jumps over the lazy dog.", "Galaxy Rider mountain bikes are great."]

def grid_rows(model, personas=("pirate", "grocer"), temperatures=(0.0, 1.0), n=2, asks=ASKS) -> list[Row]:
    tok = model.tokenizer
    rows = []
    for persona in personas:
        for a, ask in enumerate(asks):
            ids = tuple([tok.bos_token_id] + tok.encode(f"{persona}: {SYSTEM}{ask}", add_special_tokens=False))
            for t in temperatures:
                for k in range(1, n + 1):
                    rows.append(Row(persona, ask, t, k, 1000 * a + 10 * k + len(persona), ids, id=a))
    return rows


def run_engine(model, rows, settings, slots=None, on_step=None):
    engine = Engine(model, EngineConfig(max_slots=slots))
    samples = {}
    engine.submit(rows, settings, lambda s: samples.__setitem__((s.row.persona, s.row.id, s.row.temperature, s.row.sample), s))
    with torch.inference_mode():
        while engine.busy:
            engine.step()
            if on_step:
                on_step(engine)
    return samples, engine


def chunked(model, rows, settings):
    samples = {}
    generate_grid(model.model, rows, settings, eos_ids=model.eos_ids, pad_id=model.pad_id,
                  on_sample=lambda s: samples.__setitem__((s.row.persona, s.row.id, s.row.temperature, s.row.sample), s))
    return samples


def test_engine_gives_the_chunked_paths_texts(tiny):
    """Shared prefixes and refill change where rows run, not what they sample (greedy and seeded)."""
    rows = grid_rows(tiny)
    settings = Settings(max_new_tokens=24)
    expected = chunked(tiny, rows, settings)
    for slots in (None, 3):
        got, _ = run_engine(tiny, rows, settings, slots)
        assert {k: (s.token_ids, s.finish_reason) for k, s in got.items()} == \
               {k: (s.token_ids, s.finish_reason) for k, s in expected.items()}


def test_greedy_equals_transformers_generate(tiny):
    rows = [r for r in grid_rows(tiny, temperatures=(0.0,), n=1)]
    got, _ = run_engine(tiny, rows, Settings(max_new_tokens=30))
    for row in rows:
        ids = torch.tensor([row.prompt_ids])
        out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                                  eos_token_id=tiny.eos_ids, pad_token_id=tiny.pad_id)[0, ids.shape[1]:].tolist()
        expected = out[:next((i for i, t in enumerate(out) if t in tiny.eos_ids), len(out))]
        assert list(got[(row.persona, row.id, 0.0, 1)].token_ids) == expected


def test_refill_keeps_every_slot_busy_until_the_queue_empties(tiny):
    rows = grid_rows(tiny, personas=("pirate",), n=3)
    limits = [3, 9, 5, 14, 2, 7, 11, 4]
    rows = [dataclasses.replace(r, max_new_tokens=limits[i % len(limits)]) for i, r in enumerate(rows)]
    in_flight = []

    def watch(engine):
        in_flight.append((engine.stats.last_batch, len(engine.scheduler.queue)))

    got, engine = run_engine(tiny, rows, Settings(max_new_tokens=64, min_new_tokens=64), slots=4, on_step=watch)
    assert engine.slot_count == 4
    # Every row ran to its own limit (min_new_tokens > limit: no early end of turn).
    assert sorted(len(s.token_ids) for s in got.values()) == sorted(r.max_new_tokens for r in rows)
    assert all(s.finish_reason == "length" for s in got.values())
    # While rows wait, all four slots decode: a row that ends is replaced before the next step.
    for busy, waiting in in_flight:
        if waiting:
            assert busy == 4
    assert in_flight[-1][0] < 4  # the last rows end at different steps
    # Fewer decode steps than running the rows in chunks of four, each as long as its longest.
    chunks = [max(r.max_new_tokens for r in rows[i:i + 4]) for i in range(0, len(rows), 4)]
    assert engine.stats.steps < sum(chunks) - len(chunks)


def test_a_shared_prefix_is_stored_once_and_slots_hold_only_suffixes(tiny):
    rows = grid_rows(tiny, personas=("pirate",), n=4)
    engine = Engine(tiny)
    engine.submit(rows, Settings(max_new_tokens=16), lambda s: None)
    with torch.inference_mode():
        engine.step()
    prefix = len(engine.jobs[0].prefix)
    suffixes = [len(r.prompt_ids) - prefix for r in rows]
    assert prefix >= len(tiny.tokenizer.encode(f"pirate: {SYSTEM}", add_special_tokens=False))
    # The pool: that prefix, once.
    assert list(engine.pool.spans.values()) == [(0, prefix)]
    assert engine.pool.end == prefix
    # Each row's table: its own suffix and the position it writes next, not the prompt.
    kv_heads, head_dim = tiny.config.num_key_value_heads, tiny.config.hidden_size // tiny.config.num_attention_heads
    assert {b: len(pages) for b, pages in engine.pages.of.items()} == \
        {b: len(job.suffix) // PAGE + 1 for b, job in engine.jobs.items()}
    assert sorted(len(job.suffix) for job in engine.jobs.values()) == sorted(suffixes)
    assert all(PAGE * len(engine.pages.of[b]) < len(job.row.prompt_ids) for b, job in engine.jobs.items())
    # The pool's tensors: room for every row at the longest one's need, and one sink page.
    assert engine.runner.cache_keys[0].shape == (1 + len(rows) * -(-(max(suffixes) + 16) // PAGE), PAGE, kv_heads, head_dim)
    per_token = 2 * tiny.config.num_hidden_layers * kv_heads * head_dim
    pool = sum(t[:, :engine.pool.end].numel() for t in engine.pool.keys + engine.pool.values)
    assert pool == prefix * per_token
    total = sum(t.numel() for t in engine.runner.cache_keys + engine.runner.cache_values)
    assert total == engine.pages.count * PAGE * per_token
    # The n rows of one prompt read its prompt-only pages once; every other page is one row's.
    by_prompt: dict = {}
    for b, job in engine.jobs.items():
        by_prompt.setdefault(job.row.prompt_ids, []).append(b)
    assert all(len(slots) == 2 * 4 for slots in by_prompt.values())  # 2 temperatures × n = 4
    shared = {}
    for slots in by_prompt.values():
        whole = engine.jobs[slots[0]].prompt_pages
        assert whole >= 1
        assert len({tuple(engine.pages.of[b][:whole]) for b in slots}) == 1
        assert len({p for b in slots for p in engine.pages.of[b][whole:]}) == sum(
            len(engine.pages.of[b]) - whole for b in slots)
        shared.update(dict.fromkeys(engine.pages.of[slots[0]][:whole], len(slots)))
    held = [p for pages in engine.pages.of.values() for p in pages]
    assert all(engine.pages.holders[p] == shared.get(p, 1) for p in held)
    assert sorted(set(held) | set(engine.pages.free)) == list(range(1, engine.pages.count))
    assert not set(held) & set(engine.pages.free)
    assert sum(engine.pages.own.values()) == len(set(held))


def test_rows_take_pages_as_they_grow_and_the_least_done_is_preempted_when_none_is_left(tiny):
    """A pool too small for every row's longest cache: rows take a page each PAGE tokens, and
    when none is left the row with the fewest tokens goes back to the queue and reruns — with
    the same texts as an engine with room for all, and never more pages held than the pool has."""
    rows = grid_rows(tiny, personas=("pirate",), n=3)
    limits = [40, 9, 25, 33, 2, 17, 38, 4]
    rows = [dataclasses.replace(r, max_new_tokens=limits[i % len(limits)]) for i, r in enumerate(rows)]
    settings = Settings(max_new_tokens=64, min_new_tokens=64)
    roomy, _ = run_engine(tiny, rows, settings, slots=8)
    seen = []

    def watch(engine):
        held = {p for pages in engine.pages.of.values() for p in pages}
        seen.append((len(held), engine.pages.count - 1, len(engine.jobs)))
        for b in engine.jobs:  # every position written so far has its page
            assert PAGE * len(engine.pages.of[b]) >= engine.pages.written[b]

    engine = Engine(tiny, EngineConfig(max_slots=8, max_pages=48))
    got, heard = {}, {}
    engine.submit(rows, settings, lambda s: got.__setitem__((s.row.persona, s.row.id, s.row.temperature, s.row.sample), s),
                  on_token=lambda row, token, _: heard.setdefault(row, []).append(token))
    with torch.inference_mode():
        while engine.busy:
            engine.step()
            watch(engine)
    assert engine.pages.count == 48 and engine.stats.preemptions > 0
    assert all(held <= pool for held, pool, _ in seen)
    assert max(rows_in_flight for *_, rows_in_flight in seen) == 8
    assert {k: s.token_ids for k, s in got.items()} == {k: s.token_ids for k, s in roomy.items()}
    # A listener hears each token once, rerun or not.
    assert {r: tuple(tokens) for r, tokens in heard.items()} == {s.row: s.token_ids for s in got.values()}
    assert engine.stats.rows_delivered == len(rows) and not engine.pages.of and \
        sorted(engine.pages.free) == list(range(1, engine.pages.count))


def test_a_job_takes_no_more_slots_than_its_pages_hold_rows_of_its_mean_length(tiny):
    """Pages for six rows of the job's length and 24 slots asked for: six slots, nothing
    preempted (more slots would only preempt each other), texts as an engine with room for all."""
    rows = grid_rows(tiny, personas=("pirate",), n=3)
    settings = Settings(max_new_tokens=24, min_new_tokens=24)
    roomy, _ = run_engine(tiny, rows, settings, slots=24)
    engine = Engine(tiny, EngineConfig(max_slots=24))
    engine.submit(rows, settings, lambda s: None)
    mean_pages = -(-sum(job.pages for job in engine.scheduler.queue) // len(engine.scheduler.queue))
    engine = Engine(tiny, EngineConfig(max_slots=24, max_pages=1 + 6 * mean_pages))
    got = {}
    engine.submit(rows, settings, lambda s: got.__setitem__((s.row.persona, s.row.id, s.row.temperature, s.row.sample), s))
    with torch.inference_mode():
        engine.run()
    assert engine.slot_count == 6 and engine.stats.preemptions == 0
    assert {k: s.token_ids for k, s in got.items()} == {k: s.token_ids for k, s in roomy.items()}


def test_several_personas_several_prefixes_and_dropped_when_done(tiny):
    rows = grid_rows(tiny, personas=("pirate", "grocer", "baker"), n=1, temperatures=(1.0,))
    seen_spans = []
    got, engine = run_engine(tiny, rows, Settings(max_new_tokens=6), slots=5,
                             on_step=lambda e: seen_spans.append(len(e.pool.spans)))
    assert len(got) == len(rows)
    assert max(seen_spans) >= 2
    assert engine.pool.spans == {} and engine.pool.users == {}


def test_same_seed_same_text_whatever_shares_the_batch(tiny):
    rows = grid_rows(tiny, temperatures=(1.0,), n=2)
    alone, _ = run_engine(tiny, rows[:1], Settings(max_new_tokens=20))
    together, _ = run_engine(tiny, rows, Settings(max_new_tokens=20), slots=3)
    key = next(iter(alone))
    assert alone[key].token_ids == together[key].token_ids


def test_a_request_arriving_mid_run_joins_the_running_batch(tiny):
    rows = grid_rows(tiny, personas=("pirate",), temperatures=(1.0,), n=2)
    engine = Engine(tiny, EngineConfig(max_slots=8, expect_more=True))
    first, second = rows[:4], rows[4:]
    got = {}
    deliver = lambda s: got.__setitem__((s.row.id, s.row.sample), s)  # noqa: E731
    engine.submit(first, Settings(max_new_tokens=20, min_new_tokens=20), deliver)
    with torch.inference_mode():
        engine.step()
        engine.step()
        engine.submit(second, Settings(max_new_tokens=20, min_new_tokens=20), deliver)
        engine.step()
        assert len(engine.jobs) == len(rows)  # both requests decode in one batch
        while engine.busy:
            engine.step()
    alone, _ = run_engine(tiny, second, Settings(max_new_tokens=20, min_new_tokens=20))
    for (persona, line, t, k), sample in alone.items():
        assert got[(line, k)].token_ids == sample.token_ids


def test_rows_whose_suffix_is_one_token_start_in_the_decode_step(tiny):
    """A persona with one prompt (a grid) leaves each row one token after its prefix: those rows
    take no prefill pass — the decode step writes that token and chooses their first — beside a
    persona whose rows are encoded as usual. Texts as the chunked path's, greedy and seeded, and
    greedy as transformers' generate."""
    rows = grid_rows(tiny, personas=("pirate",), asks=ASKS[:1], n=3) + grid_rows(tiny, personas=("grocer",), n=1)
    settings = Settings(max_new_tokens=20)
    engine = Engine(tiny)
    engine.submit(rows, settings, lambda s: None)
    assert {len(j.suffix) for j in engine.scheduler.queue if j.row.persona == "pirate"} == {1}
    assert min(len(j.suffix) for j in engine.scheduler.queue if j.row.persona == "grocer") > 1
    with torch.inference_mode():
        engine.step()
    folded = [b for b, j in engine.jobs.items() if j.row.persona == "pirate"]
    # After one step the folded rows have their first token, the encoded ones their second.
    assert {len(engine.jobs[b].tokens) for b in folded} == {1}
    assert {len(j.tokens) for j in engine.jobs.values() if j.row.persona == "grocer"} == {2}
    expected = chunked(tiny, rows, settings)
    got, _ = run_engine(tiny, rows, settings)
    assert {k: s.token_ids for k, s in got.items()} == {k: s.token_ids for k, s in expected.items()}
    fixed = Settings(max_new_tokens=12, min_new_tokens=12)
    pirates = rows[:6]
    got, engine = run_engine(tiny, pirates, fixed)
    assert engine.stats.steps == 12  # every token from a decode step: no prefill pass chose the first
    for row in pirates:
        if row.temperature == 0.0:
            ids = torch.tensor([row.prompt_ids])
            out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                                      do_sample=False, pad_token_id=tiny.pad_id)[0, ids.shape[1]:].tolist()
            assert list(got[(row.persona, row.id, 0.0, row.sample)].token_ids) == out


def test_the_engine_times_its_prompt_passes_apart_from_its_decode_steps(tiny):
    """stats.prompt_seconds: the time of the prompt passes (the shared prefixes', the encoded
    suffixes'); stats.rows_decoded: the tokens decode steps chose — with the first tokens the
    passes chose, every token delivered. What a peer's "generation speed" leaves out, apart."""
    rows = grid_rows(tiny, personas=("pirate",), asks=ASKS[:1], n=3) + grid_rows(tiny, personas=("grocer",), n=1)
    encoded = sum(1 for row in rows if row.persona == "grocer")  # their suffixes are longer than one token
    started = time.perf_counter()
    got, engine = run_engine(tiny, rows, Settings(max_new_tokens=6, min_new_tokens=6))
    elapsed = time.perf_counter() - started
    assert sum(len(s.token_ids) for s in got.values()) == len(rows) * 6 == engine.stats.rows_decoded + encoded
    assert 0 < engine.stats.prompt_seconds < elapsed


def test_one_token_suffixes_refill_at_once_while_others_wait_for_a_pass(tiny):
    """Mid-run refill waits until an eighth of the slots can be refilled in one prefill pass —
    except rows that need no pass: one free slot takes a one-token row at once."""
    settings = Settings(max_new_tokens=10, min_new_tokens=10)
    running = grid_rows(tiny, personas=("pirate",), asks=ASKS[:1], temperatures=(1.0,), n=15)
    same_prompt = grid_rows(tiny, personas=("pirate",), asks=ASKS[:1], temperatures=(1.0,), n=18)[15:]
    other_prompt = grid_rows(tiny, personas=("pirate",), asks=ASKS[1:2], temperatures=(1.0,), n=3)
    for late, joins_at_once in ((same_prompt, True), (other_prompt, False)):
        engine = Engine(tiny, EngineConfig(max_slots=16, expect_more=True))
        got = {}
        deliver = lambda s: got.__setitem__(s.row, s.token_ids)  # noqa: E731
        engine.submit(running, settings, deliver)
        with torch.inference_mode():
            engine.step()
            jobs = engine.submit(late, settings, deliver)
            assert (len(jobs[0].suffix) == 1) == joins_at_once
            engine.step()
            assert len(engine.jobs) == (16 if joins_at_once else 15)
            engine.run()
        alone, _ = run_engine(tiny, late, settings)
        assert {s.row: s.token_ids for s in alone.values()} == {row: got[row] for row in late}


def test_per_row_masks_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    for k, p in [(0, 0.9), (5, 1.0), (5, 0.5), (1, 0.3), (0, 1.0), (60, 0.95)]:
        expected = scores
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        got = top_k_top_p_mask(scores, torch.full((6,), k), torch.full((6,), p))
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), (k, p)
    # Different values per row in one call.
    mixed = top_k_top_p_mask(scores, torch.tensor([0, 3, 0, 10, 1, 0]), torch.tensor([1.0, 1.0, 0.5, 0.8, 1.0, 0.2]))
    for row, (k, p) in enumerate([(0, 1.0), (3, 1.0), (0, 0.5), (10, 0.8), (1, 1.0), (0, 0.2)]):
        assert torch.equal(mixed[row], top_k_top_p_mask(scores[row:row + 1], torch.tensor([k]), torch.tensor([p]))[0])


def test_top_k_top_p_rows_in_the_engine_match_the_chunked_path(tiny):
    rows = grid_rows(tiny, personas=("pirate",), temperatures=(1.0,), n=3)
    settings = Settings(max_new_tokens=12, top_k=5, top_p=0.8)
    got, _ = run_engine(tiny, rows, settings, slots=4)
    expected = chunked(tiny, rows, settings)
    assert {k: s.token_ids for k, s in got.items()} == {k: s.token_ids for k, s in expected.items()}


# --- on the GPU --------------------------------------------------------------------------------


def test_listeners_hear_every_token_with_the_softmax_log_probabilities(tiny):
    """on_token hears each row's tokens in order (what its Sample then holds), with log-probabilities
    equal to log_softmax(logits / T) of the model's own forward pass; T = 0 gets the greedy one-hot."""
    rows = grid_rows(tiny, personas=("pirate",), asks=ASKS[:2])
    heard: dict[tuple, list] = {}
    samples = {}
    engine = Engine(tiny, EngineConfig(max_slots=3))
    engine.submit(rows, Settings(max_new_tokens=6), lambda s: samples.__setitem__(s.row, s),
                  on_token=lambda row, token, lp: heard.setdefault(row, []).append((token, lp)), logprobs=True)
    with torch.inference_mode():
        engine.run()
    assert set(samples) == set(rows)
    for row, sample in samples.items():
        told = heard.get(row, [])
        assert [t for t, _ in told] == list(sample.token_ids)
        ids = torch.tensor([list(row.prompt_ids) + list(sample.token_ids)])
        with torch.inference_mode():
            logits = tiny.model(ids).logits[0, len(row.prompt_ids) - 1:-1].float()
        for step, (token, lp) in enumerate(told):
            assert lp.token_id == token and len(lp.top) == 20
            if row.temperature == 0:
                assert lp.logprob == 0.0 and lp.top[0] == (token, 0.0)
                assert lp.top[0][0] == int(logits[step].argmax()) and lp.top[1][1] == float("-inf")
            else:
                expected = (logits[step] / row.temperature).log_softmax(-1)
                assert lp.logprob == pytest.approx(float(expected[token]), abs=1e-4)
                best = expected.topk(20)
                assert [i for i, _ in lp.top] == best.indices.tolist()
                assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_cancelled_rows_free_their_slots_and_the_others_are_untouched(tiny):
    """Rows cancelled mid-run (a client went away) are never delivered and leave nothing behind;
    the rows that stay sample what they sample alone."""
    keep = grid_rows(tiny, personas=("pirate",))
    drop = grid_rows(tiny, personas=("grocer",))
    settings = Settings(max_new_tokens=30, min_new_tokens=30)
    alone, _ = run_engine(tiny, keep, settings, slots=6)
    engine = Engine(tiny, EngineConfig(max_slots=6))
    got, dropped_delivered = {}, []
    engine.submit(keep, settings, lambda s: got.__setitem__((s.row.persona, s.row.id, s.row.temperature, s.row.sample), s))
    jobs = engine.submit(drop, settings, dropped_delivered.append)
    with torch.inference_mode():
        for _ in range(5):
            engine.step()
    assert engine.cancel(jobs) == len(drop)
    assert engine.cancel(jobs) == 0, "cancelling twice finds nothing"
    with torch.inference_mode():
        engine.run()
    assert not dropped_delivered and not engine.busy and not engine.pool.spans and not engine.pool.users
    assert {k: s.token_ids for k, s in got.items()} == {k: s.token_ids for k, s in alone.items()}


def test_a_dropped_engine_is_freed_at_once_with_no_reference_cycle(tiny):
    """An engine in a reference cycle would keep its slots, pages and captured graphs until the
    garbage collector runs, and the next engine (a batch file's next round, a Ray worker's next
    chunk, an out-of-memory test's next try) sizes itself from the memory free now."""
    import gc
    import weakref

    from personas.library.answer_format import AnswerFormat
    from personas.sampling.grid import Rules

    json_rows = [dataclasses.replace(row, rules=Rules(answer_format=AnswerFormat.json_object()))
                 for row in grid_rows(tiny, n=1)]
    gc.collect()
    gc.disable()
    try:
        for rows in (grid_rows(tiny, n=1), json_rows):  # the second through the grammar too
            engine = Engine(tiny, EngineConfig(max_slots=4))
            engine.submit(rows, Settings(max_new_tokens=6), lambda _sample: None)
            with torch.inference_mode():
                engine.run()
            dropped = weakref.ref(engine)
            del engine
            assert dropped() is None, "something the engine holds refers back to it"
    finally:
        gc.enable()


@pytest.mark.gpu
def test_cuda_graph_engine_equals_eager_engine_and_generate(tiny_cuda):
    rows = grid_rows(tiny_cuda, n=3)
    settings = Settings(max_new_tokens=40)
    eager, _ = run_engine(tiny_cuda, rows, settings, slots=5)
    engine = Engine(tiny_cuda, EngineConfig(max_slots=5, graphs=True))
    graphed = {}
    engine.submit(rows, settings, lambda s: graphed.__setitem__((s.row.persona, s.row.id, s.row.temperature, s.row.sample), s))
    with torch.inference_mode():
        engine.run()
    assert engine.runner.graphs, "the decode step was captured"
    assert {k: s.token_ids for k, s in graphed.items()} == {k: s.token_ids for k, s in eager.items()}
    # Log-probabilities from the captured step equal the eager step's.
    logprobs = {}
    for graphs in (False, True):
        engine = Engine(tiny_cuda, EngineConfig(max_slots=5, graphs=graphs))
        engine.submit(rows, settings, lambda s: None, logprobs=True,
                      on_token=lambda row, token, lp: logprobs.setdefault((graphs, row), []).append(lp.logprob))
        with torch.inference_mode():
            engine.run()
    for row in rows:
        assert logprobs[(True, row)] == pytest.approx(logprobs[(False, row)], abs=1e-3)
    for key, sample in graphed.items():
        if key[2] == 0.0:
            row = next(r for r in rows if (r.persona, r.id, r.temperature, r.sample) == key)
            ids = torch.tensor([row.prompt_ids], device="cuda")
            out = tiny_cuda.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                           eos_token_id=tiny_cuda.eos_ids, pad_token_id=tiny_cuda.pad_id)
            out = out[0, ids.shape[1]:].tolist()
            assert list(sample.token_ids) == out[:next((i for i, t in enumerate(out) if t in tiny_cuda.eos_ids), len(out))]


@pytest.mark.gpu
def test_fused_layer_kernels_give_the_modules_texts(tiny_cuda):
    """The CUDA decoder's fused kernels (norms, rotary, SiLU, the prefix kernel and the merge in
    the paged kernel) against transformers' modules and the matrix-product parts: the same texts,
    greedy and seeded, with two personas' prefixes in the pool."""
    rows = grid_rows(tiny_cuda, n=3)
    settings = Settings(max_new_tokens=40)
    texts = {}
    for fused in (True, False):
        engine = Engine(tiny_cuda, EngineConfig(max_slots=8, graphs=True, layer_kernels=fused))
        assert engine.runner.decoder.layer_kernels == fused
        engine.submit(rows, settings, lambda s, f=fused: texts.__setitem__((f, s.row), s.token_ids))
        with torch.inference_mode():
            engine.run()
    assert len(texts) == 2 * len(rows)
    assert {r: t for (f, r), t in texts.items() if f} == {r: t for (f, r), t in texts.items() if not f}


@pytest.mark.gpu
def test_graphs_are_captured_again_after_the_pool_regrows(tiny_cuda):
    """A server's engine: short rows, then rows with longer prompts (more pages, the same
    graphs), then another persona's longer prefix (the pool grows: the graphs are captured
    anew) — over the leading slots only, and the texts equal the eager engine's."""
    waves = [grid_rows(tiny_cuda, personas=("pirate",), asks=ASKS[:1], n=2),
             grid_rows(tiny_cuda, personas=("pirate",), asks=[" ".join(ASKS) * 3], n=2),
             grid_rows(tiny_cuda, personas=("grocer" + " of the sea" * 40,), asks=ASKS[:2], n=2)]
    settings = Settings(max_new_tokens=40)
    texts = {}
    for graphs in (False, True):
        engine = Engine(tiny_cuda, EngineConfig(max_slots=40, graphs=graphs, expect_more=True))
        for wave in waves:
            engine.submit(wave, settings, lambda s, g=graphs: texts.__setitem__((g, s.row), s.token_ids))
            with torch.inference_mode():
                engine.run()
        # A graph computes only the leading slots the busy rows sit in (16 of the 40 here).
        assert not graphs or {key.leading for key in engine.runner.graphs} == {16}
    assert len(texts) == 2 * sum(len(w) for w in waves)
    assert {r: t for (g, r), t in texts.items() if g} == {r: t for (g, r), t in texts.items() if not g}


@pytest.mark.gpu
def test_float32_scores_from_half_precision_inputs_on_cuda():
    from personas.engine.decoder import matmul32

    a = torch.randn(3, 4, 5, 64, device="cuda", dtype=torch.float16) * 30
    b = torch.randn(3, 4, 64, 7, device="cuda", dtype=torch.float16) * 30
    got = matmul32(a, b)
    assert got.dtype == torch.float32 and got.shape == (3, 4, 5, 7)
    assert torch.allclose(got, a.float() @ b.float(), rtol=1e-3, atol=1e-1)


@pytest.mark.gpu
def test_out_of_memory_halves_the_slots_and_loses_nothing(tiny_cuda):
    """A real out-of-memory. The engine sizes its pages from the card's free memory; the
    allocator is then capped at what a quarter of the slots took plus half of what all slots'
    extra pages take — the engine runs out, halves its slots until they fit, and loses nothing."""
    rows = grid_rows(tiny_cuda, n=16)
    settings = Settings(max_new_tokens=384, min_new_tokens=384)  # long rows: their pages dominate

    def run(engine):
        got = {}
        engine.submit(rows, settings, lambda s: got.__setitem__(s.row, s.token_ids))
        with torch.inference_mode():
            engine.run()
        return got

    run(Engine(tiny_cuda, EngineConfig(max_slots=len(rows) // 4, graphs=True)))  # warm: kernels, cuBLAS workspace
    torch.cuda.empty_cache()
    used = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    quarter = Engine(tiny_cuda, EngineConfig(max_slots=len(rows) // 4, graphs=True))
    expected = run(quarter)
    extra_pages = 3 * (quarter.pages.count - 1) * PAGE * quarter.runner.decoder.kv_bytes_per_token()  # all slots' pages less a quarter's
    room = torch.cuda.max_memory_allocated() - used + extra_pages // 2
    del quarter
    torch.cuda.empty_cache()
    splits = []
    engine = Engine(tiny_cuda, EngineConfig(max_slots=len(rows), graphs=True),
                    on_split=lambda old, new: splits.append((old, new)))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + room) / total)
    try:
        got = run(engine)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert splits and splits[0] == (len(rows), len(rows) // 2)
    assert got == expected and len(got) == len(rows)


def test_out_of_memory_in_the_engine_halves_the_slots_and_loses_nothing(tiny_llama_dir):
    model, request, rows = six_rows(tiny_llama_dir)

    def collect(**kwargs):
        got = {}
        sample_rows(request.settings, model, rows,
                    lambda s: got.__setitem__((s.row.temperature, s.row.sample), s.token_ids), **kwargs)
        return got

    expected = collect()

    def fail_big_batches(_module, args):  # an allocation failure injected above 2 rows decoding
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    splits = []
    handle = model.model.model.embed_tokens.register_forward_pre_hook(fail_big_batches)
    try:
        got = collect(on_split=lambda size, half: splits.append((size, half)))
    finally:
        handle.remove()
    assert splits == [(6, 3), (3, 1)]
    assert got == expected
