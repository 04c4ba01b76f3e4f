"""Training a small draft model for a target: presets, data, losses, checkpoints and evaluation.

The entry script (pretrain_draft_model.py) only parses flags into `TrainSettings` and calls `train`.
A plain training loop under `accelerate.Accelerator` keeps `accelerate launch` (multi-GPU) working with
no code change, while staying readable and resumable: the step count alone fixes the data position,
because batches come from a seeded per-epoch permutation.
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.distill_data import DISTILL_MIXES, DistillData, DistillSettings, ensure_distill_data, load_distill_data
from utils.errors import UserError
from utils.models import DraftVocab, load_draft_vocab, load_tokenizer, resolve_model_path

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"
SETTINGS_FILE = "train_settings.json"
LOSS_LOG = "loss_log.jsonl"
LOSSES = ("ce", "kl", "mix")
ARCHS = ("token", "feature")  # a small LM on tokens, or a feature draft on the target's hidden states (EAGLE)
# flags a feature draft has no use for (its shape is the target's; its loss is regression + cls_weight * CE)
TOKEN_ONLY = ("preset", "hidden_size", "num_heads", "num_kv_heads", "embed_init", "loss", "kl_weight")
IGNORE = -100

# Architecture presets (vocabulary size comes from the target, or from --vocab-subset).
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
    self_feed: float = 0.0
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
    logging_steps: int = 10
    mixed_precision: str = "bf16"
    save_dtype: str = "float32"
    final_dir: str | None = None
    eval_only: bool = False
    resume: bool = False
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------
# Validation


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
    if not 0.0 <= s.self_feed <= 1.0:
        raise UserError(f"--self-feed must be in [0, 1], got {s.self_feed}")
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


def parse_temperatures(text: str) -> tuple[float, ...]:
    try:
        temps = tuple(float(t) for t in text.split(","))
    except ValueError as exc:
        raise UserError(f"--distill-temperatures must be comma-separated numbers, got {text!r}") from exc
    if not temps or any(t < 0 for t in temps):
        raise UserError(f"--distill-temperatures must be non-negative, got {text!r}")
    return temps


# ---------------------------------------------------------------------------------------------------------
# Data


def distill_settings(s: TrainSettings, mix: str = "chat") -> DistillSettings:
    """The generation settings of one --distill-mix entry, with the --distill-* flags applied."""
    return replace(DISTILL_MIXES[mix], target=s.target, temperatures=parse_temperatures(s.distill_temperatures),
                   max_new_tokens=s.distill_max_new_tokens, top_k=s.distill_top_k,
                   batch_size=s.distill_batch_size, dtype=s.distill_dtype)


def text_data(tokenizer, dataset: str, start: int, end: int | None) -> DistillData:
    """Rows of a --dataset as token data without a stored teacher: every token after the first is a label."""
    from utils.data import CHAT_KIND, load_texts

    rows: list[list[int]] = []
    for kind, text in load_texts(dataset, start, end):
        if kind == CHAT_KIND and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
            ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 2:
            rows.append(list(ids))
    if not rows:
        raise UserError(f"dataset {dataset!r} has no row of at least two tokens")
    tokens = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows])
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    teacher = np.ones(len(tokens), dtype=bool)
    teacher[offsets[:-1]] = False
    empty = np.zeros((len(tokens), 0), dtype=np.int32)
    return DistillData(tokens, offsets, teacher, empty, empty.astype(np.float16))


def split_rows(data: DistillData, eval_rows: int, seed: int) -> tuple[DistillData, DistillData]:
    """(train, held-out): a fixed random set of whole rows is held out, never trained on."""
    order = np.random.default_rng(seed + 7919).permutation(data.num_rows)
    n_eval = min(eval_rows, data.num_rows // 10) if data.num_rows >= 10 else 0
    held = np.sort(order[:n_eval])
    train = np.sort(order[n_eval:])
    return data.rows(train), data.rows(held)


def windows(data: DistillData, seq_len: int) -> list[tuple[int, int]]:
    """(start, end) token spans of at most seq_len tokens, never crossing a row boundary."""
    spans = []
    for i in range(data.num_rows):
        a, b = int(data.offsets[i]), int(data.offsets[i + 1])
        for s in range(a, b, seq_len):
            if min(b, s + seq_len) - s >= 2 and data.teacher[s + 1:min(b, s + seq_len)].any():
                spans.append((s, min(b, s + seq_len)))
    return spans


def epoch_batches(spans: list[tuple[int, int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of span indices for one epoch: shuffled, then grouped by length in pools (less padding)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(spans)))
    rng.shuffle(order)
    pool = batch_size * 32
    batches = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p:p + pool], key=lambda i: spans[i][1] - spans[i][0])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    """Draft-vocabulary inputs, target-vocabulary inputs (for a live teacher), labels and stored teacher."""

    input_ids: torch.Tensor
    target_input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    target_greedy: torch.Tensor | None
    written: torch.Tensor


def make_batch(data: DistillData, spans: list[tuple[int, int]], vocab_map: torch.Tensor | None,
               owned: torch.Tensor | None, pad_id: int) -> Batch:
    """Right-padded batch; label t (draft id) is the token at t+1 when the target wrote it, else ignored."""
    width = max(b - a for a, b in spans)
    n = len(spans)
    k = data.topk_ids.shape[1]
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE, dtype=np.int64)
    written = np.zeros((n, width), dtype=bool)
    top_ids = np.zeros((n, width, k), dtype=np.int64)
    top_lp = np.full((n, width, k), -np.inf, dtype=np.float32)
    for r, (a, b) in enumerate(spans):
        m = b - a
        ids[r, :m] = data.tokens[a:b]
        mask[r, :m] = 1
        label_ok = data.teacher[a + 1:b]
        labels[r, :m - 1] = np.where(label_ok, data.tokens[a + 1:b], IGNORE)
        written[r, :m - 1] = label_ok
        if k:
            top_ids[r, :m - 1] = data.topk_ids[a + 1:b]
            top_lp[r, :m - 1] = np.where(label_ok[:, None], data.topk_logprobs[a + 1:b].astype(np.float32), -np.inf)
    target_ids = torch.from_numpy(ids)
    labels_t = torch.from_numpy(labels)
    draft_ids = vocab_map[target_ids] if vocab_map is not None else target_ids
    if vocab_map is not None:
        labels_t = vocab_map_label(vocab_map, owned, labels_t)
    top_ids_t = torch.from_numpy(top_ids) if k else None
    # every target-written position counts for agreement, also those whose token the draft cannot say
    written_t = torch.from_numpy(written)
    greedy = top_ids_t[..., 0].masked_fill(~written_t, IGNORE) if k else None
    return Batch(draft_ids, target_ids, torch.from_numpy(mask), labels_t, top_ids_t,
                 torch.from_numpy(top_lp) if k else None, greedy, written_t)


def vocab_map_label(vocab_map: torch.Tensor, owned: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Target-id labels as draft ids; tokens outside the subset become IGNORE (the draft cannot say them)."""
    safe = labels.clamp(min=0)
    return torch.where(owned[safe] & (labels >= 0), vocab_map[safe], torch.full_like(labels, IGNORE))


# ---------------------------------------------------------------------------------------------------------
# Vocabulary subset


def choose_vocab(data: DistillData, size: int, target_vocab: int, always: list[int],
                 oov_target_id: int) -> tuple[DraftVocab, float]:
    """The `size` most frequent tokens of the data (plus `always`: special tokens), and their coverage.

    Draft ids follow target-id order. Target tokens outside the subset are fed to the draft as
    `oov_target_id` (the unknown/end-of-text token), which the target does not write inside an answer.
    """
    counts = np.bincount(data.tokens, minlength=target_vocab)
    keep = set(always) | {oov_target_id}
    for t in np.argsort(-counts, kind="stable"):
        if len(keep) >= size:
            break
        keep.add(int(t))
    ordered = sorted(keep)
    labels = data.tokens[data.teacher]
    coverage = float(np.isin(labels, ordered).mean()) if len(labels) else 1.0
    return DraftVocab(target_vocab, ordered, ordered.index(oov_target_id)), coverage


def draft_to_target(vocab_map: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """[draft vocab] long: the target id of each draft id (inverse of the input map over owned ids)."""
    owned_ids = owned.nonzero().squeeze(-1)
    out = torch.empty(len(owned_ids), dtype=torch.long)
    out[vocab_map[owned_ids]] = owned_ids
    return out


def heldout_coverage(data: DistillData, vocab: DraftVocab | None) -> float:
    """Share of the held-out target-written tokens that the draft's vocabulary can say."""
    labels = data.tokens[data.teacher]
    if vocab is None or not len(labels):
        return 1.0
    return float(np.isin(labels, vocab.draft_to_target).mean())


def vocab_tables(vocab: DraftVocab | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(target->draft input map, target ids owned by a draft id as a boolean mask) for a subset vocabulary."""
    if vocab is None:
        return None, None
    owned = torch.zeros(vocab.target_vocab_size, dtype=torch.bool)
    owned[torch.tensor(vocab.draft_to_target)] = True
    return vocab.input_map(), owned


# ---------------------------------------------------------------------------------------------------------
# Models


def build_config(s: TrainSettings, vocab_size: int, tokenizer):
    """A LlamaConfig from the preset, overridden by explicit flags."""
    from transformers import LlamaConfig

    arch = dict(PRESETS[s.preset])
    for key, flag in (("hidden_size", s.hidden_size), ("num_hidden_layers", s.num_layers),
                      ("num_attention_heads", s.num_heads), ("num_key_value_heads", s.num_kv_heads),
                      ("intermediate_size", s.intermediate_size)):
        if flag is not None:
            arch[key] = flag
    if arch["hidden_size"] % arch["num_attention_heads"] or arch["num_attention_heads"] % arch["num_key_value_heads"]:
        raise UserError("--hidden-size must be a multiple of --num-heads, and --num-heads of --num-kv-heads")
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(2048, s.seq_len), tie_word_embeddings=True,
                       rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)


def pca_embeddings(target_embed: torch.Tensor, rows: list[int] | None, dim: int, std: float = 0.02) -> torch.Tensor:
    """Target embedding rows projected on their top `dim` principal directions, rescaled to `std`.

    Tokens that the target treats alike start alike in the draft, which saves many training steps.
    """
    e = target_embed.float()
    if rows is not None:
        e = e[torch.tensor(rows)]
    e = e - e.mean(0, keepdim=True)
    q = min(dim, e.shape[1], e.shape[0])
    _, _, v = torch.linalg.svd(e, full_matrices=False)
    proj = e @ v[:q].T
    out = torch.randn(e.shape[0], dim) * std
    out[:, :q] = proj / proj.std() * std
    return out


def check_tokenizer_match(init_tokenizer, target_tokenizer, init: str, target: str | None) -> None:
    """Refuse an --init checkpoint whose tokenizer differs from the target's (sizes named in the message)."""
    a, b = len(init_tokenizer), len(target_tokenizer)
    same = a == b and init_tokenizer.get_vocab() == target_tokenizer.get_vocab()
    if not same:
        raise UserError(f"--init {init} has a tokenizer of {a} tokens but --target {target or 'default'} has {b} "
                        "(or different tokens): a draft must share the target's tokenizer")


# ---------------------------------------------------------------------------------------------------------
# Losses and metrics


def draft_losses(logits: torch.Tensor, batch: Batch, owned: torch.Tensor | None, vocab_map: torch.Tensor | None,
                 teacher_logits: torch.Tensor | None, loss: str, kl_weight: float) -> dict[str, torch.Tensor]:
    """CE on the target's tokens and KL(target || draft) over the draft's vocabulary.

    With a stored teacher the KL uses the target's top-k log-probs renormalised over the tokens the draft
    can say (the tail is dropped); with a live teacher it uses the full distribution, restricted likewise.
    """
    logp = torch.log_softmax(logits.float(), -1)
    valid = batch.labels != IGNORE
    n = valid.sum().clamp(min=1)
    ce = F.nll_loss(logp.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum") / n
    out = {"ce": ce}
    if loss == "ce":
        out["loss"] = ce
        return out
    has_label = batch.attention_mask.bool() & (batch.labels != IGNORE) if batch.topk_ids is not None else None
    if teacher_logits is not None:
        t = teacher_logits.float()
        if owned is not None:
            t = t[..., draft_to_target(vocab_map, owned)]
        p_log = torch.log_softmax(t, -1)
        row_mask = batch.attention_mask.bool()
        row_mask[:, -1] = False
        kl_tok = (p_log.exp() * (p_log - logp)).sum(-1)
        kl = (kl_tok * row_mask).sum() / row_mask.sum().clamp(min=1)
    else:
        ids = batch.topk_ids
        lp = batch.topk_logprobs.clone()
        if vocab_map is not None:
            ok = owned[ids]
            lp = lp.masked_fill(~ok, -math.inf)
            ids = vocab_map[ids]
        p_log = torch.log_softmax(lp, -1)
        q_log = logp.gather(-1, ids)
        p = p_log.exp().nan_to_num(0.0)
        kl_tok = (p * (p_log.nan_to_num(0.0, neginf=0.0) - q_log)).sum(-1)
        keep = has_label & torch.isfinite(lp).any(-1)
        kl = (kl_tok * keep).sum() / keep.sum().clamp(min=1)
    out["kl"] = kl
    out["loss"] = kl if loss == "kl" else (1 - kl_weight) * ce + kl_weight * kl
    return out


@torch.no_grad()
def agreement(logits: torch.Tensor, greedy_target_ids: torch.Tensor, vocab_map: torch.Tensor | None,
              owned: torch.Tensor | None) -> tuple[int, int, int]:
    """(top-1 hits, top-4 hits, positions): is the target's greedy token the draft's first / in its top 4?"""
    valid = greedy_target_ids != IGNORE
    g = greedy_target_ids.clamp(min=0)
    if vocab_map is not None:
        in_draft = owned[g]
        g = vocab_map[g]
    else:
        in_draft = torch.ones_like(valid)
    top4 = logits.topk(4, -1).indices
    hit1 = (top4[..., 0] == g) & in_draft & valid
    hit4 = (top4 == g[..., None]).any(-1) & in_draft & valid
    return int(hit1.sum()), int(hit4.sum()), int(valid.sum())


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders that finished saving (they hold the training state), oldest first."""
    found = []
    for p in output_dir.glob(CHECKPOINT_PREFIX + "*"):
        m = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", p.name)
        if m and (p / STATE_FILE).is_file() and (p / "config.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def save_model_folder(model, tokenizer, vocab: DraftVocab | None, folder: Path, dtype: str,
                      settings: TrainSettings) -> None:
    """A folder that `--model` and `from_pretrained` accept: config, safetensors, tokenizer, draft_vocab.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    # copies are no longer shared with the embedding, so a tied head would be written a second time
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.state_dict().items() if k not in tied}
    model.config.dtype = torch_dtype
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if vocab is not None:
        vocab.save(folder)
    (folder / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=1))


def write_training_state(folder: Path, step: int, elapsed_s: float, optimizer,
                         model_fp32: dict[str, torch.Tensor] | None) -> None:
    """The resume state beside a checkpoint's model folder: step, time used, optimizer, RNG and (when the
    folder's weights are not float32) float32 weights. Written last and atomically: it marks the checkpoint
    complete, and a half-written one never does."""
    state = {"step": step, "elapsed_s": elapsed_s, "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if model_fp32 is not None:
        state["model_fp32"] = model_fp32
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / STATE_FILE)


def restore_training_state(folder: Path, model, optimizer, strict: bool = True) -> tuple[int, float]:
    """Load a checkpoint's resume state into `model` (its float32 weights, if stored) and `optimizer`;
    returns (step, seconds used so far)."""
    state = torch.load(folder / STATE_FILE, weights_only=False)
    if "model_fp32" in state:
        model.load_state_dict(state["model_fp32"], strict=strict)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state.get("elapsed_s", 0.0))


def prepare_output_dir(s: TrainSettings) -> list[Path]:
    """Create --output-dir; return its complete checkpoints when resuming, refuse a clash otherwise."""
    out_dir = Path(s.output_dir)
    found = checkpoints(out_dir) if s.resume else []
    if s.resume and not found:
        raise UserError(f"--resume: no complete checkpoint-N folder in {out_dir}")
    if not s.resume and checkpoints(out_dir):
        raise UserError(f"{out_dir} already holds checkpoints: pass --resume to continue, or another --output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    return found


def adamw(params: list[torch.nn.Parameter], s: TrainSettings, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=s.lr, betas=betas)


def due(step: int, every: int, s: TrainSettings, out_of_time: bool) -> bool:
    """Whether an evaluation or checkpoint (every `every` steps) falls on `step`; the last step always gets one."""
    return step % every == 0 or step == s.max_steps or out_of_time


def choose_subset(s: TrainSettings, tokenizer, data: DistillData):
    """(vocabulary subset or None, coverage of the training tokens) for --vocab-subset."""
    target_vocab = len(tokenizer)
    if not s.vocab_subset or s.vocab_subset >= target_vocab:
        return None, 1.0
    oov = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.all_special_ids[0]
    return choose_vocab(data, s.vocab_subset, target_vocab, list(tokenizer.all_special_ids), oov)


def load_init(init: str, target_tokenizer, target: str | None):
    """A draft to continue from (hub id or folder), after checking that its tokenizer is the target's."""
    from transformers import AutoModelForCausalLM

    from utils.models import is_feature_draft

    if is_feature_draft(init):
        raise UserError(f"--init {init} is a feature draft: continue it with --arch feature")
    path = resolve_model_path(init)
    init_tokenizer = load_tokenizer(init)
    check_tokenizer_match(init_tokenizer, target_tokenizer, init, target)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, load_draft_vocab(path) if Path(path).is_dir() else None


# ---------------------------------------------------------------------------------------------------------
# Training


def lr_factor(s: TrainSettings, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio.

    Progress is the larger of steps done / max_steps and, with --max-minutes, time used / time allowed,
    so a run cut by its time budget still ends at the low learning rate instead of mid-schedule.
    """
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    if s.max_minutes > 0:
        t = max(t, elapsed_s / (s.max_minutes * 60))
    t = min(1.0, t)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def load_training_data(s: TrainSettings, tokenizer) -> DistillData:
    if s.distill:
        Path(s.output_dir).mkdir(parents=True, exist_ok=True)
        log = str(Path(s.output_dir) / "distill_progress.jsonl")
        paths = [path for mix, tokens in parse_mixes(s.distill_mix, s.distill_tokens)
                 for path in ensure_distill_data(distill_settings(s, mix), tokens, s.distill_workers, log)]
        return load_distill_data(paths)
    return text_data(tokenizer, s.dataset, s.dataset_start, s.dataset_end)


def _target_embeddings(s: TrainSettings) -> torch.Tensor:
    from utils.models import load_hf_model

    return load_hf_model(s.target, torch.float32, "cpu").get_input_embeddings().weight.detach()


def build_draft(s: TrainSettings, tokenizer, data: DistillData):
    """(model, vocab subset or None, coverage): a fresh draft from the preset, or the --init checkpoint."""
    from transformers import LlamaForCausalLM

    target_vocab = len(tokenizer)
    if s.init is not None:
        model, vocab = load_init(s.init, tokenizer, s.target)
        return model, vocab, None
    vocab, coverage = choose_subset(s, tokenizer, data)
    size = len(vocab.draft_to_target) if vocab is not None else target_vocab
    model = LlamaForCausalLM(build_config(s, size, tokenizer))
    if s.embed_init == "pca":
        try:
            emb = _target_embeddings(s)
        except UserError:
            emb = None
        if emb is not None and emb.shape[0] >= target_vocab:
            rows = vocab.draft_to_target if vocab is not None else list(range(target_vocab))
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(pca_embeddings(emb, rows, model.config.hidden_size))
    return model, vocab, coverage


class Teacher:
    """The target run teacher-forced, for KL when the data holds no stored top-k log-probs."""

    def __init__(self, s: TrainSettings, device):
        from utils.models import load_hf_model

        self.model = load_hf_model(s.target, torch.float32, device)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(input_ids=batch.target_input_ids, attention_mask=batch.attention_mask).logits


def _to(batch: Batch, device) -> Batch:
    return Batch(*[t.to(device) if isinstance(t, torch.Tensor) else t for t in
                   (batch.input_ids, batch.target_input_ids, batch.attention_mask, batch.labels, batch.topk_ids,
                    batch.topk_logprobs, batch.target_greedy, batch.written)])


@torch.no_grad()
def evaluate(model, data: DistillData, s: TrainSettings, vocab: DraftVocab | None, teacher: Teacher | None,
             pad_id: int, device) -> dict[str, float]:
    """Held-out CE/KL per token and agreement with the target's greedy next token (top-1 and top-4)."""
    if data.num_rows == 0:
        return {}
    vocab_map, owned = vocab_tables(vocab)
    spans = windows(data, s.seq_len)
    was_training = model.training
    model.eval()
    sums = {"ce": 0.0, "kl": 0.0}
    hit1 = hit4 = total = batches = 0
    for j in range(0, len(spans), s.batch_size):
        batch = _to(make_batch(data, spans[j:j + s.batch_size], vocab_map, owned, pad_id), device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        t_logits = teacher.logits(batch) if teacher is not None else None
        greedy = batch.target_greedy
        if greedy is None and t_logits is not None:
            greedy = t_logits.argmax(-1).masked_fill(~batch.written, IGNORE)
        if greedy is None:
            greedy = _labels_as_target_ids(batch)
        losses = draft_losses(logits, batch, owned, vocab_map, t_logits, "mix" if (
            batch.topk_ids is not None or t_logits is not None) else "ce", 0.5)
        for key in sums:
            sums[key] += float(losses.get(key, torch.tensor(0.0)))
        a, b, c = agreement(logits, greedy, vocab_map, owned)
        hit1, hit4, total, batches = hit1 + a, hit4 + b, total + c, batches + 1
    if was_training:
        model.train()
    return {"eval_ce": sums["ce"] / batches, "eval_kl": sums["kl"] / batches,
            "eval_top1": hit1 / max(total, 1), "eval_top4": hit4 / max(total, 1), "eval_positions": total}


def _labels_as_target_ids(batch: Batch) -> torch.Tensor:
    """Without a teacher, agreement is measured against the next token of the data itself."""
    nxt = torch.full_like(batch.target_input_ids, IGNORE)
    nxt[:, :-1] = batch.target_input_ids[:, 1:]
    return nxt.masked_fill(~batch.written, IGNORE)


def evaluate_only(s: TrainSettings) -> dict[str, float]:
    """Held-out metrics of the --init draft on the same held-out rows a training run with these data
    settings and --seed would have set aside."""
    from utils.models import is_feature_draft

    validate(s)
    if is_feature_draft(s.init):
        from utils.feature_training import evaluate_feature_draft_only

        return evaluate_feature_draft_only(s)
    tokenizer = load_tokenizer(s.target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    _, held = split_rows(load_training_data(s, tokenizer), s.eval_rows, s.seed)
    model, vocab = load_init(s.init, tokenizer, s.target)
    teacher = Teacher(s, "cpu") if held.topk_ids.shape[1] == 0 else None
    metrics = evaluate(model.eval(), held, s, vocab, teacher, pad_id, "cpu")
    metrics |= {"heldout_coverage": heldout_coverage(held, vocab)}
    if len(held.greedy) and held.greedy.any():
        # rows the target decoded greedily: the text a T=0 speculative decoder actually sees
        greedy_rows = held.rows(np.flatnonzero(held.greedy))
        metrics |= {f"greedy_rows_{k}": v for k, v in
                    evaluate(model, greedy_rows, s, vocab, teacher, pad_id, "cpu").items()}
    return metrics


def train(s: TrainSettings) -> dict[str, float]:
    """Train (or resume) a draft; returns the last held-out metrics."""
    if s.arch == "feature":
        from utils.feature_training import train_feature_draft

        return train_feature_draft(s)
    from accelerate import Accelerator

    validate(s)
    accelerator = Accelerator(mixed_precision=s.mixed_precision if s.mixed_precision != "no" else "no")
    torch.manual_seed(s.seed)
    out_dir = Path(s.output_dir)
    found = prepare_output_dir(s)
    tokenizer = load_tokenizer(s.target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    data = load_training_data(s, tokenizer)
    train_data, held = split_rows(data, s.eval_rows, s.seed)

    if found:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(found[-1], dtype=torch.float32)
        vocab, coverage = load_draft_vocab(str(found[-1])), None
    else:
        model, vocab, coverage = build_draft(s, tokenizer, train_data)
    vocab_map, owned = vocab_tables(vocab)
    model.config.use_cache = False
    model.train()
    optimizer = adamw(list(model.parameters()), s, betas=(0.9, 0.98))
    step, elapsed_before = restore_training_state(found[-1], model, optimizer) if found else (0, 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = Teacher(s, accelerator.device) if s.loss != "ce" and train_data.topk_ids.shape[1] == 0 else None
    if accelerator.is_main_process:
        (out_dir / SETTINGS_FILE).write_text(json.dumps(asdict(s), indent=1))
        info = {"train_rows": train_data.num_rows, "train_teacher_tokens": train_data.num_teacher_tokens,
                "heldout_rows": held.num_rows, "heldout_teacher_tokens": held.num_teacher_tokens,
                "vocab_size": model.config.vocab_size if hasattr(model, "config") else None,
                "vocab_coverage_train": coverage, "vocab_coverage_heldout": heldout_coverage(held, vocab),
                "parameters": sum(p.numel() for p in model.parameters())}
        (out_dir / "data_info.json").write_text(json.dumps(info, indent=1))

    spans = windows(train_data, s.seq_len)
    if not spans:
        raise UserError("the training data has no window with a label: use more or longer texts")
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = max(1, math.ceil(len(spans) / (s.batch_size * world)))  # epoch_batches groups batch_size * world
    log_path = out_dir / LOSS_LOG
    progress = TrainProgress(s, step, elapsed_before, per_epoch, log_path, accelerator.is_main_process)
    last_eval: dict[str, float] = {}
    planned_epoch = -1
    while step < s.max_steps:
        epoch, index = divmod(step, per_epoch)
        if epoch != planned_epoch:  # an epoch's batches are planned once, not every step
            batches, planned_epoch = epoch_batches(spans, s.batch_size * world, s.seed, epoch), epoch
        global_batch = batches[index]
        mine = global_batch[rank::world] or global_batch[:1]
        batch = _to(make_batch(train_data, [spans[i] for i in mine], vocab_map, owned, pad_id), accelerator.device)
        lr = s.lr * lr_factor(s, step, progress.elapsed())
        for group in optimizer.param_groups:
            group["lr"] = lr
        with accelerator.autocast():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        t_logits = teacher.logits(batch) if teacher is not None else None
        losses = draft_losses(logits, batch, owned, vocab_map, t_logits, s.loss, s.kl_weight)
        optimizer_step(accelerator, losses["loss"], model.parameters(), optimizer)
        step += 1
        out_of_time = progress.after_step(step, lr, losses)
        if due(step, s.eval_steps, s, out_of_time):
            if accelerator.is_main_process:
                last_eval = evaluate(accelerator.unwrap_model(model), held, s, vocab, teacher, pad_id,
                                     accelerator.device)
                _append_log(log_path, {"step": step, **{k: round(v, 5) for k, v in last_eval.items()}})
        if due(step, s.save_steps, s, out_of_time):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model)
                folder = out_dir / f"{CHECKPOINT_PREFIX}{step}"
                save_model_folder(unwrapped, tokenizer, vocab, folder, s.save_dtype, s)
                write_training_state(folder, step, progress.elapsed(), optimizer,
                                     None if s.save_dtype == "float32" else
                                     {k: v.detach().float() for k, v in unwrapped.state_dict().items()})
        if out_of_time:
            break
    progress.bar.close()
    if s.final_dir and accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        export_final(lambda folder: save_model_folder(unwrapped, tokenizer, vocab, folder, s.save_dtype, s), s,
                     last_eval)
    return last_eval


def optimizer_step(accelerator, loss: torch.Tensor, params, optimizer) -> None:
    """Backward, clip the gradient norm to 1, step, clear the gradients."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class TrainProgress:
    """Per-step bookkeeping shared by both training loops: progress bar, loss log, time used (including
    before a resume) and the --max-minutes budget."""

    def __init__(self, s: TrainSettings, step: int, elapsed_before: float, per_epoch: int, log_path: Path,
                 is_main: bool) -> None:
        from tqdm import tqdm

        self.max_minutes, self.elapsed_before, self.is_main = s.max_minutes, elapsed_before, is_main
        self.log = LossLog(log_path, s.logging_steps, per_epoch)
        self.bar = tqdm(total=s.max_steps, initial=step, disable=not is_main, desc="train")
        self.start = time.time()

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start

    def after_step(self, step: int, lr: float, losses: dict[str, torch.Tensor]) -> bool:
        """Record a finished step; True once the time budget is used up."""
        self.bar.update(1)
        elapsed = self.elapsed()
        if self.is_main:
            self.log.add(step, lr, elapsed, losses, self.bar)
        return self.max_minutes > 0 and elapsed > self.max_minutes * 60


class LossLog:
    """Averages the training losses between log lines and appends one line every `every` steps."""

    def __init__(self, path: Path, every: int, per_epoch: int) -> None:
        self.path, self.every, self.per_epoch = path, every, per_epoch
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, step: int, lr: float, elapsed_s: float, losses: dict[str, torch.Tensor], bar=None) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
        self.count += 1
        if step % self.every:
            return
        record = {"step": step, "epoch": round(step / self.per_epoch, 3), "lr": lr, "elapsed_s": round(elapsed_s, 1)}
        record |= {k: round(v / self.count, 5) for k, v in self.sums.items()}
        _append_log(self.path, record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        self.sums, self.count = {}, 0


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def export_final(save_folder: Callable[[Path], None], s: TrainSettings, metrics: dict[str, float]) -> None:
    """The shipped folder --final-dir, written anew: the model (`save_folder(folder)` writes it), its settings,
    loss log and held-out metrics, no optimizer."""
    folder = Path(s.final_dir)
    if folder.exists():
        shutil.rmtree(folder)
    save_folder(folder)
    for name in (LOSS_LOG, "data_info.json"):
        src = Path(s.output_dir) / name
        if src.is_file():
            shutil.copy(src, folder / name)
    (folder / "heldout_metrics.json").write_text(json.dumps(metrics, indent=1))


def settings_fields() -> list[tuple[str, object, type]]:
    """(name, default, type) of every TrainSettings field, for building the argument parser."""
    return [(f.name, f.default, f.type) for f in fields(TrainSettings)]


# ---------------------------------------------------------------------------------------------------------
# Forward cost


@torch.no_grad()
def decode_step_ms(model, context: int, steps: int, repeats: int) -> float:
    """Median wall time (ms) of a one-token decode step with a KV cache (LM head included), batch 1."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, context))
    times = []
    for _ in range(repeats):
        cache = DynamicCache()
        model(input_ids=ids, cache=cache, use_cache=True)
        nxt = ids[:, -1:]
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        times.append((time.perf_counter() - t0) / steps * 1000)
    return float(np.median(times))


def engine_step_ms(model, context: int, steps: int, repeats: int) -> float:
    """Median wall time (ms) of a one-token forward of a suite TreeModel (LM head and top-1 included) at
    `context` cached tokens: the cost the decoder pays per draft or target token."""
    from engine.drafters import append_tokens

    ids = torch.randint(3, model.target_vocab_size, (context + 1,), device=model.device)
    append_tokens(model, ids[:context], 0, last_logits=False, prev_features=model.placeholder_features(context))
    one = model.placeholder_features(1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):  # the same slot each time: the cache length, hence the cost, stays `context`
            int(append_tokens(model, ids[context:], context, prev_features=one).argmax())
        times.append((time.perf_counter() - t0) / steps * 1000)
    return float(np.median(times))


def _cost_row(runtime: str, dtype: torch.dtype, ms: dict[str, float], context: int) -> dict[str, float | str]:
    return {"runtime": runtime, "dtype": str(dtype).removeprefix("torch."), "target_ms": round(ms["target"], 3),
            "draft_ms": round(ms["draft"], 3), "ratio": round(ms["draft"] / ms["target"], 4),
            "threads": torch.get_num_threads(), "context": context}


def measure_cost(draft: str, target: str | None, context: int = 128, steps: int = 32,
                 repeats: int = 5) -> list[dict[str, float | str]]:
    """Per-token decode cost of draft and target in one process, float32 and bfloat16, and their ratio:
    through the suite's engine (what the decoder runs), and for a token-level draft also through
    transformers (batch 1, KV cache)."""
    from transformers import AutoModelForCausalLM

    from utils.experiment import load_pair
    from utils.models import is_feature_draft

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        pair = load_pair(target, draft, True, dtype, "cpu", context + 8)
        models = {"target": pair.target, "draft": pair.draft}
        for m in models.values():
            engine_step_ms(m, context, 4, 1)  # warm-up
        ms = {name: engine_step_ms(m, context, steps, repeats) for name, m in models.items()}
        rows.append(_cost_row("engine", dtype, ms, context))
        if is_feature_draft(draft):
            continue
        models = {name: AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=dtype).eval()
                  for name, spec in (("target", target), ("draft", draft))}
        for m in models.values():
            decode_step_ms(m, context, 4, 1)  # warm-up
        ms = {name: decode_step_ms(m, context, steps, repeats) for name, m in models.items()}
        rows.append(_cost_row("transformers", dtype, ms, context))
    return rows
