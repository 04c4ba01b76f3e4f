"""The settings of a draft-training run: every flag of pretrain_draft_model.py once (`TrainSettings`, argparse
reads its defaults), the architecture presets, the files a run writes, and the checks made before anything
loads (one-line `UserError` each)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from utils.errors import UserError
from utils.training.distill_data import DISTILL_MIXES, DistillSettings
from utils.training.user_sources import KIND_NAMES

CHECKPOINT_PREFIX = "checkpoint-"


STATE_FILE = "training_state.pt"


SETTINGS_FILE = "train_settings.json"


LOSS_LOG = "loss_log.jsonl"


LOSSES = ("ce", "kl", "mix")


ARCHS = ("token", "feature")  # a small LM on tokens, or a feature draft on the target's hidden states (EAGLE)


TOKEN_ONLY = ("preset", "hidden_size", "num_heads", "num_kv_heads", "embed_init", "loss", "kl_weight")


FEATURE_ONLY = ("ttt_steps", "target_layers")
# training-time-test passes of a feature draft when --ttt-steps is not given: 2 measured best per CPU-minute
# against 1 (README, "EAGLE-3-style training")
FEATURE_TTT_STEPS = 2


# --target-layers names: EAGLE-3's low, middle and high layers of an L-layer target (arXiv 2503.01840, as in
# its code: the inputs of decoder layers 2, L // 2 and L - 3), and the final normed state
NAMED_LAYERS = {"low": lambda layers: 2, "mid": lambda layers: layers // 2, "high": lambda layers: layers - 3,
                "last": lambda layers: layers}


IGNORE = -100


PRESETS: dict[str, dict[str, int]] = {
    # seconds to train; for tests and smoke runs
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64),
    # the shipped SmolLM2-135M draft: 4 layers, GQA 6/2 heads of 64, over a 12k-token vocabulary subset
    "smollm2-draft": dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                          intermediate_size=1024),
}


@dataclass
class TrainSettings:
    """Every flag of pretrain_draft_model.py, with its default (argparse reads the defaults from here)."""

    output_dir: str = "outputs/draft"
    arch: str = "token"
    target: str | None = None
    init: str | None = None
    preset: str = "smollm2-draft"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_subset: int = 0
    embed_init: str = "pca"
    dataset: str | None = None
    dataset_start: int = 0
    dataset_end: int | None = None
    distill: bool = False
    distill_tokens: int = 1_000_000
    distill_workers: int = 1
    distill_mix: str = "chat"
    distill_temperatures: str = ",".join(f"{t:g}" for t in DistillSettings.temperatures)
    distill_max_new_tokens: int = DistillSettings.max_new_tokens
    distill_batch_size: int = DistillSettings.batch_size
    distill_top_k: int = DistillSettings.top_k
    distill_dtype: str = DistillSettings.dtype
    loss: str = "ce"
    kl_weight: float = 0.5
    cls_weight: float = 0.1
    feature_noise: float = 0.1
    ttt_steps: int | None = None  # --arch feature: FEATURE_TTT_STEPS unless given
    target_layers: str = "last"
    seq_len: int = 512
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_steps: int = 1000
    max_minutes: float = 0.0
    save_steps: int = 200
    eval_steps: int = 200
    eval_rows: int = 200
    heldout_kinds: str = ""
    logging_steps: int = 10
    mixed_precision: str = "bf16"
    save_dtype: str = "float32"
    final_dir: str | None = None
    eval_only: bool = False
    resume: bool = False
    resume_changed: bool = False
    seed: int = 0


def validate(s: TrainSettings) -> None:
    """Reject bad combinations before any model is loaded (one-line UserError each)."""
    if s.arch not in ARCHS:
        raise UserError(f"--arch must be one of {', '.join(ARCHS)}, got {s.arch!r}")
    parse_mixes(s.distill_mix, s.distill_tokens)
    if s.loss not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {s.loss!r}")
    if s.arch == "feature":
        ignored = [f"--{name.replace('_', '-')}" for name in TOKEN_ONLY
                   if getattr(s, name) != getattr(TrainSettings, name)]
        if ignored:
            raise UserError(f"{', '.join(ignored)} only apply to --arch token (a feature draft is one decoder layer of "
                            "the target's shape: set --num-layers / --intermediate-size; its loss is --cls-weight)")
    if s.arch == "token" and s.init is None and s.preset not in PRESETS:
        raise UserError(f"unknown --preset {s.preset!r}: choose from {', '.join(PRESETS)}")
    if (s.dataset is None) == (not s.distill):
        raise UserError("give exactly one data source: --dataset NAME_OR_PATH or --distill")
    if s.arch == "token":
        ignored = [f"--{name.replace('_', '-')}" for name in FEATURE_ONLY
                   if getattr(s, name) != getattr(TrainSettings, name)]
        if ignored:
            raise UserError(f"{', '.join(ignored)} only apply to --arch feature")
    if s.ttt_steps is not None and s.ttt_steps < 1:
        raise UserError(f"--ttt-steps must be >= 1 (1 = teacher-forced only), got {s.ttt_steps}")
    parse_target_layers(s.target_layers, None)
    if not 0.0 <= s.kl_weight <= 1.0:
        raise UserError(f"--kl-weight must be in [0, 1], got {s.kl_weight}")
    for name in ("seq_len", "batch_size", "max_steps", "save_steps", "eval_steps", "logging_steps"):
        if getattr(s, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(s, name)}")
    if s.lr <= 0:
        raise UserError(f"--lr must be positive, got {s.lr}")
    if s.vocab_subset < 0:
        raise UserError(f"--vocab-subset must be 0 (full vocabulary) or positive, got {s.vocab_subset}")
    if s.embed_init not in ("pca", "random"):
        raise UserError(f"--embed-init must be pca or random, got {s.embed_init!r}")
    if s.save_dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--save-dtype must be float32, bfloat16 or float16, got {s.save_dtype!r}")
    if s.eval_only and s.init is None:
        raise UserError("--eval-only needs --init: the draft folder to evaluate")
    parse_temperatures(s.distill_temperatures)
    unknown = [kind for kind in heldout_kind_set(s) if kind not in KIND_NAMES]
    if unknown:
        raise UserError(f"--heldout-kinds {','.join(unknown)}: unknown kind; choose from {', '.join(KIND_NAMES)}")


def heldout_kind_set(s: TrainSettings) -> set[str]:
    return {kind.strip() for kind in s.heldout_kinds.split(",") if kind.strip()}


def ttt_passes(s: TrainSettings) -> int:
    """Passes per training step: --ttt-steps, or FEATURE_TTT_STEPS for a feature draft; 1 for a token draft."""
    if s.arch != "feature":
        return 1
    return FEATURE_TTT_STEPS if s.ttt_steps is None else s.ttt_steps


def parse_mixes(text: str, default_tokens: int) -> list[tuple[str, int]]:
    """--distill-mix "chat,articles:400000" -> [("chat", default_tokens), ("articles", 400000)]."""
    mixes = []
    for entry in text.split(","):
        name, _, count = entry.partition(":")
        if name not in DISTILL_MIXES:
            raise UserError(f"unknown --distill-mix {name!r}: choose from {', '.join(DISTILL_MIXES)} "
                            "(comma-separated, each optionally NAME:TOKENS)")
        try:
            tokens = int(count) if count else default_tokens
        except ValueError as exc:
            raise UserError(f"--distill-mix {entry!r}: the token count after ':' must be an integer") from exc
        mixes.append((name, tokens))
    return mixes


def parse_target_layers(text: str, num_layers: int | None) -> tuple[int, ...] | None:
    """--target-layers "low,mid,high" / "2,15,27" / "last" -> layer indices of an L-layer target (transformers'
    hidden_states numbering: 0 = embedding, L = final normed state), or None for "last" alone (the draft
    reads the final hidden state, as every draft before fused layers did). num_layers None: check the
    syntax only."""
    names = [name.strip() for name in text.split(",")]
    if names == ["last"]:
        return None
    layers = []
    for name in names:
        if name in NAMED_LAYERS:
            layers.append(NAMED_LAYERS[name](num_layers or 0))
            continue
        try:
            layers.append(int(name))
        except ValueError as exc:
            raise UserError(f"--target-layers takes comma-separated layer indices or {', '.join(NAMED_LAYERS)}, "
                            f"got {text!r}") from exc
    if num_layers is None:
        return tuple(layers)
    if any(not 0 <= index <= num_layers for index in layers) or len(set(layers)) != len(layers):
        raise UserError(f"--target-layers {text!r} gives layers {layers}: each must be distinct and within "
                        f"0..{num_layers} (the target's layer count)")
    return tuple(layers)


def parse_temperatures(text: str) -> tuple[float, ...]:
    try:
        temps = tuple(float(t) for t in text.split(","))
    except ValueError as exc:
        raise UserError(f"--distill-temperatures must be comma-separated numbers, got {text!r}") from exc
    if not temps or any(t < 0 for t in temps):
        raise UserError(f"--distill-temperatures must be non-negative, got {text!r}")
    return temps


def distill_settings(s: TrainSettings, mix: str = "chat") -> DistillSettings:
    """The generation settings of one --distill-mix entry, with the --distill-* flags applied where they are set
    away from their defaults (a mix such as "users" keeps its own dtype, lengths and batch size otherwise)."""
    flags = {"temperatures": ("distill_temperatures", parse_temperatures),
             "max_new_tokens": ("distill_max_new_tokens", int), "top_k": ("distill_top_k", int),
             "batch_size": ("distill_batch_size", int), "dtype": ("distill_dtype", str)}
    changed = {name: convert(getattr(s, flag)) for name, (flag, convert) in flags.items()
               if getattr(s, flag) != TrainSettings.__dataclass_fields__[flag].default}
    return replace(DISTILL_MIXES[mix], target=s.target, **changed)


def settings_fields() -> list[tuple[str, object, type]]:
    """(name, default, type) of every TrainSettings field, for building the argument parser."""
    return [(f.name, f.default, f.type) for f in fields(TrainSettings)]

