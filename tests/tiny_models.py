"""Tiny randomly initialised Llama-family models for unit tests (float32, CPU, no download)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.model import TreeModel


def tiny_llama(seed: int, vocab: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               tied: bool = False, logit_scale: float = 1.0) -> LlamaForCausalLM:
    """A random Llama; `logit_scale` sharpens (>1) or flattens (<1) its next-token distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                         tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    return model


def tree_model(hf_model: LlamaForCausalLM, max_len: int = 512) -> TreeModel:
    return TreeModel(hf_model, max_len)


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(hf_model: LlamaForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate (explicit attention mask: a prompt may contain the pad id)."""
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_tree_greedy_equals_autoregressive(target: TreeModel, draft: TreeModel, vocab: int) -> None:
    """A 2-ary depth-3 static tree's greedy output equals the target's own autoregressive output on two random
    prompts, and the draft did get tokens accepted (trees were really verified)."""
    from engine import growmap as G
    from engine.decoder import autoregressive_generate, speculative_generate
    from engine.drafters import StaticTreeDrafter
    from engine.sampling import Sampling

    greedy = Sampling(0.0, 1.0)
    drafter = StaticTreeDrafter(draft, G.kary_tree(2, 3), greedy, sample_children=False)
    for seed in (3, 4):
        prompt = random_prompt(17, vocab, seed=seed)
        reference = autoregressive_generate(target, prompt, 40, set(), greedy, torch.Generator())
        result = speculative_generate(target, drafter, prompt, 40, set(), greedy, "greedy", torch.Generator())
        assert result.output_ids == reference.output_ids
        assert len(result.accepted_per_step) < 40
