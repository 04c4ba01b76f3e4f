"""Each claim of a study file judged on the table: holds, does not hold, or not separable at this sample size.
Two rows are told apart only when their 95% bootstrap intervals do not overlap; a row with fewer prompts than
the study's `min_prompts` tells nothing apart.

- `compare`: rows of `experiment` matching `a` (e.g. {method = "dynamic"}) against rows matching `b`, paired
  on every other grid column (e.g. T), by `metric`. Holds when a is above b in every pair (below, with
  `lower_is_better`), does not hold when b is above a in some pair. `especially_when = COLUMN` adds that the
  gap at the column's largest value is larger than at its smallest; `expect = {a = 0.5, b = 0.3, tolerance =
  0.1}` adds that each side's interval reaches its expected value (within the tolerance). `cost = FIGURE` lists
  that figure of the a rows (the quality a lossy method pays).
- `rank`: figure `x` of `x_experiment`'s rows against figure `y` of `y_experiment`'s, joined on column `key`
  (e.g. model); `direction = "negative"`: a smaller x goes with a larger y. Holds when every pair of keys is
  separable on both figures and ordered as claimed, does not hold when some separable pair is ordered against.
  The Spearman rank correlation of the point values is reported beside it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "not separable at this sample size"


@dataclass
class Verdict:
    claim: str
    verdict: str
    details: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # numbers behind it (e.g. spearman)


def worst(verdicts: list[str]) -> str:
    if FAILS in verdicts:
        return FAILS
    return UNCLEAR if UNCLEAR in verdicts or not verdicts else HOLDS


def _select(table: pd.DataFrame, where: dict) -> pd.DataFrame:
    rows = table
    for key, value in where.items():
        if key not in rows:
            return rows.iloc[0:0]
        rows = rows[rows[key].astype(str) == str(value)] if not isinstance(value, bool) else rows[rows[key] == value]
    return rows


def order(a: pd.Series, b: pd.Series, metric: str, min_prompts: int) -> int:
    """+1: a above b (intervals apart), -1: b above a, 0: not separable (overlap, missing, or too few prompts)."""
    if min(a["prompts"], b["prompts"]) < min_prompts:
        return 0
    a_low, a_high, b_low, b_high = (a[f"{metric}_low"], a[f"{metric}_high"], b[f"{metric}_low"], b[f"{metric}_high"])
    if any(math.isnan(v) for v in (a_low, a_high, b_low, b_high)):
        return 0
    return 1 if a_low > b_high else -1 if b_low > a_high else 0


def _fmt(row: pd.Series, metric: str) -> str:
    return f"{row[metric]:.3f} [{row[f'{metric}_low']:.3f}, {row[f'{metric}_high']:.3f}] ({int(row['prompts'])} prompts)"


def judge_compare(table: pd.DataFrame, text: str, o: dict, min_prompts: int) -> Verdict:
    metric, sign = o["metric"], -1 if o.get("lower_is_better") else 1
    rows = _select(table, {"experiment": o["experiment"]})
    a_rows, b_rows = _select(rows, o["a"]), _select(rows, o["b"])
    pair_on = [c for c in o.get("pair_on", []) if c in rows]
    verdict = Verdict(text, UNCLEAR)
    pairs = []
    for _, a in a_rows.iterrows():
        match = b_rows
        for column in pair_on:
            match = match[match[column].astype(str) == str(a[column])]
        for _, b in match.iterrows():
            pairs.append((a, b))
    if not pairs:
        verdict.details.append("no rows to compare: the table has no pair of a and b rows")
        return verdict
    parts = []
    for a, b in pairs:
        where = ", ".join(f"{c}={a[c]}" for c in pair_on) or "all"
        sense = sign * order(a, b, metric, min_prompts)
        parts.append(HOLDS if sense > 0 else FAILS if sense < 0 else UNCLEAR)
        verdict.details.append(f"{where}: a {_fmt(a, metric)} vs b {_fmt(b, metric)} -> {parts[-1]}")
    if "especially_when" in o:
        column = o["especially_when"]
        values = sorted({float(a[column]) for a, _ in pairs})
        low_pair = next(p for p in pairs if float(p[0][column]) == values[0])
        high_pair = next(p for p in pairs if float(p[0][column]) == values[-1])
        (high_least, high_most), (low_least, low_most) = gap_bounds(*high_pair, metric, sign), gap_bounds(
            *low_pair, metric, sign)
        few = min(r["prompts"] for p in (low_pair, high_pair) for r in p) < min_prompts
        trend = UNCLEAR if few or len(values) < 2 else HOLDS if high_least > low_most else (
            FAILS if high_most < low_least else UNCLEAR)
        high_gap = sign * (high_pair[0][metric] - high_pair[1][metric])
        low_gap = sign * (low_pair[0][metric] - low_pair[1][metric])
        verdict.details.append(f"gap at {column}={values[-1]:g}: {high_gap:+.3f}, at {column}={values[0]:g}: "
                               f"{low_gap:+.3f} -> larger at the high end: {trend}")
        parts.append(trend)
    if "expect" in o:
        expect, tolerance = o["expect"], o["expect"].get("tolerance", 0.1)
        for side, side_rows in (("a", a_rows), ("b", b_rows)):
            if side not in expect:
                continue
            for _, row in side_rows.iterrows():
                low, high = row[f"{metric}_low"], row[f"{metric}_high"]
                target = expect[side]
                near = UNCLEAR if row["prompts"] < min_prompts or math.isnan(low) else (
                    HOLDS if low <= target + tolerance and high >= target - tolerance else FAILS)
                verdict.details.append(f"{side} expected ~{target:g} (+-{tolerance:g}): {_fmt(row, metric)} -> {near}")
                parts.append(near)
    if "cost" in o:
        cost = o["cost"]
        for _, row in a_rows.iterrows():
            if cost in row and not math.isnan(row[cost]):
                lossy = "" if row.get("lossless", True) else " (LOSSY)"
                verdict.details.append(f"cost{lossy}: {cost} {_fmt(row, cost)}")
    verdict.verdict = worst(parts)
    return verdict


def gap_bounds(a: pd.Series, b: pd.Series, metric: str, sign: int) -> tuple[float, float]:
    """The smallest and largest gap sign * (a - b) that the two intervals allow."""
    low, high = f"{metric}_low", f"{metric}_high"
    gaps = sorted([sign * (a[low] - b[high]), sign * (a[high] - b[low])])
    return gaps[0], gaps[1]


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = pd.Series(x).rank(), pd.Series(y).rank()
    return float(rx.corr(ry)) if len(x) > 1 else float("nan")


def _figure(rows: pd.DataFrame, key: str, figure: str) -> pd.DataFrame:
    columns = [key, figure, f"{figure}_low", f"{figure}_high", "prompts"]
    return rows.dropna(subset=[figure])[columns].rename(columns={"prompts": f"prompts_{figure}"})


def judge_rank(table: pd.DataFrame, text: str, o: dict, min_prompts: int) -> Verdict:
    key, x, y = o["key"], o["x"], o["y"]
    xs = _figure(_select(table, {"experiment": o["x_experiment"], **o.get("x_where", {})}), key, x)
    ys = _figure(_select(table, {"experiment": o["y_experiment"], **o.get("y_where", {})}), key, y)
    joined = xs.merge(ys, on=key)
    verdict = Verdict(text, UNCLEAR)
    needed = o.get("min_keys", 3)
    if len(joined) < needed:
        verdict.details.append(f"{len(joined)} {key} values on both sides; the claim needs {needed}")
        return verdict
    sense = -1 if o.get("direction", "negative") == "negative" else 1
    rho = spearman(list(joined[x]), list(joined[y]))
    verdict.figures["spearman"] = rho
    parts = []
    for i in range(len(joined)):
        for j in range(i + 1, len(joined)):
            a, b = joined.iloc[i], joined.iloc[j]
            on_x = order(_side(a, x), _side(b, x), x, min_prompts)
            on_y = order(_side(a, y), _side(b, y), y, min_prompts)
            part = UNCLEAR if not on_x or not on_y else HOLDS if on_x * on_y == sense else FAILS
            parts.append(part)
            verdict.details.append(f"{_short(a[key])} vs {_short(b[key])}: {x} {a[x]:.3f} vs {b[x]:.3f}, "
                                   f"{y} {a[y]:.3f} vs {b[y]:.3f} -> {part}")
    verdict.details.append(f"Spearman rank correlation of {x} and {y}: {rho:+.2f} over {len(joined)} {key} values")
    verdict.verdict = worst(parts)
    return verdict


def _short(name) -> str:
    return str(name).rstrip("/").rsplit("/", 1)[-1]


def _side(row: pd.Series, figure: str) -> pd.Series:
    """One figure of a joined row, with its own prompt count, as `order` reads a table row."""
    return pd.Series({figure: row[figure], f"{figure}_low": row[f"{figure}_low"],
                      f"{figure}_high": row[f"{figure}_high"], "prompts": row[f"prompts_{figure}"]})


def judge(table: pd.DataFrame, claims: list, min_prompts: int) -> list[Verdict]:
    return [(judge_compare if claim.kind == "compare" else judge_rank)(table, claim.text, claim.options, min_prompts)
            for claim in claims]
