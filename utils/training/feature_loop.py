"""Training a feature-level draft (engine/feature_draft.py, `pretrain_draft_model.py --arch feature`).

The data are the same rows as for a token draft (target-written distillation data or a --dataset), cut into
the same windows. The target is run once, teacher-forced, over every window and its final hidden states are
kept (bfloat16, cached in --output-dir so a resumed run does not recompute them). The draft then learns, at
every position t of a window, to predict the target's feature h(t) from token t and h(t - 1):
  loss = smooth-L1(predicted h(t), h(t)) + cls_weight * CE(target's next-token distribution, draft's),
both distributions over the draft head's vocabulary subset (EAGLE's recipe). The input features get a little
Gaussian noise during training. Two EAGLE-3 changes (arXiv 2503.01840): --ttt-steps K unrolls K passes, pass j
reading pass j - 1's predictions with a tree chain's attention (`FeatureDraftNet.forward`), because at inference
a tree node below the root reads the draft's own prediction of its parent's feature; the loss is the mean of
every pass's, weighted 0.8^j as in EAGLE-3's code. --target-layers makes the draft read several target
layers, fused by its input projection; the final hidden state is then kept beside them as the loss's target.
"""
from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.feature_draft import FEATURE_DRAFT_KEY, FeatureDraftNet
from utils.errors import UserError
from utils.models import (DraftVocab, head_weight, load_draft_vocab, load_feature_net, load_hf_model, load_tokenizer,
                          resolve_model_path)
from utils.training.common import (LoopHooks, adamw, make_accelerator, prepare_output_dir, restore_training_state,
                                   train_loop, write_run_info)
from utils.training.settings import TrainSettings, heldout_kind_set, parse_target_layers, ttt_passes, validate
from utils.training.training_data import (check_tokenizer_match, choose_subset, heldout_coverage, load_training_data,
                                          split_rows, windows)

FEATURE_CACHE = "target_features.pt"


FEATURE_DTYPE = torch.bfloat16  # targets features are computed in: the engine's CPU default (AMX), and compact


TTT_DECAY = 0.8  # weight of unrolled pass j's loss: TTT_DECAY ** j (EAGLE-3's training code)


EVAL_DEPTHS = 3  # held-out top-1 agreement is reported at tree depths 1..EVAL_DEPTHS


def feature_config(target_config, num_layers: int, intermediate_size: int | None,
                   target_layers: tuple[int, ...] | None = None):
    """The draft layer's LlamaConfig: the target's attention shape, `num_layers` layers, marked as a feature draft
    (with the target layers it reads, unless it reads the final hidden state: the marker of older drafts)."""
    from transformers import LlamaConfig

    data = target_config.to_dict()
    for key in ("architectures", "auto_map", "quantization_config", "dtype", "torch_dtype"):
        data.pop(key, None)
    data["num_hidden_layers"] = num_layers
    if intermediate_size is not None:
        data["intermediate_size"] = intermediate_size
    data["model_type"] = "llama"
    config = LlamaConfig(**data)
    marker = {"layers": num_layers} | ({} if target_layers is None else {"target_layers": list(target_layers)})
    setattr(config, FEATURE_DRAFT_KEY, marker)
    return config


def save_feature_folder(net: FeatureDraftNet, tokenizer, vocab: DraftVocab | None, folder: Path, dtype: str,
                        settings: dict) -> None:
    """config.json (with the feature-draft marker), model.safetensors (the draft's own weights only),
    tokenizer, draft_vocab.json and the run's settings."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in net.trainable_state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = net.config.to_dict() | {"dtype": dtype}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(folder)
    if vocab is not None:
        vocab.save(folder)
    (folder / "train_settings.json").write_text(json.dumps(settings, indent=1))


@torch.inference_mode()
def compute_features(target_hf, tokens: np.ndarray, spans: list[tuple[int, int]], batch_size: int,
                     layers: tuple[int, ...] | None = None,
                     show_progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """The target's final hidden states over every span, run teacher-forced span by span (right padding),
    followed, for a draft of fused `layers`, by those layers' states (`split_states`).

    Returns (features [sum of span lengths, d or (1 + k) d] in the target's dtype, start offset of each span's
    rows).
    """
    from tqdm import tqdm

    lengths = np.array([b - a for a, b in spans], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    d = target_hf.config.hidden_size * (1 if layers is None else 1 + len(layers))
    out = torch.empty(int(starts[-1]), d, dtype=target_hf.dtype)
    order = np.argsort(lengths, kind="stable")
    device = target_hf.device
    for j in tqdm(range(0, len(order), batch_size), desc="target features", disable=not show_progress):
        chunk = order[j:j + batch_size]
        width = int(lengths[chunk].max())
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            a, b = spans[i]
            ids[r, :b - a] = torch.from_numpy(tokens[a:b].astype(np.int64))
            mask[r, :b - a] = 1
        run = target_hf.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                              output_hidden_states=layers is not None)
        hidden = run.last_hidden_state
        if layers is not None:
            hidden = torch.cat([hidden] + [run.hidden_states[i] for i in layers], dim=-1)
        hidden = hidden.cpu()
        for r, i in enumerate(chunk):
            out[starts[i]:starts[i + 1]] = hidden[r, :lengths[i]]
    return out, starts


def feature_target_loader(target: str | None) -> Callable[[], torch.nn.Module]:
    """A loader of the target in FEATURE_DTYPE that loads it at most once, and only if a cache misses."""
    return functools.cache(lambda: load_hf_model(target, FEATURE_DTYPE, "cpu"))


def cached_features(target: str | None, load_target: Callable[[], torch.nn.Module], tokens: np.ndarray,
                    spans: list[tuple[int, int]], batch_size: int, path: Path,
                    layers: tuple[int, ...] | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """compute_features, saved to `path` and reused when the spans, the target (`target`, the name that
    `load_target` loads) and the layers are the same."""
    key = {"spans": len(spans), "tokens": int(sum(b - a for a, b in spans)),
           "checksum": int(sum(int(tokens[a]) * (i + 1) for i, (a, _) in enumerate(spans)) % (1 << 61)),
           "target": resolve_model_path(target)}
    if layers is not None:  # absent for the final state alone, so caches written before fused layers still match
        key["target_layers"] = list(layers)
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved.get("key") == key:
            return saved["features"], saved["starts"]
    features, starts = compute_features(load_target(), tokens, spans, batch_size, layers)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "features": features, "starts": starts}, tmp)
    tmp.replace(path)
    return features, starts


def feature_batch(tokens: np.ndarray, spans: list[tuple[int, int]], features: torch.Tensor, starts: np.ndarray,
                  chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [b, n], target features [b, n, d], valid [b, n] bool) for the chosen spans, right-padded."""
    width = max(spans[i][1] - spans[i][0] for i in chosen)
    ids = torch.zeros(len(chosen), width, dtype=torch.long)
    feats = torch.zeros(len(chosen), width, features.shape[1], dtype=features.dtype)
    valid = torch.zeros(len(chosen), width, dtype=torch.bool)
    for r, i in enumerate(chosen):
        a, b = spans[i]
        ids[r, :b - a] = torch.from_numpy(tokens[a:b].astype(np.int64))
        feats[r, :b - a] = features[starts[i]:starts[i + 1]]
        valid[r, :b - a] = True
    return ids, feats, valid


def split_states(feats: torch.Tensor, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `compute_features` [..., d or (1 + k) d] -> (the target's final hidden state [..., d]: what the
    draft predicts, the states the draft reads [..., d or k * d]: the same tensor for a final-state draft)."""
    final = feats[..., :hidden_size]
    return final, (final if feats.shape[-1] == hidden_size else feats[..., hidden_size:])


def feature_losses(net: FeatureDraftNet, predicted: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor,
                   cls_weight: float) -> dict[str, torch.Tensor]:
    """Smooth-L1 on the features and soft CE against the target's next-token distribution (head subset)."""
    feats = feats.float()
    reg = F.smooth_l1_loss(predicted.float(), feats, reduction="none").mean(-1)
    weight = net.head.weight.float()
    with torch.no_grad():
        target_p = torch.softmax(feats[valid] @ weight.T, -1)
    draft_logp = torch.log_softmax(predicted.float()[valid] @ weight.T, -1)
    cls = -(target_p * draft_logp).sum(-1).mean()
    reg = reg[valid].mean()
    return {"loss": reg + cls_weight * cls, "reg": reg, "cls": cls}


@torch.no_grad()
def feature_metrics(net: FeatureDraftNet, full_head: torch.Tensor, head_ids: torch.Tensor | None,
                    final: torch.Tensor, valid: torch.Tensor, predicted: torch.Tensor) -> dict[str, int]:
    """Agreement with the target's greedy token (over its full vocabulary) at tree depths 1..D: `predicted`
    [D, b, n, d] is the net's unrolled forward (pass j = the depth-(j + 1) drafts, on the draft's own
    predictions below depth 1); top-1 at every depth, top-4 at depth 1. Position t counts at depth j + 1 when
    t >= j (the chain's root is in the row)."""
    greedy = (final.float() @ full_head.float().T).argmax(-1)
    counts: dict[str, int] = {}
    for step, pred in enumerate(predicted):
        top = (pred.float() @ net.head.weight.float().T).topk(4, -1).indices
        if head_ids is not None:
            top = head_ids[top]
        rows = valid.clone()
        rows[:, :step] = False
        counts[f"positions_d{step + 1}"] = int(rows.sum())
        counts[f"top1_d{step + 1}"] = int(((top[..., 0] == greedy) & rows).sum())
        if step == 0:
            counts["top4_d1"] = int(((top == greedy[..., None]).any(-1) & rows).sum())
    return counts


def evaluate_features(net: FeatureDraftNet, full_head: torch.Tensor, head_ids: torch.Tensor | None,
                      tokens: np.ndarray, spans: list[tuple[int, int]], features: torch.Tensor, starts: np.ndarray,
                      batch_size: int, cls_weight: float) -> dict[str, float]:
    """Held-out losses per position of the teacher-forced pass and agreement rates at depths 1..EVAL_DEPTHS
    (see feature_metrics), on the net's device."""
    if not spans:
        return {}
    device = net.fc.weight.device
    full_head = full_head.to(device)
    head_ids = None if head_ids is None else head_ids.to(device)
    was_training = net.training
    net.eval()
    sums: dict[str, float] = {}
    batches = 0
    with torch.no_grad():
        for j in range(0, len(spans), batch_size):
            chosen = list(range(j, min(j + batch_size, len(spans))))
            ids, feats, valid = (t.to(device) for t in feature_batch(tokens, spans, features, starts, chosen))
            final, states = split_states(feats, net.config.hidden_size)
            predicted = net(ids, states, EVAL_DEPTHS)
            for k, v in feature_losses(net, predicted[0], final, valid, cls_weight).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            for k, v in feature_metrics(net, full_head, head_ids, final, valid, predicted).items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
    net.train(was_training)

    def rate(name: str, depth: int) -> float:
        return sums[f"{name}_d{depth}"] / max(sums[f"positions_d{depth}"], 1.0)

    out = {f"heldout_{k}": sums[k] / max(batches, 1) for k in ("loss", "reg", "cls")}
    out |= {"heldout_top1": rate("top1", 1), "heldout_top4": rate("top4", 1)}
    out |= {f"heldout_top1_depth{depth}": rate("top1", depth) for depth in range(2, EVAL_DEPTHS + 1)}
    return out | {"heldout_positions": int(sums["positions_d1"])}


def evaluate_feature_draft_only(s: TrainSettings) -> dict[str, float]:
    """`--eval-only` for a feature draft: held-out metrics of --init on the rows a training run with these
    data settings and --seed would have set aside (features cached in --output-dir)."""
    tokenizer = load_tokenizer(s.target)
    check_tokenizer_match(load_tokenizer(s.init), tokenizer, s.init, s.target)
    _, held = split_rows(load_training_data(s, tokenizer), s.eval_rows, s.seed, heldout_kind_set(s))
    target = load_hf_model(s.target, torch.float32, "cpu")
    net, head_list = load_feature_net(resolve_model_path(s.init), target)
    spans = windows(held, s.seq_len)
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    features, starts = cached_features(s.target, feature_target_loader(s.target), held.tokens, spans,
                                       s.batch_size, Path(s.output_dir) / ("heldout_" + FEATURE_CACHE),
                                       net.target_layers)
    head_ids = None if head_list is None else torch.tensor(head_list)
    return evaluate_features(net, target.lm_head.weight.detach(), head_ids, held.tokens, spans, features, starts,
                             s.batch_size, s.cls_weight) | {
        "heldout_coverage": heldout_coverage(held, load_draft_vocab(resolve_model_path(s.init)))}


def feature_net_to_train(s: TrainSettings, target, tokenizer, train_data, init: str | Path | None):
    """(net, vocabulary subset or None, coverage of the training tokens or None): continued from `init`
    (a checkpoint or --init, whose target layers it keeps), else a fresh one-layer net on the target's
    embedding and head that reads --target-layers."""
    layers = parse_target_layers(s.target_layers, target.config.num_hidden_layers)
    if init is not None:
        check_tokenizer_match(load_tokenizer(str(init)), tokenizer, str(init), s.target)
        net, _ = load_feature_net(init, target)
        if s.target_layers != TrainSettings.target_layers and layers != net.target_layers:
            last = target.config.num_hidden_layers
            if net.target_layers is None and layers is not None and last in layers:
                return widen_to_layers(net, layers, last), load_draft_vocab(str(init)), None
            raise UserError(f"--target-layers {s.target_layers!r} differs from the layers {init} reads "
                            f"({net.target_layers or 'last'}): a draft keeps the layers it was trained on, except "
                            "that a draft of the last layer can be widened to a choice that includes it "
                            "(e.g. low,mid,last)")
        return net, load_draft_vocab(str(init)), None
    vocab, coverage = choose_subset(s, tokenizer, train_data)
    head_list = vocab.draft_to_target if vocab is not None else None
    config = feature_config(target.config, s.num_layers or 1, s.intermediate_size, layers)
    net = FeatureDraftNet(config, target.get_input_embeddings().weight, head_weight(target, head_list))
    return net, vocab, coverage


def widen_to_layers(net: FeatureDraftNet, layers: tuple[int, ...], last: int) -> FeatureDraftNet:
    """A draft that reads the target's final hidden state (index `last`) as one that reads `layers`, which include
    it: `target_fc` starts as the plain selection of that state (identity on its block, zeros elsewhere), so the
    widened draft computes exactly what `net` computed, and training then teaches it to use the other layers.
    A fused-layer draft warm-started in minutes from a trained one, rather than trained from scratch."""
    config = copy.deepcopy(net.config)
    getattr(config, FEATURE_DRAFT_KEY)["target_layers"] = list(layers)
    wide = FeatureDraftNet(config, net.embed.weight, net.head.weight).to(net.fc.weight.dtype)
    missing, unexpected = wide.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("target_fc.") for k in missing), (missing, unexpected)
    d, block = config.hidden_size, layers.index(last)
    with torch.no_grad():
        wide.target_fc.weight.zero_()
        wide.target_fc.bias.zero_()
        wide.target_fc.weight[:, block * d:(block + 1) * d] = torch.eye(d, dtype=wide.target_fc.weight.dtype)
    return wide


def noise_scale(states: torch.Tensor, hidden_size: int, share: float) -> torch.Tensor:
    """[k * d] the noise std for each column of the states a draft reads ([..., k * d]): `share` of each layer's
    own std. Per layer, because the layers differ in scale by orders of magnitude (the residual stream after an
    early layer against the final normed state): one std over all of them drowns the small ones in noise."""
    per_layer = states.float().reshape(-1, states.shape[-1] // hidden_size, hidden_size).std(dim=(0, 2))
    return (share * per_layer).repeat_interleave(hidden_size)


def noisy_states(states: torch.Tensor, s: TrainSettings, step: int, noise_std: torch.Tensor) -> torch.Tensor:
    """The target's states [b, n, d or k * d] plus Gaussian noise of std `noise_std` [d or k * d] (`noise_scale`),
    drawn from the step's own generator so that a resumed run repeats them exactly."""
    step_rng = torch.Generator(device=states.device).manual_seed(s.seed * 1_000_003 + step)
    noise = noise_std.to(states.device) * torch.randn(states.shape, generator=step_rng, device=states.device)
    return states + noise.to(states.dtype)


def ttt_losses(net: FeatureDraftNet, predicted: torch.Tensor, final: torch.Tensor, valid: torch.Tensor,
               cls_weight: float) -> dict[str, torch.Tensor]:
    """feature_losses of every unrolled pass (`predicted` [K, b, n, d]; pass j counts positions t >= j),
    averaged with weights TTT_DECAY ** j; with K > 1 also each pass's own loss as `loss_pass<j>`."""
    total: dict[str, torch.Tensor] = {}
    passes: dict[str, torch.Tensor] = {}
    weights = 0.0
    for step, pred in enumerate(predicted):
        rows = valid.clone()
        rows[:, :step] = False
        if not bool(rows.any()):  # every row of the batch is shorter than the chain
            continue
        losses = feature_losses(net, pred, final, rows, cls_weight)
        weight = TTT_DECAY ** step
        weights += weight
        for key, value in losses.items():
            total[key] = total.get(key, 0.0) + weight * value
        if predicted.shape[0] > 1:
            passes[f"loss_pass{step}"] = losses["loss"].detach()
    return {key: value / weights for key, value in total.items()} | passes


def train_feature_draft(s: TrainSettings) -> dict[str, float]:
    """Train (or resume) a feature draft with TrainSettings `s`; returns the last held-out metrics."""
    validate(s)
    s = replace(s, ttt_steps=ttt_passes(s))  # the passes run, as train_settings.json records them
    accelerator = make_accelerator(s)
    torch.manual_seed(s.seed)
    out_dir = Path(s.output_dir)
    found = prepare_output_dir(s)
    tokenizer = load_tokenizer(s.target)
    train_data, held = split_rows(load_training_data(s, tokenizer), s.eval_rows, s.seed, heldout_kind_set(s))
    # features in FEATURE_DTYPE (that copy is loaded only if a feature cache misses); the full-precision head
    # and embedding come from a float32 copy
    target = load_hf_model(s.target, torch.float32, "cpu")
    net, vocab, coverage = feature_net_to_train(s, target, tokenizer, train_data, found[-1] if found else s.init)
    head_ids = torch.tensor(vocab.draft_to_target) if vocab is not None else None
    full_head = target.lm_head.weight.detach()
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = adamw(params, s, betas=(0.9, 0.95))
    # the stored float32 weights are the trainable ones only (strict=False: embedding and head are the target's)
    step, elapsed_before = restore_training_state(found[-1], net, optimizer, strict=False) if found else (0, 0.0)

    spans = windows(train_data, s.seq_len)
    held_spans = windows(held, s.seq_len)
    if not spans:
        raise UserError("the training data has no window with a label: use more or longer texts")
    load_target = feature_target_loader(s.target)
    layers = net.target_layers
    features, starts = cached_features(s.target, load_target, train_data.tokens, spans, s.batch_size,
                                       out_dir / FEATURE_CACHE, layers)
    held_features, held_starts = cached_features(s.target, load_target, held.tokens, held_spans, s.batch_size,
                                                 out_dir / ("heldout_" + FEATURE_CACHE), layers)
    del load_target
    hidden_size = net.config.hidden_size
    noise_std = noise_scale(split_states(features[:100_000], hidden_size)[1], hidden_size, s.feature_noise)
    net, optimizer = accelerator.prepare(net, optimizer)
    unwrapped = accelerator.unwrap_model(net)
    if accelerator.is_main_process:
        write_run_info(out_dir, s, {
            "train_rows": train_data.num_rows, "train_tokens": int(starts[-1]), "heldout_rows": held.num_rows,
            "heldout_tokens": int(held_starts[-1]), "vocab_coverage_train": coverage,
            "vocab_coverage_heldout": heldout_coverage(held, vocab), "noise_std": noise_std[::hidden_size].tolist(),
            "trained_parameters": sum(p.numel() for p in params)})

    def losses(mine: list[int], step: int) -> dict[str, torch.Tensor]:
        ids, feats, valid = (t.to(accelerator.device)
                             for t in feature_batch(train_data.tokens, spans, features, starts, mine))
        final, states = split_states(feats, hidden_size)
        with accelerator.autocast():
            predicted = net(ids, noisy_states(states, s, step, noise_std), s.ttt_steps)
        return ttt_losses(unwrapped, predicted, final, valid, s.cls_weight)

    hooks = LoopHooks(
        losses=losses,
        evaluate=lambda: evaluate_features(unwrapped, full_head, head_ids, held.tokens, held_spans, held_features,
                                           held_starts, s.batch_size, s.cls_weight),
        save=lambda folder: save_feature_folder(unwrapped, tokenizer, vocab, folder, s.save_dtype, asdict(s)),
        resume_weights=lambda: {k: v.detach().float() for k, v in unwrapped.trainable_state_dict().items()})
    return train_loop(s, accelerator, spans, step, elapsed_before, params, optimizer, hooks)
