"""Loading a model once (`load_model` -> `LoadedModel`), and fitting a dialog to its context.

transformers is imported here, and optimum and gptqmodel only for GPTQ checkpoints (gptq.py).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError, ModelError
from . import tokenizer_file
from .choice import MODEL_HELP, ModelChoice
from .gguf_cache import embedded_checkpoint, gguf_checkpoint
from .gptq import gptq_config_of, gptq_kernel_for, kernel_name, loading_config, quant_method_of
from .prompt import Dialog, is_llama2_chat_template, llama2_ids, llama2_text, template_ids, template_text
from .quiet import quiet_torch, quiet_transformers


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class LoadedModel:
    """A model loaded once, with what every feature needs of it: its tokenizer, its prompt
    format, the ids that end a turn, and the device and GPTQ kernel it runs on."""

    label: str
    model: Any
    tokenizer: Any
    template: Literal["llama2", "model"]
    eos_ids: list[int]
    pad_id: int
    device: Any
    load_seconds: float
    # The kernel class of its 4-bit layers (MarlinLinear, TorchCpuAvx512AwqLinear, …): GPTQ's or
    # AWQ's, both through gptqmodel; None: not quantized.
    gptq_kernel: str | None = None
    gptq_fused: int = 0  # q/k/v and gate/up groups fused into one GPTQ layer each (fused_gptq.py)
    # Linear layers (fused groups once) kept as float16 weights on the CPU (half_weights.py); 0: none.
    half_weights: int = 0
    # Linear layers (fused groups once) multiplying with a GGUF file's own blocks (block_weights.py).
    block_weights: int = 0
    # Why a model that has GGUF blocks does not use them here (the CPU, no compiler, a damaged file).
    blocks_unused: str | None = None
    config: Any = None  # the model's configuration, also when only the tokenizer was loaded

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def prompt_ids(self, dialog: Dialog, template: str | None = None) -> list[int]:
        if (template or self.template) == "llama2":
            bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
            if bos is None or eos is None:
                raise ModelError(f"model '{self.label}' has no BOS/EOS tokens for the Llama-2 format",
                                 "use --template model or a chat model")
            return llama2_ids(dialog, self._encode_text, bos, eos)
        return template_ids(dialog, self.tokenizer)

    def prompt_text(self, dialog: Dialog, template: str | None = None) -> str:
        if (template or self.template) == "llama2":
            return llama2_text(dialog)
        return template_text(dialog, self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @property
    def context_length(self) -> int | None:
        """The positions a prompt and its new tokens may take: the model's, or its sliding
        attention window when one is in force (Mistral v0.1's 4,096), since the decode engine
        attends to every earlier position — a row longer than the window is refused."""
        limit = getattr(self.config, "max_position_embeddings", None)
        window = getattr(self.config, "sliding_window", None)
        if window and getattr(self.config, "use_sliding_window", True) and (limit is None or window < limit):
            return window
        return limit


Status = Callable[[str], None]


def load_model(choice: ModelChoice, *, device: str | None = None, gptq_backend: str = "auto",
               status: Status = lambda _: None, tokenizer_only: bool = False,
               allow_pickle: bool = False, trust_remote_code: bool = False, fuse_gptq: bool = True,
               cpu_weights: str = "gguf", engine_only: bool = False) -> LoadedModel:
    """Load `choice` once, on `device` (default: CUDA when present, else CPU).

    Safe by default: weights only from safetensors (pickle files can run code when loaded)
    unless `allow_pickle`, and a model's own Python code never runs unless `trust_remote_code`.
    A GPTQ Llama's q/k/v and gate/up projections are fused unless `fuse_gptq` is False. On the
    CPU, `cpu_weights` "gguf" (the default) multiplies a converted GGUF file's layers with the
    file's own blocks where it has them and this CPU runs their kernel (block_weights.py), and
    keeps a float32 model's other linear layers as float16 weights (half_weights.py), as
    "float16" keeps them all; "float32" keeps them as loaded. `engine_only`: the caller runs the
    model only through the decode engine, never transformers' forward or `generate`; a CPU
    Llama-family safetensors checkpoint is then built as plain modules (plain_llama.py), which
    starts about two seconds sooner.
    """
    if cpu_weights not in CPU_WEIGHTS:
        raise InputError(f"cpu weights '{cpu_weights}' are not one of {', '.join(CPU_WEIGHTS)}",
                         f"use {' or '.join(CPU_WEIGHTS)}")
    started = time.perf_counter()
    quiet_torch()
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but no CUDA GPU is available", "use --device cpu")
    torch_device = torch.device(device)

    if choice.kind == "hub":
        directory, gguf_file = _hub_snapshot(choice.location, status), None
    elif choice.kind == "embedded":
        directory, gguf_file = embedded_checkpoint(Path(choice.location), status)
    elif choice.kind == "gguf":
        directory, gguf_file = gguf_checkpoint(Path(choice.location), status, convert=not tokenizer_only)
    else:
        directory, gguf_file = choice.location, None

    if not tokenizer_only and not gguf_file and not allow_pickle:
        refuse_pickle_only(directory, choice.label)
    # A CPU model the engine alone runs loads without transformers where it can: plain modules,
    # and the tokenizer file read directly (tokenizer_file.py).
    without_transformers = engine_only and torch_device.type == "cpu" and not gguf_file and not tokenizer_only
    tokenizer = _load_tokenizer(directory, gguf_file, choice, status, trust_remote_code, without_transformers)
    model, kernel = None, None
    blocks, blocks_unused = {}, None
    if not tokenizer_only and torch_device.type == "cpu" and cpu_weights == "gguf" and not gguf_file:
        # Read before the weights: the layers that will multiply blocks need no float32 copy.
        blocks, blocks_unused = _usable_blocks(directory)
    if not tokenizer_only:
        if engine_only and not gguf_file and torch_device.type == "cpu":
            model = _load_plain(directory, choice, status, unread=blocks)
        if model is None:
            model, kernel = _load_weights(
                directory, gguf_file, choice, torch_device, gptq_backend, status,
                {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True})
    fused = 0
    gptq = gptq_config_of(directory) if kernel is not None and fuse_gptq else None
    if gptq is not None:  # AWQ's layers have their own layout: only GPTQ's are fused
        from .fused_gptq import fuse_gptq_projections

        status("fusing the GPTQ projections")
        fused = fuse_gptq_projections(model, directory, gptq)

    halved = blocked = 0
    if model is not None and blocks:
        from .block_weights import use_block_weights

        blocked = use_block_weights(model, blocks)
    if model is not None and torch_device.type == "cpu" and cpu_weights in ("float16", "gguf"):
        from .half_weights import keep_own_copies, use_half_weights

        halved = use_half_weights(model)  # part of "loading": the final line says "float16 weights"
        if blocked and not halved:
            keep_own_copies(model)

    config = model.config if model is not None else _load_config(directory, gguf_file, trust_remote_code)
    template = "llama2" if choice.llama2_chat or is_llama2_chat_template(
        getattr(tokenizer, "chat_template", None)) else "model"
    eos_ids = _end_of_turn_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return LoadedModel(label=choice.label, model=model, tokenizer=tokenizer, template=template,
                       eos_ids=eos_ids, pad_id=pad_id, device=torch_device,
                       load_seconds=time.perf_counter() - started, gptq_kernel=kernel, gptq_fused=fused,
                       half_weights=halved, block_weights=blocked, blocks_unused=blocks_unused, config=config)


# What a CPU model's linear layers multiply with: float16 weights through fbgemm (half_weights.py),
# the float32 ones as loaded, or a GGUF file's own blocks where it has them (block_weights.py).
CPU_WEIGHTS = ("float16", "float32", "gguf")


def _usable_blocks(directory: str) -> tuple[dict[str, Any], str | None]:
    """The GGUF blocks saved beside a converted model, where this machine can run their kernel:
    (blocks by layer name, why none are used where the model has blocks)."""
    from .block_kernel import KernelUnavailable
    from .block_weights import BlocksUnreadable, usable_blocks

    try:
        return usable_blocks(Path(directory)), None
    except KernelUnavailable as e:
        return {}, f"GGUF blocks cannot run here ({e}): float16 weights instead"
    except BlocksUnreadable as e:
        return {}, (f"GGUF blocks: {e}; float16 weights instead (where that folder is a converted copy in "
                    "the cache, deleting it makes the next start convert the file again)")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def refuse_pickle_only(directory: str, label: str) -> None:
    """Refuse a folder whose weights exist only as pickle files."""
    files = [p.name for p in Path(directory).iterdir()] if Path(directory).is_dir() else []
    if any(f.endswith(".safetensors") for f in files):
        return
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        raise InputError(f"'{label}' has only pickle weights (.bin/.pt), which can run code when loaded",
                         "convert them to safetensors, or pass --allow-pickle if you trust their source")



def _load_tokenizer(directory: str, gguf_file: str | None, choice: ModelChoice, status: Status,
                    trust_remote_code: bool = False, without_transformers: bool = False) -> Any:
    status(f"loading tokenizer of {choice.label}")
    try:
        if without_transformers and tokenizer_file.readable(Path(directory)):
            return tokenizer_file.TokenizerFile(directory)
        quiet_transformers()
        if not gguf_file and _general_tokenizer(Path(directory)):
            # The class AutoTokenizer would pick, without importing the configuration classes it
            # reads on the way (about a second of a CPU start; docs/performance.md).
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(directory)
        from transformers import AutoTokenizer

        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises many types for an unusable folder
        raise ModelError(f"cannot load the tokenizer of '{choice.label}': {_first_line(e)}",
                         "check that the folder holds a complete model") from e


def _general_tokenizer(directory: Path) -> bool:
    """True where the folder's tokenizer is tokenizer.json through the general class, with no
    code of its own."""
    try:
        settings = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return ((directory / "tokenizer.json").is_file() and not settings.get("auto_map")
            and settings.get("tokenizer_class") in tokenizer_file.GENERAL_CLASSES)


def _load_config(directory: str, gguf_file: str | None, trust_remote_code: bool) -> Any:
    """The configuration alone (for the context length), where only the tokenizer is loaded."""
    quiet_transformers()
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)
    except Exception:  # a tokenizer-only folder: prompts are then not checked against a context
        return None


def _load_weights(directory: str, gguf_file: str | None, choice: ModelChoice, device: Any,
                  gptq_backend: str, status: Status, safety: dict[str, Any]) -> tuple[Any, str | None]:
    import torch

    quiet_transformers()
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": {"": device}, "trust_remote_code": safety["trust_remote_code"]}
    if not gguf_file:
        kwargs["use_safetensors"] = safety["use_safetensors"]
    method = None if gguf_file else quant_method_of(directory)
    gptq = gptq_config_of(directory) if method == "gptq" else None
    if gptq is not None:
        kwargs["quantization_config"] = loading_config(gptq, gptq_kernel_for(gptq_backend, gptq, device))
        kwargs["dtype"] = torch.float16 if device.type == "cuda" else torch.float32
    elif gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["dtype"] = torch.float32 if device.type == "cpu" else "auto"
    status(f"loading {choice.label} on {device.type}" + (f" ({method.upper()})" if method else ""))
    try:
        with warnings.catch_warnings():
            # We pass a GPTQConfig only to choose the kernel; transformers warns that the rest of it
            # is ignored, which is what we want. gptqmodel touches a deprecated attribute.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except torch.cuda.OutOfMemoryError as e:
        raise ModelError(f"not enough GPU memory to load '{choice.label}'",
                         "use a smaller model (llama2-7b-gptq, embedded)") from e
    except Exception as e:
        if method == "awq":  # transformers loads AWQ through gptqmodel, which must know this one
            raise ModelError(f"cannot load the AWQ checkpoint '{choice.label}': {_first_line(e)}",
                             "AWQ loads through gptqmodel (pip install 'personas[gptq]'); a GPTQ "
                             "checkpoint of the same model is the tested path") from e
        raise ModelError(f"cannot load '{choice.label}': {_first_line(e)}",
                         "check that the folder holds a complete model") from e
    model.eval()
    # GPTQ's and AWQ's layers alike: their kernel decides whether a CUDA graph may capture them.
    kernel = kernel_name(model)
    return model, kernel


def _load_plain(directory: str, choice: ModelChoice, status: Status, unread: Any = ()) -> Any:
    """The checkpoint as plain modules (plain_llama.py), or None where it is not one they build;
    the linear layers named in `unread` without their weights (the caller replaces them)."""
    from .plain_llama import load_plain

    status(f"loading {choice.label} on cpu")
    try:
        return load_plain(directory, unread)
    except Exception as e:  # safetensors' and torch's own errors for a damaged file
        raise ModelError(f"cannot load '{choice.label}': {_first_line(e)}",
                         "check that the folder holds a complete model") from e


def _end_of_turn_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS, the model's, and chat-format enders."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    if model is not None:
        candidates.append(getattr(model.generation_config, "eos_token_id", None))
    candidates += _vocabulary_ids(tokenizer, ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"))
    for c in candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise ModelError("the model's tokenizer has no end-of-sequence token", "use a chat model")
    return ids


def _vocabulary_ids(tokenizer: Any, tokens: tuple[str, ...]) -> list[int | None]:
    """Each token's id, None where the vocabulary lacks it. The tokenizers library looks one up
    directly, where `get_vocab` first builds the whole vocabulary as a dict, a visible part of a
    start (docs/performance.md, "How long does start-up take?")."""
    if isinstance(tokenizer, tokenizer_file.TokenizerFile):
        backend = tokenizer.backend
    else:  # transformers' fast tokenizers hold the same library's tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "token_to_id"):
        vocab = tokenizer.get_vocab()
        return [vocab.get(token) for token in tokens]
    return [backend.token_to_id(token) for token in tokens]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --- hub ids -----------------------------------------------------------------------------------


def _hub_snapshot(repo_id: str, status: Status) -> str:
    """A local snapshot of `repo_id`: from the cache, else downloaded (never when offline)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"model '{repo_id}' is not in the local Hugging Face cache and "
                         "HF_HUB_OFFLINE is set", MODEL_HELP)
    status(f"downloading {repo_id} from the Hugging Face hub")
    try:
        return snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"],
        )
    except Exception as e:
        raise ModelError(f"cannot download '{repo_id}' from the Hugging Face hub: "
                         f"{_first_line(e)}", MODEL_HELP) from e


def fit_dialog(dialog: Dialog, model: LoadedModel, template: str | None, max_new_tokens: int,
               truncate: bool, who: str) -> tuple[list[int], int]:
    """(the dialog's ids, how many exchanges were dropped to fit the model's context).

    Exchanges go oldest first (a persona's examples, then a conversation's earliest lines), only
    with `truncate`; a dialog that still does not fit is refused with the token counts.
    """
    limit = model.context_length
    room = (limit - max_new_tokens) if limit else None
    ids = model.prompt_ids(dialog, template)
    dropped = 0
    while room is not None and len(ids) > room and truncate and dialog.examples:
        dialog = Dialog(dialog.system, dialog.examples[1:], dialog.user)
        ids = model.prompt_ids(dialog, template)
        dropped += 1
    if room is not None and len(ids) > room:
        raise InputError(
            f"{who}: the prompt is {len(ids)} tokens"
            + (f" (after dropping all {dropped} exchanges)" if dropped else "")
            + f" and {max_new_tokens} new tokens are asked for, but the model's context is {limit} tokens",
            "shorten the prompt" + ("" if dropped else ", pass --truncate to drop examples")
            + " or lower --max-new-tokens",
        )
    return ids, dropped
