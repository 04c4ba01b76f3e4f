"""Training a token-level draft (`pretrain_draft_model.py --arch token`): a small Llama LM, from a preset or
--init, trained on the target's tokens with CE, KL distillation from the target, or a mix; its held-out
evaluation and its checkpoint folders (usable as --model)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.models import DraftVocab, is_feature_draft, load_draft_vocab, load_hf_model, load_tokenizer, resolve_model_path
from utils.training.common import (LoopHooks, adamw, make_accelerator, prepare_output_dir, restore_training_state,
                                   train_loop, write_run_info)
from utils.training.distill_data import DistillData
from utils.training.settings import IGNORE, PRESETS, SETTINGS_FILE, TrainSettings, heldout_kind_set, validate
from utils.training.training_data import (Batch, check_tokenizer_match, choose_subset, draft_to_target,
                                          heldout_coverage, load_training_data, make_batch, split_rows, vocab_tables,
                                          windows)

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


def load_init(init: str, target_tokenizer, target: str | None):
    """A draft to continue from (hub id or folder), after checking that its tokenizer is the target's."""
    from transformers import AutoModelForCausalLM

    if is_feature_draft(init):
        raise UserError(f"--init {init} is a feature draft: continue it with --arch feature")
    path = resolve_model_path(init)
    init_tokenizer = load_tokenizer(init)
    check_tokenizer_match(init_tokenizer, target_tokenizer, init, target)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, load_draft_vocab(path) if Path(path).is_dir() else None


def _target_embeddings(s: TrainSettings) -> torch.Tensor:
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


def evaluate_token_draft_only(s: TrainSettings) -> dict[str, float]:
    """Held-out metrics of the --init token draft on the same held-out rows a training run with these data
    settings and --seed would have set aside."""
    tokenizer = load_tokenizer(s.target)
    pad_id = pad_id_of(tokenizer)
    _, held = split_rows(load_training_data(s, tokenizer), s.eval_rows, s.seed, heldout_kind_set(s))
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


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def train_token_draft(s: TrainSettings) -> dict[str, float]:
    """Train (or resume) a token draft; returns the last held-out metrics."""
    validate(s)
    accelerator = make_accelerator(s)
    torch.manual_seed(s.seed)
    found = prepare_output_dir(s)
    tokenizer = load_tokenizer(s.target)
    pad_id = pad_id_of(tokenizer)
    train_data, held = split_rows(load_training_data(s, tokenizer), s.eval_rows, s.seed, heldout_kind_set(s))

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
        write_run_info(Path(s.output_dir), s, {
            "train_rows": train_data.num_rows, "train_teacher_tokens": train_data.num_teacher_tokens,
            "heldout_rows": held.num_rows, "heldout_teacher_tokens": held.num_teacher_tokens,
            "vocab_size": model.config.vocab_size if hasattr(model, "config") else None,
            "vocab_coverage_train": coverage, "vocab_coverage_heldout": heldout_coverage(held, vocab),
            "parameters": sum(p.numel() for p in model.parameters())})
    spans = windows(train_data, s.seq_len)
    if not spans:
        raise UserError("the training data has no window with a label: use more or longer texts")

    def losses(mine: list[int], step: int) -> dict[str, torch.Tensor]:
        batch = _to(make_batch(train_data, [spans[i] for i in mine], vocab_map, owned, pad_id), accelerator.device)
        with accelerator.autocast():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        t_logits = teacher.logits(batch) if teacher is not None else None
        return draft_losses(logits, batch, owned, vocab_map, t_logits, s.loss, s.kl_weight)

    def resume_weights() -> dict[str, torch.Tensor] | None:
        if s.save_dtype == "float32":  # the checkpoint's own weights are exact
            return None
        return {k: v.detach().float() for k, v in accelerator.unwrap_model(model).state_dict().items()}

    hooks = LoopHooks(
        losses=losses,
        evaluate=lambda: evaluate(accelerator.unwrap_model(model), held, s, vocab, teacher, pad_id,
                                  accelerator.device),
        save=lambda folder: save_model_folder(accelerator.unwrap_model(model), tokenizer, vocab, folder, s.save_dtype,
                                              s),
        resume_weights=resume_weights)
    return train_loop(s, accelerator, spans, step, elapsed_before, list(model.parameters()), optimizer, hooks)
