"""Which decode loop samples a grid: the engine (engine.py) for the models its decoder runs,
else the older chunked loops (transformers' generate, or the CUDA-graph chunk) — kept for other
architectures and as the benchmarks' baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..errors import InputError
from ..model.load import LoadedModel
from ..sampling.grid import Row, Sample, Settings, batch_size
from .chunked import graphed
from .config import EngineConfig
from .decoder import supports
from .engine import Engine
from .job import EngineStats
from .sizing import is_out_of_memory


def generate_grid(
    model: Any,
    rows: Sequence[Row],
    settings: Settings,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    on_sample: Callable[[Sample], None],
    on_step: Callable[[int], None] = lambda _: None,
    on_split: Callable[[int, int], None] = lambda _a, _b: None,
    graph_safe: bool = False,
) -> None:
    """Sample every row; `on_sample` gets each one as soon as it is finished.

    The grid runs in chunks of `batch_size` rows (--batch-size, else the device's default). On
    out-of-memory the failing chunk is halved and retried, down to one row; rows already
    delivered are not generated again, so nothing is lost and nothing is written twice.
    `graph_safe` (the model is on CUDA with a kernel that survives graph capture) enables the
    CUDA-graph decode loop.
    """
    # The eager loop is transformers' `generate`: imported only for a grid that needs it, since
    # importing transformers costs a CPU start close to a second.
    from .chunked import eager

    fast = settings.fast_path and graph_safe
    generate_chunk = graphed.generate_chunk if fast else eager.generate_chunk
    delivered: set[int] = set()

    def deliver(index: int, sample: Sample) -> None:
        if index not in delivered:
            delivered.add(index)
            on_sample(sample)

    if not rows:
        return
    size = batch_size(settings.max_batch, model.device.type)
    # Chunks of similar prompts and one max_new_tokens: little padding, and identical prompts
    # share one prefill.
    order = sorted(range(len(rows)), key=lambda i: (rows[i].limit(settings), len(rows[i].prompt_ids),
                                                    rows[i].prompt_ids))
    pending = []
    for limit in dict.fromkeys(rows[i].limit(settings) for i in order):
        same = [i for i in order if rows[i].limit(settings) == limit]
        pending += [same[i:i + size] for i in range(0, len(same), size)]
    while pending:
        chunk = [i for i in pending.pop(0) if i not in delivered]
        if not chunk:
            continue
        limited = replace(settings, max_new_tokens=rows[chunk[0]].limit(settings))
        try:
            generate_chunk(model, rows, chunk, limited, eos_ids, pad_id, deliver, on_step)
        except Exception as e:
            if not is_out_of_memory(e) or len(chunk) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(chunk) // 2
            on_split(len(chunk), half)
            pending[:0] = [chunk[:half], chunk[half:]]


def engine_config(model: LoadedModel, settings: Settings, expect_more: bool = False) -> EngineConfig:
    """The engine's config for these settings: CUDA graphs where the kernel survives capture."""
    graphs = settings.fast_path and graphed.graph_safe(model.model, model.gptq_kernel)
    return EngineConfig(max_slots=settings.max_batch, graphs=graphs, expect_more=expect_more,
                        dense_weights=settings.dense_weights)


def engine_for(model: LoadedModel, settings: Settings, expect_more: bool = False,
               on_split: Callable[[int, int], None] = lambda _a, _b: None,
               on_dense: Callable[[int], None] = lambda _bytes: None) -> Engine | None:
    """A decode engine over the loaded model, or None when its decoder cannot run this
    architecture. on_split, on_dense: see Engine."""
    if not supports(model.model):
        return None
    return Engine(model, engine_config(model, settings, expect_more), on_split=on_split, on_dense=on_dense)


def refuse_rules_without_engine(model: LoadedModel, settings: Settings, rows: Sequence[Row]) -> None:
    """The chunked loops apply no per-row logits rules and no answer formats: rows that ask for
    them are refused."""
    kind = getattr(model.model.config, "model_type", "?")
    if settings.rules.used or any(row.rules is not None and row.rules.used for row in rows):
        raise InputError(f"min_p, the penalties, logit_bias and DRY run in the decode engine, which does not run "
                         f"'{kind}' models", "drop those settings, or choose a Llama, Mistral or Qwen model")
    if settings.rules.answer_format or any(row.rules is not None and row.rules.answer_format for row in rows):
        raise InputError(f"answer formats (a JSON schema, --json, --regex, --grammar) run in the decode engine, which "
                         f"does not run '{kind}' models", "drop the format, or choose a Llama, Mistral or Qwen model")


def sample_rows(settings: Settings, model: LoadedModel, rows: Sequence[Row],
                on_sample: Callable[[Sample], None],
                on_step: Callable[[int], None] = lambda _: None,
                on_split: Callable[[int, int], None] = lambda _a, _b: None,
                on_dense: Callable[[int], None] = lambda _bytes: None) -> EngineStats | None:
    """Sample `rows` on a loaded model: the engine where its decoder runs the model (CUDA graphs
    where the GPTQ kernel survives capture), else the chunked loops. on_dense: see Engine.
    Returns what the engine did (None from the chunked loops)."""
    engine = engine_for(model, settings, on_split=on_split, on_dense=on_dense)
    if engine is not None:
        engine.submit(rows, settings, on_sample)
        engine.run(on_step)
        return engine.stats
    refuse_rules_without_engine(model, settings, rows)
    generate_grid(model.model, rows, settings, eos_ids=model.eos_ids, pad_id=model.pad_id,
                  on_sample=on_sample, on_step=on_step, on_split=on_split,
                  graph_safe=graphed.graph_safe(model.model, model.gptq_kernel))
    return None
