"""Measuring what Sequoia's tree search needs (arXiv 2402.12374): the acceptance vector (engine.acceptance and
`growmap_tool acceptance`) and the latency profile (`growmap_tool latency`), each fed back into `search`."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from engine.acceptance import (acceptance_counts, acceptance_vector, greedy_ranks, none_fraction, rank_counts,
                               specinfer_ranks)
from engine.decoder import autoregressive_generate
from engine.drafters import teacher_forced_logits
from engine.feature_draft import FeatureDraftModel, FeatureDraftNet
from engine.growmap import load_growmap
from engine.model import TreeModel
from engine.sampling import Sampling
from engine.tree_search import expected_accepted, sequoia_dp
from tests.tiny_models import tiny_llama
from utils import growmap_tool
from utils.growmap_tool.measure import in_target_vocab, prompt_counts, tree_inputs
from utils.growmap_tool.vectors import load_root_acceptance
from utils.errors import UserError
from utils.models import load_feature_net
from utils.training.feature_loop import feature_config, save_feature_folder


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- exact reference (independent of the engine)

def exact_specinfer(p: np.ndarray, q: np.ndarray, width: int) -> np.ndarray:
    """[W + 2] exact probabilities (padding, rank 1..W, none) of the SpecInfer rule with children drawn
    without replacement from q, by enumerating every ordered sequence of children."""
    out = np.zeros(width + 2)

    def walk(p: np.ndarray, q: np.ndarray, rank: int, reach: float) -> None:
        if rank > width or q.sum() <= 0:
            out[width + 1] += reach
            return
        for x in np.flatnonzero(q > 0):
            accept = min(1.0, p[x] / q[x])
            out[rank] += reach * q[x] * accept
            if accept < 1.0:
                diff = np.maximum(p - q, 0.0)
                q_next = q.copy()
                q_next[x] = 0.0
                if q_next.sum() > 0:
                    q_next /= q_next.sum()
                walk(diff / diff.sum(), q_next, rank + 1, reach * q[x] * (1.0 - accept))

    walk(p, q, 1, 1.0)
    return out


def repeated(dist: np.ndarray, n: int) -> torch.Tensor:
    return torch.tensor(dist, dtype=torch.float32)[None].repeat(n, 1)


# ---------------------------------------------------------------- engine.acceptance: greedy

def test_greedy_draft_equals_target_accepts_first_child():
    logits = torch.randn(50, 40, generator=gen(1))
    counts = acceptance_counts(logits, logits.clone(), 4, Sampling(0.0), gen())
    assert counts.tolist() == [0, 50, 0, 0, 0, 0]
    vec = acceptance_vector(counts)
    assert vec.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0] and none_fraction(counts) == 0.0


def test_greedy_ranks_follow_draft_order():
    target = torch.full((4, 6), -5.0)
    target[torch.arange(4), torch.tensor([0, 1, 2, 5])] = 5.0          # target argmax per row: 0, 1, 2, 5
    draft = torch.tensor([[9.0, 8, 7, 6, 5, 4]] * 4)                   # draft ranks tokens 0, 1, 2, 3, ...
    assert greedy_ranks(target, draft, 3).tolist() == [1, 2, 3, 4]     # row 3: token 5 not drafted -> none
    counts = rank_counts(greedy_ranks(target, draft, 3), 3)
    assert counts.tolist() == [0, 1, 1, 1, 1]
    assert acceptance_vector(counts).tolist() == [0.0, 0.25, 0.25, 0.25]


def test_greedy_ignores_tokens_the_draft_cannot_propose():
    target = torch.tensor([[0.0, 0.0, 9.0]])                            # argmax token 2
    draft = torch.tensor([[1.0, 0.5, float("-inf")]])                   # a subset draft without token 2
    assert greedy_ranks(target, draft, 3).tolist() == [4]


# ---------------------------------------------------------------- engine.acceptance: sampled (SpecInfer rule)

def test_sampled_draft_equals_target_accepts_first_child():
    probs = torch.softmax(torch.randn(200, 30, generator=gen(2)), dim=-1)
    ranks = specinfer_ranks(probs, probs.clone(), 5, gen(3))
    assert ranks.eq(1).all()


def test_sampled_first_child_matches_sum_of_min():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))
    n = 40_000
    vec = acceptance_vector(rank_counts(specinfer_ranks(repeated(p, n), repeated(q, n), 1, gen(4)), 1))
    assert abs(float(vec[1]) - np.minimum(p, q).sum()) < 4 * 0.5 / np.sqrt(n)


@pytest.mark.parametrize("width", [2, 3])
def test_sampled_ranks_match_exact_enumeration(width):
    rng = np.random.default_rng(width)
    p, q = rng.dirichlet(np.ones(5) * 0.7), rng.dirichlet(np.ones(5) * 0.7)
    exact = exact_specinfer(p, q, width)
    assert abs(exact.sum() - 1.0) < 1e-9
    n = 40_000
    counts = rank_counts(specinfer_ranks(repeated(p, n), repeated(q, n), width, gen(5)), width)
    measured = counts.double().numpy() / n
    assert np.abs(measured - exact).max() < 4 * 0.5 / np.sqrt(n), (measured, exact)


def test_sampled_ranks_agree_with_the_engine_verifier():
    """The vectorised rule and engine.verifiers.verify_specinfer on a one-level tree accept alike."""
    from engine.sampling import sample_without_replacement
    from engine.tree import CandidateTree
    from engine.tree_mask import ancestor_mask_from_parents
    from engine.verifiers import verify_specinfer

    rng = np.random.default_rng(11)
    p, q = rng.dirichlet(np.ones(5) * 0.7), rng.dirichlet(np.ones(5) * 0.7)
    width, trials, g = 3, 3000, gen(12)
    parents = torch.tensor([-1] + [0] * width)
    ancestors = ancestor_mask_from_parents(parents)
    q_t = torch.tensor(q, dtype=torch.float32)
    logits = torch.log(torch.tensor(p, dtype=torch.float32))[None].repeat(width + 1, 1)  # T = 1: probs = p
    counts = np.zeros(width + 2)
    for _ in range(trials):
        children = sample_without_replacement(q_t[None], width, g)[0]
        tree = CandidateTree(torch.cat([torch.zeros(1, dtype=torch.long), children]), parents,
                             ancestors.sum(-1) - 1, ancestors, {0: q_t.clone()})
        path = verify_specinfer(tree, logits, Sampling(1.0, 1.0), g).path
        counts[path[0] if path else width + 1] += 1
    assert np.abs(counts / trials - exact_specinfer(p, q, width)).max() < 4 * 0.5 / np.sqrt(trials)


def test_sampled_all_tokens_drafted_never_rejects_everything():
    """With every token a child and q of full support, the residual always ends on a drafted token."""
    rng = np.random.default_rng(7)
    p, q = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(4))
    counts = rank_counts(specinfer_ranks(repeated(p, 2000), repeated(q, 2000), 4, gen(6)), 4)
    assert int(counts[-1]) == 0 and abs(exact_specinfer(p, q, 4)[-1]) < 1e-12


def test_sampled_zero_draft_mass_stops_proposing():
    p = torch.tensor([[0.0, 0.0, 1.0]])
    q = torch.tensor([[0.5, 0.5, 0.0]])                                 # token 2 can never be drafted
    assert specinfer_ranks(p, q, 3, gen()).tolist() == [4]


def test_sampled_counts_use_temperature_and_top_p():
    logits = torch.randn(300, 20, generator=gen(8))
    counts = acceptance_counts(logits, logits.clone(), 3, Sampling(0.7, 0.8), gen(9))
    assert counts.tolist() == [0, 300, 0, 0, 0]


def test_bad_shapes_and_widths_are_rejected():
    with pytest.raises(ValueError):
        greedy_ranks(torch.zeros(3, 5), torch.zeros(3, 6), 2)
    with pytest.raises(ValueError):
        specinfer_ranks(torch.ones(2, 4) / 4, torch.ones(2, 4) / 4, 5, gen())
    with pytest.raises(ValueError):
        acceptance_vector(torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------- the CLI on a tiny saved pair

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_tokenizer) -> tuple[Path, Path, Path]:
    """(target folder, draft folder, dataset file): tiny random Llamas sharing the tiny tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    vocab = len(tiny_tokenizer)
    folders = []
    for name, model in (("target", tiny_llama(seed=0, vocab=vocab, logit_scale=4.0)),
                        ("draft", tiny_llama(seed=1, vocab=vocab, hidden=32, layers=1, heads=2, kv_heads=1,
                                             logit_scale=4.0))):
        folder = root / name
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        folders.append(folder)
    data = root / "prompts.jsonl"
    rows = ["the city council said the new school will open next year",
            "add the flour and the sugar then stir for five minutes",
            "the team won the first match of the season at home"]
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
    return folders[0], folders[1], data


def model_flags(pair) -> list[str]:
    target, draft, _ = pair
    return ["--target", str(target), "--model", str(draft), "--device", "cpu", "--dtype", "float32"]


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_acceptance_cli_feeds_search(tiny_pair, tmp_path, temperature):
    vec_path = tmp_path / "vec.pt"
    argv = ["acceptance", *model_flags(tiny_pair), "--dataset", str(tiny_pair[2]), "--start", "0", "--end", "3",
            "--prompt-len", "12", "--T", temperature, "--P", "0.9", "--width", "4", "--steps-per-prompt", "10",
            "-o", str(vec_path)]
    assert growmap_tool.main(argv) == 0
    vec = torch.load(vec_path, weights_only=True)
    record = json.loads(vec_path.with_suffix(".json").read_text())
    assert vec.shape == (5,) and float(vec[0]) == 0.0
    assert record["acceptance"] == pytest.approx(vec.tolist())
    counts = record["counts"]
    assert len(counts) == 6 and counts[0] == 0 and sum(counts) == record["positions"] > 0
    assert float(vec.sum()) + record["none_accepted"] == pytest.approx(1.0)
    assert record["width"] == 4 and record["T"] == float(temperature) and record["made_by"].startswith("python -m")
    # the same arguments give the same vector (seeded per prompt)
    again = tmp_path / "again.pt"
    assert growmap_tool.main(argv[:-1] + [str(again)]) == 0
    assert torch.equal(torch.load(again, weights_only=True), vec)
    for source in (vec_path, vec_path.with_suffix(".json")):  # both files feed search as they are
        out = tmp_path / f"tree-{source.suffix[1:]}.pt"
        assert growmap_tool.main(["search", "--acceptance", str(source), "--budget", "8", "--max-depth", "4",
                                  "-o", str(out)]) == 0
        assert load_growmap(out).size == 8


@pytest.fixture(scope="module")
def feature_draft_dir(tiny_pair, tiny_tokenizer) -> Path:
    """A saved feature draft (random weights) for tiny_pair's target: its embedding and head are the target's."""
    hf = LlamaForCausalLM.from_pretrained(tiny_pair[0])
    torch.manual_seed(3)
    net = FeatureDraftNet(feature_config(hf.config, 1, None), hf.model.embed_tokens.weight, hf.lm_head.weight)
    folder = tiny_pair[0].parent / "feature-draft"
    save_feature_folder(net, tiny_tokenizer, None, folder, "float32", {})
    return folder


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_acceptance_cli_measures_a_feature_draft_at_the_root_and_below(tiny_pair, feature_draft_dir, tmp_path,
                                                                      capsys, temperature):
    vec_path = tmp_path / "feat.pt"
    argv = ["acceptance", "--target", str(tiny_pair[0]), "--model", str(feature_draft_dir), "--device", "cpu",
            "--dtype", "float32", "--dataset", str(tiny_pair[2]), "--end", "3", "--prompt-len", "12",
            "--T", temperature, "--width", "4", "--steps-per-prompt", "10", "-o", str(vec_path)]
    assert growmap_tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "deep (" in printed and "root (" in printed
    record = json.loads(vec_path.with_suffix(".json").read_text())
    assert torch.load(vec_path, weights_only=True).tolist() == pytest.approx(record["acceptance"])  # .pt: deep
    root, root_counts = record["root_acceptance"], record["root_counts"]
    assert len(root) == 5 and root[0] == 0.0 and len(root_counts) == 6
    assert sum(root_counts) == sum(record["counts"]) == record["positions"] > 0  # the same positions
    assert sum(root) + record["root_none_accepted"] == pytest.approx(1.0)
    assert "root_acceptance" in record["description"]
    best = record["sequoia_best_tokens_per_step_10_levels"]["16"]
    assert best == pytest.approx(sequoia_dp(record["acceptance"], 16, 10, root).value(16, 10))
    # the .pt picks up the root vector from the .json beside it
    assert load_root_acceptance(str(vec_path)) == pytest.approx(root)
    out = tmp_path / "tree.pt"
    assert growmap_tool.main(["search", "--acceptance", str(vec_path), "--budget", "8", "--max-depth", "4",
                              "-o", str(out)]) == 0
    assert "root vector used" in capsys.readouterr().out
    searched = json.loads(out.with_suffix(".json").read_text())
    assert searched["root_acceptance"] == {"file": str(vec_path.with_suffix(".json")), "vector": pytest.approx(root)}


def test_prompt_counts_of_a_feature_draft_measure_both_regimes(tiny_pair, feature_draft_dir):
    """Deep: the draft fed its own predicted features (as before); root: fed the target's. A plain draft: root None."""
    target_hf = LlamaForCausalLM.from_pretrained(tiny_pair[0])
    target = TreeModel(target_hf, 64)
    net, _ = load_feature_net(feature_draft_dir, target_hf)
    draft = FeatureDraftModel(net, 64, None)
    prompt, steps, width, greedy = list(range(5, 15)), 12, 4, Sampling(0.0)
    measured = prompt_counts(SimpleNamespace(target=target, draft=draft, eos_ids=set()), prompt, steps,
                                          width, greedy, gen())
    continuation = autoregressive_generate(target, prompt, steps, set(), greedy, gen()).output_ids
    tokens = torch.tensor(prompt + continuation[:-1])
    rows = torch.arange(len(prompt) - 1, tokens.shape[0])
    target_logits, features = teacher_forced_logits(target, tokens, rows, return_hidden=True)
    fed, predicted = teacher_forced_logits(draft, tokens, rows, features, return_hidden=True)
    self_fed = teacher_forced_logits(draft, tokens, rows, predicted_features=predicted)
    for counts, own_logits in ((measured.deep, self_fed), (measured.root, fed)):
        draft_logits = in_target_vocab(draft, own_logits)
        assert torch.equal(counts, acceptance_counts(target_logits, draft_logits, width, greedy, gen()))
    plain = TreeModel(LlamaForCausalLM.from_pretrained(tiny_pair[1]), 64)
    sampled = prompt_counts(SimpleNamespace(target=target, draft=plain, eos_ids=set()), prompt, steps,
                                         width, Sampling(0.8, 0.9), gen(1))
    assert sampled.root is None and int(sampled.deep.sum()) == steps


def test_search_build_inspect_use_a_root_vector(tmp_path, capsys):
    p, root_p = [0, 0.4, 0.05, 0.02], [0, 0.5, 0.4, 0.05]
    vec = tmp_path / "vec.json"
    vec.write_text(json.dumps({"acceptance": p, "root_acceptance": root_p}))
    out = tmp_path / "s.pt"
    assert growmap_tool.main(["search", "--acceptance", str(vec), "--budget", "8", "--max-depth", "5",
                              "-o", str(out)]) == 0
    assert "root vector used" in capsys.readouterr().out
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["root_acceptance"] == {"file": str(vec), "vector": root_p}
    tree = load_growmap(out)
    assert record["predicted_tokens_per_step"] == pytest.approx(expected_accepted(tree, p, root_p), abs=1e-12)
    assert record["predicted_tokens_per_step"] > expected_accepted(tree, p) + 0.1  # the root vector counted
    assert len(tree.successors[0]) == 3  # wider at the root than p alone would make it (2)
    built = tmp_path / "b.pt"
    assert growmap_tool.main(["build", "chain", "3", "--acceptance", str(vec), "-o", str(built)]) == 0
    record = json.loads(built.with_suffix(".json").read_text())
    assert record["root_acceptance"]["vector"] == root_p
    assert record["predicted_tokens_per_step"] == pytest.approx(1 + 0.5 + 0.5 * 0.4 + 0.5 * 0.4 ** 2)
    capsys.readouterr()
    assert growmap_tool.main(["inspect", str(out), "--acceptance", str(vec)]) == 0
    printed = capsys.readouterr().out
    assert "root vector used" in printed and f"{expected_accepted(tree, p, root_p):.3f}" in printed


def test_load_root_acceptance(tmp_path, capsys):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([0, 0.5, 0.2]))
    assert load_root_acceptance(str(plain)) is None
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"acceptance": [0, 0.5, 0.2], "root_acceptance": [0, 0.7, 0.2, 0.1]}))
    assert load_root_acceptance(str(keyed)) == pytest.approx([0, 0.7, 0.2, 0.1])
    assert load_root_acceptance(str(keyed), drop_last=True) == pytest.approx([0, 0.7, 0.2])
    lone = tmp_path / "lone.pt"
    torch.save(torch.tensor([0, 0.5, 0.2], dtype=torch.float64), lone)
    assert load_root_acceptance(str(lone)) is None  # no .json beside it
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"acceptance": [0, 0.5], "root_acceptance": [0, 0.9, 0.9]}))
    with pytest.raises(UserError, match="bad.json"):
        load_root_acceptance(str(bad))
    assert growmap_tool.main(["search", "--acceptance", str(bad), "--budget", "4", "-o", str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_acceptance_cli_bad_width_is_one_line_error(tiny_pair, tmp_path, capsys):
    argv = ["acceptance", *model_flags(tiny_pair), "--dataset", str(tiny_pair[2]), "--end", "1",
            "--width", "100000", "-o", str(tmp_path / "v.pt")]
    assert growmap_tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--width" in err


def test_latency_cli_feeds_search(tiny_pair, tmp_path):
    lat = tmp_path / "lat.json"
    argv = ["latency", *model_flags(tiny_pair), "--sizes", "2,4,8", "--draft-sizes", "1,2", "--draft-frontier", "2",
            "--prefix", "6", "--repeats", "2", "--warmup", "1", "-o", str(lat)]
    assert growmap_tool.main(argv) == 0
    record = json.loads(lat.read_text())
    assert sorted(record["target_ms"], key=int) == ["1", "2", "4", "8"]  # n = 1 always measured
    assert all(ms > 0 for ms in record["target_ms"].values())
    assert record["draft_step_ms"] == record["draft_ms"]["2"] > 0
    assert all(len(ms) == 2 for ms in record["timings_ms"]["target"].values())
    for key in ("device", "dtype", "threads", "versions", "date", "prefix", "tree"):
        assert key in record
    assert record["dtype"] == "float32" and record["device"] == "cpu"
    vec = tmp_path / "vec.json"
    vec.write_text(json.dumps([0, 0.6, 0.2, 0.1]))
    out = tmp_path / "hw.pt"
    assert growmap_tool.main(["search", "--acceptance", str(vec), "--latency", str(lat), "-o", str(out)]) == 0
    chosen = json.loads(out.with_suffix(".json").read_text())
    assert chosen["budget"] in (1, 2, 4, 8) and load_growmap(out).size == chosen["budget"]


@pytest.mark.parametrize("shape", ["random", "chain"])
def test_tree_inputs_are_valid_trees(shape):
    tokens, positions, slots, mask = tree_inputs(9, 5, 50, shape, gen(3), "cpu")
    assert tokens.shape == positions.shape == slots.shape == (9,)
    assert mask.shape == (9, 14) and bool(mask[:, :5].all())
    tree = mask[:, 5:]
    assert bool(tree.diagonal().all()) and not bool(tree.triu(1).any())   # parents come before children
    assert torch.equal(positions - 5, tree.sum(-1) - 1)                    # position = prefix + depth
    if shape == "chain":
        assert positions.tolist() == list(range(5, 14))


def test_latency_cli_rejects_bad_sizes(tmp_path, capsys):
    assert growmap_tool.main(["latency", "--sizes", "4,x", "-o", str(tmp_path / "l.json")]) == 2
    assert growmap_tool.main(["latency", "--sizes", "4", "-o", str(tmp_path / "l.txt")]) == 2
    assert capsys.readouterr().err.count("\n") == 2
