"""The scheduler (engine/scheduler.py): queue, admission, refill and preemption choices, and the
rows' tokens as they come. Pure Python: rows are made by hand, the prefix pool is counted by a
plain dictionary, and no model runs."""

from __future__ import annotations

from collections import Counter

from personas.engine.job import common_prefix
from personas.engine.pages import PAGE
from personas.engine.scheduler import Scheduler
from personas.sampling.grid import Row, Settings

END = 2


class Holds:
    """Counts the rows that hold each prefix, as the prefix pool does."""

    def __init__(self):
        self.count: Counter = Counter()

    def hold(self, prefix):
        if prefix:
            self.count[prefix] += 1

    def release(self, prefix):
        if prefix:
            self.count[prefix] -= 1
            if not self.count[prefix]:
                del self.count[prefix]


def row(persona: str, prompt_ids: tuple[int, ...], sample: int = 1, max_new: int | None = None) -> Row:
    return Row(persona, "p", 1.0, sample, seed=sample, prompt_ids=prompt_ids, max_new_tokens=max_new)


def test_common_prefix_leaves_each_prompt_its_last_token():
    assert common_prefix([(1, 2, 3, 4), (1, 2, 3, 5)]) == 3
    assert common_prefix([(1, 2, 3), (1, 2, 3)]) == 2
    assert common_prefix([(7,), (7, 8)]) == 0


def test_a_personas_rows_share_their_prompt_start_and_longest_rows_go_first():
    holds = Holds()
    scheduler = Scheduler(holds, [END])
    system = tuple(range(10, 30))
    rows = [row("a", system + (40, 41), 1, max_new=4), row("a", system + (50,), 2, max_new=9),
            row("b", (60, 61, 62), 1)]
    jobs = scheduler.submit(rows, Settings(max_new_tokens=6), lambda s: None)
    assert [j.prefix for j in jobs[:2]] == [system, system] and jobs[2].prefix == (60, 61)
    assert [j.max_new for j in scheduler.queue] == [9, 6, 4]
    assert holds.count == {system: 2, (60, 61): 1}
    # The same persona later, one row at a time: it still shares with the prompt seen before.
    later = scheduler.submit([row("a", system + (70, 71))], Settings(), lambda s: None)
    assert later[0].prefix == system


def test_admission_keeps_pages_for_the_running_rows_and_the_queue_order():
    scheduler = Scheduler(Holds(), [END])
    long_suffix = tuple(range(100, 100 + 3 * PAGE))  # 3 full pages of suffix
    scheduler.submit([row("a", (1,) + long_suffix, 1), row("b", (2, 3), 1)], Settings(max_new_tokens=4),
                     lambda s: None)
    first = scheduler.queue[0]
    assert first.first_pages == len(first.suffix) // PAGE + 1
    # Too few pages for the first row: nothing is admitted, the short row does not overtake it.
    assert scheduler.admissions(slot_count=4, free_pages=first.first_pages - 1, span=1024) == []
    admitted = scheduler.admissions(slot_count=4, free_pages=first.first_pages + 1, span=1024)
    assert [slot for slot, _ in admitted] == [0, 1] and not scheduler.queue


def test_rows_wait_to_refill_together_unless_they_need_no_prefill():
    scheduler = Scheduler(Holds(), [END])
    scheduler.submit([row("c", (90, 91), 1)], Settings(max_new_tokens=4), lambda s: None)
    scheduler.running[0] = scheduler.queue.popleft()  # one row already decoding
    system = tuple(range(1, 21))
    grid = [row("a", system + (99,), k) for k in range(1, 3)]  # one token past the shared prefix
    encoded = [row("b", (50,) + tuple(range(200 + 10 * k, 200 + 10 * k + 3 * PAGE)), k) for k in range(1, 3)]
    scheduler.submit(grid + encoded, Settings(max_new_tokens=4), lambda s: None)
    assert [j.starts_in_decode for j in scheduler.queue] == [True, True, False, False]
    # Pages for the grid's rows but not the next: two of four fit, and 64 slots would refill in
    # groups of 64 / 8 — yet the rows that need no prefill pass join at once.
    admitted = scheduler.admissions(slot_count=64, free_pages=4, span=1024)
    assert [job.row.persona for _, job in admitted] == ["a", "a"] and len(scheduler.queue) == 2
    # With room for the whole queue, it goes in at once.
    assert len(scheduler.admissions(slot_count=64, free_pages=100, span=1024)) == 2


def test_record_ends_rows_on_an_end_id_or_their_length_and_tells_listeners_once():
    told = []
    scheduler = Scheduler(Holds(), [END])
    jobs = scheduler.submit([row("a", (1, 2), 1), row("a", (1, 3), 2)], Settings(max_new_tokens=2), lambda s: None,
                            on_token=lambda r, token, _lp: told.append((r.sample, token)))
    scheduler.running.update({0: jobs[0], 1: jobs[1]})
    scheduler.queue.clear()
    assert scheduler.record({0: 7, 1: 8}, None) == []
    assert scheduler.record({0: END, 1: 9}, None) == [(0, "stop"), (1, "length")]
    assert told == [(1, 7), (2, 8), (2, 9)]
    # A rerun after preemption tells the listener nothing it heard already.
    scheduler.requeue(jobs[1])
    scheduler.running[1] = scheduler.queue.popleft()
    assert scheduler.record({1: 8}, None) == [] and told[-1] == (2, 9)


def test_the_row_preempted_is_the_one_that_has_done_least():
    scheduler = Scheduler(Holds(), [END])
    jobs = scheduler.submit([row("a", (1, 2), k) for k in range(1, 4)], Settings(max_new_tokens=8), lambda s: None)
    scheduler.queue.clear()
    scheduler.running.update(dict(enumerate(jobs)))
    jobs[0].tokens[:] = [5, 5]
    jobs[1].tokens[:] = [5]
    jobs[2].tokens[:] = [5]
    assert scheduler.least_done() == 2  # fewest tokens; of equals, the highest slot


def test_cancelling_queued_rows_releases_their_prefixes():
    holds = Holds()
    scheduler = Scheduler(holds, [END])
    system = tuple(range(10, 30))
    jobs = scheduler.submit([row("a", system + (40,), k) for k in range(1, 3)], Settings(), lambda s: None)
    assert scheduler.cancel_queued({jobs[0]}) == 1 and holds.count == {system: 1}
    assert scheduler.cancel_queued(set(jobs)) == 1 and not holds.count and not scheduler.busy


def test_rows_of_one_name_share_by_their_prompts_starts():
    """Personas given as data: every row named 'base'; rows with one system text share it, two
    texts make two prefixes. Named personas keep theirs apart, as before."""
    from personas.engine.prefix_groups import shared_prefixes

    sys_a, sys_b = tuple(range(100, 130)), tuple(range(200, 230))
    prompts = [sys_a + (1, i) for i in range(5)] + [sys_b + (2, i) for i in range(5)]
    kept = shared_prefixes(dict.fromkeys(prompts, 1))
    assert kept == {p: len(sys_a) + 1 for p in prompts}  # the text and its separator

    holds = Holds()
    scheduler = Scheduler(holds, [END])
    rows = [row("base", p, 1) for p in prompts] + [row("pirate", sys_a + (3, 3)), row("grocer", sys_a + (3, 4))]
    jobs = scheduler.submit(rows, Settings(), lambda s: None)
    assert {j.prefix for j in jobs[:5]} == {sys_a + (1,)} and {j.prefix for j in jobs[5:10]} == {sys_b + (2,)}
    assert [j.prefix for j in jobs[10:]] == [sys_a + (3,), sys_a + (3,)]  # each alone: all but its last token
    assert holds.count == {sys_a + (1,): 5, sys_b + (2,): 5, sys_a + (3,): 2}


def test_a_long_preamble_common_to_every_persona_does_not_merge_them():
    """A template that puts the same preamble before every system text (Llama 3's dates): each
    persona's rows still share their own text, the preamble with it."""
    from personas.engine.prefix_groups import shared_prefixes

    preamble = tuple(range(1, 31))
    texts = [tuple(range(1000 * k, 1000 * k + 40)) for k in range(1, 4)]
    prompts = [preamble + text + (9, i) for text in texts for i in range(10)]
    kept = shared_prefixes(dict.fromkeys(prompts, 2))
    assert all(kept[p] == len(preamble) + 40 + 1 for p in prompts)
    # Two rows of one prompt (n = 2) with nothing else: all of it but the last token.
    assert shared_prefixes({(5, 6, 7): 2}) == {(5, 6, 7): 2}


def test_requests_one_at_a_time_share_with_recent_ones():
    holds = Holds()
    scheduler = Scheduler(holds, [END])
    sys_a, sys_b = tuple(range(100, 130)), tuple(range(200, 230))
    prefixes = []
    for i in range(6):  # alternating system texts, one request each, as a server receives them
        system = sys_a if i % 2 == 0 else sys_b
        (job,) = scheduler.submit([row("base", system + (7, i))], Settings(), lambda s: None)
        prefixes.append(job.prefix)
    assert prefixes[2:] == [sys_a + (7,), sys_b + (7,)] * 2


def test_questions_a_few_words_apart_share_the_persona_context_only():
    """Many questions to one persona, some starting with the same words: a run sharing a few
    tokens more than the context (less than MIN_EXTRA) is no prefix of its own — one prefix."""
    from personas.engine.prefix_groups import MIN_EXTRA, shared_prefixes

    context = tuple(range(100, 130))
    asks = [(1, 2, 3), (4, 5, 6)]
    prompts = [context + ask + (50 + i, 60 + i) for ask in asks for i in range(20)]
    assert len(asks[0]) < MIN_EXTRA
    kept = shared_prefixes(dict.fromkeys(prompts, 2))
    assert set(kept.values()) == {len(context)}
