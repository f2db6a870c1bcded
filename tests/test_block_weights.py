"""A GGUF file's own blocks on the CPU (model/block_weights.py, block_kernel.c).

Blocks are recovered exactly from weights that gguf-py's own Q4_0, Q4_1 and Q8_0 quantization
made, and from nothing else; the kernel's product against the float64 product of those weights;
a row's product whatever shares its batch; a converted GGUF file's copy carrying the blocks of
every quantized layer, Llama's permuted q/k included; the engine's greedy text against
`generate` on the very same block layers; and the fallback to float16 where the kernel cannot be
built, in one status line.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import assert_same_greedy_text, block_kernel_runs, greedy_with_margins, run_cli

from personas.model import block_kernel
from personas.model.block_weights import BlockLinear, PackedBlocks, find_blocks, read_blocks, save_blocks, symmetric
from personas.model.choice import resolve_model
from personas.model.load import load_model


needs_kernel = pytest.mark.skipif(not block_kernel_runs(), reason="the block kernel needs AVX-512 VNNI and a C compiler")


def gguf_round_trip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """The float32 weights a GGUF file of this type gives back (gguf-py quantizes and dequantizes)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType[qtype]
    return torch.from_numpy(dequantize(quantize(weight.numpy(), kind), kind).astype(np.float32))


@pytest.mark.parametrize("qtype, bits", [("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8)])
def test_blocks_give_back_every_weight_of_a_quantized_tensor(qtype, bits):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=generator) * torch.logspace(-3, 1, 96)[:, None]
    weight[5] = 0  # a block of zeros, and one block of a single value
    weight[6, :32] = 0.25
    quantized = gguf_round_trip(weight, qtype)
    blocks = find_blocks(quantized)
    assert blocks is not None and blocks.bits == bits
    assert torch.equal(blocks.dequantized(), quantized)
    assert int(blocks.integers.max()) <= (15 if bits == 4 else 255)


def test_float_weights_and_other_types_have_no_blocks():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 128, generator=generator)
    assert find_blocks(weight) is None
    assert find_blocks(gguf_round_trip(weight, "Q5_0")) is None, "32 levels: neither 4- nor 8-bit blocks"
    assert find_blocks(torch.randn(64, 100)) is None, "inputs not a multiple of 32"


@needs_kernel
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_the_kernels_product_is_within_the_rows_two_int8_planes_of_the_exact_one(qtype):
    generator = torch.Generator().manual_seed(2)
    weight = gguf_round_trip(torch.randn(150, 576, generator=generator) * 0.05, qtype)
    bias = torch.randn(150, generator=generator)
    layer = BlockLinear(PackedBlocks.of(find_blocks(weight)), bias)  # 150 outputs: the kernel's last group of 16 partly empty
    x = torch.randn(5, 3, 576, generator=generator) * torch.logspace(-2, 2, 576)  # a row's blocks of many scales
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 150)
    exact = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    # Each row value is within max|block| / 65024 of its own; the product's error is bounded by
    # those errors times the weights' magnitudes.
    blocks = x.double().reshape(15, -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(15, 576)
    bound = (blocks / 65024) @ weight.double().abs().T + 1e-5 * exact.abs().reshape(15, 150)
    assert ((got.double() - exact).abs().reshape(15, 150) <= bound).all()
    assert (got.double() - exact).abs().max() > 0, "rows are kept to 16 bits, not exactly"


@needs_kernel
@pytest.mark.parametrize("qtype, kept", [("Q4_0", False), ("Q8_0", False), ("Q4_1", True)])
def test_symmetric_blocks_keep_no_offsets_and_give_the_same_products(qtype, kept):
    # Q4_0 and Q8_0 weights are d(u - 8) and d(u - 128): found in that form (a Q4_0 block that
    # Q4_1's form also gives back included), their offsets are derived in the kernel, not read.
    generator = torch.Generator().manual_seed(5)
    weight = gguf_round_trip(torch.randn(160, 256, generator=generator) * torch.logspace(-3, 1, 160)[:, None], qtype)
    packed = PackedBlocks.of(find_blocks(weight))
    layer = BlockLinear(packed, None)
    assert symmetric(packed) == (not kept) and (layer.offset is not None) == kept
    assert layer.stored_bytes() == sum(t.numel() * t.element_size() for t in (packed.packed, packed.scale)) \
        + kept * packed.offset.numel() * 2
    x = torch.randn(9, 256, generator=generator)
    read = block_kernel.product(packed.packed, packed.scale, packed.offset, packed.bits, layer.computed, None)(x)
    assert torch.equal(layer(x), read[:, :160])


@needs_kernel
def test_a_rows_product_does_not_depend_on_its_batch():
    generator = torch.Generator().manual_seed(3)
    layer = BlockLinear(PackedBlocks.of(find_blocks(gguf_round_trip(torch.randn(256, 320, generator=generator), "Q4_1"))),
                        torch.randn(256, generator=generator))
    row = torch.randn(1, 320, generator=generator)
    alone = layer(row)
    for rows in (2, 5, 8, 9, 16, 64, 130):
        batch = torch.randn(rows, 320, generator=generator) * 10  # other rows of other scales
        batch[rows // 2] = row[0]
        assert torch.equal(layer(batch)[rows // 2], alone[0]), rows


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_the_kernels_layout_gives_back_its_blocks_and_joins_layers(qtype):
    generator = torch.Generator().manual_seed(4)

    def blocks(outputs: int):
        return find_blocks(gguf_round_trip(torch.randn(outputs, 96, generator=generator), qtype))

    def same(a, b) -> bool:
        return a.bits == b.bits and all(torch.equal(x, y) for x, y in zip((a.integers, a.scale, a.offset),
                                                                            (b.integers, b.scale, b.offset)))

    odd, whole, last = blocks(150), blocks(160), blocks(40)
    assert same(PackedBlocks.of(odd).unpacked(), odd)
    for first in (odd, whole):  # 150 outputs end mid-group: repacked; 160 fill whole groups: joined
        joined = PackedBlocks.concatenated([PackedBlocks.of(first), PackedBlocks.of(last)])
        expected = PackedBlocks.of(type(first)(first.bits, *(torch.cat(pair) for pair in zip(
            (first.integers, first.scale, first.offset), (last.integers, last.scale, last.offset)))))
        assert joined.outputs == first.integers.shape[0] + 40
        assert torch.equal(joined.packed, expected.packed) and torch.equal(joined.scale, expected.scale)
        assert torch.equal(joined.offset, expected.offset)


def quantize_linear_layers(model, qtypes: dict[str, str]) -> None:
    """Every linear layer's weights replaced by what a GGUF file of the given type gives back."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                qtype = next(q for suffix, q in qtypes.items() if name.endswith(suffix))
                module.weight.copy_(gguf_round_trip(module.weight.detach().clone(), qtype))


@pytest.fixture(scope="module")
def quantized_family(tmp_path_factory):
    """A tiny Llama 3 whose layers are Q4_1, Q4_0 (down) and Q8_0 (head), saved as a GGUF file's
    converted copy is: float32 weights and the blocks beside them."""
    from test_engine_families import tiny_family
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("blocks-llama3")
    tiny_family("llama3", directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    quantize_linear_layers(model, {"down_proj": "Q4_0", "lm_head": "Q8_0", "": "Q4_1"})
    model.save_pretrained(directory)
    assert save_blocks(model, directory) == 2 * 7 + 1
    return directory


@needs_kernel
def test_the_engines_greedy_text_equals_generate_on_the_same_block_layers(quantized_family):
    from test_engine_families import rows, run

    loaded = load_model(resolve_model(str(quantized_family)), device="cpu")
    assert loaded.block_weights == 2 * 4 + 1 and loaded.half_weights == 0  # q/k/v and gate/up fused
    assert isinstance(loaded.model.lm_head, BlockLinear)
    greedy = rows(loaded, 0.0)
    together = run(loaded, greedy)
    for row in greedy:
        # The engine's C layers sum in another order than the modules generate runs: equal up to
        # near-ties (conftest.NEAR_TIE).
        expected, logits = greedy_with_margins(loaded.model, row.prompt_ids, 48, loaded.eos_ids, loaded.pad_id)
        assert_same_greedy_text(together[row.id], expected, logits, loaded.eos_ids, f"row {row.id} among all")
        assert_same_greedy_text(run(loaded, [row])[row.id], expected, logits, loaded.eos_ids, f"row {row.id} alone")
    # The plain modules the CLI builds run the same layers: the same tokens, sampled ones too.
    plain = load_model(resolve_model(str(quantized_family)), device="cpu", engine_only=True)
    assert plain.block_weights == loaded.block_weights
    assert run(plain, greedy) == together
    sampled = rows(plain, 1.0)
    assert run(plain, sampled, 24) == run(loaded, sampled, 24)


@needs_kernel
def test_the_layers_that_multiply_blocks_are_loaded_without_float32_weights(quantized_family):
    plain = load_model(resolve_model(str(quantized_family)), device="cpu", engine_only=True)
    model = plain.model
    assert not any(p.is_meta for p in model.parameters())
    config = model.config
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    # What float32 weights remain: the embedding and the norms; every projection and the head are blocks.
    assert sum(p.numel() for p in model.parameters()) == config.vocab_size * config.hidden_size + norms


def test_blocks_of_another_format_are_refused_with_the_reason(quantized_family, tmp_path):
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "older"
    shutil.copytree(quantized_family, copy)
    save_file({"x.integers": torch.zeros(16, 16, dtype=torch.uint8)}, str(copy / "blocks.safetensors"),
              metadata={"format": "personas-blocks-1", "x.bits": "4"})
    with pytest.raises(Exception, match="format 'personas-blocks-1', where this version reads 'personas-blocks-2'"):
        read_blocks(copy)


@needs_kernel
def test_float16_and_float32_on_request_leave_the_blocks_unused(quantized_family):
    half = load_model(resolve_model(str(quantized_family)), device="cpu", cpu_weights="float16")
    assert half.block_weights == 0 and half.half_weights == 2 * 4 + 1
    full = load_model(resolve_model(str(quantized_family)), device="cpu", cpu_weights="float32")
    assert full.block_weights == full.half_weights == 0


def test_a_converted_gguf_copy_carries_the_blocks_of_its_layers(tmp_path, cache_dir):
    """transformers reorders the rows of Llama's q and k when it reads a GGUF file; the blocks are
    found after that, so they match the copy's weights row for row."""
    from test_gguf_cache import write_tiny_gguf

    from personas.model.gguf_cache import gguf_checkpoint
    from safetensors.torch import load_file

    gguf = write_tiny_gguf(tmp_path / "tiny-blocks.Q4_0.gguf")
    folder, _ = gguf_checkpoint(gguf)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    blocks = read_blocks(folder)
    linear = {key[:-len(".weight")] for key in weights if key.endswith("proj.weight")}
    assert linear <= set(blocks) and len(linear) == 2 * 7
    for name in linear:
        assert torch.equal(blocks[name].dequantized(), weights[f"{name}.weight"]), name


def test_where_the_kernel_cannot_be_built_the_weights_are_float16_and_it_says_why(quantized_family, tmp_path):
    """A machine without a C compiler: one status line, then the float16 products."""
    result = run_cli(["generate", "customer", "--model", str(quantized_family), "-t", "0", "-n", "1",
                      "--max-new-tokens", "4", "--format", "jsonl"], tmp_path / "fresh-cache", CC="/nonexistent/cc")
    assert result.returncode == 0, result.stderr
    if not block_kernel_runs():
        assert "float16 weights" in result.stderr
        return
    assert "GGUF blocks cannot run here (the C compiler /nonexistent/cc could not run" in result.stderr, result.stderr
    assert "float16 weights" in result.stderr and "GGUF blocks for" not in result.stderr
    assert not list((tmp_path / "fresh-cache").glob("kernels/*.so")), "nothing half-built is left"


def test_a_damaged_blocks_file_leaves_float16_weights_and_says_so(quantized_family, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(quantized_family, copy)
    blocks = copy / "blocks.safetensors"
    blocks.write_bytes(blocks.read_bytes()[:1000])
    loaded = load_model(resolve_model(str(copy)), device="cpu")
    assert loaded.block_weights == 0 and loaded.half_weights == 2 * 4 + 1
    assert "blocks.safetensors cannot be read" in loaded.blocks_unused
    assert "converted copy in the cache, deleting it" in loaded.blocks_unused
