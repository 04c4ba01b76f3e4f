"""Finding each float32 linear layer's weights among a GGUF file's quantized blocks.

transformers loads a GGUF checkpoint dequantized (and reorders the rows of q/k for its rotary layout), and a
feature draft's head is a row subset of the target's embedding; so instead of trusting tensor names, every row
of a layer is looked up by the exact float32 bits of its first and last block among the dequantized rows of
the file, and the match is then checked whole (`torch.equal`) before the layer runs on the blocks. A layer
that is not found takes the other kernels (engine/linear_paths.py).
"""
from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.gguf_blocks import BLOCK, FORMATS, BlockMatmul, BlockWeight, dequantize, quantize_q8_0, split_blocks
from utils.errors import UserError
from utils.models import gguf_source
from utils.native_kernels import blocks_kernel

KEY_COLUMNS = 2 * BLOCK  # a row is looked up by its first and last block


def row_keys(ends: torch.Tensor) -> torch.Tensor:
    """[rows] int64 from [rows, 64] float32 (a row's first and last block): the bits times fixed odd
    multipliers, summed with wrap-around; exact integer arithmetic, so equal rows give equal keys."""
    multipliers = torch.randint(1, 2**62, (KEY_COLUMNS,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.long) | 1
    return (ends.contiguous().view(torch.int32).long() * multipliers).sum(dim=1)


def _ends(weight: torch.Tensor) -> torch.Tensor:
    return torch.cat([weight[:, :BLOCK], weight[:, -BLOCK:]], dim=1)


GGUF_TYPE_IDS = {3: "Q4_1", 8: "Q8_0"}  # ggml type id -> block format (engine/gguf_blocks.py FORMATS)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # gguf metadata value types


def read_gguf_matrices(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{tensor name: (block format, its bytes [rows, bytes per row] uint8, memory-mapped)} for the 2-D Q4_1 and
    Q8_0 tensors of a GGUF (v2/v3) file. Reads only what it needs of the header: gguf-py's reader parses every
    metadata array element (the tokenizer's 100k strings) and takes seconds."""
    with open(path, "rb") as handle:
        header = handle.read(24)
        if header[:4] != b"GGUF":
            raise UserError(f"{path} is not a GGUF file")
        version, tensor_count, kv_count = struct.unpack("<IQQ", header[4:24])
        if version < 2:
            raise UserError(f"{path} is a GGUF v{version} file; the gguf kernels read v2 and later (pass --kernel plain)")
        read = handle.read

        def string() -> str:
            (length,) = struct.unpack("<Q", read(8))
            return read(length).decode("utf-8", "replace")

        def skip_value(kind: int) -> int | None:
            if kind == 8:
                string()
            elif kind == 9:
                item, count = struct.unpack("<IQ", read(12))
                if item in _SCALAR_SIZES:
                    handle.seek(_SCALAR_SIZES[item] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                value = read(_SCALAR_SIZES[kind])
                return int.from_bytes(value, "little") if kind in (4, 10) else None
            return None

        alignment = 32
        for _ in range(kv_count):
            key = string()
            (kind,) = struct.unpack("<I", read(4))
            value = skip_value(kind)
            if key == "general.alignment" and value:
                alignment = value
        infos = []
        for _ in range(tensor_count):
            name = string()
            (dims,) = struct.unpack("<I", read(4))
            shape = struct.unpack(f"<{dims}Q", read(8 * dims))
            kind, offset = struct.unpack("<IQ", read(12))
            infos.append((name, shape, kind, offset))
        data_start = -(-handle.tell() // alignment) * alignment
    data = np.memmap(path, dtype=np.uint8, mode="r")
    matrices = {}
    for name, shape, kind, offset in infos:
        if kind in GGUF_TYPE_IDS and len(shape) == 2 and shape[0] % BLOCK == 0:
            fmt = GGUF_TYPE_IDS[kind]
            row_bytes = shape[0] // BLOCK * FORMATS[fmt][1]
            start = data_start + offset
            matrices[name] = (fmt, data[start:start + row_bytes * shape[1]].reshape(shape[1], row_bytes))
    return matrices


class GgufBlocks:
    """The quantized tensors of one GGUF file, indexed by the exact bits of each dequantized row."""

    def __init__(self, tensors: dict[str, BlockWeight]) -> None:
        self.tensors = tensors
        self._index: dict[int, dict[int, list[tuple[str, int]]]] = {}  # in_features -> key -> [(tensor, row)]

    @classmethod
    def read(cls, path: Path) -> GgufBlocks:
        """The Q4_1/Q8_0 matrices of a GGUF file (other tensors are not linear weights this path runs)."""
        tensors = {name: split_blocks(torch.from_numpy(raw.copy()), fmt)
                   for name, (fmt, raw) in read_gguf_matrices(path).items() if fmt in FORMATS}
        return cls(tensors)

    def _rows_of_width(self, width: int) -> dict[int, list[tuple[str, int]]]:
        if width not in self._index:
            index: dict[int, list[tuple[str, int]]] = {}
            for name, blocks in self.tensors.items():
                if blocks.in_features == width:
                    keys = row_keys(dequantize(blocks.block_columns((0, -1)))).tolist()
                    for row, key in enumerate(keys):
                        index.setdefault(key, []).append((name, row))
            self._index[width] = index
        return self._index[width]

    def _locate(self, row: torch.Tensor, candidates: list[tuple[str, int]]) -> tuple[str, int] | None:
        """The candidate whose whole row equals `row` (rows that share their first and last block)."""
        for name, index in candidates:
            if torch.equal(dequantize(self.tensors[name].rows(torch.tensor([index])))[0], row):
                return name, index
        return None

    def find(self, weight: torch.Tensor) -> BlockWeight | None:
        """The blocks whose dequantized rows equal `weight` [out, in] float32 exactly, row for row; None when
        any row is missing or the rows come from more than one tensor."""
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK:
            return None
        weight = weight.detach()
        index = self._rows_of_width(weight.shape[1])
        found = []
        for row, key in enumerate(row_keys(_ends(weight)).tolist()):
            candidates = index.get(key, [])
            found.append(candidates[0] if len(candidates) == 1 else self._locate(weight[row], candidates))
        if not found or None in found or len({name for name, _ in found}) != 1:
            return None
        rows = torch.tensor([row for _, row in found])
        blocks = self.tensors[found[0][0]]
        blocks = blocks if torch.equal(rows, torch.arange(blocks.out_features)) else blocks.rows(rows)
        return blocks if torch.equal(dequantize(blocks), weight) else None

    def linears_found(self, module: nn.Module) -> dict[nn.Linear, BlockWeight]:
        """Each `nn.Linear` under `module` whose weights are in the file (shared weights, as a tied head, are
        looked up once)."""
        found, by_weight = {}, {}
        for child in module.modules():
            if type(child) is nn.Linear:
                key = id(child.weight)
                if key not in by_weight:
                    by_weight[key] = self.find(child.weight)
                if by_weight[key] is not None:
                    found[child] = by_weight[key]
        return found


@functools.cache
def _blocks_of(path: Path) -> GgufBlocks:
    return GgufBlocks.read(path)


def gguf_path_unavailable(target_spec: str | None) -> str | None:
    """Why the "gguf" and "q8" linear paths cannot run for this target here (None when it can)."""
    if gguf_source(target_spec) is None:
        return "the target is not a GGUF file"
    return blocks_kernel().why or None


def gguf_linears(target_spec: str | None, module: nn.Module, quantize_rest: bool = False,
                 path: str = "gguf") -> tuple[dict[nn.Linear, BlockWeight], BlockMatmul]:
    """For a target loaded from a GGUF file: the linears of `module` (the target, or its draft, whose head may be
    the target's embedding) found in the file, and the compiled kernel; what `apply_linear_path(module, "gguf",
    ...)` takes. With `quantize_rest` (a draft) every other float32 linear whose width is a multiple of 32 is
    quantized to Q8_0 (`quantize_q8_0`): a draft's own layers then run on blocks too, their proposals off by
    Q8_0 rounding, which changes what is accepted, never the output. Raises UserError when the path cannot run
    here."""
    why = gguf_path_unavailable(target_spec)
    if why is not None:
        raise UserError(f"--kernel {path} cannot run here: {why}; pass --kernel plain or onednn")
    found = _blocks_of(gguf_source(target_spec)).linears_found(module)
    if quantize_rest:
        found.update({child: quantize_q8_0(child.weight) for child in module.modules()
                      if type(child) is nn.Linear and child not in found and child.weight.dtype == torch.float32
                      and child.in_features % BLOCK == 0})
    return found, blocks_kernel().matmul
