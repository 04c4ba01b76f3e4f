"""Continuously batched decoding of many sequences in one cache (engine/packed_decoding.py), the users mix's
sources (utils/training/user_sources.py) and the held-out split by kind."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.packed_decoding import decode_packed, lane_mask
from tests.test_gguf_blocks import VOCAB, native_pair
from tests.tiny_models import hf_greedy, random_prompt, tiny_llama, tree_model
from utils.errors import UserError
from utils.training import user_sources
from utils.training.distill_data import DistillData
from utils.training.training_data import split_rows


def prompts_of(lengths: list[int]) -> list[list[int]]:
    return [random_prompt(n, VOCAB, seed=10 + i) for i, n in enumerate(lengths)]


def test_lane_mask_sees_own_lane_up_to_itself():
    mask = lane_mask(torch.tensor([0, 8, 8]), torch.tensor([2, 0, 3]), 16)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[1].nonzero().flatten().tolist() == [8]
    assert mask[2].nonzero().flatten().tolist() == [8, 9, 10, 11]


def test_packed_greedy_rows_equal_each_sequence_alone_bit_for_bit_on_native_layers():
    native, _ = native_pair()
    prompts = prompts_of([5, 9, 3, 12, 7, 4, 10])
    temps = [0.0, 1.0, 0.0, 0.7, 0.0, 0.0, 1.0]  # sampled rows beside greedy ones, fewer lanes than prompts
    gen = torch.Generator().manual_seed(0)
    packed = decode_packed(native, prompts, temps, 11, set(), 5, gen, lanes=3, max_prefill_rows=16)
    for i, prompt in enumerate(prompts):
        if temps[i] == 0:
            alone = decode_packed(native, [prompt], [0.0], 11, set(), 5, gen, lanes=1)[0]
            assert packed[i].tokens == alone.tokens
            assert all(np.array_equal(a, b) for a, b in zip(packed[i].topk_logprobs, alone.topk_logprobs))
        assert len(packed[i].tokens) == 11 and not packed[i].finished


def test_packed_greedy_equals_transformers_generate_and_keeps_its_top_k():
    hf = tiny_llama(seed=3, vocab=VOCAB, logit_scale=4.0)
    model = tree_model(hf, max_len=256)
    prompts = prompts_of([6, 3, 8, 5])
    out = decode_packed(model, prompts, [0.0] * 4, 9, set(), 4, torch.Generator().manual_seed(0), lanes=2)
    for prompt, decoded in zip(prompts, out):
        assert decoded.tokens == hf_greedy(hf, prompt, 9)
        ids = torch.tensor([prompt + decoded.tokens[:1]])
        logprobs = torch.log_softmax(hf(ids).logits[0, -1].float(), -1)
        top = logprobs.topk(4)
        assert decoded.topk_ids[1].tolist() == top.indices.tolist()
        assert np.allclose(decoded.topk_logprobs[1].astype(np.float32), top.values.detach().numpy(), atol=2e-2)


def test_stop_token_ends_a_sequence_and_frees_its_lane():
    hf = tiny_llama(seed=3, vocab=VOCAB, logit_scale=4.0)
    model = tree_model(hf, max_len=128)
    prompts = prompts_of([4, 4, 4])
    free = decode_packed(model, prompts, [0.0] * 3, 8, set(), 2, torch.Generator().manual_seed(0), lanes=1)
    stop = free[0].tokens[2]
    out = decode_packed(model, prompts, [0.0] * 3, 8, {stop}, 2, torch.Generator().manual_seed(0), lanes=1)
    assert out[0].finished and out[0].tokens == free[0].tokens[:free[0].tokens.index(stop) + 1]
    for a, b in zip(out[1:], free[1:]):  # the next prompts took the freed lane and decoded as before
        cut = b.tokens.index(stop) + 1 if stop in b.tokens else len(b.tokens)
        assert a.tokens == b.tokens[:cut]


def test_a_lane_longer_than_the_cache_is_refused():
    model = tree_model(tiny_llama(seed=0, vocab=VOCAB), max_len=16)
    with pytest.raises(ValueError, match="cache"):
        decode_packed(model, prompts_of([10]), [0.0], 8, set(), 2, torch.Generator())


def test_wikitext_is_cleaned_to_prose():
    raw = ("{{Infobox|name=x}}'''Anarchism''' is a [[political philosophy]] of [[self-governance|self-governed]] "
           "societies.<ref>A book</ref>\n== History ==\n[[File:A.png|thumb|a [[b]] c]]\n* a list item\n"
           "It began &quot;early&quot;.")
    assert user_sources.clean_wikitext(raw) == ("Anarchism is a political philosophy of self-governed societies."
                                                "\n\nHistory\n\nIt began \"early\".")


def test_opening_ends_at_a_sentence_and_comes_from_the_text():
    text = "First sentence here. Second one follows! Third? " * 20
    rng = random.Random(0)
    for _ in range(20):
        cut = user_sources.opening(text, rng, min_chars=30, max_chars=120)
        assert cut[-1] in ".!?" and cut in text and len(cut) >= 30


def test_items_only_of_the_weighted_kinds_and_missing_sources_are_named(monkeypatch):
    weights, _ = user_sources.available_kinds(("builtin-news", "builtin-chat", "math"))
    items = user_sources.draw_items(random.Random(1), 30, weights, ["volcanoes"])
    assert {item.kind for item in items} <= set(weights) and len({item.kind for item in items}) == 3
    for item in items:
        style = user_sources.style_of(item.kind)
        assert (style == "text") == bool(item.text) and (style == "chat") == bool(item.turns)
        assert (style == "selfq") == ("volcanoes" in item.instruction)
    monkeypatch.setattr(user_sources, "_gensim_data", lambda: None)
    user_sources._material.cache_clear()
    weights, missing = user_sources.available_kinds(("news", "technical"))
    user_sources._material.cache_clear()
    assert list(weights) == ["technical"] and "pip install --no-deps gensim" in missing["news"]


def kinds_data(kinds: list[str]) -> DistillData:
    lengths = np.full(len(kinds), 4)
    n = int(lengths.sum())
    empty = np.zeros((n, 0), dtype=np.int32)
    return DistillData(np.arange(n, dtype=np.int32), np.concatenate([[0], np.cumsum(lengths)]),
                       np.ones(n, dtype=bool), empty, empty.astype(np.float16), np.zeros(len(kinds), dtype=bool),
                       np.array(kinds, dtype="<U16"))


def test_heldout_kinds_are_never_trained_on():
    data = kinds_data(["news", "math", "roleplay", "news", "roleplay", "extraction", "math", "roleplay"])
    train, held = split_rows(data, eval_rows=2, seed=0, heldout_kinds={"roleplay", "extraction"})
    assert sorted(train.kinds.tolist()) == ["math", "math", "news", "news"]
    assert held.num_rows == 2 and set(held.kinds.tolist()) <= {"roleplay", "extraction"}
    with pytest.raises(UserError, match="no row of these kinds"):
        split_rows(data, 2, 0, {"coding"})
    with pytest.raises(UserError, match="record their kind"):
        split_rows(DistillData(data.tokens, data.offsets, data.teacher, data.topk_ids, data.topk_logprobs), 2, 0,
                   {"news"})


def test_a_mix_keeps_its_own_generation_settings_unless_a_flag_changes_them():
    """`--distill-mix users` must find the cache the users mix wrote: the --distill-* flags left at their defaults
    do not replace its float32 dtype, lengths or batch size (they did once, and training regenerated the data)."""
    from dataclasses import replace

    from utils.training.distill_data import DISTILL_MIXES
    from utils.training.settings import TrainSettings, distill_settings

    defaults = TrainSettings()
    assert distill_settings(defaults, "users") == DISTILL_MIXES["users"]
    assert distill_settings(defaults, "chat") == DISTILL_MIXES["chat"]
    changed = distill_settings(replace(defaults, distill_dtype="float16", distill_max_new_tokens=64), "users")
    assert (changed.dtype, changed.max_new_tokens) == ("float16", 64)
    assert changed.batch_size == DISTILL_MIXES["users"].batch_size
