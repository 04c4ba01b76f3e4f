"""Build, search and inspect growmaps (static tree shapes): `python -m utils.growmap_tool <command> --help`.

  build chain K | wxd W D | kary K D | parents "0,0,1,..."  -o out.pt
  search --acceptance vec.json --budget 64 --max-depth 10 -o out.pt        Sequoia's optimal tree
  search --acceptance vec.json --latency lat.json [--draft-ms X] -o out.pt  ... sized for the hardware
  inspect file.pt [--acceptance vec.json] [--png out.png]

Every written growmap gets a JSON beside it (same name, .json) saying how it was made.
Bad input: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

import torch

from engine.growmap import Growmap, GrowmapError, chain, format_tree, from_parents, kary_tree, load_growmap, \
    save_growmap, wxd_tree
from engine.tree_search import LatencyProfile, SearchTable, check_acceptance, choose_budget, expected_accepted, \
    sequoia_dp
from utils.errors import UserError

MAX_NODES = 4096  # larger trees cost more to verify than they can return; also bounds the [n, n] mask
LATENCY_HELP = ('JSON {"target_ms": {"1": 20.5, "16": 21.0, ...}, "draft_step_ms": 3.1}: target forward time '
                'for n tree tokens (n = 1 required), and one draft growth step')


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input on one line and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
            data = json.loads(file.read_text())
            if isinstance(data, dict):
                if "acceptance" not in data:
                    raise ValueError('a JSON object needs the key "acceptance"')
                data = data["acceptance"]
            if not isinstance(data, list):
                raise ValueError("expected a list of probabilities")
            values = [float(x) for x in data]
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
        raise UserError(f"cannot read acceptance vector {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if drop_last:
        values = values[:-1]
    try:
        return check_acceptance(values).tolist()
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from exc


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

def write_record(out: Path, record: dict) -> Path:
    """The JSON beside a written growmap, atomically."""
    path = out.with_suffix(".json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def shape_summary(growmap: Growmap) -> dict:
    return {"size": growmap.size, "depth": growmap.max_depth, "nodes_per_depth": growmap.nodes_per_depth(),
            "first_child_path_len": growmap.first_child_path_len()}


def _command(argv: Sequence[str]) -> str:
    return "python -m utils.growmap_tool " + shlex.join(argv)


def _save(growmap: Growmap, out: Path, record: dict) -> None:
    save_growmap(growmap, out)
    write_record(out, record)
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
        p = load_acceptance(args.acceptance, args.drop_last)
        record["acceptance"] = {"file": args.acceptance, "vector": p}
        record["predicted_tokens_per_step"] = expected_accepted(growmap, p)
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
    p = load_acceptance(args.acceptance, args.drop_last)
    levels = _positive("--max-depth", args.max_depth)
    record: dict = {"made_by": _command(argv), "method": "Sequoia dynamic program (arXiv 2402.12374)",
                    "acceptance": {"file": args.acceptance, "vector": p}, "max_levels": levels}
    if args.latency is None:
        if args.draft_ms is not None:
            raise UserError("--draft-ms needs --latency")
        if args.budget is None:
            raise UserError("search needs --budget N (or --latency to choose it)")
        budget = _positive("--budget", args.budget)
        _check_size(budget)
        table = sequoia_dp(p, budget, levels)
        growmap = table.tree(budget, levels)
        predicted = table.value(budget, levels)
        record.update(budget=budget, predicted_tokens_per_step=predicted,
                      best_by_budget={str(n): table.value(n, levels) for n in _report_budgets(budget)})
        print(f"budget {budget}, at most {levels} levels: predicted tokens per step {predicted:.3f}")
    else:
        profile = load_latency(args.latency, args.draft_ms)
        max_budget = args.budget if args.budget is not None else max(profile.target_ms)
        _check_size(_positive("--budget", max_budget))
        table = sequoia_dp(p, max_budget, levels)
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
    assert abs(expected_accepted(growmap, p) - predicted) < 1e-9
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
    p = None
    if args.acceptance:
        p = load_acceptance(args.acceptance, args.drop_last)
        print(f"predicted tokens per step under {args.acceptance}: {expected_accepted(growmap, p):.3f}")
    print(format_tree(growmap, max_lines=args.max_lines))
    if args.png:
        draw_png(growmap, Path(args.png), title=Path(args.file).name,
                 predicted=None if p is None else expected_accepted(growmap, p))
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


# ---------------------------------------------------------------- argparse

def _add_acceptance(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--acceptance", required=required, metavar="VEC",
                        help="acceptance vector, .json (list or {\"acceptance\": [...]}) or .pt (1-D tensor); "
                             "index 0 is padding, p[k] = P(k-th child accepted)")
    parser.add_argument("--drop-last", action="store_true",
                        help="drop the vector's last entry (the 'none accepted' probability in Sequoia's files)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m utils.growmap_tool", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,search,inspect}")

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    handlers = {"build": cmd_build, "search": cmd_search, "inspect": cmd_inspect}
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
