"""Importing torch and the engine with Python's cycle collector paused: the CLI's process and a Ray
worker's both do it before loading a model."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector paused while torch and the engine are imported, then what they made
    frozen out of its later passes (gc.freeze). Importing torch triggers hundreds of collections,
    some of them passes over every object, and they find next to nothing: what an import makes
    lives as long as the process. That collecting was most of what a short run spent in the
    collector (docs/performance.md, start-up); the few objects the imports leave in cycles stay.
    Not the load: a first start converts a GGUF file, and what that leaves in cycles must be freed
    as it goes."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.freeze()
            gc.enable()
