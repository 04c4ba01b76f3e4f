"""The suite's one compiled kernel (engine/gguf_blocks.c), built on first use with the machine's C compiler.

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

from engine.gguf_blocks import BlockMatmul, BlockWeight
from utils.models import cache_dir

SOURCE = Path(__file__).resolve().parent.parent / "engine" / "gguf_blocks.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")
NEEDED_ISA = ("avx2", "fma")


@dataclass(frozen=True)
class KernelBuild:
    """The loaded kernel (`matmul`), or None and `why` it is not available here."""

    matmul: BlockMatmul | None
    why: str = ""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(compiler: str) -> Path:
    """Compile the kernel once per (source, flags, compiler version); the file appears whole or not at all."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"gguf_blocks-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
        os.replace(built, target)
    return target


def _bind(library: ctypes.CDLL) -> BlockMatmul:
    function = library.blocks_matmul
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]

    def matmul(kernel_id: int, x: torch.Tensor, weight: BlockWeight, out: torch.Tensor) -> None:
        # x [M, K] and out [M, N] float32 contiguous on the CPU (BlockLinear makes them so)
        status = function(kernel_id, x.data_ptr(), x.shape[0], x.shape[1], weight.scales.data_ptr(),
                          weight.mins.data_ptr(), weight.quants.data_ptr(), weight.out_features, out.data_ptr(),
                          torch.get_num_threads())
        if status:
            raise ValueError(f"gguf block kernel: in_features {x.shape[1]} is not a multiple of 32")

    return matmul


def gguf_kernel_version() -> str:
    """The kernel source's digest, or why it cannot run here: part of the calibration key."""
    build = blocks_kernel()
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12] if build.matmul else f"none: {build.why}"


@functools.cache
def blocks_kernel() -> KernelBuild:
    """The compiled block kernel for this process (built or loaded once), or why there is none."""
    missing = [flag for flag in NEEDED_ISA if flag not in cpu_flags()]
    if missing:
        return KernelBuild(None, f"the CPU lacks {', '.join(missing)}")
    compiler = _compiler()
    if compiler is None:
        return KernelBuild(None, "no C compiler (cc or gcc) on PATH")
    try:
        # torch has already loaded its OpenMP runtime (libgomp.so.1): the kernel binds to that one, so its
        # threads are torch's threads, not a second pool competing for the same cores
        return KernelBuild(_bind(ctypes.CDLL(str(_build(compiler)))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return KernelBuild(None, f"building engine/gguf_blocks.c failed: {exc}")
