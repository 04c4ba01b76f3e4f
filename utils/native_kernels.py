"""The suite's compiled kernels (engine/gguf_blocks.c, engine/llama_layer.c), built on first use with the
machine's C compiler.

Plain C with AVX2/FMA intrinsics and OpenMP, loaded with ctypes: no torch headers, so it builds in about a
second. The shared library is cached under `cache_dir()/kernels/`, keyed by the source, the flags and the
compiler's version. Where the CPU lacks AVX2/FMA or no compiler works, `blocks_kernel()` says why and the
"gguf" linear path is simply not offered (the plain and oneDNN paths remain).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.gguf_blocks import Q8_ACTIVATIONS, BlockLinear, BlockMatmul, BlockWeight, FusedBlockLinear
from engine.kv_cache import KVCache
from engine.native_layers import LayerStep
from utils.models import cache_dir
from utils.report import cpu_flags

ENGINE = Path(__file__).resolve().parent.parent / "engine"
SOURCES = (ENGINE / "gguf_blocks.c", ENGINE / "llama_layer.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")
NEEDED_ISA = ("avx2", "fma")
# the 8-bit activation kernels' ISA builds (engine/gguf_blocks.c q8_matmul): name -> (kind bits, CPU flags needed)
Q8_ISAS = {"avx2": (0, ("avx2",)), "avx512_vnni": (1 << 2, ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
           "avx_vnni": (2 << 2, ("avx_vnni",))}
Q8_ISA_ENV = "TREESPEC_Q8_ISA"  # force one of Q8_ISAS (e.g. avx2 on a VNNI CPU, to compare their bits)


@dataclass(frozen=True)
class KernelBuild:
    """The loaded kernels (`matmul`; `layer`, engine/llama_layer.c's function as bound by ctypes), or None and
    `why` they are not available here."""

    matmul: BlockMatmul | None
    layer: ctypes._CFuncPtr | None = None
    why: str = ""


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    return frozenset(cpu_flags())


def q8_isa(flags: set[str] | frozenset[str] | None = None) -> str:
    """The ISA the 8-bit activation kernel runs here: $TREESPEC_Q8_ISA when set (refused when the CPU lacks it),
    else the widest VNNI build the CPU has (512-bit vectors, then AVX-VNNI), else AVX2. Every choice gives the same
    bits."""
    flags = _cpuinfo_flags() if flags is None else flags
    has = [name for name, (_, needed) in Q8_ISAS.items() if set(needed) <= set(flags)]
    forced = os.environ.get(Q8_ISA_ENV)
    if forced:
        if forced not in has:
            raise ValueError(f"{Q8_ISA_ENV}={forced}: one of {', '.join(Q8_ISAS)} that this CPU has")
        return forced
    return next((name for name in ("avx512_vnni", "avx_vnni") if name in has), "avx2")


def kind_bits(kernel_id: int) -> int:
    """engine/gguf_blocks.c's kind for a BlockLinear's kernel id: the 8-bit activation kernels get the ISA's bits."""
    return kernel_id | Q8_ISAS[q8_isa()][0] if kernel_id & Q8_ACTIVATIONS else kernel_id


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(compiler: str) -> Path:
    """Compile the kernel once per (source, flags, compiler version); the file appears whole or not at all."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(_sources_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"gguf_blocks-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
        os.replace(built, target)
    return target


def _sources_bytes() -> bytes:
    return b"".join(source.read_bytes() for source in SOURCES)


def _bind(library: ctypes.CDLL) -> BlockMatmul:
    function = library.blocks_matmul
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]

    def matmul(kernel_id: int, x: torch.Tensor, weight: BlockWeight, out: torch.Tensor) -> None:
        # x [M, K] and out [M, N] float32 contiguous on the CPU (BlockLinear makes them so)
        status = function(kind_bits(kernel_id), x.data_ptr(), x.shape[0], x.shape[1], weight.scales.data_ptr(),
                          weight.mins.data_ptr(), weight.quants.data_ptr(), weight.out_features, out.data_ptr(),
                          torch.get_num_threads())
        if status == 2:
            raise MemoryError("gguf block kernel: out of memory for its work buffers")
        if status == 3:
            raise ValueError(f"gguf block kernel: packed blocks of {weight.out_features} rows, not a multiple of 16")
        if status:
            raise ValueError(f"gguf block kernel: in_features {x.shape[1]} is not a multiple of 32")

    return matmul


def gguf_kernel_version() -> str:
    """The kernel source's digest, or why it cannot run here: part of the calibration key."""
    build = blocks_kernel()
    return hashlib.sha256(_sources_bytes()).hexdigest()[:12] if build.matmul else f"none: {build.why}"


@functools.cache
def blocks_kernel() -> KernelBuild:
    """The compiled block kernel for this process (built or loaded once), or why there is none."""
    missing = [flag for flag in NEEDED_ISA if flag not in cpu_flags()]
    if missing:
        return KernelBuild(None, why=f"the CPU lacks {', '.join(missing)}")
    compiler = _compiler()
    if compiler is None:
        return KernelBuild(None, why="no C compiler (cc or gcc) on PATH")
    try:
        # torch has already loaded its OpenMP runtime (libgomp.so.1): the kernel binds to that one, so its
        # threads are torch's threads, not a second pool competing for the same cores
        library = ctypes.CDLL(str(_build(compiler)))
        return KernelBuild(_bind(library), _bind_layer(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return KernelBuild(None, why=f"building the kernels in engine/ failed: {exc}")


class _Matrix(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p),
                ("quants", ctypes.c_void_p), ("rows", ctypes.c_long), ("cols", ctypes.c_long),
                ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):  # engine/llama_layer.c's Layer
    _fields_ = [("hidden", ctypes.c_long), ("heads", ctypes.c_long), ("kv_heads", ctypes.c_long),
                ("head_dim", ctypes.c_long), ("ffn", ctypes.c_long), ("eps", ctypes.c_float),
                ("norm_in", ctypes.c_void_p), ("norm_post", ctypes.c_void_p), ("qkv", _Matrix), ("o", _Matrix),
                ("gate_up", _Matrix), ("down", _Matrix)]


def _bind_layer(library: ctypes.CDLL) -> ctypes._CFuncPtr:
    function = library.llama_layer
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.POINTER(_Layer), ctypes.c_long] + [ctypes.c_void_p] * 5 + \
        [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    return function


def _matrix(linear: BlockLinear | FusedBlockLinear) -> _Matrix:
    bias = linear.bias.detach() if linear.bias is not None else None
    weight = linear.blocks
    return _Matrix(kind_bits(linear.kernel_id), weight.scales.data_ptr(), weight.mins.data_ptr(),
                   weight.quants.data_ptr(),
                   weight.out_features, weight.in_features, None if bias is None else bias.data_ptr())


def _layer_struct(layer: torch.nn.Module, heads: int, kv_heads: int, head_dim: int) -> _Layer | None:
    """The C description of one transformers Llama-style decoder layer, or None where the native layer cannot
    run it (a projection off the blocks, a norm or activation of another kind)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = getattr(attn, "qkv_fused", None), getattr(mlp, "gate_up_fused", None)
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not (isinstance(qkv, FusedBlockLinear) and isinstance(gate_up, FusedBlockLinear)
            and isinstance(attn.o_proj, BlockLinear) and isinstance(mlp.down_proj, BlockLinear)):
        return None
    plain_norms = all(type(norm).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
                      and norm.weight.dtype == torch.float32 for norm in norms)
    silu = type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
    if not plain_norms or not silu or hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return None
    same_eps = norms[0].variance_epsilon == norms[1].variance_epsilon  # the C layer takes one
    if head_dim % 8 or head_dim > 512 or kv_heads < 1 or heads % kv_heads or not same_eps:
        return None  # shapes engine/llama_layer.c does not take: the torch ops run these layers
    ffn = mlp.down_proj.in_features
    return _Layer(layer.input_layernorm.weight.shape[0], heads, kv_heads, head_dim, ffn,
                  layer.input_layernorm.variance_epsilon, norms[0].weight.data_ptr(), norms[1].weight.data_ptr(),
                  _matrix(qkv), _matrix(attn.o_proj), _matrix(gate_up), _matrix(mlp.down_proj))


def _check_step_inputs(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_slots: torch.Tensor,
                       mask: torch.Tensor, cache: KVCache, head_dim: int) -> None:
    """The sizes and layouts engine/llama_layer.c trusts (it checks the slots' values and S <= max_len itself)."""
    n = hidden.shape[0]
    if not (hidden.dtype == cos.dtype == sin.dtype == torch.float32 and hidden.is_contiguous()
            and cos.shape == sin.shape == (n, head_dim) and cos.is_contiguous() and sin.is_contiguous()
            and kv_slots.dtype == torch.int64 and kv_slots.shape == (n,) and kv_slots.is_contiguous()
            and mask.dtype == torch.bool and mask.dim() == 2 and mask.shape[0] == n and mask.is_contiguous()
            and cache.keys.dtype == cache.values.dtype == torch.float32 and cache.keys.is_contiguous()
            and cache.values.is_contiguous()):
        raise ValueError("native Llama layer: inputs of unexpected shape, dtype or layout")


def native_layer_step(layers: list[torch.nn.Module], heads: int, kv_heads: int, head_dim: int) -> LayerStep | None:
    """engine/llama_layer.c as a `LayerStep` for these decoder layers (on the "gguf" path, float32), or None
    when the kernels are not built here or some layer is not one it runs. The layers' weights must stay where
    they are (the step holds their addresses, and the modules, for as long as it lives)."""
    function = blocks_kernel().layer
    structs = [_layer_struct(layer, heads, kv_heads, head_dim) for layer in layers]
    if function is None or not structs or any(struct is None for struct in structs):
        return None
    pointers = [ctypes.pointer(struct) for struct in structs]

    checked: list[tuple | None] = [None]  # the inputs last checked: one forward passes the same to every layer

    def step(index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_slots: torch.Tensor,
             mask: torch.Tensor, cache: KVCache) -> None:
        keys, values = cache.keys[index], cache.values[index]
        inputs = (hidden, cos, sin, kv_slots, mask, cache)
        if checked[0] is None or any(a is not b for a, b in zip(checked[0], inputs)):
            _check_step_inputs(hidden, cos, sin, kv_slots, mask, cache, head_dim)
            checked[0] = inputs
        status = function(pointers[index], hidden.shape[0], hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                          keys.data_ptr(), values.data_ptr(), cache.max_len, kv_slots.data_ptr(), mask.data_ptr(),
                          mask.shape[1], torch.get_num_threads())
        if status & 2:
            raise MemoryError("native Llama layer: out of memory for its work buffers")
        if status:
            raise ValueError("native Llama layer: a width, a KV slot or the mask's length outside what it takes")

    step.layers = layers  # keeps the weights the structs point into alive
    return step
