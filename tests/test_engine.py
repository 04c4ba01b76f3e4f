"""Exactness of the engine: our forward equals transformers', and speculative greedy decoding equals the
target's own greedy decoding token for token (random draft, draft = target, several tree shapes)."""
from __future__ import annotations

import pytest
import torch

from engine import growmap as G
from engine.decoder import autoregressive_generate, check_capacity, speculative_generate
from engine.drafters import StaticTreeDrafter
from engine.kv_cache import KVCache
from engine.model import TreeModel
from engine.sampling import Sampling
from engine.tree_mask import ancestor_mask_from_parents, causal_mask, tree_attention_mask
from tests.tiny_models import hf_greedy, random_prompt, tiny_llama, tree_model
from utils.models import REPO_ROOT

VOCAB = 128
GREEDY = Sampling(0.0, 1.0)
SHAPES = {
    "chain": G.chain(5),
    "kary": G.kary_tree(3, 3),
    "bushy": G.load_growmap(REPO_ROOT / "growmaps" / "68m_7b-64.pt"),
}


@pytest.fixture(scope="module")
def target_hf():
    return tiny_llama(seed=0, vocab=VOCAB)


@pytest.fixture(scope="module")
def random_draft_hf():
    return tiny_llama(seed=1, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, tied=True)


def test_forward_matches_transformers_prefill_and_incremental(target_hf):
    model = tree_model(target_hf)
    ids = torch.tensor(random_prompt(24, VOCAB, seed=5))
    with torch.no_grad():
        expected = target_hf(ids[None]).logits[0]
    pos = torch.arange(16)
    first = model.forward(ids[:16], pos, pos, causal_mask(16, 0, "cpu"))
    rest_pos = torch.arange(16, 24)
    rest = model.forward(ids[16:], rest_pos, rest_pos, causal_mask(8, 16, "cpu"))
    torch.testing.assert_close(torch.cat([first, rest]), expected, rtol=1e-5, atol=1e-5)


def test_autoregressive_matches_transformers_generate(target_hf):
    prompt = random_prompt(20, VOCAB, seed=3)
    ours = autoregressive_generate(tree_model(target_hf), prompt, 40, set(), GREEDY, torch.Generator())
    assert ours.output_ids == hf_greedy(target_hf, prompt, 40)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("draft_kind", ["random", "same"])
def test_speculative_greedy_is_exact(target_hf, random_draft_hf, shape, draft_kind):
    growmap = SHAPES[shape]
    target = tree_model(target_hf)
    draft = tree_model(target_hf if draft_kind == "same" else random_draft_hf)
    drafter = StaticTreeDrafter(draft, growmap, GREEDY, sample_children=False)
    for seed in (3, 4):
        prompt = random_prompt(17, VOCAB, seed=seed)
        expected = hf_greedy(target_hf, prompt, 48)
        reference = autoregressive_generate(target, prompt, 48, set(), GREEDY, torch.Generator())
        result = speculative_generate(target, drafter, prompt, 48, set(), GREEDY, "greedy", torch.Generator())
        assert reference.output_ids == expected
        assert result.output_ids == expected
        if draft_kind == "same":
            # the whole first-child path plus the bonus token, every step but the (truncated) last
            full = growmap.first_child_path_len() + 1
            assert result.accepted_per_step[:-1] == [full] * (len(result.accepted_per_step) - 1)
        else:
            assert sum(result.accepted_per_step) == 48


def test_random_draft_is_nearly_always_rejected(target_hf, random_draft_hf):
    drafter = StaticTreeDrafter(tree_model(random_draft_hf), SHAPES["kary"], GREEDY, sample_children=False)
    result = speculative_generate(tree_model(target_hf), drafter, random_prompt(10, VOCAB, 9), 60, set(),
                                  GREEDY, "greedy", torch.Generator())
    assert result.target_steps > 40  # mostly one token (the bonus) per step


def test_eos_stops_generation(target_hf):
    prompt = random_prompt(12, VOCAB, seed=11)
    free = autoregressive_generate(tree_model(target_hf), prompt, 30, set(), GREEDY, torch.Generator()).output_ids
    eos = free[7]
    stop = free.index(eos) + 1
    drafter = StaticTreeDrafter(tree_model(target_hf), SHAPES["bushy"], GREEDY, sample_children=False)
    spec = speculative_generate(tree_model(target_hf), drafter, prompt, 30, {eos}, GREEDY, "greedy", torch.Generator())
    ar = autoregressive_generate(tree_model(target_hf), prompt, 30, {eos}, GREEDY, torch.Generator())
    assert spec.output_ids == ar.output_ids == free[:stop]


def test_subset_vocabulary_draft_is_exact(target_hf):
    """A draft over a vocabulary subset (cheap LM head) proposes only mapped ids; output stays exact."""
    subset = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:48]
    draft_hf = tiny_llama(seed=2, vocab=48, hidden=32, layers=1, heads=2, kv_heads=1)
    input_map = torch.zeros(VOCAB, dtype=torch.long)
    input_map[subset] = torch.arange(48)
    draft = TreeModel(draft_hf, 512, input_map=input_map, output_ids=subset)
    drafter = StaticTreeDrafter(draft, SHAPES["kary"], GREEDY, sample_children=False)
    prompt = random_prompt(15, VOCAB, seed=21)
    tree = drafter.propose(torch.tensor(prompt), torch.Generator())
    assert set(tree.tokens[1:].tolist()) <= set(subset.tolist())
    drafter.reset()
    result = speculative_generate(tree_model(target_hf), drafter, prompt, 40, set(), GREEDY, "greedy", torch.Generator())
    assert result.output_ids == hf_greedy(target_hf, prompt, 40)


def test_capacity_check(target_hf):
    with pytest.raises(ValueError, match="KV cache holds 64"):
        check_capacity(tree_model(target_hf, max_len=64), 40, 20, 16)


def test_ancestor_mask_matches_definition():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 40):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
        mask = ancestor_mask_from_parents(torch.tensor(parents))
        for i in range(n):
            chain, node = set(), i
            while node != -1:
                chain.add(node)
                node = parents[node]
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == chain


def test_tree_attention_mask_sees_prefix_and_ancestors():
    tree = G.kary_tree(2, 2)
    rows = torch.tensor([3, 6])
    mask = tree_attention_mask(tree.mask, rows, prefix_len=5)
    assert mask.shape == (2, 5 + tree.size)
    assert mask[:, :5].all()
    assert torch.equal(mask[:, 5:], tree.mask[rows])
    assert mask[0, 5 + 0] and mask[0, 5 + 1] and mask[0, 5 + 3] and not mask[0, 5 + 2]


def test_kv_cache_keep_compacts_onto_path():
    cache = KVCache(num_layers=2, kv_heads=1, max_len=12, head_dim=2, dtype=torch.float32, device="cpu")
    values = torch.arange(12, dtype=torch.float32)[None, :, None].expand(1, 12, 2)
    for layer in range(2):
        cache.write(layer, torch.arange(12), values, values + 100)
    cache.keep(torch.tensor([4, 6, 9]), dst_start=4)
    keys, vals = cache.read(1, 7)
    assert keys[0, :, 0].tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert vals[0, :, 0].tolist() == [100, 101, 102, 103, 104, 106, 109]
