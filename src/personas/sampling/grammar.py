"""Answer formats at sampling time: each constrained row's llguidance matcher, the bitmask of the
tokens it allows next, and that mask applied to the row's logits.

The mask puts -inf on every token the row's format does not allow here; the chooser then draws
as it always does (Gumbel-max over logits / T with noise keyed by seed, step and token id). The
argmax of noisy scores over the allowed tokens is an exact draw from softmax(logits / T)
renormalised over them, the noise of a token does not depend on which others are allowed, and a
row's mask depends on its own tokens only — so "same seed, same text, whatever shares the batch"
holds for constrained rows too. A row without a format has every bit set, which changes nothing.

Tokens a format forces (one allowed token) are drawn like any other: the mask leaves one finite
score, so the draw takes it, one step per token — a row's step count, and so its noise, stays
the same whatever the grammar forces.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from ..library.answer_format import AnswerFormat

ALL_ALLOWED = -1  # a bitmask word with every bit set (int32)
COMPILED_FORMATS = 256  # compiled formats kept for new rows to copy
BITS = 32


def words_for(vocabulary: int) -> int:
    """int32 words a row's bitmask takes."""
    return (vocabulary + BITS - 1) // BITS


def byte_bias(device: torch.device) -> torch.Tensor:
    """(256, 8) float32: for each byte value, 0 where bit i is set and -inf where it is not — what
    `allow_only` adds, a byte of the mask at a time."""
    return torch.tensor([[0.0 if (byte >> i) & 1 else float("-inf") for i in range(8)] for byte in range(256)],
                        device=device)


def allow_only(logits: torch.Tensor, bitmask: torch.Tensor, bias_of_byte: torch.Tensor) -> torch.Tensor:
    """`logits` (rows, vocabulary) with -inf where a row's bitmask (rows, words) int32 has a 0 bit
    (token t is bit t % 32 of word t // 32, llguidance's layout: in little-endian bytes, bit t % 8
    of byte t // 8). A new tensor; no host synchronisation, so it runs inside a CUDA graph.

    Looked up a byte at a time (`byte_bias`) and added: several times cheaper than shifting out
    each bit and filling (docs/performance.md). Allowed tokens get + 0.0, which changes nothing."""
    vocabulary = logits.shape[-1]
    bytes_ = bitmask.view(torch.uint8).long()
    bias = torch.nn.functional.embedding(bytes_, bias_of_byte).view(bitmask.shape[0], -1)[:, :vocabulary]
    return logits.float() + bias


class GrammarTokenizer:
    """llguidance's view of one model's tokenizer, and a compiled matcher per answer format (new
    rows take copies of it: compiling a schema costs far more than copying its matcher)."""

    def __init__(self, tokenizer: Any, vocabulary: int, end_ids: Sequence[int]):
        import llguidance
        import llguidance.hf

        self.llguidance = llguidance
        # Every end-of-turn id ends an answer, and only where the format may end.
        self.tokenizer = llguidance.hf.from_tokenizer(_fast(tokenizer), n_vocab=vocabulary, eos_token=list(end_ids))
        # The formats in use, latest last: a server whose every request brings its own schema keeps
        # the last COMPILED_FORMATS of them, not all it has seen.
        self.compiled: OrderedDict[AnswerFormat, Any] = OrderedDict()
        self.executor = llguidance.LLExecutor()

    def matcher(self, answer_format: AnswerFormat) -> Any:
        """A fresh matcher at the start of an answer in `answer_format`."""
        if answer_format in self.compiled:
            self.compiled.move_to_end(answer_format)
        else:
            compiled = self.llguidance.LLMatcher(self.tokenizer, answer_format.grammar)
            if compiled.is_error():
                raise ValueError(f"the answer format cannot run on this model's tokenizer: {compiled.get_error()}")
            self.compiled[answer_format] = compiled
            if len(self.compiled) > COMPILED_FORMATS:
                self.compiled.popitem(last=False)
        return self.compiled[answer_format].deep_copy()

    def fill(self, matchers: Sequence[tuple[Any, int]], bitmask: torch.Tensor) -> None:
        """Each (matcher, row) pair's allowed tokens into row `row` of `bitmask` (CPU, int32,
        contiguous), the rows in parallel on llguidance's own threads, without the GIL."""
        if matchers:
            self.executor.unsafe_compute_mask_ptr(list(matchers), bitmask.data_ptr(), bitmask.shape[1] * 4,
                                                  bitmask.shape[0])


def _fast(tokenizer: Any) -> Any:
    """The transformers tokenizer llguidance reads (the fast one: it serialises its Rust backend);
    a tokenizer file read without transformers (model/tokenizer_file.py) hands over its own."""
    if hasattr(type(tokenizer), "as_transformers"):
        tokenizer = tokenizer.as_transformers()
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError("answer formats need a fast tokenizer (tokenizer.json); this model's is a slow one")
    return tokenizer
