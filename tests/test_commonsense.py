"""Common-sense tokens: follower tables (counts by hand, both formats, the original's Llama-2 table, refusals),
the original's substitute rule (engine/commonsense.py; lossy, so its figures are checked, not its exactness),
the lossless augment drafter (exact at T = 0 on tiny models), and test_greedyS_commonsense.py end to end."""
from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import growmap as G
from engine.commonsense import (FollowerAugmentDrafter, SubstituteVerifier, augment_counts, graft_followers,
                                verify_substitute)
from engine.decoder import autoregressive_generate, speculative_generate
from engine.drafters import StaticTreeDrafter
from engine.prompt_lookup import PromptLookupDrafter
from engine.sampling import Sampling
from engine.tree import CandidateTree
from engine.tree_mask import ancestor_mask_from_parents
from engine.verifiers import verify_greedy
from tests.test_cli import results_of, run_script
from tests.tiny_models import random_prompt, tiny_llama, tree_model
from utils.commonsense.table import count_followers, load_followers, save_tensor, save_text
from utils.errors import UserError
from utils.experiment import quality_row
from utils.models import REPO_ROOT

GREEDY = Sampling()
SCRIPT = str(REPO_ROOT / "test_greedyS_commonsense.py")
ORIGINAL_TABLE = REPO_ROOT.parent / "shared" / "original" / "sorted_followers_top12.txt"


def pairs_of(*rows: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array(row[:-1]), np.array(row[1:])) for row in rows]


def test_counts_by_hand():
    # pairs: 1->2 twice, 1->3 twice, 2->1 three times, 3->0 once; no pair across the two rows
    table = count_followers(pairs_of([1, 2, 1, 2, 1, 3], [2, 1, 3, 0]), vocab_size=5, k=2)
    assert table.dtype == torch.int32
    assert table.tolist() == [[-1, -1], [2, 3], [1, -1], [0, -1], [-1, -1]]  # tie 2 vs 3: smaller id first
    assert count_followers(pairs_of([4, 4, 4, 3, 4, 3, 4, 1]), 5, 1).tolist()[4] == [3]  # 4->3 twice beats 4->4, 4->1
    with pytest.raises(UserError, match="outside the vocabulary"):
        count_followers(pairs_of([1, 7]), 5, 2)


def test_both_formats_round_trip(tmp_path):
    table = count_followers(pairs_of([random.Random(0).randrange(40) for _ in range(500)]), 40, 6)
    save_text(table, tmp_path / "t.txt")
    save_tensor(table, tmp_path / "t.pt", {"source": "test"})
    from_text, _ = load_followers(tmp_path / "t.txt", 40)
    from_tensor, meta = load_followers(tmp_path / "t.pt", 40)
    assert torch.equal(from_text, table) and torch.equal(from_tensor, table)
    assert meta == {"source": "test"}
    assert (tmp_path / "t.txt").read_text().splitlines()[0].split() == [str(v) for v in table[0].tolist()]


def test_distillation_pairs_count_only_what_the_target_wrote(monkeypatch, tiny_model_dirs):
    import utils.training.distill_data as distill
    from utils.commonsense.__main__ import distill_pairs

    # row 0: prompt 1 0, the target wrote 3 1 2; row 1: prompt 2, the target wrote 1
    data = distill.DistillData(tokens=np.array([1, 0, 3, 1, 2, 2, 1]), offsets=np.array([0, 5, 7]),
                               teacher=np.array([False, False, True, True, True, False, True]),
                               topk_ids=np.zeros((7, 1)), topk_logprobs=np.zeros((7, 1)))
    monkeypatch.setattr(distill, "ensure_distill_data", lambda settings, tokens: [])
    monkeypatch.setattr(distill, "load_distill_data", lambda paths: data)
    pairs, source = distill_pairs(tiny_model_dirs["target"], "chat", 10)
    assert "2 rows" in source
    # counted: 0->3, 3->1, 1->2, 2->1; the prompt's own pair 1->0 is not
    assert count_followers(pairs, 4, 2).tolist() == [[3, -1], [2, -1], [1, -1], [1, -1]]


@pytest.mark.parametrize("case", ["missing", "ragged", "not numbers", "other tokenizer", "ids too large",
                                  "not a table"])
def test_bad_tables_are_refused(case, tmp_path):
    path = tmp_path / ("t.pt" if case == "not a table" else "t.txt")
    content = {"ragged": "1 2\n3\n", "not numbers": "1 a\n2 3\n", "other tokenizer": "1 2\n" * 7,
               "ids too large": "1 2\n4 9\n3 -1\n4 -1\n"}
    if case in content:
        path.write_text(content[case])
    elif case == "not a table":
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UserError) as error:
        load_followers(path, 4)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(not ORIGINAL_TABLE.is_file(), reason="the original's table is not beside the repository")
def test_the_originals_llama2_table_loads():
    table, _ = load_followers(ORIGINAL_TABLE, 32000)  # Llama-2: 32,000 ids; the file has 32,001 lines
    assert table.shape == (32000, 12)
    assert table[13].tolist() == [1576, 29908, 30015, 29902, 797, 29937, 29909, 3112, 4013, 278, 6246, 884]
    assert int((table[:, 0] >= 0).sum()) == 12930
    with pytest.raises(UserError, match="another tokenizer"):
        load_followers(ORIGINAL_TABLE, 49152)  # SmolLM2's vocabulary


def chain_tree(tokens: list[int], extra_root_children: list[int] = ()) -> CandidateTree:
    """Root + a chain of tokens[1:], plus more root children (leaves)."""
    parents = [-1] + list(range(len(tokens) - 1)) + [0] * len(extra_root_children)
    parent_t = torch.tensor(parents)
    ancestors = ancestor_mask_from_parents(parent_t)
    return CandidateTree(torch.tensor(tokens + list(extra_root_children)), parent_t, ancestors.sum(1) - 1, ancestors)


def logits_for(choices: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(choices), vocab)
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 5.0
    return logits


def test_substitute_overwrites_the_first_child_and_goes_on():
    tree = chain_tree([1, 2, 3], extra_root_children=[4])   # root 1 -> 2 -> 3, and root -> 4
    followers = torch.full((10, 2), -1, dtype=torch.int32)
    followers[1] = torch.tensor([7, 5], dtype=torch.int32)   # 7 commonly follows the root's token 1
    # the target wants 7 after the root (no child has it), then 3 after node 1, then 8
    verdict = verify_substitute(tree, logits_for([7, 3, 8, 0]), followers)
    assert verdict.path == [1, 2] and verdict.bonus == 8 and verdict.substitutions == {1: 7}
    assert verify_greedy(tree, logits_for([7, 3, 8, 0])).path == []              # plain greedy stops at once
    # a target token that is not a common follower: no substitution, plain greedy's verdict
    assert verify_substitute(tree, logits_for([6, 3, 8, 0]), followers) == verify_greedy(tree, logits_for([6, 3, 8, 0]))
    with pytest.raises(ValueError, match="greedy"):
        SubstituteVerifier(followers)(tree, logits_for([7, 3, 8, 0]), Sampling(0.7, 1.0), torch.Generator())


def test_substitute_without_followers_is_plain_greedy():
    rng = random.Random(0)
    empty = torch.full((6, 3), -1, dtype=torch.int32)
    for seed in range(30):
        growmap = G.kary_tree(2, 3)
        tokens = [rng.randrange(6)] * growmap.size
        for siblings in growmap.successors:
            for child, token in zip(siblings, rng.sample(range(6), len(siblings))):
                tokens[child] = token
        tree = CandidateTree(torch.tensor(tokens), growmap.parents, growmap.depth, growmap.mask.bool())
        logits = torch.randn(growmap.size, 6, generator=torch.Generator().manual_seed(seed))
        assert verify_substitute(tree, logits, empty) == verify_greedy(tree, logits)


def test_substitute_decoding_always_substitutes_with_a_table_of_every_token():
    """Every token follows every token: each step accepts the whole first-child chain, through substitutions,
    and the output is the decoder's, with the target's tokens written in."""
    target = tree_model(tiny_llama(seed=0, vocab=32))
    draft = tree_model(tiny_llama(seed=1, vocab=32))
    everything = torch.arange(32, dtype=torch.int32).repeat(32, 1)
    growmap = G.kary_tree(2, 3)
    prompt = random_prompt(8, 32, 0)
    result = speculative_generate(target, StaticTreeDrafter(draft, growmap, GREEDY, False), prompt, 40, set(),
                                  GREEDY, SubstituteVerifier(everything), torch.Generator())
    assert all(n == 4 for n in result.accepted_per_step[:-1])    # depth 3 + bonus, every step
    assert result.substitutions > 0 and result.after_substitution > 0
    reference = autoregressive_generate(target, prompt, 40, set(), GREEDY, torch.Generator()).output_ids
    assert result.output_ids[0] == reference[0]                  # the first token is the target's own choice
    assert result.output_ids != reference                        # a random draft: the rule drifts (lossy)


def test_augment_counts_and_graft():
    assert augment_counts(4, 2) == [2, 2] and augment_counts(5, 2) == [2, 2, 1] and augment_counts(3, 8) == [3]
    tree = chain_tree([1, 2, 3], extra_root_children=[4])
    followers = torch.tensor([[-1, -1, -1]] + [[4, 5, 6], [2, 9, 8]] + [[-1, -1, -1]] * 7, dtype=torch.int32)
    grafted, added = graft_followers(tree, followers, [2, 2])
    # root (token 1): 4 is already a child, so 5 and 6; node 1 (token 2): 2 and 9 (3 is its child but not listed)
    assert added == 4
    assert grafted.tokens.tolist() == [1, 2, 3, 4, 5, 6, 2, 9] and grafted.parents.tolist() == [-1, 0, 1, 0, 0, 0, 1, 1]
    assert torch.equal(grafted.ancestors, ancestor_mask_from_parents(grafted.parents))
    assert torch.equal(grafted.depth, grafted.ancestors.sum(1) - 1)
    for siblings in grafted.children():
        assert len({int(grafted.tokens[c]) for c in siblings}) == len(siblings)


@pytest.mark.parametrize("lookup", [False, True])
def test_augment_is_exact_and_helps_a_random_draft(lookup):
    """Greedy output equals the target's own (fp32); a bigram table of the target's own text makes the
    follower children accepted, so a random draft needs fewer target steps."""
    target = tree_model(tiny_llama(seed=0, vocab=32))
    draft = tree_model(tiny_llama(seed=1, vocab=32))
    prompts = [random_prompt(8, 32, seed) for seed in range(3)]
    references = [autoregressive_generate(target, p, 40, set(), GREEDY, torch.Generator()).output_ids for p in prompts]
    table = count_followers(pairs_of(*[p + r for p, r in zip(prompts, references)]), 32, 3)
    steps = {}
    for name in ("plain", "augment"):
        drafter = StaticTreeDrafter(draft, G.kary_tree(2, 2), GREEDY, False)
        if name == "augment":
            drafter = FollowerAugmentDrafter(drafter, table, budget=4, width=2)
        if lookup:
            drafter = PromptLookupDrafter(drafter, 4)
        steps[name] = 0
        for prompt, reference in zip(prompts, references):
            result = speculative_generate(target, drafter, prompt, 40, set(), GREEDY, "greedy", torch.Generator())
            assert result.output_ids == reference
            steps[name] += result.target_steps
    assert steps["augment"] < steps["plain"]


def test_augment_with_a_feature_draft_is_exact():
    from tests.test_feature_draft import VOCAB, feature_pair

    target, draft = feature_pair(head_subset=True)
    prompt = random_prompt(9, VOCAB, 4)
    reference = autoregressive_generate(target, prompt, 32, set(), GREEDY, torch.Generator()).output_ids
    table = count_followers(pairs_of(prompt + reference), VOCAB, 2)
    drafter = FollowerAugmentDrafter(StaticTreeDrafter(draft, G.kary_tree(2, 2), GREEDY, False), table, 3, 2)
    result = speculative_generate(target, drafter, prompt, 32, set(), GREEDY, "greedy", torch.Generator())
    assert result.output_ids == reference


def test_augment_refuses_sampled_children():
    draft = tree_model(tiny_llama(seed=1, vocab=32))
    inner = StaticTreeDrafter(draft, G.kary_tree(2, 2), Sampling(0.8, 1.0), True)
    with pytest.raises(ValueError, match="specinfer"):
        FollowerAugmentDrafter(inner, torch.full((32, 2), -1, dtype=torch.int32), 2, 2)


def test_quality_row_by_hand():
    target = tree_model(tiny_llama(seed=0, vocab=32))
    row = quality_row(target, [1, 2, 3], [4, 5, 6, 7], [4, 5, 9, 7])
    assert row["equal_tokens"] == 3 and row["first_difference"] == 2
    with torch.no_grad():
        logprobs = torch.log_softmax(target.hf_model(torch.tensor([[1, 2, 3, 4, 5, 6, 7]])).logits[0].float(), -1)
    expected = float(logprobs[[2, 3, 4, 5], [4, 5, 6, 7]].mean())
    assert row["log_likelihood"] == pytest.approx(expected, abs=1e-4)
    assert quality_row(target, [1], [4, 5], [4, 5, 6])["first_difference"] == 2  # stopped early: differs there


@pytest.fixture(scope="module")
def script_args(tiny_model_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("commonsense")
    text = folder / "corpus.txt"
    text.write_text("\n\n".join(["the team won the match and the city was happy ."] * 3))
    table = folder / "followers.pt"
    built = run_script("utils.commonsense", "build", "--target", tiny_model_dirs["target"], "--dataset", str(text),
                       "--output", str(table), "--text", str(folder / "followers.txt"), script="-m")
    assert built.returncode == 0, built.stderr
    return ["--target", tiny_model_dirs["target"], "--model", tiny_model_dirs["draft"], "--end", "2",
            "--max-new-tokens", "12", "--prompt-len", "16", "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt"),
            "--results-dir", str(folder / "results"), "--followers", str(table), "--dtype", "float32"]


def test_script_runs_all_side_by_side(script_args):
    completed = run_script(*script_args, script=SCRIPT)
    assert completed.returncode == 0, completed.stderr
    combined, runs = results_of(completed)
    assert [r["run"] for r in runs] == ["plain", "substitute", "augment", "plain+4"]
    assert [r["lossless"] for r in runs] == [True, False, True, True]
    assert "| substitute | NO (lossy) |" in combined["table"] and "LOSSY" in completed.stdout
    for run in runs:  # every figure comes from the run's own outputs against the target alone
        summary = json.loads(Path(run["results"]).read_text())
        rows = [json.loads(line) for line in Path(run["results"]).with_suffix(".jsonl").read_text().splitlines()]
        equal = sum(row["quality"]["equal_tokens"] for row in rows)
        assert summary["quality"]["token_match"] == pytest.approx(equal / sum(len(r["output_ids"]) for r in rows))
        if run["lossless"]:
            assert summary["quality"]["identical_outputs"] == 2 and summary["quality"]["token_match"] == 1.0
        else:
            assert summary["substitutions"] == sum(row.get("substitutions", 0) for row in rows)


@pytest.mark.parametrize("extra, expected", [
    (["--augment", "0"], "--augment and --augment-width must be >= 1"),
    (["--augment", "40", "--augment-width", "1"], "needs 40 tree nodes"),
    (["--T", "0.6"], "serves greedy verification only"),
    (["--T", "0.6", "--commonsense", "augment", "--verify", "specinfer", "--lookup", "0"], "specinfer"),
    (["--M", "40"], "--M 40 is too small"),
    (["--followers", "/nonexistent/t.pt"], "does not exist"),
    (["--followers", str(ORIGINAL_TABLE)], "another tokenizer"),
])
def test_bad_input_is_one_line_exit_2(extra, expected, script_args, monkeypatch, capsys):
    if str(ORIGINAL_TABLE) in extra and not ORIGINAL_TABLE.is_file():
        pytest.skip("the original's table is not beside the repository")
    monkeypatch.setattr(sys, "argv", [SCRIPT, *script_args, *extra])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:  # in this process: saves a torch import per case
        runpy.run_path(SCRIPT, run_name="__main__")
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr


@pytest.mark.integration
def test_augment_on_the_default_pair_equals_the_target_alone(tmp_path):
    """The real SmolLM2 target, the shipped feature draft and the shipped table, float32."""
    common = ["--end", "2", "--max-new-tokens", "32", "--dtype", "float32", "--results-dir", str(tmp_path)]
    completed = run_script(*common, "--commonsense", "augment", script=SCRIPT, timeout=900)
    assert completed.returncode == 0, completed.stderr
    _, runs = results_of(completed)
    augment = next(r for r in runs if r["run"] == "augment")
    assert augment["quality"]["identical_outputs"] == 2 and augment["quality"]["token_match"] == 1.0
