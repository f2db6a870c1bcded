"""A tokenizer.json read without transformers (model/tokenizer_file.py), against transformers' own
tokenizer of the same folder: the embedded SmolLM2's, and the real Llama 3 vocabulary
saved beside a tiny model — ids, texts, special tokens, each token's text as personas shows it,
and the rendered chat prompts; folders that ask more of transformers' class (Qwen 2's own class)
are left to it. And a CPU run of the engine never imports transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cli_env

from personas.model.prompt import Dialog, template_ids, template_text
from personas.model.tokenizer_file import TokenizerFile, readable
from personas.model.tokens import token_text

TEXTS = ["Hello there, how are you today?", "  two spaces, a tab\tand a newline\n", "naïve café — ünïcödé 🚲",
         "<|im_start|>user\nliteral control tokens<|im_end|>", "<|begin_of_text|><s> [INST] x [/INST]", ""]


@pytest.fixture(scope="module")
def folders(embedded_ready, tmp_path_factory):
    from test_engine_families import tiny_family

    found = {"embedded": str(next((embedded_ready / "models").glob("smollm2-*")))}
    for name in ("llama3", "qwen2"):
        directory = tmp_path_factory.mktemp(f"tokenizer-{name}")
        tiny_family(name, directory)
        found[name] = str(directory)
    return found


@pytest.mark.parametrize("name", ["embedded", "llama3"])
def test_a_tokenizer_file_is_transformers_tokenizer_of_the_same_folder(folders, name):
    from pathlib import Path

    from transformers import AutoTokenizer

    directory = folders[name]
    assert readable(Path(directory)), json.loads((Path(directory) / "tokenizer_config.json").read_text())
    ours, theirs = TokenizerFile(directory), AutoTokenizer.from_pretrained(directory)
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "all_special_tokens", "special_tokens_map"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert ours.get_added_vocab() == theirs.get_added_vocab()
    for text in TEXTS:
        for special in (True, False):
            for split in (True, False):
                assert ours.encode(text, add_special_tokens=special, split_special_tokens=split) == \
                    theirs.encode(text, add_special_tokens=special, split_special_tokens=split), (text, special, split)
        ids = theirs.encode(text, add_special_tokens=True)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    sample = list(range(0, len(theirs), max(1, len(theirs) // 3000))) + list(theirs.get_added_vocab().values())
    assert ours.batch_decode([[i] for i in sample]) == theirs.batch_decode([[i] for i in sample])
    assert [token_text(ours, i) for i in sample] == [token_text(theirs, i) for i in sample]
    assert ours.convert_ids_to_tokens(sample) == theirs.convert_ids_to_tokens(sample)
    dialog = Dialog(system="You are a pirate who runs a tea shop.", examples=(("Hello!", "Ahoy, a cup of tea?"),),
                    user="Which tea, <|im_end|> captain?")
    if theirs.chat_template is not None:
        assert template_text(dialog, ours) == template_text(dialog, theirs)
        assert template_ids(dialog, ours) == template_ids(dialog, theirs)
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
        for prompt in (True, False):
            assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def test_a_folder_that_asks_more_of_transformers_is_not_read_as_a_file(folders, tmp_path):
    """A tokenizer class of its own (Qwen 2's), or a setting transformers' class acts on."""
    import shutil
    from pathlib import Path

    assert not readable(Path(folders["qwen2"]))
    copy = tmp_path / "bos"
    shutil.copytree(folders["llama3"], copy)
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**settings, "add_bos_token": True}))
    assert readable(Path(folders["llama3"])) and not readable(copy)


def test_a_cpu_run_through_the_engine_never_imports_transformers(embedded_ready):
    """The embedded model on the CPU: plain modules, GGUF blocks and the tokenizer file."""
    script = ("import sys\n"
              "from personas.model.choice import EMBEDDED, resolve_model\n"
              "from personas.model.load import load_model\n"
              "from personas.engine.loop import sample_rows\n"
              "loaded = load_model(resolve_model(EMBEDDED), device='cpu', engine_only=True)\n"
              "print(type(loaded.tokenizer).__name__, 'transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=cli_env(embedded_ready))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["TokenizerFile", "False"], done.stdout
