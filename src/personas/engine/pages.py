"""Page accounting: which cache pages each slot's table holds, who holds each page, which are free.

A row's own keys and values — its suffix, then its new tokens — live in pages of PAGE positions
from one pool. A row takes the pages of its suffix when admitted and one more each PAGE tokens
as it grows, so rows in flight hold what they use, not what they might use. Rows admitted
together with the same prompt read the first one's prompt-only pages instead of copies, so a
page may have several holders; it is free again when its last holder lets go.

Pure Python, no torch: the runner mirrors these lists into each slot's page table on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

PAGE = 8  # positions per page: a row wastes less than a page of what it holds
SINK_PAGE = 0  # never given to a row: idle slots write and read it, so a step needs no branches

Slot: TypeAlias = int  # a decode slot's index, 0 … slots - 1


def ceil_div(value: int, step: int) -> int:
    return -(-value // step)


def pages_for(positions: int) -> int:
    """Pages that hold `positions` positions."""
    return ceil_div(positions, PAGE)


def round_up(value: int, step: int) -> int:
    return ceil_div(value, step) * step


class Pages:
    """The pool's `count` pages (the sink page included) and the slots that hold them."""

    def __init__(self, count: int):
        self.count = count
        self.free: list[int] = list(range(count - 1, SINK_PAGE, -1))  # popped from the end: low pages first
        self.holders: list[int] = [0] * count  # page -> slots whose tables hold it
        self.of: dict[Slot, list[int]] = {}  # slot -> the pages its table holds, in order
        self.own: dict[Slot, int] = {}  # slot -> pages it took itself (not read from a row with its prompt)
        self.written: dict[Slot, int] = {}  # slot -> positions of its cache written so far

    @property
    def usable(self) -> int:
        """Pages a row can ever hold: all but the sink."""
        return self.count - 1

    def take(self, slot: Slot, shared: Sequence[int], own: int, written: int) -> list[int]:
        """Give `slot` the `shared` pages (another slot's, read as its own) and `own` free ones."""
        pages = list(shared) + [self.free.pop() for _ in range(own)]
        for page in pages:
            self.holders[page] += 1
        self.of[slot], self.own[slot], self.written[slot] = pages, own, written
        return pages

    def needing_a_page(self) -> list[Slot]:
        """The slots whose next position lies past their last page, in the order they came."""
        return [slot for slot, pages in self.of.items() if self.written[slot] >= PAGE * len(pages)]

    def grow(self, slot: Slot) -> tuple[int, int]:
        """One free page more for `slot`: (its column in the slot's table, the page)."""
        page = self.free.pop()
        self.holders[page] += 1
        self.of[slot].append(page)
        self.own[slot] += 1
        return len(self.of[slot]) - 1, page

    def advance(self, slots: Sequence[Slot]) -> None:
        """Each of `slots` wrote one more position (a decode step)."""
        for slot in slots:
            self.written[slot] += 1

    def release(self, slot: Slot) -> int:
        """`slot`'s pages back to the pool (a page others still hold stays theirs); returns the
        pages it had taken itself."""
        for page in self.of.pop(slot):
            self.holders[page] -= 1
            if not self.holders[page]:
                self.free.append(page)
        del self.written[slot]
        return self.own.pop(slot)

    def held(self) -> set[int]:
        return {page for pages in self.of.values() for page in pages}
