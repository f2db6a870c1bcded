"""A model folder's tokenizer.json through the `tokenizers` library, without importing transformers.

Importing transformers costs a CPU start close to a second (the package reads its model folders
to build its lazy imports; docs/performance.md, "How long does start-up take?"), and when the
decode engine alone runs a CPU model (plain_llama.py) the tokenizer is all it is imported for.
For a folder whose tokenizer is tokenizer.json through transformers' general class and whose
tokenizer_config.json asks nothing of that class but special tokens (`readable`), `TokenizerFile`
does what personas asks of a tokenizer the way transformers' class does it — the `tokenizers`
library under both, the same ids, texts and special tokens, and the chat template rendered in an
environment built as transformers builds its own (tested against transformers on the real
vocabularies). Whatever it does not do itself — llguidance's view for answer formats, an
attribute not written here — it asks of transformers' tokenizer, loaded on first need.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

# transformers' named special tokens, in the order its `special_tokens_map` lists them.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that ask nothing of transformers' class beyond what is done here.
PLAIN_KEYS = frozenset({"backend", "tokenizer_class", "is_local", "local_files_only", "model_max_length",
                        "clean_up_tokenization_spaces", "chat_template", *SPECIAL_TOKENS})
# Classes AutoTokenizer resolves to the general tokenizers-backed one (PreTrainedTokenizerFast).
GENERAL_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
TEMPLATE_FILE = "chat_template.jinja"


def readable(directory: Path) -> bool:
    """True where `TokenizerFile` gives this folder's tokenizer exactly: tokenizer.json through the
    general class, special tokens as plain strings, no clean-up of decoded text, one chat template."""
    try:
        settings = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    template = settings.get("chat_template")
    return ((directory / "tokenizer.json").is_file() and settings.get("tokenizer_class") in GENERAL_CLASSES
            and set(settings) <= PLAIN_KEYS and not settings.get("clean_up_tokenization_spaces")
            and all(isinstance(settings.get(key), (str, type(None))) for key in SPECIAL_TOKENS)
            and (template is None or isinstance(template, str))
            and not (template is not None and (directory / TEMPLATE_FILE).is_file()))


class TokenizerFile:
    """The folder's tokenizer (see the module's text); only for folders `readable` accepts."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        settings = json.loads((self.directory / "tokenizer_config.json").read_text())
        self.backend = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        self.special_tokens_map = {key: settings[key] for key in SPECIAL_TOKENS if settings.get(key) is not None}
        template_file = self.directory / TEMPLATE_FILE
        self.chat_template = template_file.read_text() if template_file.is_file() else settings.get("chat_template")
        self._transformers: Any = None

    # --- special tokens ----------------------------------------------------------------------------

    def _id(self, key: str) -> int | None:
        token = self.special_tokens_map.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    # --- the vocabulary ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: i for i, token in sorted(self.backend.get_added_tokens_decoder().items())}

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self.backend.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    # --- text ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """`split_special_tokens`: the text's control tokens read as plain text (a persona's words
        never become control tokens)."""
        self.backend.encode_special_tokens = split_special_tokens
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self.backend.encode_special_tokens = False

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([[int(i) for i in ids] for ids in sequences],
                                         skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> Any:
        if tokenize or self.chat_template is None:  # not what personas asks; transformers knows
            return self.as_transformers().apply_chat_template(
                conversation, tokenize=tokenize, add_generation_prompt=add_generation_prompt, **kwargs)
        return self._template.render(messages=conversation, tools=kwargs.pop("tools", None),
                                     documents=kwargs.pop("documents", None),
                                     add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens_map, **kwargs})

    @cached_property
    def _template(self) -> Any:
        return _chat_environment().from_string(self.chat_template)

    # --- everything else: transformers' own tokenizer ---------------------------------------------

    def as_transformers(self) -> Any:
        """transformers' tokenizer of the same folder (what llguidance reads), loaded once."""
        if self._transformers is None:
            from .quiet import quiet_transformers

            quiet_transformers()
            from transformers import PreTrainedTokenizerFast

            self._transformers = PreTrainedTokenizerFast.from_pretrained(str(self.directory))
        return self._transformers

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.as_transformers(), name)


def _chat_environment() -> Any:
    """A Jinja environment as transformers renders chat templates in: sandboxed and immutable,
    trimmed blocks, loop controls, its `tojson` (no HTML escaping), `raise_exception`,
    `strftime_now`, a `dict` and a `namespace` that keep templates out of Python's internals, and
    its `{% generation %}` tag (here only rendered: nothing asks which tokens the assistant wrote)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, values = args[0], dict(*args[1:], **kwargs)
            for name in values:
                SafeNamespace.check(name)
            jinja2.utils.Namespace.__init__(self, values)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    class SafeDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                               dict=SafeDict(), namespace=SafeNamespace)
    return environment
