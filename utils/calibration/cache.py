"""The calibration cache: one JSON file per machine key, holding each measured model's timings."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from utils.models import cache_dir
from utils.native_kernels import gguf_kernel_version
from utils.report import cpu_description, read_cpuinfo, write_json

FORMAT = 3  # bump when the measurement changes meaning: older files are then recalibrated
ISA_OVERRIDES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


BUSY_LOAD = 0.75  # 1-minute load average per usable core above which a profile's timings count as inflated


def machine_load() -> float:
    """The 1-minute load average per core this process may use (0 where the system reports none): how busy
    the machine is with other work while a profile is measured."""
    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return os.getloadavg()[0] / max(cores, 1)
    except (OSError, AttributeError):
        return 0.0


def machine_key() -> dict:
    """Everything that changes which kernel is fastest: CPU, ISA (and the variables that cap it), torch's
    chosen CPU capability, threads, library versions."""
    import transformers

    model, flags = cpu_description(read_cpuinfo())
    return {"format": FORMAT, "cpu": model, "isa": flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_overrides": {name: os.environ[name] for name in ISA_OVERRIDES if name in os.environ},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "gguf_kernel": gguf_kernel_version()}


def profile_path(key: dict, folder: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (folder or cache_dir() / "calibration") / f"{digest}.json"


def model_fingerprint(path: str) -> str:
    """A local model folder's config text and weight file sizes, hashed: what decides a forward's cost (the
    shapes), not where the folder is or what the weights hold, so copies and retrained models share timings."""
    folder = Path(path)
    if not folder.is_dir():
        return path  # a hub id: its name is all we know
    digest = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{folder.name}#{digest.hexdigest()[:12]}"


def read_profile(path: Path, key: dict) -> tuple[dict, str]:
    """(models, status): the cached timings per model id and "hit"; an empty dict and "miss" when there is
    no file, or "invalid" when the file is unreadable, malformed or made for another machine key."""
    if not path.is_file():
        return {}, "miss"
    try:
        data = json.loads(path.read_text())
        models = data["models"]
        valid = data["machine"] == key and isinstance(models, dict) and all(
            isinstance(entry["rows"], list) and all(len(ms) == len(entry["rows"]) for ms in entry["ms"].values())
            for entry in models.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        valid = False
    return (models, "hit") if valid else ({}, "invalid")


def write_profile(path: Path, key: dict, models: dict) -> None:
    write_json(path, {"description": "ms per forward for each row count, per model and dtype/kernel path "
                                     "(fastest of the repeats); written by utils/calibration",
                      "machine": key, "models": models})
