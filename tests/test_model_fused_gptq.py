"""Fused GPTQ projections (model/fused_gptq.py): q/k/v and gate/up as one quantized layer each,
equal to the unfused layers they replace. A real checkpoint quantized by optimum + gptqmodel
(conftest's tiny_gptq_dir), its GPTQ v1 copy, and on a GPU Marlin."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from personas.model.choice import resolve_model
from personas.model.fused_gptq import fuse_gptq_projections
from personas.model.projections import FusedProjection, ProjectionSlice
from personas.model.gptq import gptq_config_of
from personas.model.load import load_model
from personas.engine.engine import Engine
from personas.sampling.grid import Row, Settings

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def load(directory, fuse, device="cpu", backend="torch"):
    return load_model(resolve_model(str(directory)), device=device, gptq_backend=backend, fuse_gptq=fuse)


def projections(model, x):
    out = {}
    with torch.no_grad():
        for index, layer in enumerate(model.model.model.layers):
            for name in PROJECTIONS:
                owner, attr = name.split(".")
                out[(index, name)] = getattr(getattr(layer, owner), attr)(x)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model.model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()


def quant_layers(model):
    return [m for m in model.model.modules() if type(m).__module__.startswith("gptqmodel.nn_modules.qlinear")]


def as_gptq_v1(source, target):
    """A copy saved as AutoGPTQ (and TheBloke) store it: zero points less one in every 4-bit
    field, format "gptq". Loading converts it back (v1 -> v2) for the kernels that want that."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        tensors[name] = (tensors[name] - 0x11111111).contiguous()
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"].update(checkpoint_format="gptq", format="gptq")
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def unfused(tiny_gptq_dir):
    return load(tiny_gptq_dir, fuse=False)


@pytest.fixture(scope="module")
def fused(tiny_gptq_dir):
    return load(tiny_gptq_dir, fuse=True)


def test_fused_layers_give_the_unfused_layers_outputs(unfused, fused):
    layers = fused.config.num_hidden_layers
    assert unfused.gptq_fused == 0 and fused.gptq_fused == 2 * layers
    # Per layer: one q/k/v layer, one gate/up layer, o and down: 4 quantized layers, not 7.
    assert len(quant_layers(unfused)) == 7 * layers and len(quant_layers(fused)) == 4 * layers
    attention = fused.model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, ProjectionSlice) and isinstance(attention.qkv_proj, FusedProjection)
    x = torch.randn(3, 5, fused.config.hidden_size)
    want, got = projections(unfused, x), projections(fused, x)
    for key in want:
        assert got[key].shape == want[key].shape
        assert torch.allclose(got[key], want[key], atol=1e-5), key
    ids = fused.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert torch.allclose(logits(fused, ids), logits(unfused, ids), atol=1e-4)


def test_one_product_serves_all_three_projections(fused):
    """transformers' attention calls q_proj, k_proj and v_proj with the same input: one product."""
    group = fused.model.model.layers[0].self_attn.qkv_proj
    calls = []
    hook = group.linear.register_forward_hook(lambda *_: calls.append(1))
    try:
        x = torch.randn(2, fused.config.hidden_size)
        attention = fused.model.model.layers[0].self_attn
        q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        assert len(calls) == 1 and not group._pieces  # computed once, then let go
        attention.q_proj(x.clone())
        assert len(calls) == 2  # a new input: a new product
    finally:
        hook.remove()
    assert torch.equal(torch.cat([q, k, v], -1), group.linear(x))


def test_a_gptq_v1_checkpoint_fuses_to_the_same_outputs(tiny_gptq_dir, unfused, tmp_path):
    v1 = as_gptq_v1(tiny_gptq_dir, tmp_path / "v1")
    ids = unfused.tokenizer.encode("Hello there, how are you today?")
    want = logits(unfused, ids)
    for fuse in (False, True):
        model = load(v1, fuse=fuse)
        assert model.gptq_fused == (2 * model.config.num_hidden_layers if fuse else 0)
        assert torch.allclose(logits(model, ids), want, atol=1e-4)


def test_act_order_checkpoints_stay_unfused(tiny_gptq_dir):
    model = load(tiny_gptq_dir, fuse=False)
    stored = {**gptq_config_of(str(tiny_gptq_dir)), "desc_act": True}
    assert fuse_gptq_projections(model.model, str(tiny_gptq_dir), stored) == 0
    assert not any(isinstance(m, ProjectionSlice) for m in model.model.modules())


def test_a_projection_with_reordered_inputs_stays_unfused(tiny_gptq_dir, tmp_path):
    """A g_idx other than the plain one (input i in group i // group_size) cannot be shared by
    the concatenated layer: that group keeps its own layers, the others fuse."""
    from safetensors.torch import load_file, save_file

    target = tmp_path / "reordered"
    shutil.copytree(tiny_gptq_dir, target)
    tensors = load_file(str(target / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    model = load(target, fuse=True)
    assert model.gptq_fused == 2 * model.config.num_hidden_layers - 1
    first = model.model.model.layers[0]
    assert not isinstance(first.self_attn.q_proj, ProjectionSlice)
    assert isinstance(first.mlp.gate_proj, ProjectionSlice)


def test_the_engine_samples_the_same_texts_fused_and_unfused(unfused, fused):
    rows = []
    for k, ask in enumerate(["Hello there, how are you today?", "Recall a day out with your bike."]):
        ids = tuple(fused.tokenizer.encode(f"You are a pirate captain. {ask}"))
        rows += [Row("pirate", ask, t, s, 100 * k + s, ids, id=k) for t in (0.0, 1.0) for s in (1, 2)]
    texts = []
    for model in (unfused, fused):
        got = {}
        engine = Engine(model)
        engine.submit(rows, Settings(max_new_tokens=20), lambda s: got.__setitem__(s.row, s.token_ids))
        with torch.inference_mode():
            engine.run()
        texts.append(got)
    assert texts[0] == texts[1] and len(texts[0]) == len(rows)


@pytest.mark.gpu
def test_marlin_fused_layers_equal_the_unfused_ones(tiny_gptq_dir, tmp_path):
    """On the card with Marlin (which repacks at load), from the v1 copy as TheBloke's files are."""
    v1 = as_gptq_v1(tiny_gptq_dir, tmp_path / "v1")
    plain, joined = load(v1, fuse=False, device="cuda", backend="marlin"), load(v1, fuse=True, device="cuda",
                                                                                  backend="marlin")
    assert "Marlin" in (joined.gptq_kernel or "") and joined.gptq_fused == 2 * joined.config.num_hidden_layers
    x = torch.randn(7, joined.config.hidden_size, device="cuda", dtype=torch.float16)
    want, got = projections(plain, x), projections(joined, x)
    for key in want:
        assert torch.allclose(got[key].float(), want[key].float(), atol=2e-3, rtol=1e-3), key
    ids = joined.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert torch.allclose(logits(joined, ids), logits(plain, ids), atol=2e-2)


@pytest.fixture(scope="module")
def tiny_qwen_gptq_dir(tmp_path_factory):
    """A tiny Qwen 2.5 (q/k/v with bias, tied embeddings, the real Qwen2 vocabulary) quantized to
    4 bits by optimum + gptqmodel on the CPU."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from conftest import TESTDATA, quantize_tiny
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (TESTDATA / "ggml-vocab-qwen2.gguf").is_file():
        pytest.skip(f"the real Qwen2 vocabulary is not here ({TESTDATA})")
    tokenizer = AutoTokenizer.from_pretrained(TESTDATA, gguf_file="ggml-vocab-qwen2.gguf")
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=True, use_sliding_window=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:  # zero at init: make the biases count
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0.0, 1.0)
    plain = tmp_path_factory.mktemp("tiny-qwen")
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    return quantize_tiny(plain, tokenizer, tmp_path_factory.mktemp("tiny-qwen-gptq"))


def test_qwens_fused_qkv_carries_the_three_biases(tiny_qwen_gptq_dir):
    unfused, fused = load(tiny_qwen_gptq_dir, fuse=False), load(tiny_qwen_gptq_dir, fuse=True)
    assert unfused.gptq_fused == 0 and fused.gptq_fused == 2 * fused.config.num_hidden_layers
    group = fused.model.model.layers[0].self_attn.qkv_proj
    assert group.linear.bias is not None and group.linear.bias.abs().sum() > 0
    x = torch.randn(3, 5, fused.config.hidden_size)
    want, got = projections(unfused, x), projections(fused, x)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-5), key
    ids = fused.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert torch.allclose(logits(fused, ids), logits(unfused, ids), atol=1e-4)
