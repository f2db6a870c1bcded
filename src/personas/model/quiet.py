"""Keeping transformers' and torch's own warnings and progress bars off the user's terminal."""

from __future__ import annotations

import logging


def quiet_torch() -> None:
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import chatter
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU


def quiet_transformers() -> None:
    """Called where transformers is about to be used, not sooner: importing it costs a CPU start
    close to a second, which a CPU run through the plain modules and the tokenizer file skips."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
