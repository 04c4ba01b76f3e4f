"""`--offloading`: a target bigger than the device, through accelerate's big-model dispatch.

The target is loaded with a `device_map` that accelerate infers from `--max-memory` (per device, "cpu",
"disk"): decoder layers fill the compute device first, then CPU memory, then files in `--offload-folder`.
accelerate hooks every weight-holding submodule of an offloaded layer, so the engine's own forward
(engine/model.py calls the projections, norms and MLP of each layer directly) brings each weight to the compute
device when its turn comes; the KV cache stays on the compute device. The embedding, final norm, rotary
embedding and LM head are kept on the compute device (they set the engine's device and dtype), on top of
what `--max-memory` gives the layers there.
Only one compute device: layers either live there or are offloaded, never on a second GPU, because the engine
passes hidden states between layers itself.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from utils.errors import UserError, first_line

KEPT_ON_DEVICE = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")


def parse_max_memory(entries: list[str] | None, device: str) -> dict:
    """["0=20GiB", "cpu=60GiB", "disk=500GiB"] -> accelerate's max_memory; "cuda"/"cuda:N" name the GPU too.
    None: accelerate's own estimate of every device's free memory."""
    if not entries:
        return {}
    limits: dict = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise UserError(f"--max-memory entries are DEVICE=SIZE (e.g. 0=20GiB cpu=60GiB), got {entry!r}")
        if key.startswith("cuda"):
            key = torch.device(key).index or 0
        elif key.isdigit():
            key = int(key)
        elif key not in ("cpu", "disk"):
            raise UserError(f"--max-memory device must be a GPU index, cuda[:N], cpu or disk, got {key!r}")
        limits[key] = int(value) if value.strip().isdigit() else value.strip()
    compute = compute_key(device)
    stray = [key for key in limits if isinstance(key, int) and key != compute]
    if stray:
        raise UserError(f"--offloading computes on {device}: --max-memory names other GPUs {stray}")
    return limits


def compute_key(device: str) -> int | str:
    """The device_map name of the compute device: a GPU index, or "cpu"."""
    parsed = torch.device(device)
    return "cpu" if parsed.type == "cpu" else (parsed.index or 0)


def device_map_for(model_path: str, dtype: torch.dtype, device: str, max_memory: dict) -> dict[str, int | str]:
    """Where each module goes: accelerate's inference over an empty (meta) copy under `max_memory`, with the
    modules the engine needs at hand pinned to the compute device."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_max_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    compute = compute_key(device)
    free = get_max_memory()  # accelerate's estimate of what each device has free
    limits = {key: free[key] for key in (compute, "cpu")} | dict(max_memory)  # no second GPU
    device_map = infer_auto_device_map(empty, max_memory=limits, no_split_module_classes=empty._no_split_modules,
                                       dtype=dtype)
    for name in KEPT_ON_DEVICE:
        device_map = split_entry(empty, device_map, name)
    for name in KEPT_ON_DEVICE:
        device_map[name] = compute
    return device_map


def split_entry(model: torch.nn.Module, device_map: dict, name: str) -> dict:
    """The device map with the entry covering module `name` (accelerate gives a whole-model "" entry when
    everything lands on one device) replaced by its children's entries, down to `name` itself."""
    covering = next((key for key in device_map if key == "" or name == key or name.startswith(key + ".")), None)
    if covering is None or covering == name:
        return device_map
    module = model.get_submodule(covering)
    children = {f"{covering}.{child}".lstrip("."): device_map[covering] for child, _ in module.named_children()}
    direct = [key for key, _ in module.named_parameters(recurse=False)]
    if direct:
        raise UserError(f"--offloading: module {covering or 'model'} holds weights of its own; cannot keep {name} "
                        "on the compute device")
    rest = {key: value for key, value in device_map.items() if key != covering}
    return split_entry(model, {**rest, **children}, name)


def load_offloaded(spec: str | None, dtype: torch.dtype, device: str, max_memory: dict, offload_folder: str):
    """The target as a transformers model dispatched by accelerate (eval mode), its layers partly offloaded."""
    from transformers import AutoModelForCausalLM

    from utils.models import _from_hub_or_folder, is_feature_draft, resolve_model_path

    if is_feature_draft(spec):
        raise UserError(f"--offloading loads a target, and {spec} is a feature draft")
    path = resolve_model_path(spec)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # its notes on offloaded weights are expected here
    try:
        device_map = device_map_for(path, dtype, device, max_memory)
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        model = _from_hub_or_folder(AutoModelForCausalLM.from_pretrained, path, dtype=dtype, device_map=device_map,
                                    offload_folder=offload_folder)
    except (ValueError, KeyError, NotImplementedError, RuntimeError, AttributeError) as exc:
        raise UserError(f"--offloading: accelerate cannot dispatch {spec or path}: {first_line(exc)}") from exc
    except OSError as exc:
        raise UserError(f"--offloading: cannot use --offload-folder {offload_folder}: {first_line(exc)}") from exc
    return model.eval()


def target_loader(args, device: str) -> Callable | None:
    """The --offloading flags as a target loader for utils.experiment.load_pair (None: the plain load);
    `device` is the compute device (the resolved --device, or this process's own under a launcher)."""
    if not getattr(args, "offloading", False):
        return None
    max_memory = parse_max_memory(args.max_memory, device)
    return lambda spec, dtype, _: load_offloaded(spec, dtype, device, max_memory, args.offload_folder)
