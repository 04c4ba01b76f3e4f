"""Draft potential (utils/potential/figures.py, test_greedyS_logit.py): the two edge cases (draft = target, random
draft), a hand computation on a tiny model, subset vocabularies, and the command line."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import test_greedyS_logit
from engine.tree_mask import causal_mask
from tests.tiny_models import random_prompt, tiny_llama
from utils.cli import EXIT_BAD_INPUT, run_cli
from utils.models import DraftVocab
from utils.potential.figures import (DEFAULT_EPSILON, PromptFigures, draft_potential, position_figures, prompt_figures,
                             rank_drafts)

VOCAB = 32
SUBSET = 12
SETTINGS = [(0.0, 0.9), (1.0, 1.0), (0.6, 0.9)]


def all_logits(hf_model, prompt: list[int], input_map: torch.Tensor | None = None,
               output_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced next-token logits at every position: [len(prompt), own vocab]."""
    from engine.model import TreeModel

    model = TreeModel(hf_model, 64, input_map, output_ids)
    ids = torch.tensor(prompt)
    slots = torch.arange(len(prompt))
    return model.forward(ids, slots, slots, causal_mask(len(prompt), 0, "cpu"))


@pytest.fixture(scope="module")
def target_hf():
    return tiny_llama(seed=0, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, logit_scale=20.0)


@pytest.fixture(scope="module")
def prompt():
    return random_prompt(20, VOCAB, seed=3)


@pytest.fixture(scope="module")
def target_logits(target_hf, prompt):
    return all_logits(target_hf, prompt)


def perturbed_copy(seed: int, scale: float):
    """The target's architecture and weights, each parameter nudged by `scale` times its own std."""
    model = tiny_llama(seed=0, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, logit_scale=20.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * param.std() * torch.randn(param.shape, generator=generator))
    return model


# ---------------------------------------------------------------------------------------------------------
# Hand computation (plain Python floats, one position at a time)


def softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    exps = [math.exp((x - top) / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def nucleus(probs: list[float], top_p: float) -> list[float]:
    """Keep the most likely tokens until their mass reaches top_p, renormalised."""
    kept, mass = [0.0] * len(probs), 0.0
    for index in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept[index] = probs[index]
        mass += probs[index]
    return [k / sum(kept) for k in kept]


def decoder_probs(row: list[float], temperature: float, top_p: float) -> list[float]:
    if temperature == 0:
        return softmax(row, 1.0)
    return nucleus(softmax(row, temperature), top_p)


def scatter(draft_probs: list[float], output_ids: list[int] | None, vocab: int) -> list[float]:
    if output_ids is None:
        return draft_probs
    full = [0.0] * vocab
    for column, target_id in enumerate(output_ids):
        full[target_id] = draft_probs[column]
    return full


def hand_figures(target_row: list[float], draft_row: list[float], temperature: float, top_p: float,
                 output_ids: list[int] | None) -> tuple[float, float, float, float]:
    """(KL, agreement, acceptance, outside mass) for one position, straight from the definitions."""
    vocab = len(target_row)
    tau = temperature if temperature > 0 else 1.0
    p = softmax(target_row, tau)
    q = scatter(softmax(draft_row, tau), output_ids, vocab)
    smoothed = [(1 - DEFAULT_EPSILON) * qi + DEFAULT_EPSILON / vocab for qi in q]
    kl = sum(pi * math.log(pi / si) for pi, si in zip(p, smoothed) if pi > 0)
    draft_top = max(range(len(draft_row)), key=lambda i: draft_row[i])
    if output_ids is not None:
        draft_top = output_ids[draft_top]
    agreement = float(draft_top == max(range(vocab), key=lambda i: target_row[i]))
    p_dec = decoder_probs(target_row, temperature, top_p)
    q_dec = scatter(decoder_probs(draft_row, temperature, top_p), output_ids, vocab)
    acceptance = sum(min(pi, qi) for pi, qi in zip(p_dec, q_dec))
    outside = 0.0 if output_ids is None else sum(pi for i, pi in enumerate(p_dec) if i not in set(output_ids))
    return kl, agreement, acceptance, outside


def assert_matches_hand(target_logits, draft_logits, temperature, top_p, output_ids=None, positions=(0, 7, 19)):
    ids = None if output_ids is None else torch.tensor(output_ids)
    figures = position_figures(target_logits, draft_logits, temperature, top_p, ids)
    for row in positions:
        kl, agreement, acceptance, outside = hand_figures(target_logits[row].tolist(), draft_logits[row].tolist(),
                                                          temperature, top_p, output_ids)
        assert float(figures.kl[row]) == pytest.approx(kl, rel=1e-4, abs=1e-5)
        assert float(figures.agreement[row]) == agreement
        assert float(figures.acceptance[row]) == pytest.approx(acceptance, abs=1e-5)
        assert float(figures.outside_mass[row]) == pytest.approx(outside, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_draft_equal_to_target_is_perfect(target_logits, temperature, top_p):
    figures = position_figures(target_logits, target_logits.clone(), temperature, top_p)
    assert figures.kl.abs().max() < 1e-5              # smoothing costs at most -log(1 - eps) ~ 1e-6 nats
    assert torch.allclose(figures.acceptance, torch.ones_like(figures.acceptance), atol=1e-9)  # float64 sums
    assert bool((figures.agreement == 1).all())
    assert bool((figures.outside_mass == 0).all())


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_random_draft_scores_worse_than_trained_one(target_hf, target_logits, prompt, temperature, top_p):
    close = prompt_figures(position_figures(target_logits, all_logits(perturbed_copy(1, 0.05), prompt),
                                            temperature, top_p))
    unrelated = tiny_llama(seed=5, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, logit_scale=20.0)
    far = prompt_figures(position_figures(target_logits, all_logits(unrelated, prompt), temperature, top_p))
    assert close.kl < far.kl / 4
    assert close.acceptance > far.acceptance + 0.2
    assert close.agreement > far.agreement
    potentials = {"random": draft_potential([far]), "trained": draft_potential([close])}
    ranking = rank_drafts(potentials)
    assert [(r.name, r.rank_by_score, r.rank_by_acceptance) for r in ranking] == [("trained", 1, 1), ("random", 2, 2)]


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_figures_match_hand_computation(target_logits, prompt, temperature, top_p):
    draft_logits = all_logits(perturbed_copy(2, 0.3), prompt)
    assert_matches_hand(target_logits, draft_logits, temperature, top_p)


def test_distributions_are_far_from_trivial(target_logits):
    """The hand checks mean something only if the target is neither uniform nor one-hot."""
    top = torch.softmax(target_logits, dim=-1).max(dim=-1).values
    assert 0.1 < float(top.mean()) < 0.95


# ---------------------------------------------------------------------------------------------------------
# Subset vocabulary


@pytest.fixture(scope="module")
def subset_ids():
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:SUBSET]


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_subset_draft_matches_hand_computation(target_logits, prompt, subset_ids, temperature, top_p):
    draft_hf = tiny_llama(seed=7, vocab=SUBSET, hidden=32, layers=1, heads=2, kv_heads=1, logit_scale=20.0)
    input_map = torch.zeros(VOCAB, dtype=torch.long)
    input_map[subset_ids] = torch.arange(SUBSET)
    draft_logits = all_logits(draft_hf, prompt, input_map, subset_ids)
    assert draft_logits.shape == (len(prompt), SUBSET)
    assert_matches_hand(target_logits, draft_logits, temperature, top_p, subset_ids.tolist())


def test_subset_of_the_target_itself(target_logits, subset_ids):
    """A draft that is the target restricted to a subset (q = p renormalised on it): the figures have closed
    forms. The exact KL would be infinite; the smoothed one charges log(p V / eps) per unit of outside mass."""
    figures = position_figures(target_logits, target_logits[:, subset_ids], 1.0, 1.0, subset_ids)
    p = torch.softmax(target_logits.double(), dim=-1)
    inside = torch.zeros(VOCAB, dtype=torch.bool)
    inside[subset_ids] = True
    mass_in = p[:, inside].sum(dim=-1)
    expected_kl = mass_in * mass_in.log() + (p[:, ~inside] * (p[:, ~inside] * VOCAB / DEFAULT_EPSILON).log()).sum(-1)
    assert torch.allclose(figures.outside_mass.double(), 1 - mass_in, atol=1e-6)
    assert torch.allclose(figures.kl.double(), expected_kl, rtol=1e-4, atol=1e-4)
    assert torch.allclose(figures.acceptance.double(), mass_in, atol=1e-5)  # q >= p on the subset
    assert torch.equal(figures.agreement.bool(), torch.isin(target_logits.argmax(dim=-1), subset_ids))


def test_prompt_and_draft_aggregation():
    a = PromptFigures(positions=10, kl=1.0, agreement=0.5, acceptance=0.6, outside_mass=0.0)
    b = PromptFigures(positions=30, kl=3.0, agreement=0.9, acceptance=0.8, outside_mass=0.1)
    potential = draft_potential([a, b])
    assert potential.positions == 40 and potential.prompts == 2
    assert potential.potential_score == pytest.approx((10 * 1 + 30 * 3) / 40)
    assert potential.score_std == pytest.approx(math.sqrt(2.0))  # sample std of [1, 3]
    assert (potential.score_min, potential.score_max) == (1.0, 3.0)
    assert potential.expected_acceptance == pytest.approx((6 + 24) / 40)
    assert potential.outside_vocab_mass == pytest.approx(3 / 40)
    assert draft_potential([a]).score_std == 0.0


# ---------------------------------------------------------------------------------------------------------
# Command line


def run_script(monkeypatch, *flags: str) -> int:
    monkeypatch.setattr(sys, "argv", ["test_greedyS_logit.py", *flags])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(test_greedyS_logit.main)
        raise SystemExit(0)
    return exit_info.value.code


@pytest.mark.parametrize("flags,message", [
    (["--T", "-1"], "--T must be >= 0"),
    (["--P", "0"], "--P must be in (0, 1]"),
    (["--start", "5", "--end", "2"], "--start (5) must be smaller"),
    (["--continuations", "--M", "100"], "--M 100 is too small"),
    (["--model", "a", "a"], "same draft twice"),
    (["--model", "./no/such/draft"], "model path does not exist"),
    (["--T", "abc"], "invalid float value"),
])
def test_bad_input_is_one_line_exit_2(monkeypatch, capsys, tiny_model_dirs, flags, message):
    code = run_script(monkeypatch, "--target", tiny_model_dirs["target"], "--device", "cpu", *flags)
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def subset_draft_dir(tmp_path_factory, tiny_model_dirs):
    """A saved draft over a 40-token subset of the tiny tokenizer's vocabulary."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dirs["target"]).vocab_size
    folder = tmp_path_factory.mktemp("subset_draft")
    tiny_llama(seed=9, vocab=40, hidden=32, layers=1, heads=2, kv_heads=1).save_pretrained(folder)
    DraftVocab(vocab, list(range(40)), oov_input_id=0).save(folder)
    return str(folder)


def test_end_to_end_ranks_drafts(monkeypatch, capsys, tmp_path, tiny_model_dirs, subset_draft_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in [
        "the police said the storm will hit the city on monday", "add the salt and stir the eggs in a pan",
        "the team lost the match in the last minutes of the season"]))
    target = tiny_model_dirs["target"]
    code = run_script(monkeypatch, "--target", target, "--model", target, tiny_model_dirs["draft"], subset_draft_dir,
                      "--dataset", str(data), "--end", "3", "--prompt-len", "12", "--continuations",
                      "--max-new-tokens", "5", "--M", "32", "--device", "cpu", "--T", "0.6",
                      "--results-dir", str(tmp_path / "results"), "--Mode", "greedy", "--growmap", "ignored.pt")
    out = capsys.readouterr().out
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("results: ")
    summary = json.loads(open(last.removeprefix("results: ")).read())
    potential = summary["potential"]
    assert potential[target]["potential_score"] < 1e-5
    assert potential[target]["expected_acceptance"] == pytest.approx(1.0, abs=1e-5)
    assert potential[subset_draft_dir]["outside_vocab_mass"] > 0
    assert potential[tiny_model_dirs["draft"]]["outside_vocab_mass"] == 0
    assert summary["ranking"][0]["draft"] == target
    assert set(summary["continuation_potential"]) == set(potential)
    rows = [json.loads(line) for line in open(last.removeprefix("results: ").replace(".json", ".jsonl"))]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert all(len(row["output_ids"]) >= 1 for row in rows)
    assert "ranking" in out
