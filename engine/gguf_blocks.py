"""Linear layers whose weights stay in a GGUF file's quantized blocks, multiplied in float32.

The embedded default target is a GGUF file (Q4_1 layers, a Q8_0 embedding); the plain path runs it as the
float32 weights its blocks dequantize to, reading 4 bytes per weight. `BlockLinear` keeps the blocks instead
(0.75 bytes per weight for Q4_1, 1.06 for Q8_0), dequantizes one group of weight rows at a time into the CPU's
cache and multiplies in float32 FMA registers (llama.cpp's idea, with float32 activations): the weights are
the same numbers, only the summation order differs from the plain path. The kernel sums each output in one
fixed order whatever the number of rows, so a row's result does not depend on the rows beside it: tree
verification and the autoregressive reference agree bit for bit.

With `q8=True` the same blocks run with llama.cpp's numerics instead: each input row quantized to 8 bits per block
of 32 (a scale, and for Q4_1 weights the block's sum), integer block dot products (exact), float accumulation in
one fixed order per output. Lossy against float32 (docs/q8_activations.md measures how much), still
batch-invariant: a row's result depends on that row alone, so tree and autoregressive greedy agree bit for bit.

The kernel itself (engine/gguf_blocks.c) is compiled and loaded by utils/native_kernels.py and handed in as a
`BlockMatmul`; everything here is plain torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32  # weights per GGUF block, both formats
# format -> (kernel id, bytes per block in the file, bytes of quantized values per block)
FORMATS = {"Q4_1": (0, 20, 16), "Q8_0": (1, 34, 32)}
Q8_ACTIVATIONS = 2  # added to a format's kernel id: the kernel quantizes the activations to 8 bits
Q8_PACKED = 16  # added too when the blocks are in pack_columns' layout (the 8-bit activation kernel reads it)
PACK_ROWS = 16  # weight rows (output columns) per packed group
NUMERICS = {False: "float32 products", True: "8-bit activations, llama.cpp-style (lossy vs float32)"}


@dataclass(frozen=True)
class BlockWeight:
    """One weight matrix [out_features, in_features] in blocks of 32 along each row.

    Q4_1: weight = scale * q + min (q in 0..15; byte j of a block holds q_j in its low nibble and q_{j+16} in
    its high one); Q8_0: weight = q * scale (q int8). `scales`/`mins` [out, in / 32] float32 (`mins` empty for
    Q8_0), `quants` [out, in / 32 * (16 or 32)] uint8.
    """

    format: str
    scales: torch.Tensor
    mins: torch.Tensor
    quants: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def in_features(self) -> int:
        return self.scales.shape[1] * BLOCK

    def rows(self, index: torch.Tensor) -> BlockWeight:
        """The weight rows `index` [r] long, in that order (a row subset, or a permutation)."""
        mins = self.mins[index] if self.mins.numel() else self.mins
        return BlockWeight(self.format, self.scales[index].contiguous(), mins.contiguous(),
                           self.quants[index].contiguous())

    def block_columns(self, blocks: tuple[int, ...]) -> BlockWeight:
        """Only the blocks numbered `blocks` of every row (negative counts from the end), side by side."""
        index = torch.tensor(blocks) % self.scales.shape[1]
        per_block = self.quants.shape[1] // self.scales.shape[1]
        quants = self.quants.reshape(self.out_features, -1, per_block)[:, index].reshape(self.out_features, -1)
        mins = self.mins[:, index] if self.mins.numel() else self.mins
        return BlockWeight(self.format, self.scales[:, index].contiguous(), mins.contiguous(), quants.contiguous())


def concat_rows(weights: list[BlockWeight]) -> BlockWeight:
    """Several weights of one format and width stacked row-wise (q, k and v as one matrix)."""
    return BlockWeight(weights[0].format, torch.cat([w.scales for w in weights]),
                       torch.cat([w.mins for w in weights]), torch.cat([w.quants for w in weights]))


def split_blocks(raw: torch.Tensor, fmt: str) -> BlockWeight:
    """A GGUF tensor's bytes [out, bytes per row] uint8 -> BlockWeight (scales and mins widened from float16,
    which is exact)."""
    if fmt not in FORMATS:
        raise ValueError(f"GGUF block format {fmt} has no kernel here: one of {', '.join(FORMATS)}")
    _, block_bytes, quant_bytes = FORMATS[fmt]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, block_bytes)
    scales = blocks[..., 0:2].contiguous().view(torch.float16).float().reshape(rows, -1)
    if fmt == "Q4_1":
        mins = blocks[..., 2:4].contiguous().view(torch.float16).float().reshape(rows, -1)
    else:
        mins = torch.empty(0)
    quants = blocks[..., block_bytes - quant_bytes:].reshape(rows, -1).contiguous()
    return BlockWeight(fmt, scales.contiguous(), mins.contiguous(), quants)


def dequantize(weight: BlockWeight) -> torch.Tensor:
    """[out, in] float32: the numbers the blocks stand for, rounded as gguf-py's dequantizer rounds them
    (scale * q, then + min), which is what transformers loads."""
    rows, blocks = weight.scales.shape
    if weight.format == "Q4_1":
        packed = weight.quants.reshape(rows, blocks, 16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
        values = weight.scales[..., None] * q + weight.mins[..., None]
    else:
        q = weight.quants.reshape(rows, blocks, BLOCK).view(torch.int8).float()
        values = q * weight.scales[..., None]
    return values.reshape(rows, blocks * BLOCK)


def pack_columns(weight: BlockWeight) -> BlockWeight:
    """The 8-bit activation kernel's layout (engine/gguf_blocks.c `unpack_packed_group`): the same tensors, the
    same shapes, contents reordered within each group of 16 weight rows so the kernel reads, per block, quad and
    half of 8 rows, its vectors as they lie (lane c = row c's 4 bytes of that quad) instead of transposing them
    on every call. Rows must be a multiple of 16; only whole groups may be sliced or concatenated afterwards."""
    rows, blocks = weight.scales.shape
    if rows % PACK_ROWS:
        raise ValueError(f"pack_columns needs a multiple of {PACK_ROWS} rows, got {rows}")
    groups, half = rows // PACK_ROWS, PACK_ROWS // 2
    dwords = weight.quants.view(torch.int32).reshape(groups, 2, half, blocks, -1)  # [g, h, c, b, j]
    quants = dwords.permute(0, 3, 4, 1, 2).contiguous().view(torch.uint8).reshape(rows, -1)  # [g, b, j, h, c]

    def per_block(values: torch.Tensor) -> torch.Tensor:  # [rows, blocks] -> [g, b, 16] in the same shape
        if not values.numel():
            return values
        return values.reshape(groups, PACK_ROWS, blocks).transpose(1, 2).contiguous().reshape(rows, blocks)

    return BlockWeight(weight.format, per_block(weight.scales), per_block(weight.mins), quants)


def quantize_q8_0(weight: torch.Tensor) -> BlockWeight:
    """[out, in] float weights -> Q8_0 blocks as ggml (and gguf-py) quantize them: per 32 weights a scale
    max|w| / 127 (stored as float16) and q = round(w / scale), halves away from zero. Lossy (about 0.4% of a
    block's largest weight): for weights that no GGUF file holds, such as a trained draft's own layers."""
    rows, cols = weight.shape
    values = weight.detach().float().reshape(rows, cols // BLOCK, BLOCK)
    scale = values.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    scaled = values * inverse
    q = torch.trunc(scaled + torch.copysign(torch.full_like(scaled, 0.5), scaled)).to(torch.int8)
    return BlockWeight("Q8_0", scale[..., 0].half().float().contiguous(), torch.empty(0),
                       q.reshape(rows, cols).view(torch.uint8).contiguous())


# (kernel id, x [M, K] float32, weight, out [M, N] float32) -> None: the compiled kernel's call
BlockMatmul = Callable[[int, torch.Tensor, BlockWeight, torch.Tensor], None]


class BlockLinear(nn.Module):
    """`nn.Linear`'s call over a BlockWeight. Keeps the original float32 `weight` (shared, no copy) for code
    that reads it, and runs `F.linear` on it for inputs the kernel does not take (another dtype or device,
    autograd). `q8`: activations quantized to 8 bits in the kernel (llama.cpp's numerics, lossy)."""

    def __init__(self, linear: nn.Linear, blocks: BlockWeight, matmul: BlockMatmul, q8: bool = False) -> None:
        super().__init__()
        if (blocks.out_features, blocks.in_features) != (linear.out_features, linear.in_features):
            raise ValueError(f"blocks of shape {blocks.out_features}x{blocks.in_features} for a linear layer of "
                             f"{linear.out_features}x{linear.in_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.kernel_id = FORMATS[blocks.format][0] + (Q8_ACTIVATIONS if q8 else 0)
        if q8 and blocks.out_features % PACK_ROWS == 0:  # every real layer; others are unpacked on each call
            blocks, self.kernel_id = pack_columns(blocks), self.kernel_id + Q8_PACKED
        self.blocks, self.matmul = blocks, matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return _run_blocks(x, self.blocks, self.matmul, self.kernel_id, bias)


class FusedBlockLinear(nn.Module):
    """Several BlockLinears reading the same input (q/k/v, gate/up) run as one kernel call: one pass over the
    input, one thread fork, and one dequantization loop instead of two or three. Returns the layers' outputs as
    a tuple. Each output is summed exactly as the separate layer sums it (rows are independent in the kernel),
    so the results are the same bits. The separate layers keep working, their blocks now views into this one's.
    """

    @staticmethod
    def can_fuse(parts: list) -> bool:
        """Whether these layers are BlockLinears of one kernel (format and numerics), width and bias presence."""
        return all(isinstance(part, BlockLinear) for part in parts) and \
            len({(part.kernel_id, part.in_features, part.bias is None) for part in parts}) == 1

    def __init__(self, parts: list[BlockLinear]) -> None:
        super().__init__()
        if not self.can_fuse(parts):
            raise ValueError("only layers of one kernel, width and bias presence can be fused")
        self.in_features = parts[0].in_features
        self.sizes = [p.out_features for p in parts]
        self.blocks, self.matmul, self.kernel_id = concat_rows([p.blocks for p in parts]), parts[0].matmul, \
            parts[0].kernel_id
        self.bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        self.parts = parts
        start = 0
        for part in parts:  # the separate layers read the same memory
            part.blocks = _row_range(self.blocks, start, part.out_features)
            start += part.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return tuple(part(x) for part in self.parts)
        return _run_blocks(x, self.blocks, self.matmul, self.kernel_id, self.bias).split(self.sizes, dim=-1)


def _run_blocks(x: torch.Tensor, blocks: BlockWeight, matmul: BlockMatmul, kernel_id: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] float32 on the CPU -> [..., out] through the kernel (inputs made contiguous rows)."""
    rows = x.reshape(-1, blocks.in_features).contiguous()
    out = torch.empty(rows.shape[0], blocks.out_features)
    matmul(kernel_id, rows, blocks, out)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], blocks.out_features)


def _row_range(weight: BlockWeight, start: int, count: int) -> BlockWeight:
    """Rows [start, start + count) as views (rows are the leading, contiguous dimension)."""
    mins = weight.mins[start:start + count] if weight.mins.numel() else weight.mins
    return BlockWeight(weight.format, weight.scales[start:start + count], mins, weight.quants[start:start + count])
