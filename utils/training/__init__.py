"""Draft training (`pretrain_draft_model.py`): a token-level draft (`token_loop`) or a feature draft on the
target's hidden states (`feature_loop`), both run by one loop (`common.train_loop`) over the same data
(`training_data`: rows, windows, batches, vocabulary subset; `distill_data`: text the target writes itself),
with every setting once in `settings`; `cost` measures a draft's per-token cost against its target.

May import: utils plumbing (errors, models, data, experiment, cli) and engine/. Only the entry script imports
this package.
"""
from __future__ import annotations


def train(s) -> dict[str, float]:
    """Train (or resume) the draft that TrainSettings `s` describes; returns the last held-out metrics."""
    if s.arch == "feature":
        from utils.training.feature_loop import train_feature_draft

        return train_feature_draft(s)
    from utils.training.token_loop import train_token_draft

    return train_token_draft(s)


def evaluate_only(s) -> dict[str, float]:
    """Held-out metrics of the --init draft (`--eval-only`), token or feature draft alike."""
    from utils.models import is_feature_draft
    from utils.training.settings import validate

    validate(s)
    if is_feature_draft(s.init):
        from utils.training.feature_loop import evaluate_feature_draft_only

        return evaluate_feature_draft_only(s)
    from utils.training.token_loop import evaluate_token_draft_only

    return evaluate_token_draft_only(s)
