"""Dense copies of GPTQ weights (model/dense_gptq.py): read back exactly as the kernel
dequantizes them, used only for products of many rows, and the same texts from the engine.
A real checkpoint quantized by optimum + gptqmodel (conftest's tiny_gptq_dir) on the CPU; Marlin
on a GPU."""

from __future__ import annotations

import pytest
import torch

from personas.model.choice import resolve_model
from personas.model.dense_gptq import (DENSE_MIN_ROWS, DenseWhenMany, dense_bytes, dense_weight, drop_dense,
                                       has_dense, make_dense)
from personas.model.gptq import is_quantized
from personas.model.load import load_model
from personas.engine.engine import Engine, EngineConfig
from personas.sampling.grid import Row, Settings


def load(directory, device="cpu", backend="torch"):
    return load_model(resolve_model(str(directory)), device=device, gptq_backend=backend)


def quantized(model):
    return [m for m in model.modules() if is_quantized(m)]


def rows_for(loaded, count):
    """`count` rows over a few prompts, greedy and sampled, each with its own seed."""
    rows = []
    for k, ask in enumerate(["Hello there, how are you today?", "Recall a day out with your bike.",
                             "What do you think of the sea?"]):
        ids = tuple(loaded.tokenizer.encode(f"You are a pirate captain. {ask}"))
        rows += [Row("pirate", ask, t, s, 1000 * k + s, ids, id=k) for t in (0.0, 1.0)
                 for s in range(1, count // 6 + 2)]
    return rows[:count]


def texts(loaded, rows, dense, max_new=12):
    got = {}
    engine = Engine(loaded, EngineConfig(dense_weights=dense))
    engine.submit(rows, Settings(max_new_tokens=max_new), lambda s: got.__setitem__(s.row, s.token_ids))
    with torch.inference_mode():
        engine.run()
    return got, engine


@pytest.fixture()
def model(tiny_gptq_dir):
    return load(tiny_gptq_dir)


def test_the_copy_is_the_kernels_own_dequantized_weight(model):
    layers = quantized(model.model)
    assert layers, "the fixture is a GPTQ checkpoint"
    for layer in layers:
        want = layer.dequantize_weight().to(model.model.dtype)  # gptqmodel's own unpacking
        assert torch.equal(dense_weight(layer, model.model.dtype), want)


def test_products_of_many_rows_use_the_copy_and_few_rows_the_kernel(model):
    size = 4  # float32 on the CPU
    expected = sum(size * q.in_features * q.out_features for q in quantized(model.model))
    assert dense_bytes(model.model) == expected
    made = make_dense(model.model)
    assert made == expected == size * sum(m.dense.numel() for m in model.model.modules() if isinstance(m, DenseWhenMany))
    assert made > 0 and dense_bytes(model.model) == 0 and has_dense(model.model)
    wrapper = next(m for m in model.model.modules() if isinstance(m, DenseWhenMany))
    calls = []
    hook = wrapper.quantized.register_forward_hook(lambda *_: calls.append(1))
    try:
        few = torch.randn(DENSE_MIN_ROWS - 1, wrapper.in_features)
        many = torch.randn(2, DENSE_MIN_ROWS // 2, wrapper.in_features)  # rows counted over leading dims
        out_few = wrapper(few)
        assert len(calls) == 1
        out_many = wrapper(many)
        assert len(calls) == 1  # the copy, not the kernel
    finally:
        hook.remove()
    assert torch.allclose(out_few, wrapper.quantized(few), atol=1e-5)
    assert out_many.shape == (2, DENSE_MIN_ROWS // 2, wrapper.out_features)
    assert torch.allclose(out_many, wrapper.quantized(many), atol=1e-5)
    drop_dense(model.model)
    assert not has_dense(model.model) and dense_bytes(model.model) == made


def test_the_engine_samples_the_same_texts_with_and_without_copies(model, monkeypatch):
    """300 rows: the steps of 256 rows go through the copies, the rest through the kernel."""
    rows = rows_for(model, 300)
    plain, _ = texts(model, rows, dense=False)
    assert not has_dense(model.model)
    big_products = []
    original = DenseWhenMany.forward

    def counting(self, x):
        big_products.append(x.numel() >= DENSE_MIN_ROWS * self.in_features)
        return original(self, x)

    monkeypatch.setattr(DenseWhenMany, "forward", counting)
    with_copies, engine = texts(model, rows, dense=True)
    assert has_dense(model.model) and any(big_products) and not all(big_products)
    assert len(plain) == len(rows) and with_copies == plain
    # Refused later: the copies go, and the memory with them.
    texts(model, rows[:4], dense=False)
    assert not has_dense(model.model)


def test_out_of_memory_drops_the_copies_before_any_slot(model, monkeypatch):
    """The CPU cannot run out of memory for real (the GPU test of the back-off is in
    test_engine.py): the first product through the copies raises it here. The engine drops
    the copies, keeps its slots, and loses nothing."""
    rows = rows_for(model, 300)
    plain, _ = texts(model, rows, dense=False)
    original, raised = DenseWhenMany.forward, []

    def out_of_memory_once(self, x):
        if not raised and x.numel() >= DENSE_MIN_ROWS * self.in_features:
            raised.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
        return original(self, x)

    monkeypatch.setattr(DenseWhenMany, "forward", out_of_memory_once)
    splits, told = [], []
    got = {}
    expected = dense_bytes(model.model)
    engine = Engine(model, EngineConfig(dense_weights=True), on_split=lambda old, new: splits.append((old, new)),
                    on_dense=told.append)
    engine.submit(rows, Settings(max_new_tokens=12), lambda s: got.__setitem__(s.row, s.token_ids))
    with torch.inference_mode():
        engine.run()
    assert raised and not splits and not has_dense(model.model) and not engine.dense_made
    assert told == [expected, 0]  # made, then dropped
    assert got == plain


def test_by_default_the_cpu_makes_no_copies(model):
    _, engine = texts(model, rows_for(model, 8), dense=None)
    assert not has_dense(model.model) and not engine.dense_made


def test_a_model_that_is_not_gptq_has_nothing_to_copy(tiny_llama_dir):
    plain = load_model(resolve_model(str(tiny_llama_dir)), device="cpu")
    assert dense_bytes(plain.model) == 0 and make_dense(plain.model) == 0 and not has_dense(plain.model)


@pytest.mark.gpu
def test_marlin_copies_and_the_automatic_choice_on_the_gpu(tiny_gptq_dir):
    """On the card with Marlin: the copy gives Marlin's products (fp16, another summation order),
    the engine makes the copies by default for 300 rows (memory allows) and not for 24, and
    greedy texts match Marlin's."""
    loaded = load(tiny_gptq_dir, device="cuda", backend="marlin")
    assert "Marlin" in (loaded.gptq_kernel or "")
    for layer in quantized(loaded.model):
        x = torch.randn(DENSE_MIN_ROWS, layer.in_features, device="cuda", dtype=torch.float16)
        assert torch.allclose(x @ dense_weight(layer, torch.float16), layer(x), atol=2e-2, rtol=1e-2)
    greedy = [r for r in rows_for(loaded, 600) if r.temperature == 0.0][:300]
    few, engine = texts(loaded, greedy[:24], dense=None, max_new=16)
    assert not has_dense(loaded.model) and not engine.dense_made
    many, engine = texts(loaded, greedy, dense=None, max_new=16)
    assert has_dense(loaded.model) and engine.dense_made
    plain, _ = texts(loaded, greedy, dense=False, max_new=16)
    assert not has_dense(loaded.model)
    same = sum(many[r] == plain[r] for r in greedy)
    assert same >= 0.9 * len(greedy), f"{same} of {len(greedy)} greedy texts equal"


def test_the_cli_flag_gives_the_same_samples(tiny_gptq_dir, cache_dir, tmp_path):
    """`generate --gptq-dense` (the copies asked for) and `--no-gptq-dense` on a prompts file of
    300 rows: the same JSONL rows, texts and seeds, as the real CLI writes them."""
    from conftest import REPO, run_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about day {i} at sea.\n" for i in range(50)))
    outputs = []
    for flag in ("--gptq-dense", "--no-gptq-dense"):
        result = run_cli(["generate", "a", "--file", str(REPO / "tests" / "data" / "two.toml"), "--model",
                          str(tiny_gptq_dir), "--prompts-file", str(prompts), "-t", "0", "-t", "1.0", "-n", "3",
                          "--max-new-tokens", "8", "--seed", "5", "--gptq-backend", "torch", flag], cache_dir)
        assert result.returncode == 0, result.stderr
        assert ("copies of the GPTQ weights" in result.stderr) == (flag == "--gptq-dense"), result.stderr
        outputs.append(sorted(result.stdout.splitlines()))
    assert len(outputs[0]) == 300 and outputs[0] == outputs[1]
