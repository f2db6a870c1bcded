"""Page accounting (engine/pages.py): pure Python, no model, no torch."""

from __future__ import annotations

import pytest

from personas.engine.pages import PAGE, SINK_PAGE, Pages, pages_for, round_up


def test_pages_for_and_round_up():
    assert [pages_for(n) for n in (0, 1, PAGE, PAGE + 1, 3 * PAGE)] == [0, 1, 1, 2, 3]
    assert round_up(0, 32) == 0 and round_up(1, 32) == 32 and round_up(64, 32) == 64


def test_a_new_pool_gives_low_pages_first_and_never_the_sink():
    pages = Pages(5)
    assert pages.usable == 4
    taken = pages.take(0, shared=[], own=4, written=0)
    assert taken == [1, 2, 3, 4] and SINK_PAGE not in taken and not pages.free


def test_shared_pages_are_held_twice_and_freed_by_their_last_holder():
    pages = Pages(8)
    first = pages.take(0, shared=[], own=3, written=20)
    second = pages.take(1, shared=first[:2], own=1, written=20)
    assert second[:2] == first[:2] and second[2] not in first
    assert [pages.holders[p] for p in first] == [2, 2, 1]
    assert pages.own == {0: 3, 1: 1}
    assert pages.release(0) == 3
    assert set(pages.free) == set(range(1, 8)) - set(second)  # the shared two stay the second's
    assert pages.release(1) == 1
    assert sorted(pages.free) == list(range(1, 8)) and not pages.of and not pages.written


def test_a_slot_needs_a_page_when_its_next_position_is_past_its_last_page():
    pages = Pages(6)
    pages.take(0, shared=[], own=1, written=PAGE - 1)
    pages.take(1, shared=[], own=2, written=PAGE)
    assert pages.needing_a_page() == []
    pages.advance([0, 1])
    assert pages.needing_a_page() == [0]
    column, page = pages.grow(0)
    assert column == 1 and pages.of[0][1] == page and pages.own[0] == 2 and pages.holders[page] == 1
    assert pages.needing_a_page() == []
    assert pages.held() == set(pages.of[0]) | set(pages.of[1])


def test_taking_more_than_is_free_fails_loudly():
    pages = Pages(3)
    pages.take(0, shared=[], own=2, written=0)
    with pytest.raises(IndexError):
        pages.grow(0)
