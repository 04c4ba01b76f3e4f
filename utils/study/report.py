"""`python -m utils.study report STUDY_DIR`: the tidy table (CSV and Parquet), the figures and a Markdown
report listing each claim with its verdict and the figures behind it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from utils.errors import UserError
from utils.report import cpu_description, read_cpuinfo
from utils.study.figures import potential_figure, static_dynamic_figure, tree_size_figure
from utils.study.spec import parse_study
from utils.study.table import study_table
from utils.study.verdicts import Verdict, judge

SHOWN = ("tokens_per_step", "drafted_per_step", "tokens_per_s", "speedup", "token_match", "potential_score")


def machine() -> str:
    """The CPU, its core count and vector ISA flags, and the load when the report was made."""
    cpu, isa = cpu_description(read_cpuinfo())
    return f"{cpu} ({os.cpu_count()} cores; {', '.join(isa)}); load average {os.getloadavg()[0]:.2f} when reported"


def _cell(row: pd.Series, figure: str) -> str:
    if pd.isna(row.get(figure)):
        return ""
    return f"{row[figure]:.3g} [{row[f'{figure}_low']:.3g}, {row[f'{figure}_high']:.3g}]"


def markdown_table(table: pd.DataFrame) -> str:
    shown = [f for f in SHOWN if f in table and table[f].notna().any()]
    head = ["cell", "method", "prompts", *shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        method = row["method"] + ("" if row["lossless"] else " (LOSSY)")
        lines.append("| " + " | ".join([row["cell"], method, str(int(row["prompts"])),
                                        *(_cell(row, f) for f in shown)]) + " |")
    return "\n".join(lines)


def write_report(study_dir: Path) -> Path:
    record_path = study_dir / "study.json"
    if not record_path.is_file():
        raise UserError(f"{study_dir} is not a study folder (no study.json): run `python -m utils.study run` first")
    record = json.loads(record_path.read_text())
    study = parse_study((study_dir / "study.toml").read_text(), record["size"], str(study_dir / "study.toml"))
    table = study_table(study_dir)
    if table.empty:
        raise UserError(f"{study_dir} has no finished cell yet: run the study first")
    table.to_csv(study_dir / "table.csv", index=False)
    table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(study_dir / "table.parquet",
                                                                                        index=False)
    verdicts = judge(table, study.claims, study.min_prompts)
    figures = [tree_size_figure(table, study_dir / "tokens_per_step_vs_tree_size.png"),
               static_dynamic_figure(table, study_dir / "static_vs_dynamic.png")]
    for claim, verdict in zip(study.claims, verdicts):
        if claim.kind == "rank" and claim.options.get("key") == "model":
            figures.append(potential_figure(table, study_dir / "potential_vs_acceptance.png",
                                            claim.options["x_experiment"], claim.options["y_experiment"],
                                            claim.options["y"], verdict.figures.get("spearman")))
    finished = [json.loads(path.read_text()) for c in record["cells"]
                if (path := study_dir / "cells" / c["folder"] / "cell.json").is_file()]
    loads = [cell["load_average"] for cell in finished if "load_average" in cell]
    load = f"; load average {min(loads):.2f}-{max(loads):.2f} as cells ended" if loads else ""
    lines = [f"# Study {record['name']} ({record['size']})", "",
             f"- study file: {record['file']}; {len(finished)} of {len(record['cells'])} cells finished, "
             f"{sum(cell['seconds'] for cell in finished) / 60:.1f} min of cell time",
             f"- machine: {machine()}{load}",
             "- intervals: 95% percentile bootstrap over prompts (2000 resamples); speedup paired by prompt with "
             "the same cell's baseline (the target alone)", "", "## Claims", ""]
    for verdict in verdicts:
        lines += _verdict_lines(verdict)
    lines += ["## Table", "", markdown_table(table), "", "## Figures", ""]
    lines += [f"![{path.stem}]({path.name})" for path in figures if path is not None]
    report = study_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _verdict_lines(verdict: Verdict) -> list[str]:
    return [f"- **{verdict.claim}**: {verdict.verdict}", *(f"  - {detail}" for detail in verdict.details), ""]
