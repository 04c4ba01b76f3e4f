"""Each optional linear-layer kernel path (engine/linear_paths.py) against the plain one: same logits to
rounding, and greedy speculative output equal to the autoregressive reference on the same path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.linear_paths import GGUF_PATHS, LINEAR_PATHS, OneDNNLinear, apply_linear_path, path_available, plain_copy
from tests.tiny_models import assert_tree_greedy_equals_autoregressive, random_prompt, tiny_llama, tree_model

VOCAB = 128
# the GGUF block paths need a GGUF file: tests/test_gguf_blocks.py, tests/test_q8_activations.py
OPTIONAL = [path for path in LINEAR_PATHS if path != "plain" and path not in GGUF_PATHS]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _available(path: str, dtype: torch.dtype) -> None:
    if not path_available(path, dtype, "cpu"):
        pytest.skip(f"{path} cannot run {dtype} on this CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", OPTIONAL)
def test_path_logits_equal_plain(path, dtype):
    _available(path, dtype)
    plain = tree_model(tiny_llama(seed=0, vocab=VOCAB, tied=True).to(dtype))
    packed_hf = tiny_llama(seed=0, vocab=VOCAB, tied=True).to(dtype)
    swapped = apply_linear_path(packed_hf, path)
    assert swapped == 2 * 7 + 1  # seven linears per layer and the (tied) head
    packed = tree_model(packed_hf)
    prompt = torch.tensor(random_prompt(12, VOCAB, seed=1))
    for rows in (1, 2, 5):  # one row (GEMV) and several (GEMM) take different kernels
        ids, slots = prompt[:rows], torch.arange(rows)
        mask = torch.ones(rows, rows, dtype=torch.bool).tril()
        expected = plain.forward(ids, slots, slots, mask)
        got = packed.forward(ids, slots, slots, mask)
        scale = expected.abs().max()
        assert (got - expected).abs().max() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("path", OPTIONAL)
def test_path_greedy_speculative_equals_its_autoregressive_reference(path):
    _available(path, torch.float32)
    target_hf, draft_hf = tiny_llama(seed=0, vocab=VOCAB), tiny_llama(seed=1, vocab=VOCAB, layers=1)
    for model in (target_hf, draft_hf):
        apply_linear_path(model, path)
    assert_tree_greedy_equals_autoregressive(tree_model(target_hf), tree_model(draft_hf), VOCAB)


@pytest.mark.parametrize("path", OPTIONAL)
def test_plain_copy_shares_weights_and_runs_plain_kernels(path):
    _available(path, torch.float32)
    model = tiny_llama(seed=0, vocab=VOCAB)
    apply_linear_path(model, path)
    twin = plain_copy(model)
    assert not any(isinstance(m, OneDNNLinear) for m in twin.modules())
    assert any(isinstance(m, OneDNNLinear) for m in model.modules())
    assert twin.lm_head.weight is model.lm_head.weight
    ids = torch.tensor([random_prompt(9, VOCAB, seed=2)])
    with torch.inference_mode():
        assert torch.allclose(twin(ids).logits, model(ids).logits, atol=1e-4)


def test_unknown_or_unavailable_path_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown"):
        apply_linear_path(model, "magic")
    assert apply_linear_path(model, "plain") == 0
    assert not path_available("onednn", torch.float16, "cpu")
