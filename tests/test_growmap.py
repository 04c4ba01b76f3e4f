"""Growmaps: builders, file format and validation, Sequoia's tree search, and the growmap tool."""
from __future__ import annotations

import hashlib
import itertools
import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.growmap import Growmap, GrowmapError, chain, format_tree, from_dict, from_parents, kary_tree, \
    load_growmap, save_growmap, wxd_tree
from engine.tree_search import LatencyProfile, choose_budget, expected_accepted, sequoia_dp
from utils import growmap_tool

REPO = Path(__file__).resolve().parent.parent
# The positional acceptance vector quoted in the issue (original project's 68m/7b pair).
P_68M_7B = [0, .6342, .1079, .0570, .0225, .0195, .0150, .0045, .0030, .0120, .0045, .0075, .0045, .0060, .0030,
            .0015, .0030, .0015, .0030, 0, .0030, .0030, .0030, 0, .0015, 0, .0015, 0, 0, 0, .0015, .0015, .0015]


@pytest.fixture(scope="module")
def table():
    return sequoia_dp(P_68M_7B, 128, 10)


def assert_consistent(g: Growmap) -> None:
    n = g.size
    assert g.mask.shape == (n, n) and g.depth.shape == (n,)
    assert torch.equal(g.depth, g.mask.sum(-1) - 1)
    assert bool(g.mask.diagonal().all()) and not bool(g.mask.triu(1).any())
    assert sum(map(sum, g.branches)) == n - 1
    assert len(g.roots) == g.max_depth + 1  # one step per level, leaf level included (original format)
    for s, step in enumerate(g.roots):
        assert sorted(step) == [i for i in range(n) if int(g.depth[i]) == s]
    from_dict(g.to_dict())


# ---------------------------------------------------------------- builders

@pytest.mark.parametrize("k", [1, 4, 16])
def test_chain(k):
    g = chain(k)
    assert_consistent(g)
    assert (g.size, g.max_depth, g.first_child_path_len()) == (k + 1, k, k)
    assert g.nodes_per_depth() == [1] * (k + 1)


@pytest.mark.parametrize("w,d", [(1, 3), (4, 8), (8, 8)])
def test_wxd(w, d):
    g = wxd_tree(w, d)
    assert_consistent(g)
    assert (g.size, g.max_depth) == (w * d + 1, d)
    assert g.nodes_per_depth() == [1] + [w] * d
    assert g.branching_per_depth() == [[w]] + [[1] * w] * (d - 1) + [[]]


@pytest.mark.parametrize("k,d", [(1, 1), (2, 3), (3, 2)])
def test_kary(k, d):
    g = kary_tree(k, d)
    assert_consistent(g)
    assert g.nodes_per_depth() == [k ** i for i in range(d + 1)]


def test_from_parents_keeps_child_order_and_renumbers_breadth_first():
    g = from_parents([-1, 0, 1, 0, 2])  # node 3 is the root's second child, node 4 the grandchild's child
    assert_consistent(g)
    assert g.successors == [[1, 2], [3], [], [4], []]
    assert g.roots == [[0], [1, 2], [3], [4]] and g.branches == [[2], [1, 0], [1], [0]]
    assert format_tree(g).splitlines()[0] == "0"


def test_from_parents_rejects_bad_lists():
    for bad in ([], [0], [-1, 1], [-1, 0, 5]):
        with pytest.raises(GrowmapError):
            from_parents(bad)


# ---------------------------------------------------------------- Sequoia's DP

@pytest.mark.parametrize("budget,expected", [(16, 3.130), (32, 3.501), (64, 3.852), (128, 4.192)])
def test_dp_figures(table, budget, expected):
    assert round(table.value(budget, 10), 3) == expected


@pytest.mark.parametrize("budget", [1, 2, 7, 16, 33, 64, 128])
def test_reconstructed_tree_scores_the_dp_value(table, budget):
    g = table.tree(budget, 10)
    assert_consistent(g)
    assert g.size == budget and g.max_depth <= 9
    assert expected_accepted(g, P_68M_7B) == pytest.approx(table.value(budget, 10), abs=1e-12)


def test_dp_matches_brute_force_on_small_trees():
    p = [0, 0.5, 0.1, 0.25, 0.05]  # not decreasing: ranks must still be used in order
    small = sequoia_dp(p, 7, 4)
    for n in range(1, 8):
        trees = all_trees(n)
        for levels in range(1, 5):
            fitting = [expected_accepted(t, p) for t in trees
                       if t.max_depth <= levels - 1 and max(map(len, t.successors)) <= 4]  # at most K children
            if fitting:
                assert small.value(n, levels) == pytest.approx(max(fitting), abs=1e-12)
            else:
                assert small.value(n, levels) == float("-inf")


def all_trees(n: int) -> list[Growmap]:
    """Every tree of n nodes with children in rank order: each node's parent is any earlier node, and
    from_parents numbers children in the order listed, so each shape appears with ranks 1..b."""
    return [from_parents([-1, *rest]) for rest in itertools.product(*[range(i) for i in range(1, n)])]


def random_vector(rng: np.random.Generator, ranks: int, mass: float) -> list[float]:
    return [0.0, *(rng.dirichlet(np.ones(ranks) * 0.6) * mass)]


def test_dp_with_root_vector_equal_to_p_is_the_plain_dp(table):
    same = sequoia_dp(P_68M_7B, 128, 10, root_p=P_68M_7B)
    assert np.array_equal(same.values, table.values)
    for budget in (1, 2, 16, 64, 128):
        assert same.parents(budget, 10) == table.parents(budget, 10)
    assert expected_accepted(chain(4), P_68M_7B, P_68M_7B) == expected_accepted(chain(4), P_68M_7B)


@pytest.mark.parametrize("seed", range(4))
def test_dp_with_root_vector_matches_brute_force(seed):
    """The root's children use root_p, every other node p; root_p may have more or fewer ranks than p."""
    rng = np.random.default_rng(seed)
    p = random_vector(rng, 3, rng.uniform(0.5, 1.0))
    root_p = random_vector(rng, 2 + seed % 3, rng.uniform(0.5, 1.0))  # 2..4 ranks
    small = sequoia_dp(p, 6, 4, root_p)
    for n in range(1, 7):
        trees = all_trees(n)
        for levels in range(1, 5):
            fitting = [expected_accepted(t, p, root_p) for t in trees if t.max_depth <= levels - 1
                       and len(t.successors[0]) < len(root_p) and max(map(len, t.successors[1:]), default=0) < len(p)]
            assert small.value(n, levels) == pytest.approx(max(fitting, default=float("-inf")), abs=1e-12)
            if fitting:
                tree = small.tree(n, levels)
                assert tree.size == n and tree.max_depth <= levels - 1
                assert expected_accepted(tree, p, root_p) == pytest.approx(small.value(n, levels), abs=1e-12)


def test_root_vector_widens_the_root():
    """Root children accepted far more often than deeper ones (a feature draft): spend more nodes at the root."""
    p, root_p = [0, 0.4, 0.05, 0.02], [0, 0.5, 0.4, 0.05]
    plain, rooted = sequoia_dp(p, 8, 5), sequoia_dp(p, 8, 5, root_p)
    assert len(plain.tree(8, 5).successors[0]) == 2 and len(rooted.tree(8, 5).successors[0]) == 3
    assert rooted.value(8, 5) > expected_accepted(plain.tree(8, 5), p, root_p)
    assert rooted.value(8, 5) == pytest.approx(expected_accepted(rooted.tree(8, 5), p, root_p), abs=1e-12)


def test_bad_root_vectors():
    for bad in ([0.5], [0, 0.7, 0.6], [0, float("nan")]):
        with pytest.raises(ValueError):
            sequoia_dp(P_68M_7B, 4, 3, root_p=bad)
        with pytest.raises(ValueError):
            expected_accepted(chain(2), P_68M_7B, bad)


def test_expected_accepted_of_simple_shapes():
    p1, p2 = P_68M_7B[1], P_68M_7B[2]
    assert expected_accepted(chain(3), P_68M_7B) == pytest.approx(1 + p1 + p1 ** 2 + p1 ** 3)
    assert expected_accepted(kary_tree(2, 1), P_68M_7B) == pytest.approx(1 + p1 + p2)
    assert expected_accepted(kary_tree(40, 1), P_68M_7B) == pytest.approx(sum(P_68M_7B) + 1)  # ranks > 32 add 0


def test_dp_256_nodes():
    big = sequoia_dp(P_68M_7B, 256, 10)
    values = big.best_by_budget()
    assert all(values[n] >= values[n - 1] - 1e-12 for n in range(2, 257))
    assert big.tree(256, 10).size == 256


def test_bad_acceptance_vectors():
    for bad in ([0.5], [0, 0.7, 0.6], [0, -0.1], [[0, 0.5]], [0, float("nan")]):
        with pytest.raises(ValueError):
            sequoia_dp(bad, 4, 3)


# ---------------------------------------------------------------- hardware-aware choice

def test_hardware_choice(table):
    flat = LatencyProfile({1: 10.0, 16: 10.0, 64: 10.0, 128: 10.0}, draft_step_ms=0.0)
    best = choose_budget(table, flat).best
    assert (best.budget, best.levels) == (128, 10)  # free drafting, flat target: the biggest tree wins
    assert best.speedup == pytest.approx(table.value(128, 10))
    costly = LatencyProfile({1: 10.0, 16: 10.0, 64: 40.0}, draft_step_ms=100.0)
    choice = choose_budget(table, costly)
    assert (choice.best.budget, choice.best.depth) == (1, 0) and choice.best.speedup == pytest.approx(1.0)
    row = next(c for c in choice.per_budget if c.budget == 16)
    assert row.step_ms == pytest.approx(row.depth * 100.0 + 10.0)
    assert row.ms_per_token == pytest.approx(row.step_ms / row.expected_tokens)
    with pytest.raises(ValueError, match="n = 1"):
        choose_budget(table, LatencyProfile({16: 10.0}, 1.0))


# ---------------------------------------------------------------- file format

def original_generator_dict(parents: list[int]) -> dict:
    """A growmap dict laid out the way the original's generator wrote it, built independently of from_parents:
    each step expands every node created by the previous step (0 branches included), children get the next
    indices, and the mask row of a node is its parent's row plus itself."""
    kids = {i: [j for j in range(len(parents)) if parents[j] == i] for i in range(len(parents))}
    old_to_new, successors, depth = {0: 0}, [[]], [0]
    mask = torch.zeros(len(parents), len(parents)).long()
    mask[0, 0] = 1
    roots, branches, active = [], [], [0]
    while active:
        roots.append([old_to_new[a] for a in active])
        branches.append([len(kids[a]) for a in active])
        new_active = []
        for a in active:
            for c in kids[a]:
                new = len(successors)
                old_to_new[c] = new
                successors.append([])
                successors[old_to_new[a]].append(new)
                depth.append(depth[old_to_new[a]] + 1)
                mask[new] = mask[old_to_new[a]]
                mask[new, new] = 1
                new_active.append(c)
        active = new_active
    return {"roots": roots, "branches": branches, "Successors": successors, "mask": mask,
            "depth": torch.LongTensor(depth), "size": len(successors)}


def test_original_format_loads(tmp_path, table):
    parents = table.parents(64, 10)
    data = original_generator_dict(parents)
    path = tmp_path / "original.pt"
    torch.save(data, path)
    g = load_growmap(path)
    assert g.size == 64 and g.roots == data["roots"] and g.successors == data["Successors"]
    assert expected_accepted(g, P_68M_7B) == pytest.approx(table.value(64, 10))
    # what we write is that same layout, key for key
    ours = from_parents(parents).to_dict()
    assert set(ours) == set(data)
    for key in ("roots", "branches", "Successors", "size"):
        assert ours[key] == data[key]
    assert ours["mask"].dtype == torch.long and torch.equal(ours["mask"], data["mask"])
    assert ours["depth"].dtype == torch.long and torch.equal(ours["depth"], data["depth"])


def test_files_leaving_out_leaves_in_roots_load():
    data = original_generator_dict([-1, 0, 0, 1])
    data["roots"], data["branches"] = [[0], [1]], [[2], [1]]  # only nodes that have children
    assert from_dict(data).size == 4


def test_save_load_round_trip(tmp_path):
    g = from_parents([-1, 0, 0, 1, 1, 2, 3])
    save_growmap(g, tmp_path / "g.pt")
    back = load_growmap(tmp_path / "g.pt")
    assert (back.size, back.roots, back.branches, back.successors) == (g.size, g.roots, g.branches, g.successors)
    assert torch.equal(back.mask, g.mask) and torch.equal(back.depth, g.depth) and torch.equal(back.parents, g.parents)
    raw = torch.load(tmp_path / "g.pt", weights_only=True)
    assert raw["mask"].dtype == torch.long and raw["depth"].dtype == torch.long and type(raw["size"]) is int


def _broken(edit) -> dict:
    data = original_generator_dict([-1, 0, 0, 1, 1, 2])
    edit(data)
    return data


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize("edit,key", [
    *[(lambda d, k=k: d.pop(k), k) for k in ("roots", "branches", "Successors", "mask", "depth", "size")],
    (lambda d: d["mask"].__setitem__((3, 2), 1), "mask"),
    (lambda d: d["mask"].__setitem__((3, 1), 0), "mask"),
    (_set("mask", torch.ones(5, 5).long()), "mask"),
    (lambda d: d["depth"].__setitem__(5, 3), "depth"),
    (_set("depth", torch.zeros(3).long()), "depth"),
    (lambda d: d["branches"][1].__setitem__(0, 3), "branches"),
    (lambda d: d["branches"][0].append(1), "branches"),
    (_set("Successors", [[1, 2], [3, 4], [5, 4], [], [], []]), "Successors"),  # node 4 with two parents
    (_set("Successors", [[1, 2], [4, 3], [5], [], [], []]), "Successors"),     # not numbered in expansion order
    (_set("Successors", [[1, 2], [3, 4], [5]]), "Successors"),
    (_set("size", 5), "Successors"),
    (_set("size", "6"), "size"),
    (_set("roots", [[0], [2, 1], [3, 4, 5]]), "Successors"),
    (_set("roots", [[1], [0], [3, 4, 5]]), "roots"),
])
def test_broken_files_are_refused_naming_the_key(tmp_path, edit, key):
    path = tmp_path / "broken.pt"
    torch.save(_broken(edit), path)
    with pytest.raises(GrowmapError, match=f"'{key}'"):
        load_growmap(path)


def test_non_torch_and_missing_files_are_refused(tmp_path):
    text = tmp_path / "not_torch.pt"
    text.write_text('{"size": 1}')
    with pytest.raises(GrowmapError, match="cannot read growmap"):
        load_growmap(text)
    with pytest.raises(GrowmapError, match="not found"):
        load_growmap(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(GrowmapError, match="must be a dict"):
        load_growmap(tmp_path / "list.pt")


class _Touch:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_weights_only_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "unpickled"
    data = original_generator_dict([-1, 0])
    data["extra"] = _Touch(marker)
    torch.save(data, tmp_path / "evil.pt")
    with pytest.raises(GrowmapError, match="weights_only=True"):
        load_growmap(tmp_path / "evil.pt")
    assert not marker.exists()


# ---------------------------------------------------------------- the tool and the shipped files

def test_tool_build_search_inspect(tmp_path, capsys):
    acc = REPO / "growmaps" / "acceptance" / "68m_7b.json"
    assert growmap_tool.main(["build", "parents", "0,0,1", "-o", str(tmp_path / "p.pt")]) == 0
    assert load_growmap(tmp_path / "p.pt").successors == [[1, 2], [3], [], []]
    out = tmp_path / "s.pt"
    assert growmap_tool.main(["search", "--acceptance", str(acc), "--budget", "32", "-o", str(out)]) == 0
    assert "3.501" in capsys.readouterr().out
    record = json.loads(out.with_suffix(".json").read_text())
    assert round(record["predicted_tokens_per_step"], 3) == 3.501 and record["budget"] == 32
    lat = tmp_path / "lat.json"
    lat.write_text(json.dumps({"target_ms": {"1": 10, "16": 11, "32": 12}, "draft_step_ms": 1}))
    assert growmap_tool.main(["search", "--acceptance", str(acc), "--latency", str(lat), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chosen: budget" in printed and "speedup" in printed
    assert growmap_tool.main(["inspect", str(out), "--png", str(tmp_path / "t.png")]) == 0
    assert "valid growmap" in capsys.readouterr().out and (tmp_path / "t.png").stat().st_size > 1000


@pytest.mark.parametrize("argv", [
    ["build", "chain", "0", "-o", "x.pt"],
    ["build", "parents", "0,7", "-o", "x.pt"],
    ["search", "--acceptance", "missing.json", "--budget", "8", "-o", "x.pt"],
    ["inspect", "missing.pt"],
])
def test_tool_bad_input_one_line_exit_2(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    assert growmap_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_tool_argparse_errors_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        growmap_tool.main(["build", "chain", "x", "-o", "x.pt"])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("name", ["68m_7b-64-searched", "4x8-tree", "8x8-tree"])
def test_shipped_growmaps(name, table):
    g = load_growmap(REPO / "growmaps" / f"{name}.pt")
    assert_consistent(g)
    record = json.loads((REPO / "growmaps" / f"{name}.json").read_text())
    assert expected_accepted(g, P_68M_7B) == pytest.approx(record["predicted_tokens_per_step"])
    if name == "68m_7b-64-searched":
        assert g.successors == table.tree(64, 10).successors
    else:  # the original's file, equal to what the recorded builder command makes
        width, depth = record["parameters"].values()
        assert g.successors == wxd_tree(width, depth).successors


def test_original_growmaps_ship_byte_for_byte_and_load():
    """growmaps/ holds every growmap of the original project under its own name, unchanged: original.sha256 lists
    the SHA-256 of each file as copied from the original (`sha256sum -c original.sha256` in growmaps/)."""
    listed = [line.split() for line in (REPO / "growmaps" / "original.sha256").read_text().splitlines()]
    assert len(listed) == 21
    for digest, name in listed:
        assert hashlib.sha256((REPO / "growmaps" / name).read_bytes()).hexdigest() == digest, name
    # the tree that the suite used to ship under this name had depth 9 and 6 root children
    g = load_growmap(REPO / "growmaps" / "68m_7b-64.pt")
    assert (g.size, g.max_depth, g.nodes_per_depth()[:2]) == (64, 6, [1, 9])
    for name in ("4-chain", "8-chain", "16-chain", "68m_7b-256", "A100-OpenWebText-68m-7b-stochastic"):
        assert_consistent(load_growmap(REPO / "growmaps" / f"{name}.pt"))
