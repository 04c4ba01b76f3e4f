"""How good a draft is, measured in advance from teacher-forced logits (no decoding).

For the same positions of the same text, the target's and the draft's next-token logits give three figures
per position:

- potential score: KL(target || draft) of the temperature-scaled distributions, in nats (lower = stronger
  draft). Top-p is not applied here: it would zero most of the draft's vocabulary and the KL would then
  mostly measure the smoothing below.
- top-1 agreement: the draft's argmax equals the target's (the acceptance of one drafted token at T = 0).
- expected acceptance: sum_x min(p(x), q(x)) = 1 - TV(p, q), the probability that speculative sampling
  accepts one token drafted from q (arXiv 2211.17192, section 3.1), with p and q formed exactly as the
  decoder forms them (temperature, then top-p, each over its own vocabulary).

T = 0 (greedy decoding) has no distribution, so the distribution figures then use T = 1 and no top-p (the
model's plain softmax); at T = 0 the acceptance the decoder actually sees is the top-1 agreement.

A draft over a subset of the target's vocabulary (utils.models.DraftVocab) puts zero probability on every
other token, which makes the exact KL infinite wherever the target has mass there. The potential score is
therefore a smoothed KL, KL(p || (1 - eps) q + eps / V) with eps = `DEFAULT_EPSILON` and V the target's
vocabulary size, for every draft alike (for a full-vocabulary draft it differs from the exact KL by about
eps nats). The target's mass outside the draft's vocabulary is reported as its own figure: no drafted token
can ever match it, so expected acceptance <= 1 - outside mass.

Everything here is pure: tensors in, tensors or numbers out.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from engine.model import to_target_vocab
from engine.sampling import Sampling, probs_from_logits

DEFAULT_EPSILON = 1e-6


def distribution_sampling(temperature: float, top_p: float) -> Sampling:
    """The processing the decoder applies at this T and P; T = 0 becomes the plain softmax (T = 1, P = 1)."""
    if temperature == 0:
        return Sampling(1.0, 1.0)
    return Sampling(temperature, top_p)


def decoder_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[n, V] logits -> [n, V] float64 probabilities as the decoder forms them (engine.sampling), renormalised
    in float64: a float32 softmax over ~50k tokens sums to 1 only within ~1e-5, which would show as an
    acceptance above 1 for a draft equal to the target."""
    probs = probs_from_logits(logits, sampling).double()
    return probs / probs.sum(dim=-1, keepdim=True)


def kl_per_position(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float,
                    output_ids: torch.Tensor | None = None, epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """Smoothed KL(p || (1 - eps) q + eps / V) in nats per position, p and q at the distribution temperature.

    target_logits: [n, V]; draft_logits: [n, Vd] (Vd = V, or the subset size with `output_ids`). Returns [n].
    """
    tau = distribution_sampling(temperature, 1.0).temperature
    vocab = target_logits.shape[-1]
    target_log_probs = torch.log_softmax(target_logits.double() / tau, dim=-1)                # [n, V]
    draft_log_probs = to_target_vocab(torch.log_softmax(draft_logits.double() / tau, dim=-1), output_ids,
                                      vocab, -math.inf)                                       # [n, V]
    smoothed = torch.logaddexp(draft_log_probs + math.log1p(-epsilon),
                               torch.full_like(draft_log_probs, math.log(epsilon / vocab)))
    target_probs = target_log_probs.exp()
    terms = torch.where(target_probs > 0, target_probs * (target_log_probs - smoothed), 0.0)
    return terms.sum(dim=-1)


def acceptance_per_position(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float,
                            top_p: float, output_ids: torch.Tensor | None = None) -> torch.Tensor:
    """sum_x min(p(x), q(x)) per position, p and q as the decoder forms them. Shapes as `kl_per_position`."""
    sampling = distribution_sampling(temperature, top_p)
    target_probs = decoder_probs(target_logits, sampling)                                     # [n, V]
    draft_probs = to_target_vocab(decoder_probs(draft_logits, sampling), output_ids,
                                  target_logits.shape[-1], 0.0)                                # [n, V]
    return torch.minimum(target_probs, draft_probs).sum(dim=-1)


def agreement_per_position(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                           output_ids: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 where the draft's argmax (as a target id) is the target's argmax, else 0.0: [n] float64."""
    draft_top = draft_logits.argmax(dim=-1)
    if output_ids is not None:
        draft_top = output_ids[draft_top]
    return (draft_top == target_logits.argmax(dim=-1)).double()


def outside_mass_per_position(target_logits: torch.Tensor, output_ids: torch.Tensor | None, temperature: float,
                              top_p: float) -> torch.Tensor:
    """The target's probability (as the decoder forms it) on tokens the draft cannot propose: [n]."""
    if output_ids is None:
        return torch.zeros(target_logits.shape[0], dtype=torch.float64, device=target_logits.device)
    target_probs = decoder_probs(target_logits, distribution_sampling(temperature, top_p))
    return (1.0 - target_probs[:, output_ids].sum(dim=-1)).clamp(min=0.0)


@dataclass(frozen=True)
class PositionFigures:
    """Per-position figures of one draft on one text; every field is [n] float64."""

    kl: torch.Tensor
    agreement: torch.Tensor
    acceptance: torch.Tensor
    outside_mass: torch.Tensor

    def rows(self, start: int, stop: int) -> PositionFigures:
        """The positions [start, stop) only."""
        return PositionFigures(self.kl[start:stop], self.agreement[start:stop], self.acceptance[start:stop],
                               self.outside_mass[start:stop])


def position_figures(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float, top_p: float,
                     output_ids: torch.Tensor | None = None, epsilon: float = DEFAULT_EPSILON) -> PositionFigures:
    """All per-position figures. target_logits: [n, V]; draft_logits: [n, Vd]; output_ids: [Vd] or None."""
    if target_logits.shape[0] != draft_logits.shape[0]:
        raise ValueError(f"{target_logits.shape[0]} target positions but {draft_logits.shape[0]} draft positions")
    return PositionFigures(
        kl=kl_per_position(target_logits, draft_logits, temperature, output_ids, epsilon),
        agreement=agreement_per_position(target_logits, draft_logits, output_ids),
        acceptance=acceptance_per_position(target_logits, draft_logits, temperature, top_p, output_ids),
        outside_mass=outside_mass_per_position(target_logits, output_ids, temperature, top_p))


@dataclass(frozen=True)
class PromptFigures:
    """One draft on one prompt: the per-position figures' means over `positions` positions."""

    positions: int
    kl: float
    agreement: float
    acceptance: float
    outside_mass: float

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_figures(figures: PositionFigures) -> PromptFigures:
    """Means over the positions (at least one)."""
    count = figures.kl.shape[0]
    if count == 0:
        raise ValueError("no positions to average")
    return PromptFigures(count, float(figures.kl.mean()), float(figures.agreement.mean()),
                         float(figures.acceptance.mean()), float(figures.outside_mass.mean()))


@dataclass(frozen=True)
class DraftPotential:
    """One draft over all prompts. Means are per position (prompts weighted by their positions); the spread
    is over the prompts' own mean KL (sample std, 0 for one prompt)."""

    prompts: int
    positions: int
    potential_score: float
    score_std: float
    score_min: float
    score_max: float
    top1_agreement: float
    expected_acceptance: float
    outside_vocab_mass: float

    def as_dict(self) -> dict:
        return asdict(self)


def _weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def draft_potential(prompts: Sequence[PromptFigures]) -> DraftPotential:
    """Combine per-prompt figures (at least one prompt)."""
    if not prompts:
        raise ValueError("no prompts to combine")
    weights = [p.positions for p in prompts]
    scores = [p.kl for p in prompts]
    return DraftPotential(
        prompts=len(prompts), positions=sum(weights),
        potential_score=_weighted_mean(scores, weights),
        score_std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
        score_min=min(scores), score_max=max(scores),
        top1_agreement=_weighted_mean([p.agreement for p in prompts], weights),
        expected_acceptance=_weighted_mean([p.acceptance for p in prompts], weights),
        outside_vocab_mass=_weighted_mean([p.outside_mass for p in prompts], weights))


@dataclass(frozen=True)
class RankRow:
    name: str
    potential: DraftPotential
    rank_by_score: int        # 1 = lowest potential score
    rank_by_acceptance: int   # 1 = highest expected acceptance


def rank_drafts(potentials: Mapping[str, DraftPotential]) -> list[RankRow]:
    """Drafts ordered by potential score (ascending), each with its rank by expected acceptance beside it."""
    by_score = sorted(potentials, key=lambda name: potentials[name].potential_score)
    by_acceptance = sorted(potentials, key=lambda name: -potentials[name].expected_acceptance)
    return [RankRow(name, potentials[name], rank + 1, by_acceptance.index(name) + 1)
            for rank, name in enumerate(by_score)]
