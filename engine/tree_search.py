"""The optimal static tree for an acceptance vector, and the hardware-aware choice of its size and depth.

Sequoia (Chen et al., arXiv 2402.12374, section 3.1) models verification with a *positional acceptance
vector* p: p[k] is the probability that the k-th drafted child of a node (children drafted in rank order
1, 2, ...) is the one the target accepts; p[0] is padding and the "none accepted" entry is not part of p.
Under this model the expected number of tokens a step yields is

    E(tree) = 1 + sum over non-root nodes v of  prod_{u on the path root -> v, u != root} p[rank(u)]

where the 1 stands for the bonus token (the root). Sequoia finds the tree that maximises E for a node
budget n (root included) and a depth limit of L levels (root included, so tree depth <= L - 1) with a
dynamic program over (budget, levels, number of children of the root). A node has at most K = len(p) - 1
children (the ranks p measures), and a node with b children always
uses ranks 1..b: the drafter's children are its top-b (or first b sampled) tokens, so rank 9 cannot be
drafted without ranks 1..8 even where p is not decreasing.

A feature draft (engine/feature_draft.py) drafts the root's children from the target's real hidden state
and deeper nodes from its own predicted features, so its root level is accepted more often: `root_p`
(`sequoia_dp`, `expected_accepted`) scores the root's children with their own vector, every other node with p.

Section 3.2 (hardware-aware): pick the budget and depth that minimise the time per generated token,
(depth * draft_step_time + target_time(n)) / E, because the draft runs one forward per growth step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from engine.growmap import Growmap, from_parents


def check_acceptance(p: Sequence[float]) -> np.ndarray:
    """p as float64 [K + 1] after checking it: 1-D, finite, entries in [0, 1], p[1:] summing to at most 1."""
    vec = np.asarray(p, dtype=np.float64)
    if vec.ndim != 1 or vec.shape[0] < 2:
        raise ValueError("the acceptance vector must be 1-D with padding at index 0 and at least one rank")
    if not np.all(np.isfinite(vec)) or np.any(vec[1:] < 0) or np.any(vec[1:] > 1):
        raise ValueError("acceptance vector entries must be probabilities in [0, 1]")
    if vec[1:].sum() > 1 + 1e-6:
        raise ValueError(f"acceptance vector ranks 1.. sum to {vec[1:].sum():.4f} > 1; "
                         "drop the 'none accepted' entry or renormalise")
    vec = vec.copy()
    vec[0] = 0.0
    return vec


@dataclass(frozen=True)
class LevelTable:
    """The DP arrays of one acceptance vector at every level limit L and budget m (see `sequoia_dp`)."""
    values: np.ndarray       # [max_levels + 1, max_budget + 1] float64: best value of L levels, m nodes
    best_branch: np.ndarray  # [max_levels + 1, max_budget + 1] int: children of the root in that best tree
    split: np.ndarray        # [max_levels + 1, K + 1, max_budget + 1] int: budget the root keeps before child b

    @classmethod
    def empty(cls, max_levels: int, ranks: int, max_budget: int) -> LevelTable:
        """Level 1 filled (a lone root); levels >= 2 filled by `fill`."""
        n = max_budget + 1
        values = np.full((max_levels + 1, n), -np.inf)
        values[1] = _lone_root(n)
        return cls(values, np.zeros((max_levels + 1, n), dtype=np.int64),
                   np.zeros((max_levels + 1, ranks + 1, n), dtype=np.int64))

    def fill(self, levels: int, child: np.ndarray, vec: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> None:
        """Level `levels`: a root whose children, accepted with `vec`, are subtrees worth `child` [n]."""
        self.values[levels], self.best_branch[levels], self.split[levels] = _best_root(child, vec, *pairs)

    def child_sizes(self, levels: int, size: int) -> list[int]:
        """Sizes of the children's subtrees, rank 1 first, in the best tree of `size` nodes and `levels` levels."""
        sizes = []
        rest = size
        for k in range(int(self.best_branch[levels, size]), 0, -1):  # child k takes what remains after
            kept = int(self.split[levels, k, rest])                    # the root and children 1..k-1
            sizes.append(rest - kept)
            rest = kept
        assert rest == 1, "DP reconstruction must end at the lone root"
        return sizes[::-1]


@dataclass(frozen=True)
class SearchTable:
    """Sequoia's DP table for one acceptance vector, every budget up to `max_budget`, every level limit.

    values[L, n]: best expected tokens per step with exactly n nodes and at most L levels (-inf where no
    such tree exists, i.e. n > 1 with L = 1). Non-decreasing in L; in n too, since p >= 0.

    `whole` is the DP of whole trees; `subtrees` that of the subtrees below the root. With a root vector (a
    feature draft drafts the root's children from the target's real hidden state, so they are accepted more
    often than deeper nodes) the whole tree's root level is scored with it and the subtrees with the plain
    vector; without one the two are the same table.
    """
    whole: LevelTable
    subtrees: LevelTable

    @property
    def values(self) -> np.ndarray:
        """[max_levels + 1, max_budget + 1] float64: the whole trees' best values."""
        return self.whole.values

    @property
    def max_budget(self) -> int:
        return self.values.shape[1] - 1

    @property
    def max_levels(self) -> int:
        return self.values.shape[0] - 1

    def value(self, budget: int, levels: int) -> float:
        """Best expected tokens per step for `budget` nodes and at most `levels` levels."""
        self._check(budget, levels)
        return float(self.values[levels, budget])

    def best_by_budget(self, levels: int | None = None) -> np.ndarray:
        """[max_budget + 1] best value per budget at the level limit (default: the table's own)."""
        return self.values[self.max_levels if levels is None else levels].copy()

    def parents(self, budget: int, levels: int) -> list[int]:
        """Parent list of an optimal tree, breadth-first, each node's children in rank order 1, 2, ..."""
        self._check(budget, levels)
        if not math.isfinite(self.values[levels, budget]):
            raise ValueError(f"no tree of {budget} nodes fits in {levels} level(s)")
        parents = [-1]
        queue = [(0, budget, levels)]  # (node id, subtree size, level limit)
        for node, size, lev in queue:  # the list grows while we walk it: breadth-first
            for child_size in (self.whole if node == 0 else self.subtrees).child_sizes(lev, size):  # rank 1 first
                parents.append(node)
                queue.append((len(parents) - 1, child_size, lev - 1))
        return parents

    def tree(self, budget: int, levels: int) -> Growmap:
        """The optimal tree as a Growmap (canonical order: rank-1 child first)."""
        return from_parents(self.parents(budget, levels))

    def _check(self, budget: int, levels: int) -> None:
        if not 1 <= budget <= self.max_budget:
            raise ValueError(f"budget {budget} outside the table's 1..{self.max_budget}")
        if not 1 <= levels <= self.max_levels:
            raise ValueError(f"levels {levels} outside the table's 1..{self.max_levels}")


def _lone_root(n: int) -> np.ndarray:
    """[n] value of a root without children: 1 (its bonus token) at budget 1, -inf (no such tree) elsewhere."""
    values = np.full(n, -np.inf)
    values[1] = 1.0
    return values


def _budget_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(other [n, n], valid [n, n]): other[m, y] = m - y is the budget a new child gets when the root
    (with its earlier children) keeps y of m; valid where both parts are at least 1 (other clipped elsewhere)."""
    m_idx = np.arange(n)[:, None]
    y_idx = np.arange(n)[None, :]
    other = m_idx - y_idx
    valid = (other >= 1) & (y_idx >= 1)
    return np.clip(other, 0, n - 1), valid


def _best_root(child: np.ndarray, vec: np.ndarray, other: np.ndarray,
               valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level of Sequoia's DP: the best root whose children, accepted with `vec`, are subtrees worth
    `child` [n] per budget (their best value one level down).

    Returns (best [n], best_branch [n], split [K + 1, n]): per budget m, the best value, its number of
    children, and for each b the budget kept by the root and children 1..b-1 when child b is added.
    One helper for the deep levels and the root level, so a root vector changes the input, not the rule.
    """
    n = child.shape[0]
    finite = np.isfinite(child)
    child_value = np.where(finite, child, 0.0)  # scaled below, -inf put back after: no 0 * -inf = nan
    g = best = _lone_root(n)
    best_branch = np.zeros(n, dtype=np.int64)
    split = np.zeros((vec.shape[0], n), dtype=np.int64)
    for b in range(1, vec.shape[0]):
        scaled = np.where(finite, vec[b] * child_value, -np.inf)
        cand = np.where(valid, g[None, :] + scaled[other], -np.inf)  # [m, y]
        arg = cand.argmax(axis=1)
        g = cand[np.arange(n), arg]
        split[b] = arg
        improve = g > best  # strict: ties keep the fewer children
        best = np.where(improve, g, best)
        best_branch = np.where(improve, b, best_branch)
    return best, best_branch, split


def sequoia_dp(p: Sequence[float], max_budget: int, max_levels: int,
               root_p: Sequence[float] | None = None) -> SearchTable:
    """Sequoia's dynamic program (arXiv 2402.12374, section 3.1), vectorised over budgets.

    With f[L][m] the best value of a subtree of m nodes and at most L levels, and g[L][b][m] the best
    value when its root has exactly the children of ranks 1..b,
        g[L][0][m] = 1 if m == 1 else -inf
        g[L][b][m] = max_{1 <= y < m} g[L][b-1][y] + p[b] * f[L-1][m - y]   (child b gets m - y nodes)
        f[L][m]    = max_b g[L][b][m],   f[1] = g[.][0].
    split[L][b][m] keeps the maximising y for the reconstruction. Cost O(L * K * N^2), vectorised in N^2.

    root_p: where the root's children are accepted differently from every other node's (a feature draft
    drafts them from the target's real hidden state, deeper nodes from its own predicted features), the
    whole tree's value is the same recurrence once more on top of the subtrees' f, with root_p[b] in place
    of p[b]: F[L][m] = max_b G[L][b][m], G[L][b][m] = max_y G[L][b-1][y] + root_p[b] * f[L-1][m - y].
    Every level limit and budget is kept, so `choose_budget` works on either table. root_p may have a
    different length from p (the root may get more or fewer children than a deep node).
    """
    vec = check_acceptance(p)
    root_vec = None if root_p is None else check_acceptance(root_p)
    if max_budget < 1 or max_levels < 1:
        raise ValueError("max_budget and max_levels must be at least 1")
    pairs = _budget_pairs(max_budget + 1)
    deep = LevelTable.empty(max_levels, vec.shape[0] - 1, max_budget)
    top = deep if root_vec is None else LevelTable.empty(max_levels, root_vec.shape[0] - 1, max_budget)
    for lev in range(2, max_levels + 1):
        deep.fill(lev, deep.values[lev - 1], vec, pairs)
        if root_vec is not None:
            top.fill(lev, deep.values[lev - 1], root_vec, pairs)
    return SearchTable(whole=top, subtrees=deep)


def child_ranks(growmap: Growmap) -> list[int]:
    """Rank of each node among its siblings (1 = first child); 0 for the root."""
    ranks = [0] * growmap.size
    for children in growmap.successors:
        for k, child in enumerate(children, start=1):
            ranks[child] = k
    return ranks


def path_probabilities(growmap: Growmap, p: Sequence[float], root_p: Sequence[float] | None = None) -> list[float]:
    """Probability that each node is on the accepted path under the positional model (root: 1).

    root_p, if given, is the acceptance vector of the root's children (see `sequoia_dp`); p is everyone else's.
    """
    vec = check_acceptance(p)
    root_vec = vec if root_p is None else check_acceptance(root_p)
    ranks = child_ranks(growmap)
    parents = growmap.parents.tolist()
    prob = [1.0] * growmap.size
    for node in range(1, growmap.size):  # parents come before children
        rank, parent = ranks[node], parents[node]
        node_vec = root_vec if parent == 0 else vec
        prob[node] = prob[parent] * (float(node_vec[rank]) if rank < node_vec.shape[0] else 0.0)
    return prob


def expected_accepted(growmap: Growmap, p: Sequence[float], root_p: Sequence[float] | None = None) -> float:
    """Expected tokens per step of any growmap under acceptance vector p (Sequoia's E, bonus included);
    the root's children use root_p where given.

    Ranks beyond len(p) - 1 (len(root_p) - 1 at the root) contribute 0.
    """
    return float(sum(path_probabilities(growmap, p, root_p)))


@dataclass(frozen=True)
class LatencyProfile:
    """Measured costs: the target's forward over n tree tokens, and one draft growth step."""
    target_ms: Mapping[int, float]  # n tree tokens -> milliseconds for one target forward
    draft_step_ms: float


@dataclass(frozen=True)
class Choice:
    """One (budget, levels) candidate and its predicted cost."""
    budget: int
    levels: int             # level limit given to the DP, root included
    depth: int              # draft growth steps = levels - 1
    expected_tokens: float  # per step, bonus token included
    step_ms: float          # depth * draft_step_ms + target_ms[budget]
    ms_per_token: float
    speedup: float          # target_ms[1] * expected_tokens / step_ms, over plain autoregressive decoding


@dataclass(frozen=True)
class HardwareChoice:
    best: Choice
    per_budget: list[Choice]  # the best level limit for each measured budget, by budget


def choose_budget(table: SearchTable, profile: LatencyProfile) -> HardwareChoice:
    """Sequoia's hardware-aware choice (section 3.2) over the budgets the profile measured.

    Only budgets present in `profile.target_ms` (and within the table) are candidates: no interpolation.
    The speedup needs target_ms[1], the cost of one autoregressive step.
    """
    if 1 not in profile.target_ms:
        raise ValueError("the latency profile needs the target time for n = 1 (one autoregressive step)")
    if profile.draft_step_ms < 0 or any(ms <= 0 for ms in profile.target_ms.values()):
        raise ValueError("latencies must be positive (draft step time may be 0)")
    base_ms = float(profile.target_ms[1])
    per_budget = []
    for budget in sorted(n for n in profile.target_ms if 1 <= n <= table.max_budget):
        best: Choice | None = None
        for levels in range(1, table.max_levels + 1):
            value = float(table.values[levels, budget])
            if not math.isfinite(value):
                continue
            step_ms = (levels - 1) * profile.draft_step_ms + float(profile.target_ms[budget])
            cand = Choice(budget, levels, levels - 1, value, step_ms, step_ms / value, base_ms * value / step_ms)
            if best is None or cand.ms_per_token < best.ms_per_token - 1e-12:
                best = cand
        if best is not None:
            per_budget.append(best)
    if not per_budget:
        raise ValueError(f"no measured budget lies within the table's 1..{table.max_budget}")
    best_overall = min(per_budget, key=lambda c: (c.ms_per_token, c.budget))
    return HardwareChoice(best_overall, per_budget)
