"""Percentile bootstrap over prompts: resample the prompts of a row with replacement, recompute its figure.
Every figure here is a ratio of sums over prompts (tokens / steps, tokens / seconds, ...), so a resample keeps
each prompt's numerator and denominator together, and a paired figure (speedup over the same cell's baseline)
keeps each prompt's method and baseline together."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


def bootstrap(statistic: Callable[[dict[str, np.ndarray]], np.ndarray], columns: dict[str, np.ndarray],
              resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Estimate:
    """`statistic` maps columns of shape [..., prompts] to figures of shape [...] (sum over the last axis);
    returns its value on all prompts and the percentile interval of `level` over `resamples` resamples."""
    count = len(next(iter(columns.values())))
    value = float(statistic(columns))
    if count < 2:
        return Estimate(value, float("nan"), float("nan"))
    picks = np.random.default_rng(seed).integers(0, count, size=(resamples, count))  # [resamples, prompts]
    figures = statistic({name: column[picks] for name, column in columns.items()})
    figures = figures[np.isfinite(figures)]
    tail = (1 - level) / 2
    low, high = np.quantile(figures, [tail, 1 - tail]) if figures.size else (float("nan"),) * 2
    return Estimate(value, float(low), float(high))


def ratio(numerator: str, denominator: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """sum(numerator) / sum(denominator) over prompts."""
    def statistic(c: dict[str, np.ndarray]) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return c[numerator].sum(-1) / c[denominator].sum(-1)
    return statistic


def ratio_of_ratios(num: str, den: str, base_num: str, base_den: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """(sum(num) / sum(den)) / (sum(base_num) / sum(base_den)): e.g. tokens/s over the baseline's tokens/s on
    the same resampled prompts."""
    def statistic(c: dict[str, np.ndarray]) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (c[num].sum(-1) / c[den].sum(-1)) / (c[base_num].sum(-1) / c[base_den].sum(-1))
    return statistic
