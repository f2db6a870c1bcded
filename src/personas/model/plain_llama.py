"""A Llama-family checkpoint built as plain torch modules, for the decode engine on the CPU.

The engine's decoder (engine/decoder.py) runs a model's modules one by one — embedding, norms,
projections, rotary embedding, MLP, head — and never transformers' forward. Building those
modules through transformers costs a CPU start about two seconds: importing its configuration
and model classes (which pull in torch's compiler and distributed packages) and its loading
machinery (docs/performance.md, "How long does start-up take?"). This module reads the same
config.json and safetensors and builds modules with the same attribute names and the very same
arithmetic (RMSNorm, rotary tables; tested bit for bit against transformers' own), so the
decoder cannot tell them apart.

Only what is read exactly as transformers reads it is built here: the families the decoder
runs, SiLU MLPs, default or Llama 3 rotary embeddings, every tensor name the layout expects and
no other. Anything else gives None, and the caller loads through transformers as before.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The families whose layers are Llama's, the decoder's (engine/decoder.py's FAMILIES).
from .projections import FUSABLE_FAMILIES as PLAIN_FAMILIES
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class PlainConfig:
    """What config.json says about a plain-built model: its shape, and what LoadedModel and the
    engine read from a configuration (context length, sliding window)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: dict[str, Any]
    tie_word_embeddings: bool | None
    hidden_act: str = "silu"
    max_position_embeddings: int | None = None
    sliding_window: int | None = None
    use_sliding_window: bool = True
    qkv_bias: bool = False  # q, k and v projections with a bias
    o_bias: bool = False
    mlp_bias: bool = False


def read_plain_config(directory: Path) -> PlainConfig | None:
    """The checkpoint's configuration, or None where it is not one this module builds exactly."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "rms_norm_eps")
    if raw.get("model_type") not in PLAIN_FAMILIES or any(raw.get(k) is None for k in needed):
        return None
    if raw.get("auto_map"):  # the model brings code of its own
        return None
    quantization = raw.get("quantization_config")
    # A GGUF converted to plain float32 (the embedded model's cache) still names its source.
    if quantization and quantization.get("quant_method") != "gguf":
        return None
    if raw.get("hidden_act", "silu") != "silu" or raw.get("partial_rotary_factor", 1.0) != 1.0:
        return None
    rope = _rope_parameters(raw)
    if rope is None:
        return None
    heads, kind = raw["num_attention_heads"], raw["model_type"]
    return PlainConfig(
        model_type=kind, hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, vocab_size=raw["vocab_size"],
        rms_norm_eps=raw["rms_norm_eps"], rope=rope, tie_word_embeddings=raw.get("tie_word_embeddings"),
        max_position_embeddings=raw.get("max_position_embeddings"), sliding_window=raw.get("sliding_window"),
        # Qwen's configurations turn the window off unless asked; Llama's and Mistral's have no switch.
        use_sliding_window=raw.get("use_sliding_window", not kind.startswith("qwen")), **_biases(raw))


def _biases(raw: dict[str, Any]) -> dict[str, bool]:
    """Which projections have a bias, as each family's transformers modules decide it (a bias in
    the checkpoint that the config does not ask for is ignored there, so here it is left over)."""
    kind = raw["model_type"]
    if kind == "qwen2":
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
    attention = bool(raw.get("attention_bias", False)) if kind in ("llama", "qwen3") else False
    mlp = bool(raw.get("mlp_bias", False)) if kind == "llama" else False
    return {"qkv_bias": attention, "o_bias": attention, "mlp_bias": mlp}


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The rotary parameters in either layout transformers reads (rope_parameters, or the older
    rope_theta beside rope_scaling), or None: no theta given (each family's default differs), or
    a kind of scaling not built here."""
    rope = dict(raw.get("rope_parameters") or {})
    if not rope:
        rope = dict(raw.get("rope_scaling") or {})
        if raw.get("rope_theta") is not None:
            rope["rope_theta"] = raw["rope_theta"]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("rope_theta") is None or kind not in ROPE_TYPES:
        return None
    if kind == "llama3" and any(rope.get(k) is None for k in LLAMA3_ROPE_KEYS):
        return None
    return {**rope, "rope_type": kind}


class PlainRMSNorm(nn.Module):
    """transformers' Llama RMSNorm, operation for operation."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden.to(dtype)


def inverse_frequencies(config: PlainConfig) -> torch.Tensor:
    """The rotary embedding's inverse frequencies, computed as transformers computes them."""
    base, dim = config.rope["rope_theta"], config.head_dim
    inverse = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if config.rope["rope_type"] == "default":
        return inverse
    # Llama 3's scaling: long wavelengths slowed by `factor`, short ones kept, those between
    # interpolated (transformers' _compute_llama3_parameters).
    factor, low, high = (config.rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_context = config.rope["original_max_position_embeddings"]
    low_wavelength, high_wavelength = old_context / low, old_context / high
    wavelength = 2 * math.pi / inverse
    scaled = torch.where(wavelength > low_wavelength, inverse / factor, inverse)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = ~(wavelength < high_wavelength) * ~(wavelength > low_wavelength)
    return torch.where(between, smoothed, scaled)


class PlainRotary(nn.Module):
    """transformers' rotary embedding module: (cos, sin) for positions, in the input's dtype."""

    def __init__(self, config: PlainConfig):
        super().__init__()
        self.inv_freq = nn.Buffer(inverse_frequencies(config), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


class PlainAttention(nn.Module):
    """The attention's projections (and Qwen 3's norms over each head of q and k); the decoder
    computes the attention itself."""

    def __init__(self, config: PlainConfig, take: "_Take", prefix: str):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, take.linear(f"{prefix}.{name}", config.qkv_bias))
        self.o_proj = take.linear(f"{prefix}.o_proj", config.o_bias)
        self.head_dim = config.head_dim
        self.scaling = config.head_dim ** -0.5
        if config.model_type == "qwen3":
            self.q_norm = PlainRMSNorm(take(f"{prefix}.q_norm.weight"), config.rms_norm_eps)
            self.k_norm = PlainRMSNorm(take(f"{prefix}.k_norm.weight"), config.rms_norm_eps)


class PlainMLP(nn.Module):
    """down(SiLU(gate(x)) × up(x))."""

    def __init__(self, take: "_Take", prefix: str, bias: bool):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, take.linear(f"{prefix}.{name}", bias))
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainLayer(nn.Module):
    def __init__(self, config: PlainConfig, take: "_Take", prefix: str):
        super().__init__()
        self.self_attn = PlainAttention(config, take, f"{prefix}.self_attn")
        self.mlp = PlainMLP(take, f"{prefix}.mlp", config.mlp_bias)
        self.input_layernorm = PlainRMSNorm(take(f"{prefix}.input_layernorm.weight"), config.rms_norm_eps)
        self.post_attention_layernorm = PlainRMSNorm(take(f"{prefix}.post_attention_layernorm.weight"),
                                                     config.rms_norm_eps)


class PlainBody(nn.Module):
    def __init__(self, config: PlainConfig, take: "_Take"):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(take("model.embed_tokens.weight"), freeze=True)
        self.layers = nn.ModuleList(PlainLayer(config, take, f"model.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = PlainRMSNorm(take("model.norm.weight"), config.rms_norm_eps)
        self.rotary_emb = PlainRotary(config)


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json's end-of-sequence ids, all LoadedModel reads of it."""

    eos_token_id: int | list[int] | None = None


class PlainCausalLM(nn.Module):
    """A causal LM as the decoder sees one: `.model` (embed_tokens, layers, norm, rotary_emb),
    `.lm_head`, `.config`, `.generation_config`. It has no forward of its own: only the decode
    engine runs it."""

    def __init__(self, config: PlainConfig, take: "_Take", generation: GenerationDefaults):
        super().__init__()
        self.config, self.generation_config = config, generation
        self.model = PlainBody(config, take)
        tied = config.tie_word_embeddings
        if tied is None:  # unsaid: tied exactly when the checkpoint has no head of its own
            tied = "lm_head.weight" not in take.tensors
        # On the meta device: no random weights made only to be replaced (1 GB for a 128k vocabulary).
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(
            self.model.embed_tokens.weight if tied else take("lm_head.weight"), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # the head's weight may be packed away (half_weights.py)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


class _Take:
    """The checkpoint's tensors as float32, each read once by name when taken; `left` says what
    no module took. Tensors named in `unread` are not read: they come as float32 tensors of their
    shape on the meta device, for the caller to replace."""

    def __init__(self, files: list[Any], unread: Collection[str] = ()):
        self.tensors = {name: file for file in files for name in file.keys()}  # name -> its open file
        self.unread = set(unread)
        self.taken: set[str] = set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise _NotPlain(name)
        self.taken.add(name)
        file = self.tensors[name]
        if name in self.unread:
            return torch.empty(file.get_slice(name).get_shape(), dtype=torch.float32, device="meta")
        return file.get_tensor(name).to(torch.float32)

    def linear(self, prefix: str, bias_wanted: bool) -> nn.Linear:
        weight = self(f"{prefix}.weight")
        bias = self(f"{prefix}.bias") if bias_wanted else None
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def left(self) -> set[str]:
        return set(self.tensors) - self.taken


class _NotPlain(Exception):
    """A tensor the layout expects is missing: not a checkpoint built here."""


def load_plain(directory: str | Path, unread: Collection[str] = ()) -> PlainCausalLM | None:
    """The checkpoint in `directory` as a PlainCausalLM in float32 on the CPU, or None where its
    configuration or tensors are not exactly the layout built here (the caller then loads it
    through transformers). The linear layers named in `unread` keep their weights unread, on the
    meta device: the caller replaces those layers (the GGUF blocks do, block_weights.py)."""
    from safetensors import safe_open

    directory = Path(directory)
    config = read_plain_config(directory)
    if config is None:
        return None
    files = _safetensors_files(directory)
    if not files:
        return None
    with contextlib.ExitStack() as stack:
        take = _Take([stack.enter_context(safe_open(str(file), framework="pt")) for file in files],
                     {f"{name}.weight" for name in unread})
        try:
            model = PlainCausalLM(config, take, _generation_defaults(directory))
        except _NotPlain:
            return None
    # Tied models may still carry a copy of the head; anything else unread is a layout this module
    # does not know (or a tensor transformers would warn about and ignore): transformers decides.
    if take.left() - {"lm_head.weight"}:
        return None
    return model


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            return []
        return [directory / s for s in shards] if all((directory / s).is_file() for s in shards) else []
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def _generation_defaults(directory: Path) -> GenerationDefaults:
    # Without a generation_config.json transformers derives one from config.json.
    for name in ("generation_config.json", "config.json"):
        try:
            return GenerationDefaults(eos_token_id=json.loads((directory / name).read_text()).get("eos_token_id"))
        except (OSError, ValueError):
            continue
    return GenerationDefaults()
