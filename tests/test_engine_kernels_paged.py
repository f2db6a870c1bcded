"""The paged decode attention (sampling/paged_attention.py): each row read through its page table
as far as its own length, equal to dense attention over the same positions.

The Triton kernel runs compiled on a GPU, and on the CPU through Triton's interpreter
(`TRITON_INTERPRET=1`, in a subprocess: the variable must be set before triton is imported).
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_in_triton_interpreter
from personas.engine.decoder import Part, matmul_part
from personas.engine.kernels.paged import PAGE, PagedPart, flat_positions, gather_positions, paged_attention

def scattered_pool(rows: int, kv_heads: int, head_dim: int, width: int, device: str, seed: int = 0):
    """A pool of pages in random order per row (as rows freed and took them), and the tables."""
    generator = torch.Generator().manual_seed(seed)
    pages = 1 + rows * width
    keys = torch.randn(pages, PAGE, kv_heads, head_dim, generator=generator).half().to(device)
    values = torch.randn(pages, PAGE, kv_heads, head_dim, generator=generator).half().to(device)
    order = torch.randperm(pages - 1, generator=generator) + 1
    table = order.view(rows, width).int().to(device)
    return keys, values, table


def dense_reference(q, keys, values, table, lengths, scale):
    span = int(lengths.max())
    bias = torch.zeros(len(lengths), span, device=q.device)
    bias = bias.masked_fill_(torch.arange(span, device=q.device)[None] >= lengths[:, None], float("-inf"))[:, None]
    part = Part(gather_positions(keys, table, span).float(), gather_positions(values, table, span).float(),
                bias, shared=False)
    return matmul_part(q.float(), part, scale, 1)


def check_against_dense(device: str) -> None:
    """Lengths of one position, a page and one past it, past a 64-position block; grouped query
    heads (3 per kv head, as SmolLM2) and one (Llama 2); a head size that is not a power of two."""
    for kv_heads, group, head_dim in ((2, 3, 16), (4, 1, 64), (1, 2, 24)):
        width = 20
        keys, values, table = scattered_pool(6, kv_heads, head_dim, width, device)
        lengths = torch.tensor([1, PAGE, PAGE + 1, 64, 65, width * PAGE], device=device)
        q = (torch.randn(6, kv_heads, group, head_dim) * 2).half().to(device)
        lse, out = paged_attention(q, PagedPart(keys, values, table, lengths), head_dim ** -0.5)
        want_lse, want_out = dense_reference(q, keys, values, table, lengths, head_dim ** -0.5)
        assert lse.shape == want_lse.shape and out.shape == want_out.shape
        assert torch.allclose(lse, want_lse, atol=1e-4), (lse - want_lse).abs().max()
        # The kernel's weights go through half precision before the product, as matmul_part's do.
        assert torch.allclose(out, want_out, atol=2e-3), (out - want_out).abs().max()


def test_flat_positions_follow_each_rows_table():
    table = torch.tensor([[5, 2, 9], [1, 3, 4]], dtype=torch.int32)
    positions = torch.tensor([[0, PAGE - 1, PAGE, 2 * PAGE + 1], [1, PAGE + 2, 0, 0]])
    assert flat_positions(table, positions).tolist() == [
        [5 * PAGE, 5 * PAGE + PAGE - 1, 2 * PAGE, 9 * PAGE + 1], [PAGE + 1, 3 * PAGE + 2, PAGE, PAGE]]
    assert flat_positions(table, torch.tensor([PAGE + 3, 2 * PAGE])).tolist() == [2 * PAGE + 3, 4 * PAGE]
    pool = torch.arange(10 * PAGE).view(10, PAGE, 1, 1)
    dense = gather_positions(pool, table, 2 * PAGE)  # (rows, kv_heads, span, head_dim)
    assert dense[0, 0, :, 0].tolist() == list(range(5 * PAGE, 6 * PAGE)) + list(range(2 * PAGE, 3 * PAGE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the compiled kernel is tested instead")
def test_the_kernel_equals_dense_attention_in_tritons_interpreter():
    """CI has no GPU: Triton's interpreter runs the same kernel on the CPU (with the triton that
    CI's torch brings; the GPU machine's triton 3.6 interpreter stops on the loop over a loaded
    length with a TypeError, so there the compiled kernel is what is tested)."""
    run_in_triton_interpreter("test_engine_kernels_paged", "check_against_dense")


@pytest.mark.gpu
def test_the_kernel_equals_dense_attention_on_cuda():
    check_against_dense("cuda")


@pytest.mark.gpu
def test_one_captured_kernel_serves_every_length():
    """The lengths and tables are read on the device: a graph captured once, replayed after
    they change in place, gives what an eager call with the new values gives."""
    keys, values, table = scattered_pool(4, 2, 64, 12, "cuda")
    q = torch.randn(4, 2, 1, 64).half().cuda()
    lengths = torch.tensor([1, 9, 30, 70], device="cuda")
    part = PagedPart(keys, values, table, lengths)
    paged_attention(q, part, 0.125)  # compiles the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lse, out = paged_attention(q, part, 0.125)
    lengths.copy_(torch.tensor([96, 2, 31, 17], device="cuda"))
    table.copy_(table.flip(0))
    graph.replay()
    want_lse, want_out = paged_attention(q, PagedPart(keys, values, table.clone(), lengths.clone()), 0.125)
    assert torch.equal(lse, want_lse) and torch.equal(out, want_out)
