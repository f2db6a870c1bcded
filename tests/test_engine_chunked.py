"""The chunked decode loops (engine/chunked/, for architectures the engine does not run): the
static-cache loop against transformers' plain generate, and the out-of-memory back-off.

On the CPU the static loop runs eagerly, so CI checks its logic — padding, positions, the mask,
min_new_tokens, end-of-turn handling, per-row seeds — token for token against the plain path.
On a CUDA machine the same checks run with the step captured as a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from conftest import six_rows

from personas.model.choice import resolve_model
from personas.model.load import load_model
from personas.engine.chunked.graphed import graph_safe
from personas.generate.request import Request, plan
from personas.library.schema import Example, Persona
from personas.sampling.grid import Settings
from personas.engine.loop import generate_grid

PERSONAS = [
    Persona(name="a", system="You are a pirate.", prompt="Hello there",
            examples=[Example(user="How are you?", assistant="I am fine.")]),
    Persona(name="b", prompt="Tell me about the quick brown fox and the lazy dog"),
]
SETTINGS = [
    Settings(max_new_tokens=20),
    Settings(max_new_tokens=20, min_new_tokens=6, top_k=5),
    Settings(max_new_tokens=40, top_p=0.9),  # longer than CHECK_EVERY: rows are read back mid-run
]
def both_paths(model, settings: Settings) -> tuple[dict, dict]:
    request = Request(personas=PERSONAS, temperatures=[0, 0.8, 1.5], n=2, seed=3, settings=settings)
    rows = plan(request, model)
    results = []
    for graphed in (False, True):
        got: dict = {}
        generate_grid(model.model, rows, settings, eos_ids=model.eos_ids, pad_id=model.pad_id,
                      on_sample=lambda s: got.__setitem__((s.row.persona, s.row.temperature, s.row.sample),
                                                          (s.token_ids, s.finish_reason)),
                      graph_safe=graphed)
        assert len(got) == len(rows), "every row delivered exactly once"
        results.append(got)
    return results[0], results[1]


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "min-new-top-k", "long-top-p"])
def test_static_loop_equals_plain_generate_on_cpu(tiny, settings):
    plain, fast = both_paths(tiny, settings)
    assert fast == plain
    if settings.min_new_tokens:
        assert all(len(tokens) >= settings.min_new_tokens for tokens, _ in fast.values())
    assert any(reason == "stop" for _, reason in fast.values()) or all(
        len(tokens) == settings.max_new_tokens for tokens, _ in fast.values())


def test_fast_path_is_only_chosen_where_it_is_safe(tiny):
    assert not graph_safe(tiny.model, None), "CPU keeps transformers' generate"

    class OnCuda:
        device = torch.device("cuda")

    assert graph_safe(OnCuda(), "MarlinLinear") and graph_safe(OnCuda(), None)
    assert not graph_safe(OnCuda(), "ExllamaV2Linear"), "wrong tokens under graph capture (measured)"
    assert not graph_safe(OnCuda(), "SomeNewKernel"), "unknown kernels take the plain path"


@pytest.mark.gpu
@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "min-new-top-k", "long-top-p"])
def test_cuda_graph_equals_plain_generate(tiny_llama_dir, settings):
    model = load_model(resolve_model(str(tiny_llama_dir)), device="cuda")
    plain, fast = both_paths(model, settings)
    assert fast == plain


@pytest.mark.gpu
def test_cuda_graph_gptq_greedy_equals_plain(tiny_gptq_dir):
    model = load_model(resolve_model(str(tiny_gptq_dir)), device="cuda", gptq_backend="torch")
    plain, fast = both_paths(model, Settings(max_new_tokens=24))
    greedy = [k for k in plain if k[1] == 0]
    assert [fast[k] for k in greedy] == [plain[k] for k in greedy]


@pytest.mark.gpu
def test_the_default_kernel_on_cuda_is_graph_safe(tiny_gptq_dir):
    model = load_model(resolve_model(str(tiny_gptq_dir)), device="cuda")  # --gptq-backend auto
    assert model.gptq_kernel == "MarlinLinear" and graph_safe(model.model, model.gptq_kernel)


def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_llama_dir):
    model, request, rows = six_rows(tiny_llama_dir)

    def collect(**kwargs):
        got = {}
        generate_grid(model.model, rows, request.settings, eos_ids=model.eos_ids, pad_id=model.pad_id,
                      on_sample=lambda s: got.__setitem__((s.row.temperature, s.row.sample), s.token_ids), **kwargs)
        return got

    expected = collect()

    def fail_big_batches(_module, args, kwargs):  # an allocation failure injected above 2 rows
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    splits = []
    handle = model.model.register_forward_pre_hook(fail_big_batches, with_kwargs=True)
    try:
        got = collect(on_split=lambda size, half: splits.append((size, half)))
    finally:
        handle.remove()
    assert splits[0] == (6, 3) and (3, 1) in splits
    assert got == expected
