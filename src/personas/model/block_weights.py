"""On the CPU, a GGUF model's linear layers can multiply with the file's own 4- and 8-bit blocks
(Q4_0, Q4_1, Q8_0) instead of float16 copies of them: `--cpu-weights gguf`.

A one-row decode step is bound by reading the weights once: the embedded model's float16 weights
are 269 MB a step, its Q4_1/Q8_0 blocks 98 MB. Neither torch nor a library it ships
multiplies float32 rows by such blocks on x86 without rounding the rows to 8 bits (torch's int4
and int8 kernels, fbgemm's dynamic quantization) or running slower than float16
(docs/performance.md, "How does the CPU compare with llama.cpp?"), hence personas' own kernel,
block_kernel.c. It keeps about 16 bits of each row (two int8 planes per block of 32 values) where
llama.cpp keeps 8, and gives a row the same product whatever its batch.

The blocks are found when a GGUF file is converted (gguf_cache.py): transformers dequantizes
every tensor to float32, and `find_blocks` recovers, per block of 32 weights, a scale, an offset
and integers that give back every float32 weight exactly — the file's blocks, in its layout-free
form, whatever transformers did to the tensor's rows on the way (Llama's q/k permutation).
A tensor that no such blocks reproduce (another quantization type, or float weights) is left to
float16. They are saved beside the converted weights as `blocks.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import block_kernel
from .projections import Plan, plan_products, replace_products

BLOCKS_FILE = "blocks.safetensors"
BLOCK = 32


class Blocks:
    """A weight matrix as blocks of 32: weight = scale * integer + offset, per output and block.
    `integers`: uint8 [outputs, inputs] (0–15 for 4 bits, 0–255 for 8); `scale`, `offset`:
    float16 [outputs, inputs / 32]."""

    def __init__(self, bits: int, integers: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        self.bits, self.integers, self.scale, self.offset = bits, integers, scale, offset

    def dequantized(self) -> torch.Tensor:
        """The float32 weights the blocks stand for (each rounded once from the exact value)."""
        n, width = self.integers.shape
        exact = (self.integers.double().view(n, -1, BLOCK) * self.scale.double()[..., None]
                 + self.offset.double()[..., None])
        return exact.view(n, width).float()


def find_blocks(weight: torch.Tensor, chunk_elements: int = 1 << 21) -> Blocks | None:
    """Blocks that reproduce `weight` (float32 [outputs, inputs]) exactly, 4-bit if any do, else
    8-bit; None when neither does."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK or weight.dtype != torch.float32:
        return None
    rows_per_chunk = max(1, chunk_elements // weight.shape[1])
    for bits in (4, 8):
        parts = []
        for start in range(0, weight.shape[0], rows_per_chunk):
            part = _recover(weight[start:start + rows_per_chunk], bits)
            if part is None:
                break
            parts.append(part)
        else:
            return Blocks(bits, *(torch.cat(pieces) for pieces in zip(*parts)))
    return None


def _recover(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...] | None:
    values = weight.detach().double().view(weight.shape[0], -1, BLOCK)
    if bits == 4:
        # Q4_1 spans its block: d = (max - min) / 15 upward from the minimum. Q4_0 is w = d * (q - 8)
        # with q = 0 for the value largest in size, w0 = -8 d: an offset of w0, a scale of -w0 / 8.
        # Where Q4_0's form gives back every block of the chunk, it is taken for all of them: a
        # Q4_0 layer then comes out symmetric, and the kernel derives its offsets instead of
        # reading them. Elsewhere each block takes Q4_1's form, or Q4_0's where Q4_1's misses.
        largest = values.gather(-1, values.abs().argmax(-1, keepdim=True)).squeeze(-1)
        q4_0 = _candidate(values, -largest / 8, largest, 15)
        if bool(q4_0[0].all()):
            found = q4_0
        else:
            low, high = values.amin(-1), values.amax(-1)
            found = _either(_candidate(values, (high - low) / 15, low, 15), q4_0)
    else:
        # Q8_0: w = d * q with q in -127..127, stored as q + 128.
        scale = values.abs().amax(-1) / 127
        found = _candidate(values, scale, -128 * scale, 255)
    exact, integers, scale, offset = found
    if not bool(exact.all()) or not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        return None
    return integers.to(torch.uint8).view(weight.shape[0], -1), scale, offset


def _candidate(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """(which blocks it gives back exactly, integers, scale, offset) for one form's float16 scale
    and offset per block of `values` (float64 [rows, blocks, 32])."""
    scale, offset = scale.half(), offset.half()
    step = scale.double()[..., None]
    integers = ((values - offset.double()[..., None]) / torch.where(step == 0, 1.0, step)).round().clamp(0, top)
    exact = ((integers * step + offset.double()[..., None]).float().double() == values).all(-1)
    return exact, integers, scale, offset


def _either(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Each block from `first` where it gives the block back, else from `second`."""
    use = second[0] & ~first[0]
    return (first[0] | second[0], torch.where(use[..., None], second[1], first[1]),
            torch.where(use, second[2], first[2]), torch.where(use, second[3], first[3]))


class PackedBlocks:
    """A layer's blocks in the layout block_kernel.c reads — what is saved, loaded and multiplied.
    Outputs in groups of 16 (the last group filled with zero weights); `packed`: uint8 [group,
    block, step, 16 outputs, 4 inputs], 8 steps of 4 inputs per block (4-bit: two steps to a byte,
    the even step in the low nibbles); `scale`, `offset`: float16 [group, block, 16 outputs]."""

    def __init__(self, bits: int, outputs: int, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        self.bits, self.outputs, self.packed, self.scale, self.offset = bits, outputs, packed, scale, offset
        self.width = packed.shape[1] * BLOCK

    @classmethod
    def of(cls, blocks: Blocks) -> "PackedBlocks":
        n, width = blocks.integers.shape
        groups, count = -(-n // 16), width // BLOCK
        fill = groups * 16 - n

        def by_group(values: torch.Tensor) -> torch.Tensor:
            values = torch.nn.functional.pad(values, (0, 0, 0, fill))
            return values.view(groups, 16, count).transpose(1, 2).contiguous()

        integers = torch.nn.functional.pad(blocks.integers, (0, 0, 0, fill))
        steps = integers.view(groups, 16, count, 8, 4).permute(0, 2, 3, 1, 4)
        if blocks.bits == 4:
            steps = steps[:, :, 0::2] | (steps[:, :, 1::2] << 4)
        return cls(blocks.bits, n, steps.contiguous(), by_group(blocks.scale), by_group(blocks.offset))

    def unpacked(self) -> Blocks:
        """The blocks in rows again: `of`, undone."""
        groups, count = self.packed.shape[:2]
        steps = self.packed
        if self.bits == 4:
            steps = torch.stack([steps & 0x0F, steps >> 4], dim=3).view(groups, count, 8, 16, 4)
        integers = steps.permute(0, 3, 1, 2, 4).reshape(groups * 16, count * BLOCK)[:self.outputs]

        def by_output(values: torch.Tensor) -> torch.Tensor:
            return values.transpose(1, 2).reshape(groups * 16, count)[:self.outputs]

        return Blocks(self.bits, integers, by_output(self.scale), by_output(self.offset))

    def dequantized(self) -> torch.Tensor:
        return self.unpacked().dequantized()

    @classmethod
    def concatenated(cls, parts: list["PackedBlocks"]) -> "PackedBlocks":
        """One layer of the parts' outputs end to end (fused q/k/v, gate/up; all of one bit width).
        Parts whose outputs fill whole groups are joined as they are; others are repacked."""
        if len(parts) == 1:
            return parts[0]

        def joined(triples: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
            return [torch.cat(pieces) for pieces in zip(*triples)]

        if all(part.outputs % 16 == 0 for part in parts[:-1]):
            return cls(parts[0].bits, sum(part.outputs for part in parts),
                       *joined([(p.packed, p.scale, p.offset) for p in parts]))
        rows = [part.unpacked() for part in parts]
        return cls.of(Blocks(parts[0].bits, *joined([(b.integers, b.scale, b.offset) for b in rows])))


FORMAT = "personas-blocks-2"  # 2: the kernel's layout, so that loading is reading


def save_blocks(model: Any, folder: Path) -> int:
    """Write the blocks of every linear layer that has them into `folder`, in the kernel's
    layout; how many layers did."""
    from safetensors.torch import save_file

    tensors, metadata = {}, {"format": FORMAT}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        blocks = find_blocks(module.weight)
        if blocks is None:
            continue
        packed = PackedBlocks.of(blocks)
        tensors[f"{name}.packed"], tensors[f"{name}.scale"], tensors[f"{name}.offset"] = \
            packed.packed, packed.scale, packed.offset
        metadata[f"{name}.bits"], metadata[f"{name}.outputs"] = str(packed.bits), str(packed.outputs)
    if tensors:
        save_file(tensors, str(folder / BLOCKS_FILE), metadata=metadata)
    return len(tensors) // 3


class BlocksUnreadable(Exception):
    """The blocks file exists but cannot be read (damaged, or written by another version)."""


def read_blocks(folder: Path) -> dict[str, PackedBlocks]:
    """The blocks saved in `folder`, by linear layer name (none when there is no file)."""
    from safetensors import safe_open

    path = Path(folder) / BLOCKS_FILE
    if not path.is_file():
        return {}
    found = {}
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, where this version reads {FORMAT!r}")
            for key, bits_text in metadata.items():
                if not key.endswith(".bits"):
                    continue
                name = key[:-len(".bits")]
                found[name] = PackedBlocks(int(bits_text), int(metadata[f"{name}.outputs"]),
                                           *(file.get_tensor(f"{name}.{part}") for part in ("packed", "scale", "offset")))
    except Exception as e:  # safetensors raises its own error type, and OSError, ValueError, ...
        raise BlocksUnreadable(f"{path} cannot be read ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e
    return found


def symmetric(blocks: PackedBlocks) -> bool:
    """Every offset is -2^(bits-1) times its scale, exactly: Q4_0's w = d(u - 8) and Q8_0's
    w = d(u - 128), where block_kernel.c derives the offsets instead of reading them."""
    return torch.equal(blocks.offset.float(), blocks.scale.float() * -(2 ** (blocks.bits - 1)))


class BlockLinear(nn.Module):
    """A linear layer whose weights are a GGUF file's blocks, multiplied by block_kernel.c."""

    def __init__(self, blocks: PackedBlocks, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = blocks.outputs, blocks.width
        self.bits = blocks.bits
        self.computed = blocks.packed.shape[0] * 16  # outputs rounded up to the kernel's groups of 16
        # Plain attributes, not buffers: the kernel holds their addresses, so `model.float()` or
        # `.to()` must not replace them. Symmetric blocks keep no offsets: the kernel derives
        # them, and a one-row product, bound by reading, reads a tenth less of a Q4_0 layer.
        self.packed, self.scale = blocks.packed, blocks.scale
        self.offset: torch.Tensor | None = None if symmetric(blocks) else blocks.offset
        self.bias = None if bias is None else torch.nn.functional.pad(
            bias.detach().float(), (0, self.computed - self.out_features)).contiguous()
        self.multiply = block_kernel.product(self.packed, self.scale, self.offset, self.bits, self.computed,
                                             self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()
        y = self.multiply(rows)
        if self.computed != self.out_features:
            y = y[:, :self.out_features].contiguous()
        return y.view(*x.shape[:-1], self.out_features)

    def stored_bytes(self) -> int:
        """What one product reads: the packed integers, scales and offsets (where kept)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset) if t is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.bits}-bit GGUF blocks"


def usable_blocks(folder: Path) -> dict[str, PackedBlocks]:
    """The blocks saved in `folder` (none when there are none), where this machine runs their
    kernel. Raises KernelUnavailable or BlocksUnreadable (a damaged file)."""
    saved = read_blocks(folder)
    if saved:
        block_kernel.load()
    return saved


def use_block_weights(model: Any, saved: dict[str, PackedBlocks]) -> int:
    """Replace the linear layers of `model` named in `saved` (usable_blocks) with `BlockLinear`,
    q/k/v and gate/up fused where all parts have blocks of the same width. Their weights may be
    left unread (on the meta device). Returns how many layers were replaced (fused groups count once)."""
    names = {id(module): name for name, module in model.named_modules()}

    def blocks_of(module: nn.Module) -> PackedBlocks | None:
        return saved.get(names.get(id(module), "")) if type(module) is nn.Linear else None

    plans = plan_products(model, lambda module: blocks_of(module) is not None,
                          lambda parts: len({blocks_of(p).bits for p in parts}) == 1)

    def build(plan: Plan) -> BlockLinear:
        owner, projection_names, _ = plan
        parts = [getattr(owner, name) for name in projection_names]
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        return BlockLinear(PackedBlocks.concatenated([blocks_of(p) for p in parts]), bias)

    replace_products(plans, [build(plan) for plan in plans])
    return len(plans)
