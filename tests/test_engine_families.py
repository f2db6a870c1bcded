"""Today's model families in the decode engine: tiny random models of each family's config, with
the family's real vocabulary (../shared/testdata), against transformers' own generate.

Llama 3 (llama3 rope scaling, a 128k vocabulary, two end-of-turn ids), Qwen 2.5 (q/k/v bias, tied
embeddings), Qwen 3 (an RMSNorm over each head of q and k), Mistral (a sliding window: rows
longer than it are refused). Gemma 2 is routed to the chunked fallback, with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TESTDATA

from personas.engine.decoder import supports, unsupported_reason
from personas.engine.engine import Engine, EngineConfig
from personas.errors import InputError
from personas.model.choice import resolve_model
from personas.model.load import fit_dialog, load_model
from personas.model.prompt import Dialog
from personas.sampling.grid import Row, Settings

VOCABS = {"llama3": "ggml-vocab-llama-bpe.gguf", "qwen2": "ggml-vocab-qwen2.gguf", "llama2": "ggml-vocab-llama-spm.gguf"}
SYSTEM = "You are a lighthouse keeper on a small rocky island, and you answer every question kindly. "
ASKS = ["What do you see tonight?", "How old is the lamp?", "Do you like storms?", "Who brings the food?",
        "What is the best hour?", "Where do the gulls sleep?", "Is the sea cold?", "What did you read today?"]


def tokenizer_for(vocab: str):
    from transformers import AutoTokenizer

    if not (TESTDATA / VOCABS[vocab]).is_file():
        pytest.skip(f"the real {vocab} vocabulary is not here ({TESTDATA / VOCABS[vocab]})")
    return AutoTokenizer.from_pretrained(TESTDATA, gguf_file=VOCABS[vocab])


def config_for(family: str, tokenizer):
    from transformers import AutoConfig

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "llama3":
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        return AutoConfig.for_model("llama", **{**common, "eos_token_id": [tokenizer.eos_token_id, eot]},
                                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})
    if family == "qwen2":
        return AutoConfig.for_model("qwen2", **common, tie_word_embeddings=True, use_sliding_window=False)
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", **common, head_dim=16, tie_word_embeddings=False)
    if family == "mistral":
        return AutoConfig.for_model("mistral", **common, sliding_window=96)
    if family == "gemma2":
        return AutoConfig.for_model("gemma2", **common, head_dim=16)
    raise ValueError(family)


FAMILIES = {"llama3": "llama3", "qwen2": "qwen2", "qwen3": "qwen2", "mistral": "llama2", "gemma2": "llama2"}


@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3", "mistral"])
def family(request, tmp_path_factory):
    return request.param, tiny_family(request.param, tmp_path_factory.mktemp(request.param))


def tiny_family(name: str, directory: Path):
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_for(FAMILIES[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(name, tokenizer))
    with torch.no_grad():
        # Sharper attention and larger logits than the default init: a row's tokens then depend on
        # what it attends to (a family's difference in attention changes them), and temperature
        # visibly matters.
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
            # Layers that move the residual stream: with tied embeddings a near-identity model
            # would only repeat its last input token.
            layer.self_attn.o_proj.weight.mul_(30)
            layer.mlp.down_proj.weight.mul_(30)
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if projection.bias is not None:  # Qwen 2's q/k/v bias, zero at init: make it count
                    projection.bias.normal_(0.0, 1.0)
        model.model.norm.weight.mul_(4)  # not the output embedding: Qwen's is the input's (tied)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return load_model(resolve_model(str(directory)), device="cpu")


def rows(loaded, temperature: float) -> list[Row]:
    tok = loaded.tokenizer
    out = []
    for i, ask in enumerate(ASKS):
        ids = tuple(tok.encode(SYSTEM + ask, add_special_tokens=True))
        out.append(Row("keeper", ask, temperature, 1, 7000 + i, ids, id=i))
    return out


def run(loaded, batch: list[Row], tokens: int = 48) -> dict[int, tuple[int, ...]]:
    engine = Engine(loaded, EngineConfig())
    got = {}
    engine.submit(batch, Settings(max_new_tokens=tokens), lambda s: got.__setitem__(s.row.id, s.token_ids))
    with torch.inference_mode():
        engine.run()
    return got


def test_greedy_equals_generate_alone_and_sharing_a_prefix(family):
    name, loaded = family
    assert supports(loaded.model), unsupported_reason(loaded.model)
    greedy = rows(loaded, 0.0)
    together = run(loaded, greedy)
    jobs = Engine(loaded, EngineConfig()).submit(greedy, Settings(), lambda s: None)
    (prefix,) = {job.prefix for job in jobs}
    assert len(prefix) > 10, "the eight rows share their system text's start"
    for row in greedy:
        alone = run(loaded, [row])
        ids = torch.tensor([row.prompt_ids])
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                                    eos_token_id=loaded.eos_ids, pad_token_id=loaded.pad_id)[0, ids.shape[1]:].tolist()
        expected = tuple(out[:next((i for i, t in enumerate(out) if t in loaded.eos_ids), len(out))])
        assert together[row.id] == expected, (name, row.id)
        assert alone[row.id] == expected, (name, row.id)


def test_seeded_samples_are_the_same_with_and_without_sharing(family):
    _, loaded = family
    sampled = rows(loaded, 1.0)
    together = run(loaded, sampled, 24)
    assert {row.id: run(loaded, [row], 24)[row.id] for row in sampled} == together
    assert len(set(together.values())) > 1


def test_every_end_of_turn_id_ends_a_row():
    """Llama 3 ends a turn on <|eot_id|> beside <|end_of_text|>: both are the model's end ids."""
    tokenizer = tokenizer_for("llama3")
    from personas.model.load import _end_of_turn_ids
    from transformers import GenerationConfig

    class Model:  # only what _end_of_turn_ids reads: the checkpoint's generation config
        generation_config = GenerationConfig(eos_token_id=[128001, 128009])

    ids = _end_of_turn_ids(tokenizer, Model())
    assert {128001, 128009} <= set(ids)


def test_a_row_longer_than_mistrals_window_is_refused(tmp_path):
    loaded = tiny_family("mistral", tmp_path / "mistral")
    assert loaded.context_length == 96  # the sliding window, not the 512 positions
    with pytest.raises(InputError, match="context is 96 tokens"):
        fit_dialog(Dialog(None, (), "word " * 80), loaded, None, 48, truncate=False, who="persona 'x'")


def test_gemma_goes_to_the_fallback_with_its_reason(tmp_path):
    loaded = tiny_family("gemma2", tmp_path / "gemma2")
    assert not supports(loaded.model)
    reason = unsupported_reason(loaded.model)
    assert "gemma2" in reason and "soft-capping" in reason


def test_qwens_chat_template_renders_a_persona_as_the_tokenizer_does(family):
    """ChatML from the vocabulary's own template: the persona's system text, its examples and the
    user's turn, as `apply_chat_template` renders them; typed control tokens stay text."""
    name, loaded = family
    if name not in ("qwen2", "qwen3"):
        pytest.skip("the Qwen vocabulary carries its template; the others' tests give none")
    dialog = Dialog("You keep a lighthouse.", (("How are you?", "Windswept."),), "What do you see?")
    messages = [{"role": "system", "content": dialog.system}, {"role": "user", "content": "How are you?"},
                {"role": "assistant", "content": "Windswept."}, {"role": "user", "content": dialog.user}]
    expected = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert loaded.prompt_ids(dialog, None) == list(expected)
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    typed = loaded.prompt_ids(Dialog("You keep a lighthouse.", (), "Say <|im_end|> please"), None)
    assert typed.count(im_end) == 2, "only the template's own: after the system turn and the user's"


def test_serve_http_answers_with_a_qwen_model_and_gemma_falls_back_with_its_reason(tmp_path, cache_dir):
    """The server runs every family the engine runs; `generate` on Gemma 2 says why it takes the
    chunked path, and still answers."""
    pytest.importorskip("openai")
    from conftest import run_cli
    from test_serve_http import Server

    tiny_family("qwen2", tmp_path / "qwen2")
    server = Server(cache_dir, "--model", str(tmp_path / "qwen2"))
    try:
        server.wait_ready()
        answer = server.client().chat.completions.create(
            model="base", seed=1, max_tokens=8, messages=[{"role": "system", "content": "You keep bees."},
                                                          {"role": "user", "content": "Hello?"}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens <= 8
    finally:
        server.stop()
    tiny_family("gemma2", tmp_path / "gemma2")
    result = run_cli(["generate", "--model", str(tmp_path / "gemma2"), "--prompt", "Hello?", "-n", "2",
                      "--max-new-tokens", "6", "-f", "jsonl"], cache_dir)
    assert result.returncode == 0, result.stderr
    assert "the decode engine does not run 'gemma2' models" in result.stderr
    assert "sampling through transformers' generate in chunks" in result.stderr
    assert len(result.stdout.splitlines()) >= 2
    # Answer formats run in the engine only: refused on the fallback, never sampled free.
    result = run_cli(["generate", "--model", str(tmp_path / "gemma2"), "--prompt", "Hello?", "--json",
                      "--max-new-tokens", "6", "-f", "jsonl"], cache_dir)
    assert result.returncode == 2 and "answer formats" in result.stderr and "'gemma2'" in result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3", "mistral"])
def test_layer_kernels_and_graphs_on_cuda_give_the_modules_tokens(name, tmp_path):
    """On the card: the fused layer kernels under CUDA graphs against transformers' modules run
    eagerly, each family (half precision: a near-tie may part one row late, never most rows)."""
    tiny_family(name, tmp_path / name)
    loaded = load_model(resolve_model(str(tmp_path / name)), device="cuda")
    greedy = rows(loaded, 0.0)

    def tokens(**config) -> dict[int, tuple[int, ...]]:
        engine = Engine(loaded, EngineConfig(**config))
        got = {}
        engine.submit(greedy, Settings(max_new_tokens=24), lambda s: got.__setitem__(s.row.id, s.token_ids))
        with torch.inference_mode():
            engine.run()
        return got

    modules, kernels = tokens(graphs=False, layer_kernels=False), tokens(graphs=True, layer_kernels=True)
    assert all(kernels[i][:4] == modules[i][:4] for i in modules), (kernels, modules)
    assert sum(kernels[i] == modules[i] for i in modules) >= 6, (kernels, modules)


# Mistral-7B-Instruct-v0.2's template as its tokenizer_config.json carries it: no system role.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def test_mistrals_template_gets_the_system_text_folded_into_the_last_user_turn():
    """A template that refuses a system role: the persona's system text goes before the last user
    message, as Mistral's later templates put it; the rest is the template's own rendering."""
    from personas.model.prompt import template_ids

    tokenizer = tokenizer_for("llama2")
    tokenizer.chat_template = MISTRAL_TEMPLATE
    dialog = Dialog("You keep a lighthouse.", (("How are you?", "Windswept."),), "What do you see?")
    folded = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Windswept."},
              {"role": "user", "content": "You keep a lighthouse.\n\nWhat do you see?"}]
    text = tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)
    assert template_ids(dialog, tokenizer) == tokenizer.encode(text, add_special_tokens=False)
    typed = template_ids(Dialog("Say [/INST] and </s>", (), "Hi"), tokenizer)
    assert typed.count(tokenizer.eos_token_id) == 0, "a typed </s> stays text"


# Meta's Llama 3 chat format (its header tokens and <|eot_id|>); the vocabulary file carries no
# template, so the test gives it.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_llama3s_template_renders_a_persona_as_the_tokenizer_does():
    from personas.model.prompt import messages, template_ids

    tokenizer = tokenizer_for("llama3")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    dialog = Dialog("You keep a lighthouse.", (("How are you?", "Windswept."),), "What do you see?")
    expected = tokenizer.apply_chat_template(messages(dialog), add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert template_ids(dialog, tokenizer) == list(expected)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    typed = template_ids(Dialog("You keep a lighthouse.", (), "Say <|eot_id|> now"), tokenizer)
    assert typed.count(eot) == 2, "only the template's own, after the system turn and the user's"
