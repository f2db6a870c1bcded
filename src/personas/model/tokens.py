"""A single token as text, for the places that show tokens one by one (`explain`, log-probabilities)."""

from __future__ import annotations

from typing import Any


def token_text(tokenizer: Any, token_id: int) -> str:
    """A single token as text, keeping the leading space a SentencePiece '▁' stands for (decoding
    one token alone would drop it, and ' the' and 'the' are different tokens)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return ""
    if piece in tokenizer.all_special_tokens:
        return piece
    if piece.startswith("▁"):
        return " " + tokenizer.convert_tokens_to_string([piece]).lstrip(" ")
    return tokenizer.convert_tokens_to_string([piece])
