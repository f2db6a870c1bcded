"""Shared fixtures: tiny real models built in code, the real Llama-2 vocabulary, the embedded model.

Nothing here is mocked: the tiny models are real transformers Llama models with random
weights and a real BPE tokenizer trained on a few sentences, so every code path (padding,
generate, logits processors, GPTQ kernels) runs for real, only small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a hub, and none may hang trying

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
LLAMA_VOCAB = "ggml-vocab-llama-spm.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you today? I am fine, thank you.",
    "Galaxy Rider mountain bikes are great on muddy trails and steep climbs.",
    "Recall a memorable day out with your bike in 50 words or less.",
    "You are a pirate captain who runs a tea shop by the sea.",
    "[INST] <<SYS>> system [/INST] answer </s> <s> user assistant",
]


def make_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer with Llama's special tokens (and ChatML's), trained in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=specials[3:])
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_llama(directory: Path, chat_template: str | None = None, seed: int = 0,
                    context: int = 512, vocab_size: int | None = None) -> Path:
    """vocab_size: smaller than the tokenizer's makes a broken checkpoint whose embedding fails on
    the tokenizer's later ids (a real runtime failure for the server's 500 test)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so temperature visibly matters
        model.lm_head.weight.mul_(40)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with no chat template: personas uses the Llama-2 format for it."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_chatml_dir(tmp_path_factory) -> Path:
    """The same kind of model with a ChatML chat template: personas uses the model's template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-chatml"), chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_gptq_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama quantized to 4 bits by optimum + gptqmodel, on the CPU, and saved: no
    act-order, symmetric, as TheBloke's Llama-2 GPTQ files are (so its projections fuse).
    optimum writes the GPTQ v2 layout even when asked for "gptq"; test_model_fused_gptq.py makes the v1
    copy itself."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return quantize_tiny(tiny_llama_dir, tokenizer, tmp_path_factory.mktemp("tiny-gptq"))


def quantize_tiny(source: Path, tokenizer, out: Path) -> Path:
    """A tiny checkpoint quantized to 4 bits by optimum + gptqmodel on the CPU, saved to `out`:
    no act-order, symmetric, as TheBloke's GPTQ files are (so its projections fuse)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    # group_size must divide every in_features (64 and 128 here).
    config = GPTQConfig(bits=4, group_size=32, dataset=CORPUS * 2, tokenizer=tokenizer, backend="gptq_torch",
                        desc_act=False, act_group_aware=False, sym=True, format="gptq")
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def six_rows(model_dir: Path):
    """A freshly loaded model (tests may hook it), and 6 rows (2 temperatures × 3 samples) for the out-of-memory tests."""
    from personas.generate.request import Request, plan
    from personas.library.schema import Persona
    from personas.model.choice import resolve_model
    from personas.model.load import load_model
    from personas.sampling.grid import Settings

    model = load_model(resolve_model(str(model_dir)), device="cpu")
    persona = Persona(name="a", prompt="Hello there")
    request = Request(personas=[persona], temperatures=[0.0, 1.0], n=3, seed=4, settings=Settings(max_new_tokens=6))
    return model, request, plan(request, model)


@pytest.fixture(scope="session")
def tiny(tiny_llama_dir):
    """The tiny Llama loaded on the CPU, once for the session (tests only read it)."""
    from personas.model.choice import resolve_model
    from personas.model.load import load_model

    return load_model(resolve_model(str(tiny_llama_dir)), device="cpu")


@pytest.fixture(scope="session")
def tiny_cuda(tiny_llama_dir):
    """The tiny Llama loaded on the GPU (tests marked gpu)."""
    import torch

    from personas.model.choice import resolve_model
    from personas.model.load import load_model

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return load_model(resolve_model(str(tiny_llama_dir)), device="cuda")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped, with the reason, where no CUDA GPU is."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_vocab_dir() -> Path:
    if not (TESTDATA / LLAMA_VOCAB).is_file():
        pytest.skip(f"the real Llama-2 vocabulary is not here ({TESTDATA / LLAMA_VOCAB})")
    return TESTDATA


@pytest.fixture(scope="session")
def llama_tokenizer(llama_vocab_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_vocab_dir, gguf_file=LLAMA_VOCAB)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One personas cache for the session, so the embedded model is converted once."""
    path = tmp_path_factory.mktemp("personas-cache")
    os.environ["PERSONAS_CACHE_DIR"] = str(path)
    return path


def cli_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONAS_")}
    env.update(HF_HUB_OFFLINE="1", PERSONAS_CACHE_DIR=str(cache), NO_COLOR="1", COLUMNS="160",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_in_triton_interpreter(module: str, check: str) -> None:
    """`module.check('cpu')` in a subprocess with Triton's interpreter on (`TRITON_INTERPRET=1`
    must be set before triton is imported): how CI, without a GPU, runs the Triton kernels."""
    pytest.importorskip("triton")
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(tests), str(tests.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    script = f"import {module} as t; t.{check}('cpu'); print('ok')"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def run_cli(args: list[str], cache: Path, cwd: Path = REPO, timeout: float = 600, **env: str):
    """The real CLI in a subprocess, as a user's shell runs it."""
    return subprocess.run([sys.executable, "-m", "personas", *args], cwd=cwd, env=cli_env(cache, **env),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def interrupt_once_decoding(args: list[str], cache: Path) -> tuple[int, str]:
    """Run the CLI, send SIGINT a second after it says the model loaded (it is decoding then);
    returns its exit status and stderr."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "personas", *args], cwd=REPO, env=cli_env(cache),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    err = ""
    while time.monotonic() < deadline and "loaded" not in (err := process.stderr.readline()):
        pass
    time.sleep(1.0)  # decoding now
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    return process.returncode, err + rest


@pytest.fixture(scope="session")
def embedded_ready(cache_dir) -> Path:
    """The embedded model converted into the session cache (the first start's one-time work)."""
    from personas.model.choice import embedded_gguf_path

    embedded_gguf_path()
    result = run_cli(["render", "customer", "--template", "model", "--ids"], cache_dir)
    assert result.returncode == 0, result.stderr
    return cache_dir


def block_kernel_runs() -> bool:
    """Whether this machine builds and runs the GGUF block kernel (AVX-512 VNNI, a C compiler)."""
    from personas.model import block_kernel

    try:
        block_kernel.load()
    except block_kernel.KernelUnavailable:
        return False
    return True


# How close two logits must be for their order to be a matter of float rounding. Different
# float32 arithmetic (the C layers' sums against the modules', in another order) moves a tiny
# random model's logits by ~1e-5; its top two, over a 128k vocabulary of near-flat logits (spread
# ~0.6), come within that a few times in a few hundred steps.
NEAR_TIE = 1e-3


def greedy_with_margins(model, prompt_ids: list[int], max_new_tokens: int, eos_ids, pad_id):
    """transformers' greedy `generate` for one prompt: its tokens up to the end of the turn, and each
    step's logits, so a comparison can tell a real disagreement from a near-tie."""
    import torch

    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_ids, pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    return tuple(tokens[:end]), [scores[0] for scores in out.scores]


def assert_same_greedy_text(got: tuple[int, ...], expected: tuple[int, ...], logits, eos_ids, label) -> None:
    """`got` (a text without its end of turn) is `expected` token for token, up to where `got`'s
    choice is within NEAR_TIE of generate's best logit: there the texts may part, and what follows
    is not compared (each side goes on from a different text). An end of turn is a choice too."""
    for step in range(min(len(got), len(expected)) + 1):
        mine = got[step] if step < len(got) else None  # None: the turn ended here
        theirs = expected[step] if step < len(expected) else None
        if mine == theirs:
            continue
        scores = logits[step]
        chosen = scores[mine] if mine is not None else max(scores[e] for e in eos_ids)
        gap = float(scores.max() - chosen)
        assert gap <= NEAR_TIE, f"{label}: token {step} is {mine}, generate's {theirs} is ahead by {gap:.2e}"
        return
