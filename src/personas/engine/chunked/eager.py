"""The eager decode loop: transformers' own `generate`, with our chooser as a logits processor.

transformers has no per-row temperature or per-row generator, so the choice is made in a
logits processor (`RowSampler`) that leaves only the chosen token finite; `generate` then runs
greedy and simply takes it. Since the decode engine (engine.py), this chunked path runs only
models whose architecture the engine's decoder does not cover, and serves as a baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ...sampling.chooser import TokenChooser
from ...sampling.grid import Row, Sample, Settings
from .prefill import padded, plan_sharing, shared_cache


class RowSampler(LogitsProcessor):
    """Chooses each row's next token (per-row temperature and seed) and reports finished rows."""

    def __init__(self, temperatures: torch.Tensor, seeds: torch.Tensor, prompt_length: int,
                 settings: Settings, eos_ids: Sequence[int],
                 on_finish: Callable[[int, list[int]], None], on_step: Callable[[int], None]):
        self.choose = TokenChooser(temperatures, seeds, settings)
        self.prompt_length = prompt_length
        self.eos_ids = torch.tensor(list(eos_ids), device=seeds.device)
        self.done = torch.zeros_like(self.choose.greedy)
        self.on_finish, self.on_step = on_finish, on_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        chosen = self.choose(input_ids, scores, step)

        finished = torch.isin(chosen, self.eos_ids) & ~self.done
        if finished.any():
            for i in finished.nonzero().flatten().tolist():
                self.on_finish(i, input_ids[i, self.prompt_length:].tolist())
            self.done |= finished
        self.on_step(step + 1)

        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, chosen[:, None], 0.0)


def generate_chunk(model: Any, rows: Sequence[Row], chunk: list[int], settings: Settings,
                    eos_ids: Sequence[int], pad_id: int,
                    deliver: Callable[[int, Sample], None], on_step: Callable[[int], None]) -> None:
    device = model.device
    sharing = plan_sharing(rows, chunk)
    input_ids, attention = padded(rows, chunk, pad_id, sharing.prefix)
    width = input_ids.shape[1]

    def finished(r: int, tokens: list[int]) -> None:
        deliver(chunk[r], Sample(rows[chunk[r]], tuple(tokens), "stop"))

    sampler = RowSampler(
        temperatures=torch.tensor([rows[i].temperature for i in chunk], dtype=torch.float32, device=device),
        seeds=torch.tensor([rows[i].seed for i in chunk], dtype=torch.long, device=device),
        prompt_length=width, settings=settings, eos_ids=eos_ids, on_finish=finished, on_step=on_step,
    )
    past = shared_cache(model, rows, chunk, sharing, input_ids, attention)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None,
        do_sample=False, num_beams=1, repetition_penalty=1.0,
        eos_token_id=list(eos_ids), pad_token_id=pad_id,
    )
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                cache=past, generation_config=config,
                                logits_processor=LogitsProcessorList([sampler]))
    # Rows that sampled an end-of-turn were delivered as they finished; the rest ran out of room.
    for r, i in enumerate(chunk):
        deliver(i, Sample(rows[i], tuple(output[r, width:].tolist()), "length"))
