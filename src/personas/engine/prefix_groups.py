"""Which start of its prompt each row keeps in the prefix pool, chosen from the prompt ids.

Rows share a prefix when their prompts start alike: a persona's system context and examples
before each prompt, or one system text on ten thousand batch lines that name no persona at all
(`model: "base"`). The pool keeps one prefix per row, so the choice is a grouping. The scheduler
asks once per persona name (inline personas all carry one name), and here the distinct prompts
are sorted: the common starts of neighbours form a tree, each node a run of prompts and the start
they all share, its children runs that share longer starts (by two pages at least: MIN_EXTRA).
A node either shares its start among all its rows — saving (rows − 1) × start tokens of cache stored and read — or leaves each child
to share its own longer start; bottom-up, each node takes whichever saves more. So lines with
one system text share it, lines with ten texts make ten prefixes, and a long preamble that a
template puts before every text (Llama 3's dates) does not swallow them into one group.

A prompt's own rows (its n samples) already share its pages and its prefill, so a run of one
prompt saves nothing here: one persona's several prompts share the persona's context, as they
always have, rather than each keeping its whole prompt as a prefix of its own. A prompt alone
keeps all of it but its last token, which its row decodes from.

Pure Python: the scheduler calls it on every submission, with the prompts it saw recently so that
requests arriving one at a time still share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .pages import PAGE

# A run of prompts becomes a prefix of its own only if it shares at least this many tokens more
# than its parent run: fewer save each row at most one page of its own cache (and often none),
# while one more prefix is stored, and read, every step.
MIN_EXTRA = 2 * PAGE

Prompt = tuple[int, ...]


def common_start(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens `a` and `b` share."""
    limit = min(len(a), len(b))
    k = 0
    while k < limit and a[k] == b[k]:
        k += 1
    return k


@dataclass(eq=False)
class _Node:
    depth: int  # the start its prompts share (a leaf: its prompt's length less its last token)
    rows: int = 0
    children: list[_Node] = field(default_factory=list)
    prompt: Prompt | None = None  # leaves only
    gain: int = 0
    share: bool = False  # its rows share its start (else each child decides)


def shared_prefixes(rows_of: Mapping[Prompt, int]) -> dict[Prompt, int]:
    """For each distinct prompt, given how many rows read it, how many of its first tokens it
    keeps in the prefix pool (always leaving its last token to its own pages)."""
    prompts = sorted(rows_of)
    if not prompts:
        return {}
    leaves = [_Node(max(len(p) - 1, 0), rows_of[p], prompt=p) for p in prompts]
    # The tree of common starts (a Cartesian tree over the neighbours' common starts; equal
    # depths join one node), built with a stack of nodes of increasing depth.
    stack: list[_Node] = []
    last = leaves[0]
    for previous, leaf in zip(prompts, leaves[1:]):
        depth = min(common_start(previous, leaf.prompt or ()), leaf.depth, last.depth)
        while stack and stack[-1].depth > depth:
            top = stack.pop()
            top.children.append(last)
            last = top
        if stack and stack[-1].depth == depth:
            stack[-1].children.append(last)
        else:
            stack.append(_Node(depth, children=[last]))
        last = leaf
    while stack:
        top = stack.pop()
        top.children.append(last)
        last = top
    _merge_close(last)
    _decide(last)
    return _assign(last)


def _merge_close(root: _Node) -> None:
    """Fold into its parent every run whose start is less than MIN_EXTRA longer than the parent's
    (512 distinct questions to one persona share its context, not dozens of starts a few words
    apart)."""
    pending = [root]
    while pending:
        node = pending.pop()
        kept: list[_Node] = []
        queue = list(node.children)
        while queue:
            child = queue.pop(0)
            if child.prompt is None and child.depth - node.depth < MIN_EXTRA:
                queue[0:0] = child.children
            else:
                kept.append(child)
        node.children = kept
        pending.extend(child for child in kept if child.prompt is None)


def _post_order(root: _Node) -> list[_Node]:
    order, pending = [], [root]
    while pending:
        node = pending.pop()
        order.append(node)
        pending.extend(node.children)
    return order[::-1]  # children before parents


def _decide(root: _Node) -> None:
    for node in _post_order(root):
        if node.prompt is not None:  # its own rows share its pages already: nothing saved here
            node.gain, node.share = 0, node is root
            continue
        node.rows = sum(child.rows for child in node.children)
        together = (node.rows - 1) * node.depth
        apart = sum(child.gain for child in node.children)
        # Ties go to sharing: one prefix in the pool instead of several.
        node.share = node.depth > 0 and together >= apart
        node.gain = together if node.share else apart


def _assign(root: _Node) -> dict[Prompt, int]:
    out: dict[Prompt, int] = {}
    pending: list[tuple[_Node, int | None]] = [(root, None)]
    while pending:
        node, chosen = pending.pop()
        if chosen is None and node.share:
            chosen = node.depth
        if node.prompt is not None:
            out[node.prompt] = chosen if chosen is not None else 0
        pending.extend((child, chosen) for child in node.children)
    return out
