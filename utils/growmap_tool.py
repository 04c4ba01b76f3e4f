"""Build, search and inspect growmaps (static tree shapes), and measure what the search needs:
`python -m utils.growmap_tool <command> --help`.

  build chain K | wxd W D | kary K D | parents "0,0,1,..."  -o out.pt
  search --acceptance vec.json --budget 64 --max-depth 10 -o out.pt        Sequoia's optimal tree
  search --acceptance vec.json --latency lat.json [--draft-ms X] -o out.pt  ... sized for the hardware
  inspect file.pt [--acceptance vec.json] [--png out.png]
  acceptance --model D --target T --dataset X --T 0 --width 32 -o vec.pt   measure the pair's acceptance vector
  latency --model D --target T --device cpu --sizes 1,2,4,...,256 -o lat.json   measure the hardware's costs

Every written growmap gets a JSON beside it (same name, .json) saying how it was made.
Bad input: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from engine.growmap import Growmap, GrowmapError, chain, format_tree, from_parents, kary_tree, load_growmap, \
    save_growmap, wxd_tree
from engine.tree_search import LatencyProfile, check_acceptance, choose_budget, expected_accepted, \
    sequoia_dp
from utils.cli import OneLineParser, add_model_flags, add_prompt_flags
from utils.errors import UserError, first_line
from utils.report import wall_clock, write_json

MAX_NODES = 4096  # larger trees cost more to verify than they can return; also bounds the [n, n] mask
LATENCY_HELP = ('JSON {"target_ms": {"1": 20.5, "16": 21.0, ...}, "draft_step_ms": 3.1}: target forward time '
                'for n tree tokens (n = 1 required), and one draft growth step')


# ---------------------------------------------------------------- inputs

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


def parse_parents(text: str) -> list[int]:
    """ "0,0,1,..." (parents of nodes 1..n-1) or with a leading -1 for the root -> full parent list."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"parents must be comma-separated integers, got {text!r}") from None
    if values[:1] != [-1]:
        values = [-1] + values
    return values


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise UserError(f"{name} must be at least 1, got {value}")
    return value


def _out_path(path: str) -> Path:
    out = Path(path)
    if out.suffix != ".pt":
        raise UserError(f"output must be a .pt file: {path}")
    return out


def _check_size(n: int) -> None:
    if n > MAX_NODES:
        raise UserError(f"that tree has {n} nodes; the tool stops at {MAX_NODES}")


# ---------------------------------------------------------------- outputs

def shape_summary(growmap: Growmap) -> dict:
    return {"size": growmap.size, "depth": growmap.max_depth, "nodes_per_depth": growmap.nodes_per_depth(),
            "first_child_path_len": growmap.first_child_path_len()}


def _command(argv: Sequence[str]) -> str:
    return "python -m utils.growmap_tool " + shlex.join(argv)


def _save(growmap: Growmap, out: Path, record: dict) -> None:
    save_growmap(growmap, out)
    write_json(out.with_suffix(".json"), record)
    print(f"wrote {out} ({growmap.size} nodes, depth {growmap.max_depth}) and {out.with_suffix('.json')}")


# ---------------------------------------------------------------- commands

def cmd_build(args: argparse.Namespace, argv: Sequence[str]) -> None:
    out = _out_path(args.output)
    if args.shape == "chain":
        _check_size(_positive("K", args.k) + 1)
        growmap, params = chain(args.k), {"k": args.k}
    elif args.shape == "wxd":
        _check_size(_positive("W", args.width) * _positive("D", args.depth) + 1)
        growmap, params = wxd_tree(args.width, args.depth), {"width": args.width, "depth": args.depth}
    elif args.shape == "kary":
        _positive("K", args.k), _positive("D", args.depth)
        _check_size(sum(args.k ** d for d in range(args.depth + 1)))
        growmap, params = kary_tree(args.k, args.depth), {"k": args.k, "depth": args.depth}
    else:
        parents = parse_parents(args.parents)
        _check_size(len(parents))
        growmap, params = from_parents(parents), {"parents": parents}
    record = {"made_by": _command(argv), "builder": args.shape, "parameters": params, "shape": shape_summary(growmap)}
    if args.acceptance:
        p, root_p, entries = load_vectors(args)
        record.update(entries)
        record["predicted_tokens_per_step"] = expected_accepted(growmap, p, root_p)
        print(f"predicted tokens per step: {record['predicted_tokens_per_step']:.3f}")
    _save(growmap, out, record)


def _budget_table(choices, chosen) -> list[str]:
    lines = [f"{'budget':>6} {'depth':>5} {'tokens/step':>11} {'step ms':>9} {'ms/token':>9} {'speedup':>7}"]
    for c in choices:
        mark = "  <- chosen" if c == chosen else ""
        lines.append(f"{c.budget:>6} {c.depth:>5} {c.expected_tokens:>11.3f} {c.step_ms:>9.3f} "
                     f"{c.ms_per_token:>9.3f} {c.speedup:>7.2f}{mark}")
    return lines


def cmd_search(args: argparse.Namespace, argv: Sequence[str]) -> None:
    out = _out_path(args.output)
    p, root_p, entries = load_vectors(args)
    levels = _positive("--max-depth", args.max_depth)
    record: dict = {"made_by": _command(argv), "method": "Sequoia dynamic program (arXiv 2402.12374)",
                    **entries, "max_levels": levels}
    if args.latency is None:
        if args.draft_ms is not None:
            raise UserError("--draft-ms needs --latency")
        if args.budget is None:
            raise UserError("search needs --budget N (or --latency to choose it)")
        budget = _positive("--budget", args.budget)
        _check_size(budget)
        table = sequoia_dp(p, budget, levels, root_p)
        growmap = table.tree(budget, levels)
        predicted = table.value(budget, levels)
        record.update(budget=budget, predicted_tokens_per_step=predicted,
                      best_by_budget={str(n): table.value(n, levels) for n in _report_budgets(budget)})
        print(f"budget {budget}, at most {levels} levels: predicted tokens per step {predicted:.3f}")
    else:
        profile = load_latency(args.latency, args.draft_ms)
        max_budget = args.budget if args.budget is not None else max(profile.target_ms)
        _check_size(_positive("--budget", max_budget))
        table = sequoia_dp(p, max_budget, levels, root_p)
        try:
            choice = choose_budget(table, profile)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        best = choice.best
        growmap = table.tree(best.budget, best.levels)
        predicted = best.expected_tokens
        rows = _budget_table(choice.per_budget, best)
        print(f"chosen: budget {best.budget}, depth {best.depth} ({best.levels} levels); "
              f"predicted tokens per step {predicted:.3f}, {best.ms_per_token:.3f} ms/token, "
              f"speedup {best.speedup:.2f}x over autoregressive")
        print("\n".join(rows))
        record.update(latency={"file": args.latency, "target_ms": {str(k): v for k, v in sorted(profile.target_ms.items())},
                               "draft_step_ms": profile.draft_step_ms},
                      budget=best.budget, levels=best.levels, predicted_tokens_per_step=predicted,
                      predicted_ms_per_token=best.ms_per_token, predicted_speedup=best.speedup,
                      per_budget=[vars(c) for c in choice.per_budget])
    assert abs(expected_accepted(growmap, p, root_p) - predicted) < 1e-9
    record["shape"] = shape_summary(growmap)
    record["parents"] = growmap.parents.tolist()
    _save(growmap, out, record)


def _report_budgets(budget: int) -> list[int]:
    powers = [2 ** k for k in range(0, 13) if 2 ** k < budget]
    return powers + [budget]


def cmd_inspect(args: argparse.Namespace, argv: Sequence[str]) -> None:
    growmap = load_growmap(args.file)
    print(f"{args.file}: valid growmap")
    print(f"size {growmap.size} nodes (root included), depth {growmap.max_depth} "
          f"({growmap.max_depth + 1} levels, {growmap.growth_steps} draft growth steps)")
    print(f"first-child path length {growmap.first_child_path_len()}")
    print("depth  nodes  expanded  children per expanded node")
    counts = growmap.nodes_per_depth()
    for d, kids in enumerate(growmap.branching_per_depth()):
        print(f"{d:>5}  {counts[d]:>5}  {len(kids):>8}  {' '.join(map(str, kids)) if kids else '-'}")
    predicted = None
    if args.acceptance:
        p, root_p, _ = load_vectors(args)
        predicted = expected_accepted(growmap, p, root_p)
        print(f"predicted tokens per step under {args.acceptance}: {predicted:.3f}")
    print(format_tree(growmap, max_lines=args.max_lines))
    if args.png:
        draw_png(growmap, Path(args.png), title=Path(args.file).name, predicted=predicted)
        print(f"wrote {args.png}")


def tree_layout(growmap: Growmap) -> list[tuple[float, int]]:
    """(x, depth) per node: leaves at consecutive x in rank order, each parent centred over its children."""
    xs = [0.0] * growmap.size
    next_leaf = 0
    order: list[int] = []
    stack = [0]
    while stack:  # pre-order, rank 1 first
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(growmap.successors[node]))
    for node in order:
        if not growmap.successors[node]:
            xs[node] = float(next_leaf)
            next_leaf += 1
    for node in reversed(order):  # children before parents
        kids = growmap.successors[node]
        if kids:
            xs[node] = (xs[kids[0]] + xs[kids[-1]]) / 2
    return [(xs[i], int(growmap.depth[i])) for i in range(growmap.size)]


def draw_png(growmap: Growmap, path: Path, title: str, predicted: float | None = None) -> None:
    """The tree top-down: one row per depth, edges to parents; rank-1 children in a darker colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = tree_layout(growmap)
    leaves = sum(1 for kids in growmap.successors if not kids)
    width = min(max(6.0, 0.28 * leaves + 2), 40.0)
    height = min(max(3.0, 0.7 * (growmap.max_depth + 1) + 1.5), 20.0)
    fig, ax = plt.subplots(figsize=(width, height))
    parents = growmap.parents.tolist()
    for node in range(1, growmap.size):
        (x0, y0), (x1, y1) = layout[parents[node]], layout[node]
        ax.plot([x0, x1], [-y0, -y1], color="0.6", linewidth=0.8, zorder=1)
    first = {kids[0] for kids in growmap.successors if kids}
    colours = ["black" if i == 0 else ("tab:blue" if i in first else "tab:orange") for i in range(growmap.size)]
    ax.scatter([x for x, _ in layout], [-y for _, y in layout], c=colours, s=60 if growmap.size <= 80 else 25, zorder=2)
    if growmap.size <= 80:
        for i, (x, y) in enumerate(layout):
            ax.annotate(str(i), (x, -y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_yticks([-d for d in range(growmap.max_depth + 1)])
    ax.set_yticklabels([f"depth {d} ({n})" for d, n in enumerate(growmap.nodes_per_depth())])
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    extra = "" if predicted is None else f", predicted {predicted:.3f} tokens/step"
    ax.set_title(f"{title}: {growmap.size} nodes, depth {growmap.max_depth}{extra}\n"
                 "blue: rank-1 child, orange: other ranks, (n): nodes at that depth", fontsize=9)
    ax.margins(x=0.03, y=0.12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- measuring: shared

DEFAULT_SIZES = "1,2,4,8,16,32,64,128,256"
DEFAULT_DRAFT_SIZES = "1,2,4,8"
DRAFT_TOPK = 8  # children picked per expanded node in a timed draft step (a top-k over the draft's logits)
SEQUOIA_BUDGETS = (16, 32, 64, 128)  # budgets whose best predicted tokens/step the acceptance record quotes
SEQUOIA_LEVELS = 10


def _load_models(args: argparse.Namespace, max_len: int):
    """(ModelPair, device, dtype) for --target/--model/--device/--dtype, each model with max_len cache slots."""
    from utils.cli import quiet_transformers, resolve_device, resolve_dtype
    from utils.experiment import load_pair

    quiet_transformers()  # as utils.cli.run_cli: keep stderr to our own lines
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    return load_pair(args.target, args.model, True, dtype, device, max_len), device, dtype


def _environment(device: str, dtype: torch.dtype) -> dict:
    """Where a measurement ran: device, dtype, threads, hardware, library versions and the date."""
    from utils.report import hardware, library_versions

    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "hardware": hardware(), "versions": library_versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ---------------------------------------------------------------- measuring: acceptance vector

def in_target_vocab(model, logits: torch.Tensor) -> torch.Tensor:
    """A TreeModel's logits [r, own V] -> [r, V] over the target vocabulary (-inf on tokens a
    vocabulary-subset draft cannot propose)."""
    from utils.potential import to_target_vocab

    return to_target_vocab(logits, model.output_ids, model.target_vocab_size, float("-inf"))


class PromptCounts(NamedTuple):
    """Acceptance counts [W + 2] of one prompt, per regime."""
    deep: torch.Tensor          # plain draft: every node's children; feature draft: non-root nodes' children (self-fed)
    root: torch.Tensor | None   # a feature draft's root children, fed the target's real features; else None


def prompt_counts(pair, prompt_ids: list[int], steps: int, width: int, sampling,
                  generator: torch.Generator) -> PromptCounts:
    """Acceptance counts [W + 2] along the target's own continuation (<= `steps` tokens) of one prompt.

    Position t has context prompt + continuation[:t]; one teacher-forced forward of each model over
    prompt + continuation[:-1] gives every position's distribution at once. A feature draft is measured
    twice on the same continuation: deep (self-fed, as every node below depth 1 runs) and root (the target's
    features, as the root's children run). Each regime takes its own draws from `generator` (at T > 0 the
    children are sampled), deep first, so a plain draft's counts and every deep count stay as they were.
    """
    from engine.acceptance import acceptance_counts
    from engine.decoder import autoregressive_generate
    from engine.drafters import teacher_forced_logits

    device = pair.target.device
    continuation = autoregressive_generate(pair.target, prompt_ids, steps, pair.eos_ids, sampling, generator).output_ids
    tokens = torch.tensor(prompt_ids + continuation[:-1], dtype=torch.long, device=device)  # [L]
    rows = torch.arange(len(prompt_ids) - 1, tokens.shape[0], device=device)               # [len(continuation)]
    # one target forward gives its logits and the features a feature draft reads
    target_logits, features = teacher_forced_logits(pair.target, tokens, rows, return_hidden=True)  # [n, V], [L, d]

    def counts(draft_logits: torch.Tensor) -> torch.Tensor:                                # [n, own V]
        return acceptance_counts(target_logits, in_target_vocab(pair.draft, draft_logits), width, sampling,
                                 generator)

    if not pair.draft.uses_target_features:
        return PromptCounts(counts(teacher_forced_logits(pair.draft, tokens, rows)), None)
    # fed the target's features (the root's children), then its own predictions (every deeper node)
    fed, predicted = teacher_forced_logits(pair.draft, tokens, rows, features, return_hidden=True)
    deep = counts(teacher_forced_logits(pair.draft, tokens, rows, predicted))  # deep first: the draws' order
    return PromptCounts(deep, counts(fed))


def _check_measure_flags(args: argparse.Namespace) -> None:
    if args.T < 0:
        raise UserError(f"--T must be >= 0, got {args.T}")
    if not 0.0 < args.P <= 1.0:
        raise UserError(f"--P must be in (0, 1], got {args.P}")
    if args.start < 0 or args.start >= args.end:
        raise UserError(f"need 0 <= --start < --end, got {args.start} and {args.end}")
    _positive("--prompt-len", args.prompt_len)


def cmd_acceptance(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Sequoia's acceptance vector of a draft/target pair (arXiv 2402.12374, section 3.1), measured."""
    from tqdm import tqdm

    from engine.acceptance import acceptance_vector, none_fraction
    from engine.decoder import check_capacity
    from engine.sampling import Sampling
    from utils.data import load_prompts
    from utils.experiment import generator_for

    out = _out_path(args.output)
    _check_measure_flags(args)
    width = _positive("--width", args.width)
    steps = _positive("--steps-per-prompt", args.steps_per_prompt)
    pair, device, dtype = _load_models(args, args.prompt_len + steps)
    if width > pair.target.vocab_size:
        raise UserError(f"--width {width} exceeds the vocabulary ({pair.target.vocab_size} tokens)")
    prompts = load_prompts(args.dataset, pair.tokenizer, args.start, args.end, args.prompt_len)
    sampling = Sampling(args.T, args.P)
    counts = torch.zeros(width + 2, dtype=torch.long)
    root_counts = torch.zeros(width + 2, dtype=torch.long) if pair.draft.uses_target_features else None
    for prompt in tqdm(prompts, desc="acceptance", unit="prompt", dynamic_ncols=True):
        try:
            check_capacity(pair.target, len(prompt.ids), steps, 0)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        measured = prompt_counts(pair, prompt.ids, steps, width, sampling, generator_for(device, args.seed + prompt.index))
        counts += measured.deep
        if root_counts is not None:
            root_counts += measured.root
    vec = acceptance_vector(counts)  # [W + 1], index 0 padding, 'none accepted' dropped
    none = none_fraction(counts)
    root_vec = None if root_counts is None else acceptance_vector(root_counts)
    table = sequoia_dp(vec.tolist(), max(SEQUOIA_BUDGETS), SEQUOIA_LEVELS, None if root_vec is None else root_vec.tolist())
    best = {str(n): table.value(n, SEQUOIA_LEVELS) for n in SEQUOIA_BUDGETS}
    root_entries = {} if root_vec is None else {
        "root_acceptance": root_vec.tolist(), "root_none_accepted": none_fraction(root_counts),
        "root_counts": root_counts.tolist()}
    record = {
        "description": "Positional acceptance vector: acceptance[k] = fraction of positions where the k-th drafted "
                       "child was accepted. Index 0 is padding; the 'none accepted' fraction is none_accepted "
                       "(Sequoia's vector = acceptance + [none_accepted])." + ("" if root_vec is None else FEATURE_REGIMES),
        "made_by": _command(argv), "method": "Sequoia (arXiv 2402.12374): along the target's own continuation",
        "target": pair.target_name, "draft": pair.draft_name, "dataset": args.dataset, "range": [args.start, args.end],
        "prompts": len(prompts), "prompt_len": args.prompt_len, "steps_per_prompt": steps,
        "positions": int(counts.sum()), "T": args.T, "P": args.P, "width": width, "seed": args.seed,
        "rule": "greedy: child == target argmax" if sampling.greedy else
                "SpecInfer/Sequoia: children sampled without replacement from the draft, accept min(1, p/q)",
        "acceptance": vec.tolist(), "none_accepted": none, "counts": counts.tolist(), **root_entries,
        "counts_layout": "[0 (padding), accepted at rank 1..W, none accepted]",
        f"sequoia_best_tokens_per_step_{SEQUOIA_LEVELS}_levels": best,
        **_environment(device, dtype),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vec, out)
    write_json(out.with_suffix(".json"), record)
    print(f"{record['positions']} positions over {len(prompts)} prompts; "
          + ("" if root_vec is None else "deep (nodes below depth 1, self-fed features): ") + _vector_line(vec, none))
    if root_vec is not None:
        print("root (the root's children, the target's features): " + _vector_line(root_vec, record["root_none_accepted"]))
    print("Sequoia's best tree at 10 levels: " + ", ".join(f"{n} nodes {v:.3f}" for n, v in best.items()) + " tokens/step")
    print(f"wrote {out} and {out.with_suffix('.json')}")


FEATURE_REGIMES = (
    " A feature draft is measured in two regimes on the same positions. acceptance / none_accepted / counts (and the "
    ".pt): deep, the draft fed its own predicted feature of the previous position, as every tree node below depth "
    "1 runs. root_acceptance / root_none_accepted / root_counts: root, the draft fed the target's real feature, as "
    "the root's children run. search, build and inspect score the root's children with root_acceptance and every "
    "other node with acceptance; so do the sequoia_best figures.")


def _vector_line(vec: torch.Tensor, none: float) -> str:
    """p[1..8], the ranks' sum and the 'none accepted' fraction of an acceptance vector, in one line."""
    shown = " ".join(f"{x:.4f}" for x in vec[1:9].tolist())
    return f"p[1..{min(vec.shape[0] - 1, 8)}] = {shown}; ranks sum {float(vec.sum()):.4f}, none accepted {none:.4f}"


# ---------------------------------------------------------------- measuring: latency profile

def parse_sizes(text: str, flag: str) -> list[int]:
    """ "1,2,4,..." -> sorted distinct positive sizes (each at most MAX_NODES)."""
    try:
        sizes = sorted({int(x) for x in text.replace(" ", "").split(",") if x != ""})
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_NODES:
        raise UserError(f"{flag} sizes must lie in 1..{MAX_NODES}, got {text!r}")
    return sizes


def tree_inputs(size: int, prefix: int, vocab: int, shape: str, generator: torch.Generator,
                device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_ids [n], positions [n], kv_slots [n], attn_mask [n, prefix + n]) of a tree of n nodes placed
    after `prefix` cached tokens, as the decoder feeds it. shape "random": node i's parent is uniform in
    0..i-1 (a random recursive tree); "chain": node i's parent is i - 1."""
    from engine.tree_mask import ancestor_mask_from_parents, tree_attention_mask

    ids = torch.arange(size)
    if shape == "chain":
        parents = ids - 1
    else:
        parents = (torch.rand(size, generator=generator) * ids).long()  # [n], node 0 gets 0: fixed below
        parents[0] = -1
    ancestors = ancestor_mask_from_parents(parents)                    # [n, n] bool
    depth = ancestors.sum(dim=-1) - 1                                  # [n]
    tokens = torch.randint(0, vocab, (size,), generator=generator)
    mask = tree_attention_mask(ancestors, ids, prefix)                 # [n, prefix + n]
    return tokens.to(device), (prefix + depth).to(device), (prefix + ids).to(device), mask.to(device)


def _timed_ms(call, device: str) -> float:
    """Wall time of call() in ms, synchronising CUDA before and after."""
    with wall_clock(device) as elapsed:
        call()
    return elapsed[0] * 1000.0


def time_round_robin(calls: dict[str, object], repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Every call `warmup` times untimed, then `repeats` timed rounds, each round running every call once
    (interleaved, so a slow spell on a shared machine spreads over all sizes instead of hitting one)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    timings: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            timings[key].append(_timed_ms(call, device))
    return timings


def _target_call(model, inputs):
    tokens, positions, slots, mask = inputs
    return lambda: model.forward(tokens, positions, slots, mask)


def _draft_call(model, inputs):
    """One draft growth step: the forward over the frontier and the top-k children of each node."""
    tokens, positions, slots, mask = inputs
    k = min(DRAFT_TOPK, model.vocab_size)
    features = model.placeholder_features(tokens.shape[0])
    return lambda: model.to_target_ids(model.forward(tokens, positions, slots, mask, prev_features=features)
                                       .topk(k, dim=-1).indices)


def cmd_latency(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Sequoia's hardware profile (arXiv 2402.12374, section 3.2): target forward time per tree size, draft step time."""
    from engine.drafters import append_tokens

    out = Path(args.output)
    if out.suffix != ".json":
        raise UserError(f"output must be a .json file: {args.output}")
    sizes = sorted(set(parse_sizes(args.sizes, "--sizes")) | {1})  # n = 1 (autoregressive) is always needed
    draft_sizes = sorted(set(parse_sizes(args.draft_sizes, "--draft-sizes")) | {_positive("--draft-frontier", args.draft_frontier)})
    repeats, warmup = _positive("--repeats", args.repeats), args.warmup
    if warmup < 0 or args.prefix < 0:
        raise UserError("--warmup and --prefix must be >= 0")
    if args.threads is not None:
        torch.set_num_threads(_positive("--threads", args.threads))
    pair, device, dtype = _load_models(args, args.prefix + max(sizes + draft_sizes))
    generator = torch.Generator().manual_seed(args.seed)
    vocab = pair.target.vocab_size
    prefix_ids = torch.randint(0, vocab, (args.prefix,), generator=generator).to(device)
    calls = {}
    for model, kind, kind_sizes, make in ((pair.target, "target", sizes, _target_call),
                                          (pair.draft, "draft", draft_sizes, _draft_call)):
        if args.prefix:
            append_tokens(model, prefix_ids, 0, last_logits=False,
                          prev_features=model.placeholder_features(args.prefix))
        for n in kind_sizes:
            calls[f"{kind}:{n}"] = make(model, tree_inputs(n, args.prefix, vocab, args.tree, generator, device))
    timings = time_round_robin(calls, repeats, warmup, device)
    per = {kind: {key.split(":")[1]: ms for key, ms in timings.items() if key.startswith(kind + ":")}
           for kind in ("target", "draft")}
    median = {kind: {n: statistics.median(ms) for n, ms in rows.items()} for kind, rows in per.items()}
    record = {
        "description": "target_ms[n]: one target forward over a tree of n tokens (root included) after `prefix` "
                       "cached tokens; draft_step_ms: one draft growth step (forward over draft_frontier nodes + "
                       f"top-{DRAFT_TOPK}). Medians of `repeats` timed runs after `warmup` untimed ones, sizes "
                       "interleaved round-robin. Read by `growmap_tool search --latency`.",
        "made_by": _command(argv), "target": pair.target_name, "draft": pair.draft_name,
        "target_ms": median["target"], "draft_step_ms": median["draft"][str(args.draft_frontier)],
        "draft_frontier": args.draft_frontier, "draft_ms": median["draft"],
        "timings_ms": per, "prefix": args.prefix, "tree": args.tree, "repeats": repeats, "warmup": warmup,
        "seed": args.seed, **_environment(device, dtype),
    }
    write_json(out, record)
    print(f"{'tokens':>6} {'target ms':>10} {'min':>8} {'max':>8}")
    for n, ms in per["target"].items():
        print(f"{n:>6} {median['target'][n]:>10.3f} {min(ms):>8.3f} {max(ms):>8.3f}")
    print("draft step ms by frontier: " + ", ".join(f"{n}: {v:.3f}" for n, v in median["draft"].items())
          + f"; draft_step_ms = {record['draft_step_ms']:.3f} (frontier {args.draft_frontier})")
    noisy = [f"{kind} {n}" for kind, rows in per.items() for n, ms in rows.items() if median[kind][n] > 1.25 * min(ms)]
    if noisy:
        print(f"note: median more than 25% above the fastest run for {', '.join(noisy)}: the machine looks busy; "
              "rerun on an idle one (or with more --repeats)")
    print(f"wrote {out} ({record['device']}, {record['dtype']}, {record['threads']} threads)")


# ---------------------------------------------------------------- argparse

def _add_acceptance(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--acceptance", required=required, metavar="VEC",
                        help="acceptance vector, .json (list or {\"acceptance\": [...]}) or .pt (1-D tensor); "
                             "index 0 is padding, p[k] = P(k-th child accepted)")
    parser.add_argument("--drop-last", action="store_true",
                        help="drop the vector's last entry (the 'none accepted' probability in Sequoia's files)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m utils.growmap_tool", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{build,search,inspect,acceptance,latency}")

    build = commands.add_parser("build", help="build a chain, W chains of D, a k-ary tree, or a tree from parents")
    shapes = build.add_subparsers(dest="shape", required=True, metavar="{chain,wxd,kary,parents}")
    specs = {
        "chain": ("the root and a chain of K drafted tokens", [("k", "K", "drafted tokens")]),
        "wxd": ("W chains of D tokens under the root (the original's WxD-tree)",
                [("width", "W", "chains"), ("depth", "D", "tokens per chain")]),
        "kary": ("the complete K-ary tree of depth D", [("k", "K", "children per node"), ("depth", "D", "levels below the root")]),
    }
    for name, (help_text, positionals) in specs.items():
        sub = shapes.add_parser(name, help=help_text, description=help_text)
        for dest, metavar, arg_help in positionals:
            sub.add_argument(dest, metavar=metavar, type=int, help=arg_help)
    sub = shapes.add_parser("parents", help="a tree from its parent list",
                            description="A tree from its parent list; children keep their listed order (first = rank 1).")
    sub.add_argument("parents", help='parents of nodes 1..n-1, e.g. "0,0,1,1,2" (a leading -1 for the root is allowed)')
    for sub in shapes.choices.values():
        sub.add_argument("-o", "--output", required=True, help="growmap to write (.pt); a .json record goes beside it")
        _add_acceptance(sub, required=False)

    search = commands.add_parser(
        "search", help="Sequoia's optimal tree for an acceptance vector (optionally sized for measured latencies)",
        description="Sequoia's dynamic program (arXiv 2402.12374). Without --latency: the best tree of --budget "
                    "nodes. With --latency: the budget and depth minimising time per token over the measured budgets.")
    _add_acceptance(search, required=True)
    search.add_argument("--budget", type=int, help="nodes, root included (with --latency: the largest considered; "
                                                   "default the largest measured)")
    search.add_argument("--max-depth", type=int, default=10,
                        help="at most this many levels, root included (tree depth <= MAX_DEPTH - 1); default 10")
    search.add_argument("--latency", metavar="LAT", help=LATENCY_HELP)
    search.add_argument("--draft-ms", type=float, help="draft growth step time in ms (overrides the latency file)")
    search.add_argument("-o", "--output", required=True, help="growmap to write (.pt); a .json record goes beside it")

    inspect = commands.add_parser("inspect", help="validate a growmap and describe it (text tree, optional PNG)")
    inspect.add_argument("file", help="growmap .pt")
    inspect.add_argument("--png", help="also draw the tree to this PNG")
    inspect.add_argument("--max-lines", type=int, default=300, help="longest text tree to print (default 300)")
    _add_acceptance(inspect, required=False)
    _add_acceptance_command(commands)
    _add_latency_command(commands)
    return parser


def _add_acceptance_command(commands) -> None:
    from utils.config import DEFAULTS

    sub = commands.add_parser(
        "acceptance", help="measure Sequoia's acceptance vector of a draft/target pair (-> search --acceptance)",
        description="Walk along the target's own continuation of each prompt (greedy at T = 0, sampled at T > 0); "
                    "at each position draw W children from the draft (top-W at T = 0, sampled without replacement "
                    "at T > 0) and apply the verification rule. acceptance[k] = fraction of positions whose k-th "
                    "child was accepted (Sequoia, arXiv 2402.12374). Writes a .pt (1-D tensor, index 0 padding, "
                    "'none accepted' dropped) and a .json record beside it; both feed search --acceptance as they are.")
    add_model_flags(sub)
    add_prompt_flags(sub)
    sub.add_argument("--T", type=float, default=DEFAULTS.T, help="temperature; 0 = greedy")
    sub.add_argument("--P", type=float, default=DEFAULTS.P, help="top-p nucleus mass in (0, 1], used when T > 0")
    sub.add_argument("--width", type=int, default=32, help="children drafted per position (ranks measured); default 32")
    sub.add_argument("--steps-per-prompt", type=int, default=DEFAULTS.max_new_tokens,
                     help=f"continuation tokens (positions) per prompt; default {DEFAULTS.max_new_tokens}")
    sub.add_argument("-o", "--output", required=True, help="vector to write (.pt); a .json record goes beside it")


def _add_latency_command(commands) -> None:
    sub = commands.add_parser(
        "latency", help="time the target per tree size and one draft step (-> search --latency)",
        description="Time one target forward over n tree tokens after --prefix cached tokens for each n in --sizes, "
                    "and one draft growth step for each frontier in --draft-sizes; medians after warm-up "
                    "(Sequoia's hardware-aware search, arXiv 2402.12374 section 3.2). Run it on an idle machine.")
    add_model_flags(sub)
    sub.add_argument("--sizes", default=DEFAULT_SIZES, help=f"tree sizes n (root included) to time; 1 is always "
                                                            f"added; default {DEFAULT_SIZES}")
    sub.add_argument("--draft-sizes", default=DEFAULT_DRAFT_SIZES,
                     help=f"draft frontier sizes (nodes per growth step) to time; default {DEFAULT_DRAFT_SIZES}")
    sub.add_argument("--draft-frontier", type=int, default=4,
                     help="the frontier size whose time becomes draft_step_ms (added to --draft-sizes); default 4")
    sub.add_argument("--prefix", type=int, default=128, help="committed tokens already in the cache; default 128")
    sub.add_argument("--tree", choices=("random", "chain"), default="random",
                     help="random: node i's parent uniform in 0..i-1; chain: a line (default random)")
    sub.add_argument("--repeats", type=int, default=7, help="timed runs per size (median reported); default 7")
    sub.add_argument("--warmup", type=int, default=2, help="untimed runs per size first; default 2")
    sub.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the random trees and tokens")
    sub.add_argument("-o", "--output", required=True, help="latency profile to write (.json)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    handlers = {"build": cmd_build, "search": cmd_search, "inspect": cmd_inspect,
                "acceptance": cmd_acceptance, "latency": cmd_latency}
    try:
        handlers[args.command](args, argv)
    except (UserError, GrowmapError) as exc:
        print(f"growmap_tool: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
