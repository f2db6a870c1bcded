"""A CPU pass's layers as one C call (cpu_layers.c), where every projection is GGUF blocks.

With the GGUF file's blocks (model/block_weights.py) a one-row step of the embedded model spends
about as long in the ~40 small torch operations each layer makes — norms, rotary, the cache
write, masks, two attention parts and their merge, SiLU, residual adds, each a few microseconds
of dispatch for a few hundred numbers — as in its products (docs/performance.md, "How does the
CPU compare with llama.cpp?"). No library runs a Llama layer over personas' own cache layout
(pages plus a shared prefix pool), so this file's C does: one call for all layers, the products
through block_kernel.c's function in the same library, the rest in AVX-512 next to them.

Rows each add one token: a decode step's rows, or a prompt's positions, each a row of its own
sequence that attends to the positions before it (`prompt`). A prompt pass through the modules
spends about a quarter of its time in those same small operations, the attention over hundreds
of positions the largest (docs/performance.md); here its rows share the step's products and
attend in the same loops as decoding, so a position's numbers are the same whether its prompt is
encoded as a shared prefix, as a row's own rest, or one token at a time. Every other model
keeps the modules (decoder.py). Built by `CpuLayers.of(decoder)`, which says None where this
does not apply: not the CPU, not float32, a projection that is not blocks, a width the kernel
does not take, or the kernel cannot be built.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch

from ...model import block_kernel
from ...model.block_weights import BlockLinear
from ...model.projections import FusedProjection

SOURCE = Path(__file__).with_name("cpu_layers.c")
VECTOR = 16  # floats in an AVX-512 register: the widths the C loops step through
MAX_HEAD_DIM = 256  # cpu_layers.c keeps a head's attention sums in registers
# A prompt's rows a call: the call's attention scratch is rows × heads × positions floats, so a
# long prompt goes in chunks, each attending to the keys the earlier ones wrote.
PROMPT_CHUNK = 256

pointer, integer = ctypes.c_void_p, ctypes.c_int


class _Product(ctypes.Structure):
    _fields_ = [("weights", pointer), ("d", pointer), ("m", pointer), ("bias", pointer),
                ("bits", integer), ("outputs", integer), ("width", integer)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Product), ("o", _Product), ("gate_up", _Product), ("down", _Product),
                ("input_norm", pointer), ("post_norm", pointer), ("q_norm", pointer), ("k_norm", pointer),
                ("cache_keys", pointer), ("cache_values", pointer),
                ("prefix_keys", pointer), ("prefix_values", pointer)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", integer), ("hidden", integer), ("intermediate", integer), ("heads", integer),
                ("kv_heads", integer), ("head_dim", integer), ("page", integer), ("table_width", integer),
                ("prefix_capacity", integer), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("cos", pointer), ("sin", pointer), ("table", pointer), ("write_at", pointer),
                ("prefix_starts", pointer), ("prefix_lengths", pointer)]


def _library() -> ctypes.CDLL:
    lib = block_kernel.compiled((block_kernel.SOURCE, SOURCE))
    lib.decode_layers.argtypes = [ctypes.POINTER(_Layer), integer, ctypes.POINTER(_Step), pointer]
    lib.decode_layers.restype = integer
    return lib


def _product(linear: Any) -> _Product | None:
    if type(linear) is not BlockLinear:
        return None
    bias = linear.bias.data_ptr() if linear.bias is not None else None
    offset = linear.offset.data_ptr() if linear.offset is not None else None  # None: symmetric blocks
    return _Product(linear.packed.data_ptr(), linear.scale.data_ptr(), offset, bias,
                    linear.bits, linear.computed, linear.in_features)


def _fused(group: Any, sizes: list[int]) -> _Product | None:
    """The fused product of q/k/v (gate/up), where it is blocks with exactly those parts."""
    if not isinstance(group, FusedProjection) or list(group.sizes) != sizes:
        return None
    return _product(group.linear)


def _norm(module: Any, size: int) -> torch.Tensor | None:
    """An RMSNorm's weight where the module is the plain Llama one over `size` float32 values."""
    weight = getattr(module, "weight", None)
    if getattr(module, "variance_epsilon", None) is None or weight is None:
        return None
    if weight.dtype != torch.float32 or weight.shape != (size,) or not weight.is_contiguous():
        return None
    return weight


class CpuLayers:
    """The decoder's layers as C: `logits` is `Decoder.run` for a decode step (one query a row)
    over the runner's cache pages and the prefix pool, `prompt` for a prompt's positions; their
    numbers the modules' up to rounding."""

    # `decoder` is engine/decoder.py's Decoder (not imported: the decoder imports this folder).
    def __init__(self, decoder: Any, library: ctypes.CDLL, products: list[tuple[_Product, ...]],
                 norms: list[tuple[torch.Tensor | None, ...]]):
        self.decoder, self.library = decoder, library
        self.products, self.norms = products, norms
        config = decoder.model.config
        self.hidden, self.intermediate = config.hidden_size, config.intermediate_size
        self.eps = float(decoder.layers[0].input_layernorm.variance_epsilon)
        self._layers: ctypes.Array | None = None
        self._bound: tuple = ()

    @classmethod
    def of(cls, decoder: Any) -> "CpuLayers | None":
        """CpuLayers for `decoder`'s model, or None where the C step does not apply (the modules run)."""
        config = decoder.model.config
        hidden, intermediate = getattr(config, "hidden_size", 0), getattr(config, "intermediate_size", 0)
        if (decoder.device.type != "cpu" or decoder.dtype != torch.float32 or getattr(config, "hidden_act", None) != "silu"
                or any(size % VECTOR for size in (hidden, intermediate, decoder.head_dim))
                or decoder.head_dim > MAX_HEAD_DIM):
            return None
        heads, kv_heads, head_dim = decoder.heads, decoder.kv_heads, decoder.head_dim
        products, norms = [], []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            found = (_fused(getattr(attention, "qkv_proj", None), [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]),
                     _product(attention.o_proj),
                     _fused(getattr(mlp, "gate_up_proj", None), [intermediate, intermediate]),
                     _product(mlp.down_proj))
            weights = (_norm(layer.input_layernorm, hidden), _norm(layer.post_attention_layernorm, hidden))
            head_norms = ((_norm(attention.q_norm, head_dim), _norm(attention.k_norm, head_dim))
                          if decoder.head_norms else (None, None))
            if (None in found or None in weights or (decoder.head_norms and None in head_norms)
                    or getattr(layer.input_layernorm, "variance_epsilon", None)
                    != getattr(layer.post_attention_layernorm, "variance_epsilon", None)):
                return None
            products.append(found)
            norms.append(weights + head_norms)
        try:
            library = _library()
        except block_kernel.KernelUnavailable:
            return None
        return cls(decoder, library, products, norms)

    def _layer_array(self, cache_keys: list[torch.Tensor], cache_values: list[torch.Tensor],
                     prefix_keys: list[torch.Tensor] | None, prefix_values: list[torch.Tensor] | None) -> ctypes.Array:
        """The layers' descriptions, rebuilt only when the runner or the pool has replaced its lists of
        tensors (both replace them whole, never in place). The lists are held here, so the tensors
        behind the addresses live as long as the descriptions."""
        bound = (cache_keys, cache_values, prefix_keys, prefix_values)
        if self._layers is None or any(now is not then for now, then in zip(bound, self._bound)):
            def address(tensor: torch.Tensor | None) -> int | None:
                return None if tensor is None else tensor.data_ptr()

            self._layers = (_Layer * len(self.products))(*(
                _Layer(*products, *map(address, norms), keys.data_ptr(), values.data_ptr(),
                       address(prefix_keys[i] if prefix_keys else None),
                       address(prefix_values[i] if prefix_values else None))
                for i, (products, norms, keys, values) in enumerate(zip(self.products, self.norms, cache_keys,
                                                                        cache_values))))
            self._bound = bound
        return self._layers

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, write_at: torch.Tensor,
               cache_keys: list[torch.Tensor], cache_values: list[torch.Tensor],
               prefix: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Logits (rows, vocabulary), float32, of one new token a row (ids, positions: (rows,)),
        its keys and values written to the cache pages at `write_at` through `table` (rows, pages
        a row), attending to them and, with `prefix` = (pool keys, pool values, starts, lengths),
        to the row's span of the prefix pool."""
        hidden = self._through_layers(ids, positions, table, write_at, cache_keys, cache_values, prefix)
        return self.decoder.head(self.decoder.norm(hidden)).float()

    def prompt(self, ids: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, write_at: torch.Tensor,
               cache_keys: list[torch.Tensor], cache_values: list[torch.Tensor],
               prefix: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor] | None,
               last: torch.Tensor | None) -> torch.Tensor | None:
        """`logits` for a prompt's positions, one row each: rows of one sequence share its page
        table row and come in the order of their positions, `write_at` counting its own positions
        (each row reads those up to its own). Logits of the rows `last` only (None: keys and values
        alone)."""
        outputs = []
        for start in range(0, ids.shape[0], PROMPT_CHUNK):
            part = slice(start, start + PROMPT_CHUNK)
            spans = None if prefix is None else (prefix[0], prefix[1], prefix[2][part], prefix[3][part])
            outputs.append(self._through_layers(ids[part], positions[part], table[part], write_at[part],
                                                cache_keys, cache_values, spans))
        if last is None:
            return None
        return self.decoder.head(self.decoder.norm(torch.cat(outputs)[last])).float()

    def _through_layers(self, ids: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                        write_at: torch.Tensor, cache_keys: list[torch.Tensor], cache_values: list[torch.Tensor],
                        prefix: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor] | None
                        ) -> torch.Tensor:
        """The rows' hidden states after every layer, (rows, hidden): one C call."""
        d = self.decoder
        rows = ids.shape[0]
        hidden = d.embed(ids[:, None]).reshape(rows, self.hidden).contiguous()
        cos, sin = d.rotary(hidden, positions[:, None])
        cos, sin = cos.reshape(rows, -1).contiguous(), sin.reshape(rows, -1).contiguous()
        table, write_at = table.to(torch.int32).contiguous(), write_at.to(torch.int64).contiguous()
        keys, values, starts, lengths = prefix if prefix is not None else (None, None, None, None)
        if starts is not None:
            starts, lengths = starts.to(torch.int32).contiguous(), lengths.to(torch.int32).contiguous()
        layers = self._layer_array(cache_keys, cache_values, keys, values)
        page = cache_keys[0].shape[1]
        step = _Step(rows, self.hidden, self.intermediate, d.heads, d.kv_heads, d.head_dim, page, table.shape[1],
                     keys[0].shape[1] if keys else 0, self.eps, d.scale, cos.data_ptr(), sin.data_ptr(),
                     table.data_ptr(), write_at.data_ptr(),
                     starts.data_ptr() if starts is not None else None,
                     lengths.data_ptr() if lengths is not None else None)
        if self.library.decode_layers(layers, len(self.products), ctypes.byref(step), hidden.data_ptr()):
            # Worded as the engine's back-off recognises it (sizing.is_out_of_memory): fewer slots.
            raise MemoryError("out of memory for the CPU layers' scratch")
        return hidden
