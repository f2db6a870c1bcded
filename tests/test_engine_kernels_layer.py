"""The fused Triton kernels of a CUDA decode step against what they replace.

layer_kernels.py (residual add + RMSNorm, rotary embedding, SiLU × up) against transformers'
modules; prefix_attention.py (the shared part read through each row's span) against the
matrix-product attention with a 0 / -inf bias; paged_attention_after (the own part starting from
the prefix part's state) against the two parts merged by their log-sum-exp.

The kernels run compiled on a GPU, and on the CPU through Triton's interpreter in a
subprocess (`TRITON_INTERPRET=1` must be set before triton is imported), as
test_engine_kernels_paged.py does.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_in_triton_interpreter
from personas.engine.decoder import Part, add_rms_norm_modules, matmul_part, merge, rotary_modules
from personas.engine.kernels.paged import PagedPart, paged_attention, paged_attention_after
from personas.engine.kernels.prefix import PrefixPart, prefix_attention


def check_norm_rotary_silu(device: str) -> None:
    """Rotary equals transformers' bit for bit (the same roundings); the norm and SiLU up to the
    float32 sum's order and the exponential's last bits, a half-precision step at most."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    from personas.engine.kernels import layer as layer_kernels
    from transformers import LlamaConfig

    generator = torch.Generator().manual_seed(0)
    for width, heads, kv_heads, head_dim, queries in ((96, 6, 2, 16, 1), (200, 5, 5, 40, 3)):
        rows = 5
        norm = LlamaRMSNorm(width, eps=1e-5)
        norm.weight.data = torch.rand(width, generator=generator) + 0.5
        norm = norm.half().to(device)
        hidden = (torch.randn(rows, queries, width, generator=generator) * 3).half().to(device)
        delta = torch.randn(rows, queries, width, generator=generator).half().to(device)
        want_hidden, want = add_rms_norm_modules(hidden.clone(), delta, norm)
        got_hidden, got = layer_kernels.add_rms_norm(hidden.clone(), delta, norm)
        assert torch.equal(got_hidden, want_hidden)
        assert torch.allclose(got.float(), want.float(), rtol=2e-3, atol=2e-3), (got - want).abs().max()
        _, first = layer_kernels.add_rms_norm(hidden.clone(), None, norm)  # the first layer: no residual yet
        assert torch.allclose(first.float(), norm(hidden).float(), rtol=2e-3, atol=2e-3)

        # q and k as the fused q/k/v product hands them out: strided column views.
        qkv = torch.randn(rows, queries, (heads + 2 * kv_heads) * head_dim, generator=generator).half().to(device)
        q = qkv[..., :heads * head_dim].view(rows, queries, heads, head_dim)
        k = qkv[..., heads * head_dim:(heads + kv_heads) * head_dim].view(rows, queries, kv_heads, head_dim)
        config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=512)
        positions = torch.randint(0, 500, (rows, queries), generator=generator).to(device)
        cos, sin = LlamaRotaryEmbedding(config).to(device)(hidden, positions)
        want_q, want_k = rotary_modules(q, k, cos, sin)
        got_q, got_k = layer_kernels.rotary(q, k, cos, sin)
        assert got_q.shape == want_q.shape and got_k.shape == want_k.shape and got_q.is_contiguous()
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)

        gate_up = torch.randn(rows, queries, 2 * width, generator=generator).half().to(device) * 4
        gate, up = gate_up[..., :width], gate_up[..., width:]
        want = torch.nn.functional.silu(gate) * up
        got = layer_kernels.silu_mul(gate, up)
        assert torch.allclose(got.float(), want.float(), rtol=2e-3, atol=2e-3), (got - want).abs().max()


def prefix_case(device: str, rows: int, kv_heads: int, group: int, head_dim: int, seed: int = 0, idle_tail: int = 0):
    """A pool of three prefixes (one longer than a 64-position block), rows spread over them and
    over no prefix at all, in an order that mixes them within a tile; the last `idle_tail` rows
    are idle slots (no prefix, a start left over from an earlier row), a whole tile of them."""
    generator = torch.Generator().manual_seed(seed)
    capacity = 300
    keys = torch.randn(kv_heads, capacity, head_dim, generator=generator).half().to(device)
    values = torch.randn(kv_heads, capacity, head_dim, generator=generator).half().to(device)
    spans = [(0, 0), (3, 40), (43, 150), (200, 77)]
    chosen = [spans[(i * 7 + 1) % 4] for i in range(rows - idle_tail)] + [(250, 0)] * idle_tail
    starts = torch.tensor([s for s, _ in chosen], dtype=torch.int32, device=device)
    lengths = torch.tensor([n for _, n in chosen], dtype=torch.int32, device=device)
    bias = torch.full((rows, capacity), float("-inf"))
    for r, (s, n) in enumerate(chosen):
        bias[r, s:s + n] = 0.0
    q = (torch.randn(rows, kv_heads, group, head_dim, generator=generator) * 2).half().to(device)
    return q, PrefixPart(keys, values, starts, lengths), Part(keys.float(), values.float(), bias.to(device), shared=True)


def check_prefix_and_merge(device: str) -> None:
    from test_engine_kernels_paged import scattered_pool

    for rows, kv_heads, group, head_dim, idle in ((7, 2, 3, 16, 0), (40, 3, 1, 64, 0), (5, 1, 2, 24, 0),
                                                  (24, 2, 1, 16, 8)):
        q, part, dense = prefix_case(device, rows, kv_heads, group, head_dim, idle_tail=idle)
        lse, out = prefix_attention(q, part, head_dim ** -0.5)
        want_lse, want_out = matmul_part(q.float(), dense, head_dim ** -0.5, 1)
        sees = part.lengths > 0
        assert torch.equal(torch.isinf(lse[~sees]), torch.ones_like(lse[~sees], dtype=torch.bool))
        assert torch.all(out[~sees] == 0)
        assert torch.allclose(lse[sees], want_lse[sees], atol=1e-4), (lse[sees] - want_lse[sees]).abs().max()
        assert torch.allclose(out[sees], want_out[sees], atol=2e-3), (out[sees] - want_out[sees]).abs().max()

        # The own part continuing from the prefix part's state equals the two merged.
        keys, values, table = scattered_pool(rows, kv_heads, head_dim, 12, device)
        lengths = torch.arange(rows, device=device) * 13 % 90 + 1
        own = PagedPart(keys, values, table, lengths)
        merged = paged_attention_after(q, own, head_dim ** -0.5, (lse, out))
        want = merge([paged_attention(q, own, head_dim ** -0.5), (lse, out)])
        assert merged.dtype == q.dtype
        assert torch.allclose(merged.float(), want, atol=2e-3), (merged.float() - want).abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the compiled kernels are tested instead")
def test_norm_rotary_and_silu_kernels_in_tritons_interpreter():
    run_in_triton_interpreter("test_engine_kernels_layer", "check_norm_rotary_silu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the compiled kernels are tested instead")
def test_prefix_kernel_and_merged_own_part_in_tritons_interpreter():
    """(The device's triton 3.6 interpreter stops on loops over loaded bounds; there the compiled
    kernels are what is tested.)"""
    run_in_triton_interpreter("test_engine_kernels_layer", "check_prefix_and_merge")


@pytest.mark.gpu
def test_norm_rotary_and_silu_kernels_on_cuda():
    check_norm_rotary_silu("cuda")


@pytest.mark.gpu
def test_prefix_kernel_and_merged_own_part_on_cuda():
    check_prefix_and_merge("cuda")
