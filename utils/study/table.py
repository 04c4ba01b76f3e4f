"""The study's tidy table: one row per cell and method, read from the cells' result files (per-prompt rows),
each figure with its 95% bootstrap interval over prompts and the prompt count. Columns: what identifies the row
(experiment, cell, script, method, lossless, the cell's grid values, model, dataset, T, tree_size), `prompts`,
then per figure `<figure>`, `<figure>_low`, `<figure>_high`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from utils.run_log import read_rows
from utils.study.bootstrap import Estimate, bootstrap, ratio, ratio_of_ratios

FIGURES = ("tokens_per_step", "drafted_per_step", "tokens_per_s", "speedup", "token_match", "potential_score",
           "agreement", "expected_acceptance")
DESCRIBED = ("model", "dataset", "T")  # flags every row names, grid value or fixed
DECODING = ("test_greedyS", "test_greedyS_dy", "test_llava")


def _finished(folder: Path) -> list[tuple[dict, list[dict]]]:
    """(summary, rows) of every finished result file in a cell's folder."""
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        combined = isinstance(summary, dict) and "runs" in summary  # commonsense's side-by-side file: no prompt rows
        if isinstance(summary, dict) and "script" in summary and summary.get("partial") is False and not combined:
            out.append((summary, list(read_rows([path.with_suffix(".jsonl")]).values())))
    return out


def _tree_size(summary: dict) -> float:
    if "growmap" in summary and "size" in summary["growmap"]:
        return summary["growmap"]["size"] + (summary.get("augment") or {}).get("max_nodes", 0)
    return (summary.get("dynamic_tree") or {}).get("budget", float("nan"))


def decoding_figures(rows: list[dict]) -> dict[str, Estimate]:
    """A speculative run's rows (a --Mode benchmark run's carry the baseline beside each prompt: speedup is
    paired by prompt); quality rows (a lossy method's) add token_match against the target alone."""
    rows = [row for row in rows if "accepted_per_step" in row]
    c = {"new": np.array([len(r["output_ids"]) for r in rows], float),
         "steps": np.array([r["target_steps"] for r in rows], float),
         "drafted": np.array([sum(a - 1 for a in r["accepted_per_step"]) for r in rows], float),
         "seconds": np.array([r["seconds"] for r in rows], float)}
    figures = {"tokens_per_step": bootstrap(ratio("new", "steps"), c),
               "drafted_per_step": bootstrap(ratio("drafted", "steps"), c),
               "tokens_per_s": bootstrap(ratio("new", "seconds"), c)}
    if rows and all("baseline_seconds" in r for r in rows):
        c["base_new"] = np.array([len(r["baseline_output_ids"]) for r in rows], float)
        c["base_seconds"] = np.array([r["baseline_seconds"] for r in rows], float)
        figures["speedup"] = bootstrap(ratio_of_ratios("new", "seconds", "base_new", "base_seconds"), c)
    if rows and all("quality" in r for r in rows):
        c["equal"] = np.array([r["quality"]["equal_tokens"] for r in rows], float)
        figures["token_match"] = bootstrap(ratio("equal", "new"), c)
    return figures


def baseline_figures(rows: list[dict]) -> dict[str, Estimate]:
    """The target alone, from a benchmark run's baseline_ fields."""
    renamed = [{key.removeprefix("baseline_"): value for key, value in r.items() if key.startswith("baseline_")}
               for r in rows if "baseline_seconds" in r]
    return {key: value for key, value in decoding_figures(renamed).items() if key in ("tokens_per_step",
                                                                                      "tokens_per_s")}


def potential_figures(rows: list[dict], draft: str) -> dict[str, Estimate]:
    """One draft of a test_greedyS_logit run: position-weighted means over prompts."""
    figures = [r["drafts"][draft] for r in rows]
    c = {"positions": np.array([f["positions"] for f in figures], float)}
    for key in ("kl", "agreement", "acceptance"):
        c[key] = np.array([f[key] * f["positions"] for f in figures], float)
    return {"potential_score": bootstrap(ratio("kl", "positions"), c),
            "agreement": bootstrap(ratio("agreement", "positions"), c),
            "expected_acceptance": bootstrap(ratio("acceptance", "positions"), c)}


def bench_figures(rows: list[dict], method: str, reference: str = "generate") -> dict[str, Estimate]:
    """One method of `python -m utils.bench`; speedup over transformers' generate on the same prompts."""
    runs = [r["outputs"][method] for r in rows]
    refs = [r["outputs"][reference] for r in rows]
    c = {"new": np.array([len(r["output_ids"]) for r in runs], float),
         "seconds": np.array([r["seconds"] for r in runs], float),
         "calls": np.array([r["target_calls"] for r in runs], float),
         "base_new": np.array([len(r["output_ids"]) for r in refs], float),
         "base_seconds": np.array([r["seconds"] for r in refs], float)}
    return {"tokens_per_step": bootstrap(ratio("new", "calls"), c),
            "tokens_per_s": bootstrap(ratio("new", "seconds"), c),
            "speedup": bootstrap(ratio_of_ratios("new", "seconds", "base_new", "base_seconds"), c)}


def _method_name(script: str, summary: dict) -> str:
    if script == "test_greedyS_dy":
        return "static" if summary.get("static") else "dynamic"
    if script == "test_llava":
        return "llava-dynamic" if "dynamic_tree" in summary else "llava-static"
    return "static"


def cell_rows(cell: dict, folder: Path) -> list[dict]:
    """The table rows of one finished cell (its record in study.json, its folder)."""
    script, out = cell["script"], []
    described = {key: cell["flags"].get(key) for key in DESCRIBED}
    base = {"experiment": cell["experiment"], "cell": cell["name"], "script": script, **described, **cell["values"]}

    def add(method: str, lossless: bool, summary: dict, prompts: int, figures: dict[str, Estimate]) -> None:
        row = {**base, "method": method, "lossless": lossless, "tree_size": _tree_size(summary), "prompts": prompts}
        for name in FIGURES:
            estimate = figures.get(name)
            row[name], row[f"{name}_low"], row[f"{name}_high"] = ((estimate.value, estimate.low, estimate.high)
                                                                 if estimate else (np.nan,) * 3)
        out.append(row)

    for summary, rows in _finished(folder):
        name = summary["script"]
        if name == "test_greedyS_logit":
            specs = cell["flags"].get("model", summary["flags"]["model"])
            for spec, draft in zip(specs if isinstance(specs, list) else [specs], summary["drafts"]):
                add(draft, True, summary, len(rows), potential_figures(rows, draft))
                out[-1]["model"] = spec  # as the study file writes it: joined with the decoding cells' --model
        elif name == "bench":
            for method in summary.get("methods", {}):
                if method != "generate":
                    add(method, True, summary, len(rows), bench_figures(rows, method))
        elif name.startswith("test_greedyS_commonsense-"):
            add(summary.get("commonsense", name.rsplit("-", 1)[-1]), bool(summary.get("lossless", True)), summary,
                len(rows), decoding_figures(rows))
        elif name in DECODING and summary.get("flags", {}).get("Mode") != "baseline":
            add(_method_name(name, summary), bool(summary.get("lossless", True)), summary, len(rows),
                decoding_figures(rows))
            if all("baseline_seconds" in r for r in rows) and rows:
                add("baseline", True, summary, len(rows), baseline_figures(rows))
    return out


def study_table(study_dir: Path) -> pd.DataFrame:
    """Every finished cell's rows, in the study's cell order."""
    record = json.loads((study_dir / "study.json").read_text())
    rows = [row for cell in record["cells"] for row in cell_rows(cell, study_dir / "cells" / cell["folder"])]
    return pd.DataFrame(rows)
