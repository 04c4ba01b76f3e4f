"""Result files and the printed summary (DESIGN.md, "Result files")."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def library_versions() -> dict:
    """Versions that change numerics or speed, recorded in every result file."""
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


# the ISA flags that pick kernel paths (engine/native_layers.py, the q8 tiles, oneDNN)
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none: not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists for the first CPU (empty where there is none)."""
    for line in read_cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_description(cpuinfo: str) -> tuple[str, list[str]]:
    """(model name, the ISA flags that pick kernel paths) from the text of /proc/cpuinfo."""
    model, flags = "unknown", []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = sorted(set(value.split()) & set(ISA_FLAGS))
    return model, flags


def hardware() -> dict:
    """Where a run happened: CPU (architecture, model name, kernel-relevant ISA flags), torch threads and the GPU
    if any (timings mean nothing without it)."""
    model, isa = cpu_description(read_cpuinfo())
    info = {"cpu": platform.processor() or platform.machine(), "cpu_model": model, "isa": isa,
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temp file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> Path:
    """`data` as indented JSON at `path` (parent folders created), atomically; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path


@contextmanager
def wall_clock(device: torch.device | str) -> Iterator[list[float]]:
    """Wall seconds of the block, synchronising CUDA on both sides (kernels are asynchronous);
    yields a one-element list filled at exit."""
    cuda = torch.device(device).type == "cuda"
    elapsed = [0.0]
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    yield elapsed
    if cuda:
        torch.cuda.synchronize(device)
    elapsed[0] = time.perf_counter() - started


def format_summary(title: str, figures: dict) -> str:
    lines = [title,
             f"  prompts                 {figures['prompts']}",
             f"  new tokens              {figures['new_tokens']}",
             f"  target steps            {figures['target_steps']}",
             f"  mean accepted tokens    {figures['mean_accepted_tokens']:.3f} per target step (bonus included)",
             f"  seconds per token       {figures['seconds_per_token']:.4f}",
             f"  tokens per second       {figures['tokens_per_second']:.2f}"]
    split = figures.get("time_split") or {}
    total = sum(split.values())
    if total > 0:
        lines.append("  time split              " + ", ".join(
            f"{phase} {100 * value / total:.0f}%" for phase, value in split.items()))
    return "\n".join(lines)


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
