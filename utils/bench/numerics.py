"""What the q8 path (8-bit activations, llama.cpp's numerics; lossy) costs against the float32 model, on the same
prompts and held-out text, both on the target's GGUF blocks:

- greedy outputs of both paths: share of output tokens equal to float32 greedy (position by position), outputs
  identical, and the mean log-likelihood per token of each path's outputs under the float32 target;
- perplexity of held-out text (plain text, not generated) under both paths.

    python -m utils.bench.numerics --end 10 --max-new-tokens 96

Prints one JSON object (and writes it with --out). docs/q8_activations.md keeps the figures.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from engine.decoder import autoregressive_generate
from engine.linear_paths import KernelPlan
from engine.model import TreeModel
from engine.sampling import Sampling
from utils.data import BUILTIN_NAME, load_prompts, load_texts
from utils.experiment import mean_log_likelihood, token_log_likelihoods


def compare_outputs(reference: list[int], other: list[int]) -> tuple[int, int]:
    """(positions where both have a token and they agree, positions of the reference)."""
    return sum(a == b for a, b in zip(reference, other)), len(reference)


def measure(models: dict[str, TreeModel], prompts: list[list[int]], heldout: list[list[int]], max_new: int,
            eos: set[int]) -> dict:
    """The figures of the module docstring; `models` = {"float32": ..., "q8": ...}."""
    greedy, generator = Sampling(), torch.Generator()
    equal = total = identical = 0
    loglik = {name: [] for name in models}
    for ids in prompts:
        outputs = {name: autoregressive_generate(model, ids, max_new, eos, greedy, generator).output_ids
                   for name, model in models.items()}
        same, count = compare_outputs(outputs["float32"], outputs["q8"])
        equal, total = equal + same, total + count
        identical += outputs["float32"] == outputs["q8"]
        for name, out in outputs.items():
            if out:
                loglik[name].append(token_log_likelihoods(models["float32"], ids, out))
    nll = {name: [-mean_log_likelihood(model, ids[:1], ids[1:]) for ids in heldout] for name, model in models.items()}
    return {"prompts": len(prompts), "max_new_tokens": max_new,
            "share_of_tokens_equal_to_float32": round(equal / max(total, 1), 4),
            "identical_outputs": identical,
            "mean_loglik_under_float32": {name: round(float(torch.cat(v).mean()), 4) for name, v in loglik.items()},
            "heldout_texts": len(heldout),
            "heldout_perplexity": {name: round(math.exp(sum(v) / len(v)), 4) for name, v in nll.items()},
            "q8_numerics": KernelPlan(torch.float32, "q8").numerics}


def main(argv: list[str] | None = None) -> None:
    from utils.cli import quiet_transformers
    from utils.experiment import load_pair
    from utils.report import emit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="a GGUF target (default: the suite's own)")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=10, help="built-in prompts [start, end) to decode")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--heldout-start", type=int, default=60, help="built-in rows whose text is scored")
    parser.add_argument("--heldout-end", type=int, default=72)
    parser.add_argument("--heldout-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_transformers()
    max_len = max(args.prompt_len + args.max_new_tokens, args.heldout_tokens) + 8
    models, tokenizer, eos = {}, None, set()
    for name, path in (("float32", "gguf"), ("q8", "q8")):
        plan = KernelPlan(torch.float32, path)
        pair = load_pair(args.target, None, False, torch.float32, "cpu", max_len, tokenizer=tokenizer,
                         plans=(plan, plan))
        models[name], tokenizer, eos = pair.target, pair.tokenizer, pair.eos_ids
    prompts = [p.ids for p in load_prompts(BUILTIN_NAME, tokenizer, args.start, args.end, args.prompt_len)]
    heldout = [tokenizer(text, add_special_tokens=False)["input_ids"][:args.heldout_tokens]
               for _, text in load_texts(BUILTIN_NAME, args.heldout_start, args.heldout_end)]
    result = measure(models, prompts, [ids for ids in heldout if len(ids) > 1], args.max_new_tokens, eos)
    text = json.dumps(result, indent=1)
    emit(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
