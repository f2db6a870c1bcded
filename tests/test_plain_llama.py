"""A CPU checkpoint built as plain modules (model/plain_llama.py) runs in the decode engine exactly
as the same checkpoint loaded through transformers: the same rotary tables and norms bit for bit,
the same tokens greedy and seeded, for each family the engine runs and for the embedded model;
anything it does not build exactly goes through transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_engine_families import rows, run, tiny_family

from personas.model.choice import resolve_model
from personas.model.load import load_model
from personas.model.plain_llama import PlainCausalLM, PlainConfig, PlainRMSNorm, PlainRotary, load_plain
from personas.model.tokenizer_file import TokenizerFile, readable


@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3", "mistral"])
def both(request, tmp_path_factory):
    """(family, the folder, loaded through transformers, loaded as plain modules)."""
    directory = tmp_path_factory.mktemp(f"plain-{request.param}")
    through_transformers = tiny_family(request.param, directory)
    plain = load_model(resolve_model(str(directory)), device="cpu", engine_only=True)
    return request.param, directory, through_transformers, plain


def test_each_family_loads_as_plain_modules_with_what_the_engine_reads(both):
    name, directory, reference, plain = both
    assert isinstance(plain.model, PlainCausalLM), name
    assert not isinstance(reference.model, PlainCausalLM)
    assert plain.half_weights == reference.half_weights > 0
    assert plain.eos_ids == reference.eos_ids and plain.pad_id == reference.pad_id
    assert plain.context_length == reference.context_length
    assert plain.model.get_output_embeddings().out_features == reference.model.get_output_embeddings().out_features
    assert (plain.model.device, plain.model.dtype) == (reference.model.device, reference.model.dtype)
    # The tokenizer file is read without transformers where its class would add nothing (Qwen's has its own).
    expected = TokenizerFile if readable(directory) else type(reference.tokenizer)
    assert type(plain.tokenizer) is expected and (expected is TokenizerFile) == (name in ("llama3", "mistral"))
    text = "What do you see tonight, keeper? <|im_end|> ünïcödé"
    assert plain.tokenizer.encode(text) == reference.tokenizer.encode(text)


def test_rotary_tables_and_norms_are_transformers_own_bit_for_bit(both):
    name, _, reference, plain = both
    mine, theirs = plain.model.model, reference.model.model
    positions = torch.arange(0, 700, 7)[None, :].repeat(2, 1)
    x = torch.randn(2, 100, 64)
    for got, want in zip(mine.rotary_emb(x, positions), theirs.rotary_emb(x, positions)):
        assert torch.equal(got, want), name
    hidden = torch.randn(3, 5, 64) * 7
    for a, b in [(mine.norm, theirs.norm), (mine.layers[1].input_layernorm, theirs.layers[1].input_layernorm)]:
        assert torch.equal(a(hidden), b(hidden)), name
    if name == "qwen3":
        heads = torch.randn(3, 5, 4, 16)
        assert torch.equal(mine.layers[0].self_attn.q_norm(heads), theirs.layers[0].self_attn.q_norm(heads))


def test_greedy_and_seeded_tokens_are_those_of_the_transformers_model(both):
    """The transformers-loaded model's engine tokens equal `generate` (test_engine_families)."""
    name, _, reference, plain = both
    for temperature, tokens in ((0.0, 48), (1.0, 24)):
        mine, theirs = run(plain, rows(plain, temperature), tokens), run(reference, rows(reference, temperature), tokens)
        assert mine == theirs, name


def test_a_qwen_window_unsaid_is_off_as_in_transformers(both, tmp_path):
    """Qwen's configurations default use_sliding_window to off: a window given without the switch
    does not limit the context."""
    name, directory, _, _ = both
    if not name.startswith("qwen"):
        pytest.skip("Llama's and Mistral's configurations have no switch")
    config = json.loads((directory / "config.json").read_text())
    config.pop("use_sliding_window", None)
    changed = copy_of(directory, tmp_path / "unsaid", {**config, "sliding_window": 64})
    plain = load_model(resolve_model(str(changed)), device="cpu", engine_only=True)
    reference = load_model(resolve_model(str(changed)), device="cpu")
    assert isinstance(plain.model, PlainCausalLM)
    assert plain.context_length == reference.context_length == 512


def test_the_embedded_model_answers_the_same_as_plain_modules(embedded_ready):
    from personas.model.choice import resolve_model as resolve

    choice = resolve("embedded")
    reference = load_model(choice, device="cpu")
    plain = load_model(choice, device="cpu", engine_only=True)
    assert isinstance(plain.model, PlainCausalLM) and not isinstance(reference.model, PlainCausalLM)
    assert plain.eos_ids == reference.eos_ids and plain.context_length == reference.context_length == 8192
    for temperature in (0.0, 1.0):
        assert run(plain, rows(plain, temperature), 32) == run(reference, rows(reference, temperature), 32)


def test_a_plain_start_imports_neither_transformers_model_classes_nor_torchs_compiler(tiny_llama_dir):
    """What the plain modules save: the imports a CPU start would otherwise pay for."""
    check = (
        "import sys\n"
        "from personas.model.choice import resolve_model\n"
        "from personas.model.load import load_model\n"
        f"loaded = load_model(resolve_model({str(tiny_llama_dir)!r}), device='cpu', engine_only=True)\n"
        "assert type(loaded.model).__name__ == 'PlainCausalLM'\n"
        "heavy = [m for m in ('transformers.modeling_utils', 'transformers.configuration_utils', "
        "'torch._dynamo', 'torch.distributed.tensor') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_explain_and_the_gpu_keep_transformers_model(tiny_llama_dir):
    """Without engine_only (explain runs the model's own forward) the model is transformers'."""
    loaded = load_model(resolve_model(str(tiny_llama_dir)), device="cpu")
    assert not isinstance(loaded.model, PlainCausalLM)
    assert hasattr(loaded.model, "generate")


def copy_of(source: Path, target: Path, config_change: dict | None = None) -> Path:
    shutil.copytree(source, target)
    if config_change is not None:
        config = json.loads((target / "config.json").read_text())
        config.update(config_change)
        (target / "config.json").write_text(json.dumps(config))
    return target


def rewrite_tensors(directory: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = dict(load_file(str(directory / "model.safetensors")))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("why,config_change", [
    ("rope scaling of another kind",
     {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    ("no rope theta (each family's default differs)",
     {"rope_parameters": None, "rope_scaling": None, "rope_theta": None}),
    ("another activation", {"hidden_act": "gelu"}),
    ("a family the engine does not run", {"model_type": "gemma2"}),
    ("code of its own", {"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}),
    ("a quantized checkpoint", {"quantization_config": {"quant_method": "gptq", "bits": 4}}),
])
def test_a_checkpoint_not_built_exactly_is_left_to_transformers(tiny_llama_dir, tmp_path, why, config_change):
    assert load_plain(copy_of(tiny_llama_dir, tmp_path / "x", config_change)) is None, why


def test_unknown_or_missing_tensors_are_left_to_transformers(tiny_llama_dir, tmp_path):
    assert isinstance(load_plain(tiny_llama_dir), PlainCausalLM)
    extra = copy_of(tiny_llama_dir, tmp_path / "extra")
    rewrite_tensors(extra, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.zeros(64)))
    assert load_plain(extra) is None, "a bias the config does not ask for"
    missing = copy_of(tiny_llama_dir, tmp_path / "missing")
    rewrite_tensors(missing, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert load_plain(missing) is None
    # And load_model then loads through transformers, which says what is missing.
    assert not isinstance(load_model(resolve_model(str(extra)), device="cpu", engine_only=True).model, PlainCausalLM)


def test_biases_follow_the_config_as_in_transformers(tmp_path):
    """Llama's attention_bias and mlp_bias: the biases are read where the config asks for them."""
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         attention_bias=True, mlp_bias=True, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 1.0)
        model.lm_head.weight.mul_(40)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    plain = load_model(resolve_model(str(tmp_path)), device="cpu", engine_only=True)
    reference = load_model(resolve_model(str(tmp_path)), device="cpu")
    assert isinstance(plain.model, PlainCausalLM)
    assert run(plain, rows(plain, 0.0), 24) == run(reference, rows(reference, 0.0), 24)


def test_the_head_is_tied_as_the_config_says_or_else_where_the_checkpoint_has_none(tiny_llama_dir, tmp_path):
    untied = load_plain(tiny_llama_dir)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    tied = load_plain(copy_of(tiny_llama_dir, tmp_path / "tied", {"tie_word_embeddings": True}))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    unsaid = copy_of(tiny_llama_dir, tmp_path / "unsaid", {"tie_word_embeddings": None})
    rewrite_tensors(unsaid, lambda t: t.pop("lm_head.weight"))
    headless = load_plain(unsaid)
    assert headless.lm_head.weight.data_ptr() == headless.model.embed_tokens.weight.data_ptr()


def test_llama3_rotary_scaling_matches_transformers_at_long_positions():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    theirs = LlamaRotaryEmbedding(LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=rope,
                                              max_position_embeddings=131072))
    mine = PlainRotary(PlainConfig("llama", 2048, 8192, 16, 32, 8, 64, 128256, 1e-5, rope, True))
    positions = torch.tensor([[0, 1, 4095, 8191, 8192, 30000, 131071]])
    for got, want in zip(mine(torch.zeros(1, 7, 2048), positions), theirs(torch.zeros(1, 7, 2048), positions)):
        assert torch.equal(got, want)
    weight = torch.rand(2048) + 0.5
    reference = LlamaRMSNorm(2048, eps=1e-5)
    reference.weight.data.copy_(weight)
    hidden = torch.randn(4, 2048)
    assert torch.equal(PlainRMSNorm(weight.clone(), 1e-5)(hidden), reference(hidden))
