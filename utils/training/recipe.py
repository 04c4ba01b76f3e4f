"""`python pretrain_draft_model.py` with no flags (the original README's whole command): the default recipe, and an
estimate of how long it will take on this machine, printed before it starts.

The recipe is the shipped feature draft's (drafts/README.md: EAGLE-style, one decoder layer on the target's hidden
states, trained on text the target writes itself; `--ttt-steps 2`, the successor of its `--self-feed 0.3`), scaled down so that a first checkpoint comes within minutes:
100k target-written tokens instead of 0.9M, 30 minutes of training, a checkpoint every 50 steps. It writes
./outputs/checkpoint-N/ folders that every script takes as `--model ./outputs/checkpoint-N/`; run again, it resumes
from the newest one. The same run with flags: `recipe_argv()`, printed by the script.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils.training.settings import TrainSettings, distill_settings, parse_mixes, ttt_passes

OUTPUT_DIR = "outputs"
RECIPE_FLAGS = ("--arch", "feature", "--distill", "--distill-tokens", "100000", "--distill-workers", "2",
                "--vocab-subset", "12288", "--ttt-steps", "2", "--seq-len", "512", "--batch-size", "16",
                "--lr", "1.5e-3", "--warmup-steps", "50", "--max-steps", "1600", "--max-minutes", "30",
                "--save-steps", "50", "--eval-steps", "200", "--eval-rows", "150", "--save-dtype", "bfloat16")


@dataclass(frozen=True)
class Reference:
    """Figures measured on this project's 2-core AVX512-BF16 CPU (drafts/README.md), idle, for the default target."""

    target_step_ms: float = 34.0           # the engine's one-token bfloat16 target forward at 128 cached tokens
    distill_tokens_per_s: float = 330.0    # target-written tokens per second, two 1-thread workers
    feature_positions_per_s: float = 1000.0  # target feature extraction before feature training
    prompt_overhead: float = 1.13          # training positions per target-written token (prompts included)
    # one feature-draft pass over 16 windows of 512 tokens: 2.2 s was measured per step with --self-feed 0.3 (30% of
    # steps with one more, gradient-free pass), so about 2.0 s per pass; --ttt-steps K runs K passes per step
    feature_step_s: float = 2.0
    token_step_s: float = 1.8              # one token-draft step (smollm2-draft preset), same batch


REFERENCE = Reference()


def recipe_argv(output_dir: str = OUTPUT_DIR) -> list[str]:
    """The recipe as flags; with --resume when `output_dir` already holds its checkpoints."""
    from utils.training.common import checkpoints

    argv = [*RECIPE_FLAGS, "--output-dir", output_dir]
    return argv + ["--resume"] if checkpoints(Path(output_dir)) else argv


@dataclass(frozen=True)
class Estimate:
    """Minutes each phase should take here: the reference figures times this machine's speed factor."""

    speed_factor: float       # probe time here / on the reference machine (2 = twice as slow)
    missing_tokens: int       # target-written tokens still to generate (the rest are cached)
    generate_min: float
    features_min: float
    train_min: float
    first_checkpoint_min: float

    @property
    def total_min(self) -> float:
        return self.generate_min + self.features_min + self.train_min

    def lines(self) -> list[str]:
        return [f"estimate for this machine (one target forward took {self.speed_factor:.2f}x the reference "
                f"CPU's; rough, and a busy machine is slower): about {self.total_min:.0f} min in all",
                f"  writing {self.missing_tokens:,} tokens of training text with the target: ~{self.generate_min:.0f} min",
                f"  the target's features over them: ~{self.features_min:.0f} min",
                f"  training: ~{self.train_min:.0f} min; first checkpoint after ~{self.first_checkpoint_min:.0f} min"]


def probe_ms(target: str | None) -> float:
    """The engine's one-token bfloat16 target forward at 128 cached tokens, here (median of 3 x 8 steps)."""
    import torch

    from engine.model import TreeModel
    from utils.models import load_hf_model
    from utils.training.cost import engine_step_ms

    model = TreeModel(load_hf_model(target, torch.bfloat16, "cpu"), 136)
    engine_step_ms(model, 128, 2, 1)  # warm-up
    return engine_step_ms(model, 128, 8, 3)


def estimate(s: TrainSettings, measured_ms: float, ref: Reference = REFERENCE) -> Estimate:
    """Time of a --distill run of TrainSettings `s` here, from one probe (`probe_ms`) of this machine."""
    from utils.training.distill_data import cached_teacher_tokens

    factor = measured_ms / ref.target_step_ms
    mixes = parse_mixes(s.distill_mix, s.distill_tokens)
    tokens = sum(count for _, count in mixes)
    missing = sum(max(0, count - cached_teacher_tokens(distill_settings(s, mix))) for mix, count in mixes)
    workers = min(max(s.distill_workers, 1), 2) / 2
    generate_s = missing / (ref.distill_tokens_per_s * workers) * factor
    features_s = tokens * ref.prompt_overhead / ref.feature_positions_per_s * factor if s.arch == "feature" else 0.0
    passes = ttt_passes(s)
    step_s = (ref.feature_step_s if s.arch == "feature" else ref.token_step_s) * passes * factor * (
        s.batch_size * s.seq_len) / (16 * 512)
    train_s = s.max_steps * step_s
    if s.max_minutes > 0:
        train_s = min(train_s, s.max_minutes * 60)
    first_s = generate_s + features_s + min(s.save_steps * step_s, train_s)  # the time limit saves one too
    return Estimate(factor, missing, generate_s / 60, features_s / 60, train_s / 60, first_s / 60)
