"""The study's PNG figures (matplotlib, Agg), each drawn when the table has what it needs: tokens per step vs
tree size per dataset and T; static vs dynamic across T; potential score vs measured acceptance across drafts."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _errorbar(axis, rows: pd.DataFrame, x: str, y: str, label: str) -> None:
    rows = rows.sort_values(x)
    axis.errorbar(rows[x], rows[y], yerr=[rows[y] - rows[f"{y}_low"], rows[f"{y}_high"] - rows[y]], marker="o",
                  capsize=3, label=label)


def _short(name) -> str:
    return str(name).rstrip("/").rsplit("/", 1)[-1]


def tree_size_figure(table: pd.DataFrame, path: Path) -> Path | None:
    rows = table[(table["method"] == "static") & table["tree_size"].notna() & table["tokens_per_step"].notna()]
    groups = rows.groupby(["experiment", rows["dataset"].astype(str), rows["T"].astype(str)])
    groups = [(key, group) for key, group in groups if group["tree_size"].nunique() > 1]
    if not groups:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for (experiment, dataset, temperature), group in groups:
        _errorbar(axis, group, "tree_size", "tokens_per_step", f"{experiment} {_short(dataset)} T={temperature}")
    axis.set(xlabel="tree size (nodes)", ylabel="tokens per target step (95% CI)", xscale="log",
             title="Tokens per step vs tree size")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def static_dynamic_figure(table: pd.DataFrame, path: Path, metric: str = "speedup") -> Path | None:
    rows = table[table["method"].isin(["static", "dynamic"]) & table[metric].notna()]
    experiments = [e for e, g in rows.groupby("experiment") if g["method"].nunique() == 2 and g["T"].nunique() > 1]
    if not experiments:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for experiment in experiments:
        for method, group in rows[rows["experiment"] == experiment].groupby("method"):
            _errorbar(axis, group.astype({"T": float}), "T", metric, f"{experiment}: {method}")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set(xlabel="temperature T", ylabel=f"{metric} (95% CI)", title="Static vs dynamic trees across T")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def potential_figure(table: pd.DataFrame, path: Path, x_experiment: str, y_experiment: str, y: str,
                     rho: float | None) -> Path | None:
    xs = table[(table["experiment"] == x_experiment) & table["potential_score"].notna()]
    ys = table[(table["experiment"] == y_experiment) & table[y].notna()]
    joined = xs.merge(ys, on="model", suffixes=("_x", "_y"))
    if joined.empty:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.errorbar(joined["potential_score_x"], joined[f"{y}_y"],
                  xerr=[joined["potential_score_x"] - joined["potential_score_low_x"],
                        joined["potential_score_high_x"] - joined["potential_score_x"]],
                  yerr=[joined[f"{y}_y"] - joined[f"{y}_low_y"], joined[f"{y}_high_y"] - joined[f"{y}_y"]],
                  fmt="o", capsize=3)
    for _, row in joined.iterrows():
        axis.annotate(_short(row["model"]), (row["potential_score_x"], row[f"{y}_y"]), fontsize=7)
    title = "Potential score vs measured acceptance" + (f" (Spearman {rho:+.2f})" if rho is not None else "")
    axis.set(xlabel="potential score (mean KL, nats; lower = stronger)", ylabel=f"{y} (95% CI)", title=title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
