"""The search's inputs read from files: acceptance vectors (.json / .pt, with a feature draft's root-level
vector) and latency profiles (.json from the `latency` command)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from engine.tree_search import LatencyProfile, check_acceptance
from utils.errors import UserError, first_line


LATENCY_HELP = ('JSON {"target_ms": {"1": 20.5, "16": 21.0, ...}, "draft_step_ms": 3.1}: target forward time '
                'for n tree tokens (n = 1 required), and one draft growth step')


def load_acceptance(path: str, drop_last: bool = False) -> list[float]:
    """Acceptance vector from .json (a list, or a dict with key "acceptance") or .pt (a 1-D tensor).

    Convention: index 0 is padding, p[k] the probability that the k-th child is accepted. With
    drop_last, the last entry (the "none accepted" probability in Sequoia's measured vectors) is removed.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"acceptance file not found: {path}")
    try:
        if file.suffix == ".json":
            values = _json_vector(json.loads(file.read_text()), "acceptance", required=True)
        elif file.suffix == ".pt":
            data = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(data, torch.Tensor) or data.ndim != 1:
                raise ValueError("expected a 1-D tensor")
            values = data.double().tolist()
        else:
            raise UserError(f"acceptance file must be .json or .pt: {path}")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read acceptance vector {path}: {first_line(exc)}") from exc
    return _checked_vector(values, path, drop_last)


def _json_vector(data, key: str, required: bool) -> list[float] | None:
    """A probability list from parsed JSON: `data[key]` of an object (None if absent and not `required`),
    or, for the required vector only, `data` itself when it is a bare list."""
    if isinstance(data, dict):
        if key not in data:
            if required:
                raise ValueError(f'a JSON object needs the key "{key}"')
            return None
        data = data[key]
    elif not required:
        return None
    if not isinstance(data, list):
        raise ValueError(f'"{key}": expected a list of probabilities')
    return [float(x) for x in data]


def _checked_vector(values: list[float], path: str | Path, drop_last: bool) -> list[float]:
    """values (less the last entry with drop_last) as a checked acceptance vector; UserError naming path."""
    if drop_last:
        values = values[:-1]
    try:
        return check_acceptance(values).tolist()
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from exc


def root_acceptance_source(path: str) -> Path:
    """Where a root vector for the acceptance file `path` would be: the file itself if it is a JSON, else
    the .json record beside it (what `acceptance` writes next to its .pt)."""
    file = Path(path)
    return file if file.suffix == ".json" else file.with_suffix(".json")


def load_root_acceptance(path: str, drop_last: bool = False) -> list[float] | None:
    """The acceptance vector of the root's children, or None where the file has none.

    A feature draft's root children are drafted from the target's real hidden state and accepted more often
    than deeper nodes; `acceptance` measures both and writes this one as "root_acceptance" in its JSON. Read
    from a JSON object's "root_acceptance" key; for a .pt, from the .json beside it if that exists. Same
    convention (and --drop-last) as `load_acceptance`.
    """
    source = root_acceptance_source(path)
    if not source.is_file():
        return None
    try:
        values = _json_vector(json.loads(source.read_text()), "root_acceptance", required=False)
    except Exception as exc:
        raise UserError(f"cannot read the root acceptance vector in {source}: {first_line(exc)}") from exc
    return None if values is None else _checked_vector(values, source, drop_last)


def load_vectors(args: argparse.Namespace) -> tuple[list[float], list[float] | None, dict]:
    """(p, root_p or None, the record's "acceptance" [and "root_acceptance"] entries) for --acceptance,
    saying on stdout when a root vector is used."""
    p = load_acceptance(args.acceptance, args.drop_last)
    root_p = load_root_acceptance(args.acceptance, args.drop_last)
    entries = {"acceptance": {"file": args.acceptance, "vector": p}}
    if root_p is not None:
        source = str(root_acceptance_source(args.acceptance))
        entries["root_acceptance"] = {"file": source, "vector": root_p}
        print(f"root vector used for the root's children (from {source}): p[1] = {root_p[1]:.4f}, "
              f"deeper nodes p[1] = {p[1]:.4f}")
    return p, root_p, entries


def load_latency(path: str, draft_ms: float | None) -> LatencyProfile:
    """Latency profile from JSON (see LATENCY_HELP); --draft-ms overrides the file's draft_step_ms."""
    try:
        data = json.loads(Path(path).read_text())
        target = {int(n): float(ms) for n, ms in data["target_ms"].items()}
        file_draft = data.get("draft_step_ms")
    except FileNotFoundError:
        raise UserError(f"latency file not found: {path}") from None
    except Exception as exc:
        raise UserError(f"cannot read latency profile {path}: expected {LATENCY_HELP} ({type(exc).__name__}: {exc})") from exc
    draft = draft_ms if draft_ms is not None else file_draft
    if draft is None:
        raise UserError(f"{path} has no draft_step_ms: pass --draft-ms")
    if not all(math.isfinite(v) and v > 0 for v in target.values()) or not math.isfinite(float(draft)) or float(draft) < 0:
        raise UserError(f"{path}: latencies must be positive numbers")
    if 1 not in target:
        raise UserError(f"{path}: target_ms needs an entry for n = 1 (one autoregressive step)")
    return LatencyProfile(target, float(draft))

