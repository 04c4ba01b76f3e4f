"""Picking each model's dtype and kernel path from the calibration profile, for the rows a run's trees use."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from pathlib import Path

import torch

from engine.growmap import Growmap
from engine.linear_paths import EXACT_PATHS, GGUF_PATHS, KernelPlan
from utils.calibration.cache import (BUSY_LOAD, machine_key, machine_load, model_fingerprint, profile_path,
                                     read_profile, write_profile)
from utils.calibration.measure import CALIBRATION_ROWS, candidates, measure_pair
from utils.config import DEFAULTS, KERNELS
from utils.errors import UserError
from utils.experiment import KernelChoice
from utils.gguf_weights import gguf_path_unavailable
from utils.models import default_draft_for, resolve_model_path

CATCH_UP_ROWS = 3  # tokens a draft runs again after each step (about the accepted tokens per step)


def add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", default=DEFAULTS.kernel, choices=KERNELS,
                        help="linear-layer kernels: plain torch, onednn (weights packed once), gguf (float32 "
                             "products over a GGUF target's own quantized blocks, AVX2 CPUs), q8 (the same blocks "
                             "with 8-bit activations, llama.cpp's numerics: lossy), or auto = the fastest exact path "
                             "measured on this machine (with --dtype auto, per model)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure this machine's dtype/kernel profile again (otherwise measured once and cached)")


def static_step_rows(growmap: Growmap, lookup: int) -> tuple[list[int], list[int]]:
    """(target rows, draft rows per forward) of one static-tree step: the target verifies the tree and the
    lookup branch at once; the draft grows one level per forward, then catches up on the accepted tokens."""
    return [growmap.size + lookup], growmap.nodes_per_depth()[:-1] + [CATCH_UP_ROWS]


def dynamic_step_rows(budget: int, width: int, depth: int, lookup: int) -> tuple[list[int], list[int]]:
    """The same for a dynamic tree: the root, then up to `width` nodes expanded per level."""
    return [budget + lookup], [1] + [width] * (depth - 1) + [CATCH_UP_ROWS]


def estimate_ms(rows: list[int], ms: list[float], n: int) -> float:
    """ms of an n-row forward, linear between measured row counts and beyond the largest."""
    for index in range(1, len(rows)):
        if n <= rows[index] or index == len(rows) - 1:
            low, high = rows[index - 1], rows[index]
            return ms[index - 1] + (ms[index] - ms[index - 1]) * (max(n, low) - low) / (high - low)
    return ms[0]


def step_costs(entry: dict, step_rows: list[int], allowed: list[str]) -> dict[str, float]:
    """Estimated ms of one step's forwards for each allowed plan label of a profile entry."""
    return {label: sum(estimate_ms(entry["rows"], entry["ms"][label], n) for n in step_rows)
            for label in allowed if label in entry["ms"]}


def _allowed(args: argparse.Namespace, device: str) -> list[KernelPlan]:
    dtypes = None if args.dtype == "auto" else [getattr(torch, args.dtype)]
    paths = EXACT_PATHS if args.kernel == "auto" else (args.kernel,)  # a lossy path only when asked for
    plans = [plan for plan in candidates(device, args.target)
             if (dtypes is None or plan.dtype in dtypes) and plan.linear_path in paths]
    if not plans:
        why = (gguf_path_unavailable(args.target) or "it runs float32 only") if args.kernel in GGUF_PATHS else \
            "oneDNN bfloat16 needs AVX512-BF16, AMX or AVX-NE-CONVERT"
        raise UserError(f"--kernel {args.kernel} cannot run --dtype {args.dtype} on this machine ({why}): "
                        f"pass --kernel plain")
    return plans


def _note(text: str) -> None:
    """Progress on stdout: stderr keeps one line for a bad input that fails after calibration."""
    print(text, flush=True)


@dataclass
class Profile:
    """What calibration knows for one run: the plans it may pick from and, when calibrated, each model's
    entry {"rows": [...], "ms": {plan label: [ms per row count]}} (None for a model not needed)."""

    allowed: list[KernelPlan]
    target: dict | None = None
    draft: dict | None = None
    record: dict = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return self.target is not None


def load_profile(args: argparse.Namespace, need_draft: bool) -> Profile:
    """The calibration profile of this machine and the run's models, measured on a miss (or --recalibrate) and
    cached. On CUDA or with --dtype float16: that plan, nothing measured."""
    from utils.cli import resolve_dtype

    if torch.device(args.device).type != "cpu" or args.dtype == "float16":
        plan = KernelPlan(resolve_dtype(args.dtype, args.device))
        return Profile([plan], record={"calibrated": False, "why": f"not calibrated on {args.device}/{args.dtype}"})
    # measured even when the flags leave one plan: the default tree is searched for that plan's costs
    allowed = _allowed(args, args.device)
    draft_spec = (args.model or default_draft_for(args.target)) if need_draft else None
    ids = {"target": f"target:{model_fingerprint(resolve_model_path(args.target))}"}
    if draft_spec is not None:
        ids["draft"] = f"draft:{model_fingerprint(resolve_model_path(draft_spec))}|{ids['target']}"
    key = machine_key()
    path = profile_path(key)
    models, status = read_profile(path, key)
    load = machine_load()
    # timings taken while other work loaded the machine are taken again once it is quieter (and only then)
    busy_then = [role for role, model_id in ids.items()
                 if load <= BUSY_LOAD < models.get(model_id, {}).get("load", 0.0)]
    missing = [role for role, model_id in ids.items()
               if args.recalibrate or model_id not in models or role in busy_then]
    if missing:
        if status == "invalid":
            _note(f"calibration: {path} is unreadable or from another setup; measuring again")
        if busy_then:
            _note(f"calibration: the {' and '.join(busy_then)} timings in {path} were taken on a busy machine; "
                  "measuring again now that it is quieter")
        if load > BUSY_LOAD:
            _note(f"calibration: this machine is busy (load {load:.2f} per core): the timings are kept until a "
                  "quieter run measures them again")
        plans = candidates(args.device, args.target)
        _note(f"calibration: timing {' and '.join(missing)} forwards of {len(CALIBRATION_ROWS)} sizes in "
              f"{len(plans)} dtype/kernel paths (once per machine; cached in {path})")
        target_ms, draft_ms = measure_pair(args.target, draft_spec if "draft" in missing else None, args.device, plans)
        measured = {"target": target_ms, "draft": draft_ms}
        for role in missing:
            models[ids[role]] = {"rows": list(CALIBRATION_ROWS), "ms": measured[role], "load": load}
        write_profile(path, key, models)
        status = "measured"
    return Profile(allowed, models[ids["target"]], models.get(ids.get("draft")),
                   {"calibrated": True, "profile": str(path), "cache": status})


def pick_kernels(profile: Profile, target_rows: list[int], draft_rows: list[int],
                 tree: dict | None = None) -> KernelChoice:
    """Each model's plan with the least estimated time for its row counts of one step; `tree` (how the
    static tree was chosen, `pick_growmap`) joins the printed line and the record."""
    if not profile.calibrated:
        plan = profile.allowed[0]
        record = {"target": plan.label, "draft": plan.label, **profile.record, **numerics_record(plan, plan)}
        return KernelChoice(plan, plan, f"kernels: {plan.label} for both models ({profile.record['why']})"
                            f"{numerics_note(plan, plan)}", record)
    labels = [plan.label for plan in profile.allowed]
    chosen, record = {}, dict(profile.record)
    for role, entry, rows in (("target", profile.target, target_rows), ("draft", profile.draft, draft_rows)):
        if entry is None:
            continue
        costs = step_costs(entry, rows, labels)
        chosen[role] = min(costs, key=costs.get)
        record |= {role: chosen[role], f"{role}_rows": rows,
                   f"{role}_step_ms": {label: round(ms, 2) for label, ms in costs.items()}}
    by_label = {plan.label: plan for plan in profile.allowed}
    target = by_label[chosen["target"]]
    draft = by_label[chosen.get("draft", chosen["target"])]
    parts = [f"target {target.label} ({record['target_step_ms'][target.label]:.0f} ms per verification of "
             f"{'+'.join(map(str, target_rows))} tokens, est.)"]
    if "draft" in chosen:
        parts.append(f"draft {draft.label} ({record['draft_step_ms'][draft.label]:.1f} ms per step, est.)")
    if tree is not None and "predicted_tokens_per_step" in tree:
        parts.append(f"tree searched for them: {tree['size']} nodes, depth {tree['depth']} "
                     f"({tree['predicted_tokens_per_step']:.2f} tokens/step predicted without lookup)")
        record["tree"] = tree
    line = f"kernels: {', '.join(parts)}; calibration {record['cache']} ({Path(record['profile']).name})" \
        f"{numerics_note(target, draft)}"
    return KernelChoice(target, draft, line, record | numerics_record(target, draft))


def numerics_record(target: KernelPlan, draft: KernelPlan) -> dict:
    """What each model's numbers are, for the result JSON (`lossy`: not the float model's greedy output)."""
    return {"target_numerics": target.numerics, "draft_numerics": draft.numerics, "lossy": target.lossy}


def numerics_note(target: KernelPlan, draft: KernelPlan) -> str:
    """Said on the kernels line whenever a model runs with other numbers than its float weights give."""
    lossy = [f"{role} {plan.numerics}" for role, plan in (("target", target), ("draft", draft)) if plan.lossy]
    return f"; numerics: {', '.join(lossy)}" if lossy else ""


def choose_kernels(args: argparse.Namespace, target_rows: list[int], draft_rows: list[int],
                   need_draft: bool) -> KernelChoice:
    """Each model's dtype and kernel path for this run (`load_profile`, then `pick_kernels`)."""
    return pick_kernels(load_profile(args, need_draft), target_rows, draft_rows)
