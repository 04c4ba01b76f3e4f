"""`inspect`: a growmap as text (and its expected accepted tokens under a vector) and as a PNG drawing."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from engine.growmap import Growmap, format_tree, load_growmap
from engine.tree_search import expected_accepted
from utils.growmap_tool.vectors import load_vectors


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

