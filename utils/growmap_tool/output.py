"""Writing a growmap: the output path, the size limit, and the JSON record beside each file saying how it was
made (shape, command line)."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from engine.growmap import Growmap, save_growmap
from utils.errors import UserError
from utils.report import write_json


MAX_NODES = 4096  # larger trees cost more to verify than they can return; also bounds the [n, n] mask


def positive(name: str, value: int) -> int:
    if value < 1:
        raise UserError(f"{name} must be at least 1, got {value}")
    return value


def out_path(path: str) -> Path:
    out = Path(path)
    if out.suffix != ".pt":
        raise UserError(f"output must be a .pt file: {path}")
    return out


def check_size(n: int) -> None:
    if n > MAX_NODES:
        raise UserError(f"that tree has {n} nodes; the tool stops at {MAX_NODES}")


def shape_summary(growmap: Growmap) -> dict:
    return {"size": growmap.size, "depth": growmap.max_depth, "nodes_per_depth": growmap.nodes_per_depth(),
            "first_child_path_len": growmap.first_child_path_len()}


def command_line(argv: Sequence[str]) -> str:
    return "python -m utils.growmap_tool " + shlex.join(argv)


def save_with_record(growmap: Growmap, out: Path, record: dict) -> None:
    save_growmap(growmap, out)
    write_json(out.with_suffix(".json"), record)
    print(f"wrote {out} ({growmap.size} nodes, depth {growmap.max_depth}) and {out.with_suffix('.json')}")

