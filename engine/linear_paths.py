"""Optional CPU kernel paths for a model's linear layers, with the plain `nn.Linear` as the fallback.

"plain"   torch's own `F.linear`: MKL/oneDNN GEMV for one row, a GEMM that packs the weight again on every
          call for several rows (on 2 AVX2 cores the step from 1 to 2 rows cost 1.6x in float32, most of it
          re-packing the weight; README "Fast on any CPU").
"onednn"  the weight reordered once into oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`)
          and run with `torch.ops.mkldnn._linear_pointwise`: what inductor's `freezing` pass does for CPU
          linears (torch/_inductor/fx_passes/mkldnn_fusion.py), without compiling the model. float32
          everywhere oneDNN runs; bfloat16 only where oneDNN has a bfloat16 path (AVX512-BF16, AMX,
          AVX-NE-CONVERT).
"gguf"    float32 only: each linear whose weights came from a GGUF file's Q4_1/Q8_0 blocks keeps the blocks
          and runs engine/gguf_blocks.py's kernel (a fifth of the bytes per weight read, the same weights),
          q/k/v and gate/up fused into one call each; the layers not found in the file take "onednn" where it
          runs, else "plain".
"q8"      "gguf" with each activation row quantized to 8 bits per block of 32 in the kernel and integer block
          dot products (llama.cpp's numerics): lossy against float32, still one fixed summation order per row; not
          yet cheaper per row than "gguf" on the CPUs measured (docs/q8_activations.md).

Apart from "q8", a path changes how the products are summed, never what is summed: outputs agree with the plain
path to rounding. Exactness of greedy decoding holds within one path (the target's autoregressive reference and its
tree verification run the same kernels); tests/test_linear_paths.py compares each path with the plain one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.gguf_blocks import NUMERICS, BlockLinear, BlockMatmul, BlockWeight, FusedBlockLinear

LINEAR_PATHS = ("plain", "onednn", "gguf", "q8")
GGUF_PATHS = ("gguf", "q8")  # the paths over a GGUF file's blocks (q8: 8-bit activations, lossy)
EXACT_PATHS = ("plain", "onednn", "gguf")  # the float model's numbers, to summation order
# projections that read the same input, fused on the gguf path: (parent's layers, the fused module's name), which
# engine/model.py's decoder_stack uses when present
FUSED_PROJECTIONS = ((("q_proj", "k_proj", "v_proj"), "qkv_fused"), (("gate_proj", "up_proj"), "gate_up_fused"))


@dataclass(frozen=True)
class KernelPlan:
    """How one model runs: its dtype and the kernel path of its linear layers."""

    dtype: torch.dtype
    linear_path: str = "plain"

    @property
    def label(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}/{self.linear_path}"

    @property
    def lossy(self) -> bool:
        """Whether its numbers differ from the dtype's own model beyond summation order (8-bit activations)."""
        return self.linear_path == "q8"

    @property
    def numerics(self) -> str:
        """What its numbers are, for the printed kernels line and result files."""
        return NUMERICS[True] if self.lossy else str(self.dtype).removeprefix("torch.")


class OneDNNLinear(nn.Module):
    """A frozen linear layer whose weight lives in oneDNN's packed layout; same call as `nn.Linear`.

    Keeps the original `weight` (shared, no copy) so that code reading `.weight`, `.out_features` or the
    parameters' dtype keeps working, and falls back to `F.linear` for inputs the packed weight cannot take
    (another dtype or device, autograd).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        if x.dtype != self.weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def path_available(path: str, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `path` can run `dtype` linears on `device` here (plain always can). Tries one tiny reorder,
    since oneDNN's bfloat16 support depends on the CPU (and on ONEDNN_MAX_CPU_ISA)."""
    if path == "plain":
        return True
    if path in GGUF_PATHS:  # whether the kernel was built here is the caller's to know (utils/native_kernels.py)
        return dtype == torch.float32 and torch.device(device).type == "cpu"
    if path != "onednn" or torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        weight = torch.ones(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


def apply_linear_path(module: nn.Module, path: str,
                      gguf: tuple[dict[nn.Linear, BlockWeight], BlockMatmul] | None = None) -> int:
    """Swap every `nn.Linear` under `module` for `path`'s kernel, in place; returns how many were swapped
    (0 for "plain"). "gguf" needs `gguf` = (the linears found in a GGUF file with their blocks, the compiled
    kernel); the others take "onednn" where it runs. Raises ValueError for a path that is unknown or unavailable
    for the module's dtype."""
    if path not in LINEAR_PATHS:
        raise ValueError(f"unknown linear path {path!r}: one of {', '.join(LINEAR_PATHS)}")
    if path == "plain":
        return 0
    first = next(module.parameters())
    if not path_available(path, first.dtype, first.device):
        raise ValueError(f"linear path {path!r} cannot run {first.dtype} on {first.device} here")
    if path in GGUF_PATHS and gguf is None:
        raise ValueError(f"linear path {path!r} needs the layers' GGUF blocks and the compiled kernel")
    found, matmul = gguf or ({}, None)
    packed = path == "onednn" or path_available("onednn", first.dtype, first.device)
    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and (child in found or packed)]
    for parent, name, child in swaps:
        setattr(parent, name, BlockLinear(child, found[child], matmul, q8=path == "q8") if child in found
                else OneDNNLinear(child))
    for parent in list(module.modules()):
        for names, fused_name in FUSED_PROJECTIONS:
            parts = [getattr(parent, name, None) for name in names]
            if FusedBlockLinear.can_fuse(parts):
                setattr(parent, fused_name, FusedBlockLinear(parts))
    return len(swaps)


def plain_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with plain `nn.Linear` layers, sharing every parameter and buffer with it (no
    weight is copied): what code outside the engine (transformers' generate) should run."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    memo.update({id(m.packed): None for m in module.modules() if isinstance(m, OneDNNLinear)})
    memo.update({id(m.blocks): None for m in module.modules() if isinstance(m, (BlockLinear, FusedBlockLinear))})
    twin = copy.deepcopy(module, memo)
    swaps = [(parent, name, child) for parent in twin.modules() for name, child in parent.named_children()
             if isinstance(child, (OneDNNLinear, BlockLinear))]
    for parent, name, child in swaps:
        plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                          device="meta", dtype=child.weight.dtype)
        plain.weight, plain.bias = child.weight, child.bias
        setattr(parent, name, plain)
    for parent in twin.modules():
        for _, fused_name in FUSED_PROJECTIONS:
            if fused_name in parent._modules:
                del parent._modules[fused_name]
    return twin
