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


_TEXTS: dict[int, dict[str, int]] = {}  # id(tokenizer) -> each token's text -> its id


def token_id_of(tokenizer: Any, text: str) -> int:
    """The id of the one token whose text is `text` (as `token_text` shows it: ' Aye' and 'Aye'
    are different tokens). Raises InputError when `text` is not one token, naming the closest."""
    from ..errors import InputError

    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and token_text(tokenizer, ids[0]) == text:
        return ids[0]
    texts = _TEXTS.get(id(tokenizer))
    if texts is None:
        texts = _TEXTS[id(tokenizer)] = {token_text(tokenizer, i): i for i in range(len(tokenizer))}
    if text in texts:
        return texts[text]
    spaced = f" {text}"
    hint = (f"the token with a leading space is {spaced!r} (id {texts[spaced]})" if spaced in texts
            else "name one token, by its text as `personas explain` shows it or by its id")
    raise InputError(f"logit_bias: {text!r} is not one token of this model (it encodes to {len(ids)})", hint)
