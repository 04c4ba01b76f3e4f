"""Per-token forward cost of a draft against its target, measured side by side in one process
(`pretrain_draft_model.py --measure-cost DRAFT`)."""
from __future__ import annotations

import time

import numpy as np
import torch

from engine.linear_paths import KernelPlan
from utils.experiment import load_pair
from utils.gguf_weights import gguf_path_unavailable
from utils.models import is_feature_draft, resolve_model_path

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


def _cost_row(runtime: str, dtype: torch.dtype, ms: dict[str, float], context: int,
              kernel: str = "plain") -> dict[str, float | str]:
    return {"runtime": runtime, "dtype": str(dtype).removeprefix("torch."), "kernel": kernel,
            "target_ms": round(ms["target"], 3),
            "draft_ms": round(ms["draft"], 3), "ratio": round(ms["draft"] / ms["target"], 4),
            "threads": torch.get_num_threads(), "context": context}


def measure_cost(draft: str, target: str | None, context: int = 128, steps: int = 32,
                 repeats: int = 5) -> list[dict[str, float | str]]:
    """Per-token decode cost of draft and target in one process, float32 and bfloat16, and their ratio:
    through the suite's engine (what the decoder runs) with plain kernels, with both models on the GGUF block
    kernels where the target is a GGUF file and they build (what calibration picks on most CPUs), and for a
    token-level draft also through transformers (batch 1, KV cache)."""
    from transformers import AutoModelForCausalLM

    plans = [KernelPlan(torch.float32), KernelPlan(torch.bfloat16)]
    if gguf_path_unavailable(target) is None:
        plans.append(KernelPlan(torch.float32, "gguf"))
    rows = []
    for plan in plans:
        dtype = plan.dtype
        pair = load_pair(target, draft, True, dtype, "cpu", context + 8, plans=(plan, plan))
        models = {"target": pair.target, "draft": pair.draft}
        for m in models.values():
            engine_step_ms(m, context, 4, 1)  # warm-up
        ms = {name: engine_step_ms(m, context, steps, repeats) for name, m in models.items()}
        rows.append(_cost_row("engine", dtype, ms, context, plan.linear_path))
        if is_feature_draft(draft) or plan.linear_path != "plain":
            continue
        models = {name: AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=dtype).eval()
                  for name, spec in (("target", target), ("draft", draft))}
        for m in models.values():
            decode_step_ms(m, context, 4, 1)  # warm-up
        ms = {name: decode_step_ms(m, context, steps, repeats) for name, m in models.items()}
        rows.append(_cost_row("transformers", dtype, ms, context))
    return rows

