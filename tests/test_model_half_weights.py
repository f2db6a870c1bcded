"""The CPU's float16 weights (model/half_weights.py) and the CPU decoder's shorter operations.

fbgemm's half-precision products against float32 products over the same rounded weights, a
row's product whatever shares its batch, fused q/k/v columns equal to the unfused layer's; the
loader's choice (float16 by default on the CPU where a model has no GGUF blocks, float32 on
request); the decoder's one-call RMSNorm and sign-folded rotary against transformers' modules,
bit for bit. The engine's greedy
text against `generate` on such a model is tested in test_engine.py (the `tiny` model is
loaded this way) and on the embedded model below.
"""

from __future__ import annotations

import pytest
import torch

from personas.engine.decoder import add_rms_norm_cpu, add_rms_norm_modules, rotary_cpu, rotary_modules, signed_sin
from personas.model.half_weights import HalfWeightLinear, half_weights_available
from personas.model.projections import FusedProjection, ProjectionSlice

needs_fbgemm = pytest.mark.skipif(not half_weights_available(), reason="fbgemm's kernels are x86's")


@needs_fbgemm
def test_a_half_weight_product_is_the_float32_product_of_the_rounded_weights():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(300, 200, generator=generator) * 0.05, torch.randn(300, generator=generator)
    layer = HalfWeightLinear(weight, bias)
    x = torch.randn(7, 3, 200, generator=generator)
    rounded = torch.nn.functional.linear(x.double(), weight.half().double(), bias.double())
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (7, 3, 300)
    # float32 accumulation over 200 terms: the rows themselves are never rounded to half precision.
    assert torch.allclose(got.double(), rounded, rtol=0, atol=1e-5), (got.double() - rounded).abs().max()
    exact = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    assert (got.double() - exact).abs().max() > 1e-6  # the weights were rounded: not the float32 model


@needs_fbgemm
def test_rounding_before_packing_gives_fbgemms_own_values():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 96, generator=generator) * torch.logspace(-9, 5, 96)  # subnormals to saturation
    x = torch.randn(3, 96, generator=generator)
    own = torch.ops.quantized.linear_dynamic_fp16(x, torch.ops.quantized.linear_prepack_fp16(weight, None))
    assert torch.equal(HalfWeightLinear(weight, None)(x), own)


@needs_fbgemm
def test_a_rows_half_weight_product_does_not_depend_on_its_batch():
    generator = torch.Generator().manual_seed(1)
    layer = HalfWeightLinear(torch.randn(512, 256, generator=generator), None)
    row = torch.randn(1, 256, generator=generator)
    alone = layer(row)
    for rows in (2, 5, 16, 64, 130):
        batch = torch.randn(rows, 256, generator=generator) * 10  # other rows of other scales
        batch[rows // 2] = row[0]
        assert torch.equal(layer(batch)[rows // 2], alone[0]), rows


@needs_fbgemm
def test_fused_columns_equal_each_projection_alone():
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, 96, generator=generator) for n in (96, 32, 32))
    fused = FusedProjection(HalfWeightLinear(torch.cat([q, k, v]), None), [96, 32, 32])
    slices = [ProjectionSlice(fused, i) for i in range(3)]
    for rows in (1, 9):
        x = torch.randn(rows, 96, generator=generator)
        for weight, piece, whole in zip((q, k, v), slices, fused(x)):
            assert torch.equal(piece(x), HalfWeightLinear(weight, None)(x))
            assert torch.equal(whole, piece(x))


@needs_fbgemm
def test_the_cpu_loads_float16_weights_unless_asked_for_float32(tiny_llama_dir):
    from torch import nn

    from personas.model.choice import resolve_model
    from personas.model.load import load_model

    halved = load_model(resolve_model(str(tiny_llama_dir)), device="cpu")
    layer = halved.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.linear, HalfWeightLinear)
    assert isinstance(layer.self_attn.q_proj, ProjectionSlice) and isinstance(layer.mlp.up_proj, ProjectionSlice)
    assert isinstance(layer.self_attn.o_proj, HalfWeightLinear) and isinstance(halved.model.lm_head, HalfWeightLinear)
    # 2 fused groups + o + down per layer, and the head
    assert halved.half_weights == 4 * len(halved.model.model.layers) + 1
    plain = load_model(resolve_model(str(tiny_llama_dir)), device="cpu", cpu_weights="float32")
    assert plain.half_weights == 0 and type(plain.model.model.layers[0].self_attn.q_proj) is nn.Linear

    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.inference_mode():
        a, b = halved.model(ids).logits, plain.model(ids).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=1e-2)


def test_the_cpu_norm_and_rotary_equal_transformers_modules_bit_for_bit():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    generator = torch.Generator().manual_seed(3)
    for width, heads, kv_heads, head_dim, queries in ((96, 6, 2, 16, 1), (200, 5, 5, 40, 3)):
        rows = 4
        norm = LlamaRMSNorm(width, eps=1e-5)
        norm.weight.data = torch.rand(width, generator=generator) + 0.5
        hidden = torch.randn(rows, queries, width, generator=generator) * 3
        delta = torch.randn(rows, queries, width, generator=generator)
        for d in (delta, None):
            want_hidden, want = add_rms_norm_modules(hidden.clone(), d, norm)
            got_hidden, got = add_rms_norm_cpu(hidden.clone(), d, norm)
            assert torch.equal(got_hidden, want_hidden) and torch.equal(got, want)

        qkv = torch.randn(rows, queries, (heads + 2 * kv_heads) * head_dim, generator=generator)
        q = qkv[..., :heads * head_dim].view(rows, queries, heads, head_dim)
        k = qkv[..., heads * head_dim:(heads + kv_heads) * head_dim].view(rows, queries, kv_heads, head_dim)
        config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=512)
        positions = torch.randint(0, 500, (rows, queries), generator=generator)
        cos, sin = LlamaRotaryEmbedding(config)(hidden, positions)
        want_q, want_k = rotary_modules(q, k, cos, sin)
        got_q, got_k = rotary_cpu(q, k, cos[:, :, None], signed_sin(sin)[:, :, None])
        assert got_q.shape == want_q.shape and got_k.shape == want_k.shape
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.slow
@needs_fbgemm
@pytest.mark.parametrize("weights", ["float16", "gguf"])
def test_the_engines_greedy_text_equals_generate_on_the_embedded_models_weights(embedded_ready, weights):
    """Real weights, real prompts: the engine and transformers' `generate` run the same packed
    modules (float16, or the GGUF's blocks through personas' kernel), and only the engine's
    attention (two parts merged) differs in its order of sums."""
    from conftest import REPO, block_kernel_runs

    from personas.engine.engine import Engine
    from personas.generate.request import Request, plan
    from personas.library.load import load_library
    from personas.model.choice import EMBEDDED, resolve_model
    from personas.model.load import load_model
    from personas.sampling.grid import Settings

    if weights == "gguf" and not block_kernel_runs():
        pytest.skip("the block kernel needs AVX-512 VNNI and a C compiler")
    loaded = load_model(resolve_model(EMBEDDED), device="cpu", cpu_weights=weights)
    assert loaded.half_weights if weights == "float16" else loaded.block_weights == 121
    library = load_library(REPO / "personas.toml")
    rows = plan(Request(personas=[library.get(name) for name in ("customer", "pirate", "critic")],
                        temperatures=(0.0,), n=1, seed=1), loaded)
    engine = Engine(loaded)
    samples = {}
    engine.submit(rows, Settings(max_new_tokens=48), lambda s: samples.__setitem__(s.row.persona, s))
    with torch.inference_mode():
        while engine.busy:
            engine.step()
        for row in rows:
            ids = torch.tensor([row.prompt_ids])
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                                        eos_token_id=loaded.eos_ids, pad_token_id=loaded.pad_id)[0, ids.shape[1]:]
            out = out.tolist()
            expected = out[:next((i for i, t in enumerate(out) if t in loaded.eos_ids), len(out))]
            assert list(samples[row.persona].token_ids) == expected, row.persona
