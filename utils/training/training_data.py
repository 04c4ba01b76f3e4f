"""What both training loops train on: rows (target-written distillation data or a --dataset), the held-out
split, windows that never cross a row, the per-epoch batch plan, token batches, and the draft's vocabulary
subset."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.data import CHAT_KIND, load_texts
from utils.errors import UserError
from utils.models import DraftVocab
from utils.training.distill_data import DistillData, ensure_distill_data, load_distill_data
from utils.training.settings import IGNORE, TrainSettings, distill_settings, heldout_kind_set, parse_mixes

def text_data(tokenizer, dataset: str, start: int, end: int | None) -> DistillData:
    """Rows of a --dataset as token data without a stored teacher: every token after the first is a label."""
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


def load_training_data(s: TrainSettings, tokenizer) -> DistillData:
    if s.distill:
        Path(s.output_dir).mkdir(parents=True, exist_ok=True)
        log = str(Path(s.output_dir) / "distill_progress.jsonl")
        paths = [path for mix, tokens in parse_mixes(s.distill_mix, s.distill_tokens)
                 for path in ensure_distill_data(distill_settings(s, mix), tokens, s.distill_workers, log)]
        return load_distill_data(paths)
    return text_data(tokenizer, s.dataset, s.dataset_start, s.dataset_end)


def split_rows(data: DistillData, eval_rows: int, seed: int,
               heldout_kinds: set[str] | frozenset[str] = frozenset()) -> tuple[DistillData, DistillData]:
    """(train, held-out): a fixed random set of whole rows is held out, never trained on. With `heldout_kinds`,
    whole kinds are: no row of them is trained on, and up to `eval_rows` of them (a fixed random set) are
    evaluated."""
    order = np.random.default_rng(seed + 7919).permutation(data.num_rows)
    if heldout_kinds:
        if not len(data.kinds):
            raise UserError("--heldout-kinds needs data whose rows record their kind: --distill-mix users")
        of_kind = np.isin(data.kinds, sorted(heldout_kinds))
        if not of_kind.any():
            raise UserError(f"--heldout-kinds {','.join(sorted(heldout_kinds))}: no row of these kinds in the data")
        held = np.sort([i for i in order if of_kind[i]][:eval_rows])
        return data.rows(np.flatnonzero(~of_kind)), data.rows(held)
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


def choose_subset(s: TrainSettings, tokenizer, data: DistillData):
    """(vocabulary subset or None, coverage of the training tokens) for --vocab-subset."""
    target_vocab = len(tokenizer)
    if not s.vocab_subset or s.vocab_subset >= target_vocab:
        return None, 1.0
    oov = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.all_special_ids[0]
    return choose_vocab(data, s.vocab_subset, target_vocab, list(tokenizer.all_special_ids), oov)


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


def check_tokenizer_match(init_tokenizer, target_tokenizer, init: str, target: str | None) -> None:
    """Refuse an --init checkpoint whose tokenizer differs from the target's (sizes named in the message)."""
    a, b = len(init_tokenizer), len(target_tokenizer)
    same = a == b and init_tokenizer.get_vocab() == target_tokenizer.get_vocab()
    if not same:
        raise UserError(f"--init {init} has a tokenizer of {a} tokens but --target {target or 'default'} has {b} "
                        "(or different tokens): a draft must share the target's tokenizer")

