"""Scoring drafts on prompts and reporting their potential (the body of test_greedyS_logit.py).

Each prompt (optionally followed by the target's own greedy continuation) is run teacher-forced through the
target and every draft once; utils/potential/figures.py turns the logits into per-position figures, which are
averaged per prompt, then per draft, and ranked. Formatting and the result JSON live here too, so the script
only parses flags, loads models and prompts, and calls `score_prompts` and `report`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine.decoder import autoregressive_generate
from engine.drafters import teacher_forced_logits
from engine.model import TreeModel
from engine.sampling import Sampling
from utils.data import Prompt
from utils.experiment import ModelPair
from utils.potential.figures import (DEFAULT_EPSILON, DraftPotential, PositionFigures, PromptFigures, distribution_sampling,
                             draft_potential, position_figures, prompt_figures, rank_drafts)

GREEDY = Sampling(0.0, 1.0)


@dataclass
class PromptText:
    """The text scored for one prompt: its ids, then the target's continuation (possibly empty)."""

    prompt: Prompt
    continuation: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids + self.continuation


def continuation_rows(text: PromptText) -> tuple[int, int]:
    """Rows whose context ends at the last prompt token or a generated one and that predict a generated
    token: exactly where speculative decoding drafts."""
    start = len(text.prompt.ids) - 1
    return start, start + len(text.continuation)


def all_position_logits(model: TreeModel, ids: torch.Tensor, target_features: torch.Tensor | None = None,
                        return_hidden: bool = False,
                        hidden_layers: tuple[int, ...] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits at every position of `ids` ([n] long, target ids): [n, model's own vocab]
    (a feature draft reads the target's features [n, d] or [n, k * d]; `return_hidden` also gives a plain
    model's, of its `hidden_layers` if named)."""
    return teacher_forced_logits(model, ids, torch.arange(ids.shape[0], device=model.device), target_features,
                                 return_hidden=return_hidden, hidden_layers=hidden_layers)


def score_prompt(text: PromptText, target: TreeModel, drafts: dict[str, TreeModel], temperature: float,
                 top_p: float) -> dict[str, PositionFigures]:
    """Per-position figures of every draft on one text (one teacher-forced forward per model, and one more
    target forward per other choice of target layers that a fused-layer feature draft reads)."""
    ids = torch.tensor(text.ids, dtype=torch.long, device=target.device)
    target_logits, final_states = all_position_logits(target, ids, return_hidden=True)
    states = {None: final_states}

    def read_by(draft: TreeModel) -> torch.Tensor:
        if draft.target_layers not in states:
            states[draft.target_layers] = all_position_logits(target, ids, return_hidden=True,
                                                              hidden_layers=draft.target_layers)[1]
        return states[draft.target_layers]

    return {name: position_figures(target_logits, all_position_logits(draft, ids, read_by(draft)), temperature,
                                   top_p, draft.output_ids, DEFAULT_EPSILON)
            for name, draft in drafts.items()}


@dataclass
class Scores:
    """Per-prompt means for every draft: over all positions, and over continuation positions (when scored)."""

    whole: list[dict[str, PromptFigures]] = field(default_factory=list)
    continued: list[dict[str, PromptFigures]] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def score_prompts(prompts: list[Prompt], pair: ModelPair, drafts: dict[str, TreeModel], temperature: float,
                  top_p: float, continuation_tokens: int, on_row: Callable[[dict], None] | None = None,
                  progress: bool = True) -> Scores:
    """Score every prompt; with continuation_tokens > 0 the target's greedy continuation of that length is
    appended first and its positions are also scored on their own. `on_row` sees each prompt's row when done."""
    scores = Scores()
    for prompt in tqdm(prompts, desc="potential", unit="prompt", dynamic_ncols=True, disable=not progress):
        continuation = []
        if continuation_tokens > 0:
            continuation = autoregressive_generate(pair.target, prompt.ids, continuation_tokens, pair.eos_ids,
                                                   GREEDY, torch.Generator(device=pair.target.device)).output_ids
        text = PromptText(prompt, continuation)
        figures = score_prompt(text, pair.target, drafts, temperature, top_p)
        whole = {name: prompt_figures(f) for name, f in figures.items()}
        scores.whole.append(whole)
        row = {"index": prompt.index, "kind": prompt.kind, "prompt_ids": prompt.ids, "output_ids": continuation,
               "output_text": pair.tokenizer.decode(continuation, skip_special_tokens=True),
               "drafts": {name: f.as_dict() for name, f in whole.items()}}
        if continuation:
            start, stop = continuation_rows(text)
            continued = {name: prompt_figures(f.rows(start, stop)) for name, f in figures.items()}
            scores.continued.append(continued)
            row["continuation_drafts"] = {name: f.as_dict() for name, f in continued.items()}
        scores.rows.append(row)
        if on_row is not None:
            on_row(row)
    return scores


def scores_of_rows(rows: list[dict]) -> Scores:
    """The Scores that result rows were made from (rows of several sessions or processes, merged)."""
    scores = Scores(rows=list(rows))
    for row in rows:
        scores.whole.append({name: PromptFigures(**f) for name, f in row["drafts"].items()})
        if "continuation_drafts" in row:
            scores.continued.append({name: PromptFigures(**f) for name, f in row["continuation_drafts"].items()})
    return scores


def summarise(per_prompt: list[dict[str, PromptFigures]], names: list[str]) -> dict[str, DraftPotential]:
    """Per-prompt figures -> one DraftPotential per draft."""
    return {name: draft_potential([figures[name] for figures in per_prompt]) for name in names}


def describe_distributions(temperature: float, top_p: float) -> str:
    sampling = distribution_sampling(temperature, top_p)
    greedy = " (T = 0: plain softmax; top-1 agreement is the greedy acceptance)" if temperature == 0 else ""
    return (f"distributions at T = {sampling.temperature:g}, top-p = {sampling.top_p:g}{greedy}; KL without top-p, "
            f"smoothed with eps = {DEFAULT_EPSILON:g}")


def format_potential(name: str, potential: DraftPotential) -> str:
    return "\n".join([
        f"draft {name}",
        f"  positions               {potential.positions} over {potential.prompts} prompts",
        f"  potential score         {potential.potential_score:.4f} nats per position (smoothed KL, lower is better)",
        f"  spread over prompts     std {potential.score_std:.4f}, min {potential.score_min:.4f}, "
        f"max {potential.score_max:.4f}",
        f"  top-1 agreement         {potential.top1_agreement:.4f}",
        f"  expected acceptance     {potential.expected_acceptance:.4f}",
        f"  target mass outside     {potential.outside_vocab_mass:.4f} (of the draft's vocabulary)"])


def format_ranking(potentials: dict[str, DraftPotential]) -> str:
    width = max(len(name) for name in potentials)
    lines = ["ranking (by potential score; rank by expected acceptance beside it)",
             f"  {'rank':>4}  {'draft':<{width}}  {'score':>8}  {'agree':>6}  {'accept':>6}  {'outside':>7}  "
             f"{'acc.rank':>8}"]
    for row in rank_drafts(potentials):
        p = row.potential
        lines.append(f"  {row.rank_by_score:>4}  {row.name:<{width}}  {p.potential_score:>8.4f}  "
                     f"{p.top1_agreement:>6.3f}  {p.expected_acceptance:>6.3f}  {p.outside_vocab_mass:>7.4f}  "
                     f"{row.rank_by_acceptance:>8}")
    return "\n".join(lines)


def report(scores: Scores, names: list[str], temperature: float, top_p: float,
           summary: dict) -> tuple[dict, list[str]]:
    """Add the potential figures and ranking to `summary` (the run's metadata) and return it with the lines
    to print, in order."""
    potentials = summarise(scores.whole, names)
    sampling = distribution_sampling(temperature, top_p)
    summary.update({"distribution": {"temperature": sampling.temperature, "top_p": sampling.top_p},
                    "kl_epsilon": DEFAULT_EPSILON,
                    "potential": {name: p.as_dict() for name, p in potentials.items()},
                    "ranking": [{"draft": r.name, "rank_by_score": r.rank_by_score,
                                 "rank_by_acceptance": r.rank_by_acceptance} for r in rank_drafts(potentials)]})
    lines = [describe_distributions(temperature, top_p),
             "all positions (prompt" + (" + continuation)" if scores.continued else ")")]
    lines.extend(format_potential(name, potentials[name]) for name in names)
    if scores.continued:
        continued = summarise(scores.continued, names)
        summary["continuation_potential"] = {name: p.as_dict() for name, p in continued.items()}
        lines.append("continuation positions only (where speculative decoding drafts)")
        lines.extend(format_potential(name, continued[name]) for name in names)
    if len(names) > 1:
        lines.append(format_ranking(potentials))
    return summary, lines
