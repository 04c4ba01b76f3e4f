"""Growmaps: the static tree shapes, in the file format of the original project and of Sequoia.

A growmap is a `torch.save`d dict (load with `weights_only=True`):
  size        number of nodes n, root included (node 0 is the root)
  roots       per growth step s, the node indices expanded at step s
  branches    per step s, aligned with roots[s], how many children each expanded node gets
  Successors  length n: the child indices of each node, numbered consecutively in expansion order
  mask        [n, n] 0/1: mask[i][j] = 1 when j is i or an ancestor of i
  depth       [n] long: depth of each node (root 0)

Like the original generator (Sequoia's tree search), `from_parents` writes one `roots` entry per depth
level, every node of that level included, even those with 0 branches; the last entry is the leaf level,
all zeros. Engines written for those files run `len(roots) - 1` growth steps and need that last entry.
Files that leave out 0-branch nodes load as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.tree_mask import ancestor_mask_from_parents

REQUIRED_KEYS = ("size", "roots", "branches", "Successors", "mask", "depth")


class GrowmapError(ValueError):
    """A growmap file or dict that is not a valid tree; the message names the failing key."""


@dataclass(frozen=True)
class Growmap:
    size: int
    roots: list[list[int]]
    branches: list[list[int]]
    successors: list[list[int]]
    depth: torch.Tensor    # [n] long
    mask: torch.Tensor     # [n, n] bool, ancestor-or-self
    parents: torch.Tensor  # [n] long, -1 for the root

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def nodes_per_depth(self) -> list[int]:
        return torch.bincount(self.depth).tolist()

    @property
    def growth_steps(self) -> int:
        """Draft forwards needed to grow the tree: one per level below the root (= max_depth)."""
        return self.max_depth

    def branching_per_depth(self) -> list[list[int]]:
        """For each depth, the number of children of every node of that depth that has children."""
        out: list[list[int]] = [[] for _ in range(self.max_depth + 1)]
        for node, children in enumerate(self.successors):
            if children:
                out[int(self.depth[node])].append(len(children))
        return out

    def first_child_path_len(self) -> int:
        """Nodes on the chain that follows each node's first child from the root (root excluded)."""
        node, length = 0, 0
        while self.successors[node]:
            node, length = self.successors[node][0], length + 1
        return length

    def to_dict(self) -> dict:
        """The on-disk dict, in the original's key names and types."""
        return {"size": self.size, "roots": self.roots, "branches": self.branches,
                "Successors": self.successors, "mask": self.mask.long(), "depth": self.depth.clone()}


def _int_list(value, key: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise GrowmapError(f"'{key}' must be a list of integers")
    return list(value)


def from_dict(data: dict) -> Growmap:
    """Validate every key against the others; raise GrowmapError naming the first that disagrees."""
    if not isinstance(data, dict):
        raise GrowmapError("a growmap must be a dict with keys " + ", ".join(REQUIRED_KEYS))
    for key in REQUIRED_KEYS:
        if key not in data:
            raise GrowmapError(f"missing key '{key}'")
    size = data["size"]
    if isinstance(size, torch.Tensor) and size.numel() == 1:
        size = int(size)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise GrowmapError(f"'size' must be a positive integer, got {size!r}")

    successors = data["Successors"]
    if not isinstance(successors, (list, tuple)) or len(successors) != size:
        raise GrowmapError(f"'Successors' must be a list of {size} child lists (one per node)")
    successors = [_int_list(children, f"Successors[{i}]") for i, children in enumerate(successors)]
    parents = [-1] * size
    for node, children in enumerate(successors):
        for child in children:
            if not node < child < size:
                raise GrowmapError(f"'Successors'[{node}] names child {child}, outside ({node}, {size})")
            if parents[child] != -1:
                raise GrowmapError(f"'Successors': node {child} has two parents ({parents[child]} and {node})")
            parents[child] = node
    orphans = [i for i in range(1, size) if parents[i] == -1]
    if orphans:
        raise GrowmapError(f"'Successors': nodes {orphans[:5]} have no parent")

    roots, branches = data["roots"], data["branches"]
    if not isinstance(roots, (list, tuple)) or not isinstance(branches, (list, tuple)) or len(roots) != len(branches):
        raise GrowmapError("'roots' and 'branches' must be lists with one entry per growth step")
    roots = [_int_list(step, f"roots[{s}]") for s, step in enumerate(roots)]
    branches = [_int_list(step, f"branches[{s}]") for s, step in enumerate(branches)]
    created = {0}
    expanded: set[int] = set()
    next_id = 1  # children are numbered consecutively in expansion order
    for s, (step_roots, step_branches) in enumerate(zip(roots, branches)):
        if len(step_roots) != len(step_branches):
            raise GrowmapError(f"'branches'[{s}] has {len(step_branches)} entries but 'roots'[{s}] has {len(step_roots)}")
        new_nodes = []
        for node, count in zip(step_roots, step_branches):
            if node not in created:
                raise GrowmapError(f"'roots'[{s}] expands node {node} before it exists")
            if node in expanded:
                raise GrowmapError(f"'roots': node {node} is expanded twice")
            if count != len(successors[node]):
                raise GrowmapError(f"'branches'[{s}] gives node {node} {count} children but "
                                   f"'Successors'[{node}] lists {len(successors[node])}")
            if successors[node] != list(range(next_id, next_id + count)):
                raise GrowmapError(f"'Successors'[{node}] is {successors[node]}, but expanding 'roots' in order "
                                   f"numbers its children {list(range(next_id, next_id + count))}")
            next_id += count
            expanded.add(node)
            new_nodes.extend(successors[node])
        created.update(new_nodes)
    unexpanded = [i for i in range(size) if successors[i] and i not in expanded]
    if unexpanded:
        raise GrowmapError(f"'roots': nodes {unexpanded[:5]} have children but are never expanded")

    parent_t = torch.tensor(parents, dtype=torch.long)
    depth_expected = torch.zeros(size, dtype=torch.long)
    for node in range(1, size):  # children have larger indices than parents, so one pass suffices
        depth_expected[node] = depth_expected[parents[node]] + 1
    depth = data["depth"]
    if not isinstance(depth, torch.Tensor):
        depth = torch.tensor(_int_list(depth, "depth"))
    if depth.shape != (size,) or not torch.equal(depth.long(), depth_expected):
        raise GrowmapError("'depth' disagrees with the tree that 'Successors' describes")

    mask_expected = ancestor_mask_from_parents(parent_t)
    mask = data["mask"]
    if not isinstance(mask, torch.Tensor):
        raise GrowmapError("'mask' must be a tensor")
    if mask.shape != (size, size) or not torch.equal(mask != 0, mask_expected):
        raise GrowmapError("'mask' disagrees with the tree that 'Successors' describes "
                           "(mask[i][j] must be 1 exactly when j is i or an ancestor of i)")
    return Growmap(size, roots, branches, successors, depth_expected, mask_expected, parent_t)


def _load_failure(exc: Exception) -> str:
    """One line on why torch.load(weights_only=True) refused a file (its own message spans many lines)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
        detail = detail.split(" Please use", 1)[0]
        return f"not a plain torch.save file of tensors, lists and numbers (weights_only=True refused it: {detail})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_growmap(path: str | Path) -> Growmap:
    path = Path(path)
    if not path.is_file():
        raise GrowmapError(f"growmap file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or non-torch file raises many different types
        raise GrowmapError(f"cannot read growmap {path}: {_load_failure(exc)}") from exc
    try:
        return from_dict(data)
    except GrowmapError as exc:
        raise GrowmapError(f"invalid growmap {path}: {exc}") from exc


def save_growmap(growmap: Growmap, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(growmap.to_dict(), tmp)
    tmp.replace(path)


def from_parents(parents: list[int]) -> Growmap:
    """Growmap for the tree given by a parent list (parents[0] = -1, parents[i] < i).

    Nodes are renumbered into the canonical order: growth step s expands the nodes of depth s, in
    index order, and each node's children are numbered consecutively, keeping their order (the first
    listed child is the rank-1 child). `roots` lists every level, leaves included (see module docstring).
    """
    n = len(parents)
    if n == 0 or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i > 0):
        raise GrowmapError("parents must start with -1 and satisfy 0 <= parents[i] < i")
    children: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        children[parents[i]].append(i)
    new_id = {0: 0}
    successors: list[list[int]] = [[] for _ in range(n)]
    roots, branches = [], []
    frontier = [0]
    while frontier:
        step_roots, step_branches, next_frontier = [], [], []
        for old in frontier:
            step_roots.append(new_id[old])
            step_branches.append(len(children[old]))
            for child in children[old]:
                new_id[child] = len(new_id)
                successors[new_id[old]].append(new_id[child])
                next_frontier.append(child)
        roots.append(step_roots)
        branches.append(step_branches)
        frontier = next_frontier
    new_parents = [-1] * n
    for node, kids in enumerate(successors):
        for child in kids:
            new_parents[child] = node
    parent_t = torch.tensor(new_parents, dtype=torch.long)
    mask = ancestor_mask_from_parents(parent_t)
    depth = mask.sum(-1) - 1
    return from_dict({"size": n, "roots": roots, "branches": branches, "Successors": successors,
                      "mask": mask.long(), "depth": depth.long()})


def add_children(growmap: Growmap, counts: list[int]) -> Growmap:
    """`growmap` with counts[i] more children for node i, ranked after its own (leaves; renumbered into the
    canonical order). With the counts of an augment budget it is the plain tree of the same node count."""
    parents = growmap.parents.tolist()
    for node, count in enumerate(counts):
        if node >= growmap.size:
            raise GrowmapError(f"cannot add children to node {node}: the growmap has {growmap.size} nodes")
        parents += [node] * count
    return from_parents(parents)


def chain(k: int) -> Growmap:
    """The root and a chain of k drafted tokens (plain speculative decoding with k guesses)."""
    return from_parents([-1] + list(range(k)))


def wxd_tree(width: int, depth: int) -> Growmap:
    """`width` chains of `depth` tokens under the root (the original's 4x8-tree)."""
    parents = [-1]
    for _ in range(width):
        parent = 0
        for _ in range(depth):
            parents.append(parent)
            parent = len(parents) - 1
    return from_parents(parents)


def kary_tree(k: int, depth: int) -> Growmap:
    """The complete k-ary tree of the given depth (root at depth 0)."""
    parents, frontier = [-1], [0]
    for _ in range(depth):
        next_frontier = []
        for node in frontier:
            for _ in range(k):
                parents.append(node)
                next_frontier.append(len(parents) - 1)
        frontier = next_frontier
    return from_parents(parents)


def format_tree(growmap: Growmap, max_lines: int | None = None) -> str:
    """The tree as indented text, one node per line: `index (rank k)`, children in rank order."""
    lines: list[str] = []
    stack: list[tuple[int, str, str]] = [(0, "", "")]  # (node, prefix for this line, prefix for children)
    while stack:
        node, head, tail = stack.pop()
        parent = int(growmap.parents[node])
        rank = "" if parent < 0 else f" (rank {growmap.successors[parent].index(node) + 1})"
        lines.append(f"{head}{node}{rank}")
        children = growmap.successors[node]
        for k in range(len(children) - 1, -1, -1):  # pushed in reverse: popped in rank order
            last = k == len(children) - 1
            stack.append((children[k], tail + ("`-- " if last else "|-- "), tail + ("    " if last else "|   ")))
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... {len(lines) - max_lines} more nodes"]
    return "\n".join(lines)
