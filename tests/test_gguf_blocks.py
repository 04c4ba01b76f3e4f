"""The "gguf" linear path: GGUF Q4_1/Q8_0 blocks read as transformers reads them, found row by row under a
model's float32 linears, and the compiled kernel's products equal to the plain ones to rounding, each row's
result independent of the rows beside it, and greedy speculative output equal to the path's own
autoregressive output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from torch import nn

from engine.gguf_blocks import (BlockLinear, BlockWeight, FusedBlockLinear, dequantize, quantize_q8_0,
                                split_blocks)
from engine.linear_paths import apply_linear_path, plain_copy
from tests.tiny_models import assert_tree_greedy_equals_autoregressive, random_prompt, tiny_llama, tree_model
from utils import native_kernels
from utils.errors import UserError
from utils.gguf_weights import GgufBlocks, read_gguf_matrices

VOCAB = 128
FORMATS = ["Q4_1", "Q8_0"]



def small_tree(prefix: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(depths, token ids, mask) of a 5-node tree 0 -> {1, 2}, 1 -> 3, 2 -> 4 after `prefix` committed slots: each
    row sees the prefix, itself and its ancestors."""
    parents, depth = [-1, 0, 0, 1, 2], [0, 1, 1, 2, 2]
    tree_mask = torch.zeros(5, prefix + 5, dtype=torch.bool)
    tree_mask[:, :prefix] = True
    for i in range(5):
        j = i
        while j >= 0:
            tree_mask[i, prefix + j] = True
            j = parents[j]
    return depth, torch.tensor(random_prompt(5, VOCAB, seed=7)), tree_mask

def quantized(rows: int, width: int, fmt: str, seed: int = 0) -> tuple[torch.Tensor, BlockWeight]:
    """(gguf-py's dequantized float32 [rows, width], the same tensor as BlockWeight) of random weights."""
    values = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    raw = gguf_quantize(values, GGMLQuantizationType[fmt])
    reference = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType[fmt]).reshape(rows, width).copy())
    return reference, split_blocks(torch.from_numpy(raw.copy()), fmt)


def kernel():
    build = native_kernels.blocks_kernel()
    if build.matmul is None:
        pytest.skip(f"the gguf kernel cannot run here: {build.why}")
    return build.matmul


def quantize_linears(model: nn.Module, fmt: str = "Q4_1") -> GgufBlocks:
    """Quantize every linear of a tiny model in place (its weights become the dequantized values, as a GGUF
    target loaded by transformers), returning the blocks as a GGUF file would hold them."""
    tensors = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is nn.Linear:
                reference, blocks = quantized(module.out_features, module.in_features, fmt, seed=len(tensors))
                module.weight.copy_(reference)
                tensors[name] = blocks
    return GgufBlocks(tensors)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_equals_gguf_py_bit_for_bit(fmt):
    reference, blocks = quantized(7, 96, fmt)
    assert torch.equal(dequantize(blocks), reference)
    assert (blocks.out_features, blocks.in_features) == (7, 96)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_plain_and_each_row_is_independent_of_the_others(fmt):
    matmul = kernel()
    reference, blocks = quantized(13, 160, fmt)  # 13 rows: a group of 4 left incomplete
    linear = nn.Linear(160, 13, bias=False)
    linear.weight.data.copy_(reference)
    layer = BlockLinear(linear, blocks, matmul)
    x = torch.randn(8, 160, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together = layer(x)
        assert torch.allclose(together, x @ reference.T, atol=1e-4, rtol=1e-5)
        for rows in (1, 2, 3, 4, 5, 7):  # the 3-row tile, its remainder and the 1-row loop
            assert torch.equal(layer(x[:rows]), together[:rows])
        assert torch.equal(layer(x[5:6]), together[5:6])
        assert torch.equal(layer(x.reshape(2, 4, 160)).reshape(8, 13), together)
    with torch.enable_grad():  # autograd takes the plain path
        assert torch.allclose(layer(x), x @ reference.T, atol=1e-5)


def test_q8_0_quantizer_equals_gguf_py_bit_for_bit():
    values = np.random.default_rng(3).standard_normal((8, 96)).astype(np.float32)
    values[:, 32:64] *= 1e-3
    values[0, :32] = 0  # an all-zero block: scale 0, q 0
    values[1, 5] = 127.5 * values[1, :32].__abs__().max() / 127  # a half-way value: rounds away from zero
    ours = quantize_q8_0(torch.from_numpy(values))
    reference = split_blocks(torch.from_numpy(gguf_quantize(values, GGMLQuantizationType.Q8_0).copy()), "Q8_0")
    assert torch.equal(ours.scales, reference.scales) and torch.equal(ours.quants, reference.quants)


def test_find_rows_by_their_bits_permuted_subset_or_refused():
    reference, blocks = quantized(10, 64, "Q4_1")
    found = GgufBlocks({"w": blocks})
    permuted = torch.tensor([3, 1, 2, 0, 9, 8, 7, 6, 5, 4])
    assert found.find(reference).format == "Q4_1"
    assert torch.equal(dequantize(found.find(reference[permuted])), reference[permuted])
    assert torch.equal(dequantize(found.find(reference[[4, 2]])), reference[[4, 2]])
    changed = reference.clone()
    changed[3, 5] += 1e-3
    assert found.find(changed) is None
    assert found.find(reference.bfloat16()) is None
    assert found.find(torch.randn(10, 48)) is None  # a width with no blocks


def test_rows_sharing_their_first_and_last_block_are_told_apart():
    values = np.random.default_rng(5).standard_normal((3, 96)).astype(np.float32)
    values[1, :32], values[1, 64:] = values[0, :32], values[0, 64:]  # rows 0 and 1 differ only in the middle
    raw = gguf_quantize(values, GGMLQuantizationType.Q8_0)
    blocks = split_blocks(torch.from_numpy(raw.copy()), "Q8_0")
    reference = dequantize(blocks)
    found = GgufBlocks({"w": blocks})
    for order in ([1, 0, 2], [0, 1], [1]):
        assert torch.equal(dequantize(found.find(reference[order])), reference[order])


def test_gguf_path_logits_and_greedy_speculative_equal_its_reference():
    matmul = kernel()
    target_hf = tiny_llama(seed=0, vocab=VOCAB, tied=True)
    draft_hf = tiny_llama(seed=1, vocab=VOCAB, layers=1)
    target_blocks, draft_blocks = quantize_linears(target_hf), quantize_linears(draft_hf, "Q8_0")
    plain = tree_model(plain_copy(target_hf))
    assert apply_linear_path(target_hf, "gguf", (target_blocks.linears_found(target_hf), matmul)) == 2 * 7 + 1
    assert sum(isinstance(m, BlockLinear) for m in target_hf.modules()) == 2 * 7 + 1
    apply_linear_path(draft_hf, "gguf", (draft_blocks.linears_found(draft_hf), matmul))
    target, draft = tree_model(target_hf), tree_model(draft_hf)
    prompt = torch.tensor(random_prompt(12, VOCAB, seed=1))
    slots = torch.arange(12)
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.allclose(target.forward(prompt, slots, slots, mask), plain.forward(prompt, slots, slots, mask),
                          atol=1e-4)
    assert_tree_greedy_equals_autoregressive(target, draft, VOCAB)


def test_fused_projections_give_the_same_bits_and_leave_the_plain_twin():
    matmul = kernel()
    model = tiny_llama(seed=0, vocab=VOCAB)
    blocks = quantize_linears(model)
    apply_linear_path(model, "gguf", (blocks.linears_found(model), matmul))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_fused, FusedBlockLinear) and isinstance(mlp.gate_up_fused, FusedBlockLinear)
    shared = attn.qkv_fused.blocks.quants.untyped_storage().data_ptr()  # the separate layers read views of it
    assert attn.k_proj.blocks.quants.untyped_storage().data_ptr() == shared
    fused = tree_model(model)
    prompt = torch.tensor(random_prompt(9, VOCAB, seed=2))
    slots = torch.arange(9)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    with_fusion = fused.forward(prompt, slots, slots, mask)
    twin = plain_copy(model)
    assert not any(isinstance(m, (FusedBlockLinear, BlockLinear)) for m in twin.modules())
    for layer in model.model.layers:  # the same layers one projection at a time
        del layer.self_attn.qkv_fused, layer.mlp.gate_up_fused
    separate = tree_model(model)
    assert torch.equal(separate.forward(prompt, slots, slots, mask), with_fusion)


def native_pair(fmt: str = "Q4_1"):
    """(a tiny target on the gguf path through engine/llama_layer.c, the same model through torch's ops)."""
    matmul = kernel()
    model = tiny_llama(seed=0, vocab=VOCAB, tied=True)
    apply_linear_path(model, "gguf", (quantize_linears(model, fmt).linears_found(model), matmul))
    native, torch_ops = tree_model(model), tree_model(model)
    native.layer_step = native_kernels.native_layer_step(native.layers, native.num_heads, native.kv_heads,
                                                         native.head_dim)
    assert native.layer_step is not None
    return native, torch_ops


@pytest.mark.parametrize("fmt", FORMATS)
def test_native_layers_agree_with_torch_ops_cache_and_hidden_layers_included(fmt):
    native, torch_ops = native_pair(fmt)
    prompt = torch.tensor(random_prompt(20, VOCAB, seed=5))
    slots = torch.arange(20)
    mask = torch.ones(20, 20, dtype=torch.bool).tril()
    logits, states = native.forward(prompt, slots, slots, mask, return_hidden=True, hidden_layers=(0, 1, 2))
    ref_logits, ref_states = torch_ops.forward(prompt, slots, slots, mask, return_hidden=True, hidden_layers=(0, 1, 2))
    def close(a, b):  # to float32 rounding of the largest value (random 4-bit weights make states of ~1e3)
        return (a - b).abs().max() <= 1e-5 * b.abs().max()

    assert close(logits, ref_logits) and close(states, ref_states)
    assert close(native.cache.keys[:, :, :20], torch_ops.cache.keys[:, :, :20])
    assert close(native.cache.values[:, :, :20], torch_ops.cache.values[:, :, :20])
    assert not torch.equal(logits, ref_logits)  # really another implementation


def test_native_tree_rows_equal_one_token_steps_bit_for_bit_and_greedy_is_exact():
    native, _ = native_pair()
    prompt = torch.tensor(random_prompt(10, VOCAB, seed=6))
    prefix_mask = torch.ones(10, 10, dtype=torch.bool).tril()

    def prefill():
        native.forward(prompt, torch.arange(10), torch.arange(10), prefix_mask)

    # tree after the prompt: 0 -> {1, 2}, 1 -> 3, 2 -> 4; stale garbage in slots between keys must not matter
    depth, nodes, tree_mask = small_tree(prefix=10)
    prefill()
    tree = native.forward(nodes, torch.tensor(depth) + 10, torch.arange(10, 15), tree_mask)
    for path in ([0, 1, 3], [0, 2, 4]):
        prefill()
        for step, node in enumerate(path):
            one = native.forward(nodes[node:node + 1], torch.tensor([10 + step]), torch.tensor([10 + step]),
                                 torch.ones(1, 11 + step, dtype=torch.bool))
        assert torch.equal(one[0], tree[path[-1]])
    draft_hf = tiny_llama(seed=1, vocab=VOCAB, layers=1)
    quantize_linears(draft_hf, "Q8_0")  # the same random values as the target's first layer: tokens get accepted
    assert_tree_greedy_equals_autoregressive(native, tree_model(draft_hf), VOCAB)


def test_native_layers_refuse_layers_off_the_blocks():
    kernel()
    model = tiny_llama(seed=0, vocab=VOCAB)
    plain = tree_model(model)
    assert native_kernels.native_layer_step(plain.layers, plain.num_heads, plain.kv_heads, plain.head_dim) is None


def test_native_layer_refuses_slots_and_masks_outside_its_cache_and_keeps_nan():
    """A KV slot or a mask longer than the cache is a ValueError with nothing written (the C code would
    otherwise write or read past the layer's cache); a NaN stays NaN as in torch's ops."""
    native, _ = native_pair()
    rows, max_len = 2, native.cache.max_len
    hidden = torch.randn(rows, native.layers[0].input_layernorm.weight.shape[0])
    cos, sin = torch.ones(rows, native.head_dim), torch.zeros(rows, native.head_dim)
    cache_before = native.cache.keys.clone()
    for slots, width in (([0, max_len], 2), ([-1, 0], 2), ([0, 1], max_len + 8)):
        mask = torch.ones(rows, width, dtype=torch.bool)
        with pytest.raises(ValueError, match="KV slot or the mask"):
            native.layer_step(0, hidden.clone(), cos, sin, torch.tensor(slots), mask, native.cache)
    assert torch.equal(native.cache.keys, cache_before)
    with pytest.raises(ValueError, match="unexpected shape"):
        native.layer_step(0, hidden.clone(), cos[:1], sin[:1], torch.tensor([0, 1]),
                          torch.ones(rows, 2, dtype=torch.bool), native.cache)
    poisoned = hidden.clone()
    poisoned[0, 0] = float("nan")
    native.layer_step(0, poisoned, cos, sin, torch.tensor([0, 1]), torch.ones(rows, 2, dtype=torch.bool).tril(),
                      native.cache)
    assert torch.isnan(poisoned).all()  # row 0's NaN reaches every value of both rows, as in torch


def test_native_layers_leave_shapes_they_do_not_take_to_torch():
    kernel()
    model = tiny_llama(seed=0, vocab=VOCAB)
    apply_linear_path(model, "gguf", (quantize_linears(model).linears_found(model), kernel()))
    tree = tree_model(model)
    assert native_kernels.native_layer_step(tree.layers, tree.num_heads, tree.kv_heads, tree.head_dim) is not None
    for heads, kv_heads, head_dim in ((tree.num_heads, tree.num_heads + 1, tree.head_dim),   # kv > heads
                                      (tree.num_heads, tree.kv_heads, 4)):                    # head_dim % 8
        assert native_kernels.native_layer_step(tree.layers, heads, kv_heads, head_dim) is None


def test_gguf_path_needs_its_blocks_and_float32():
    model = tiny_llama(seed=0, vocab=VOCAB)
    with pytest.raises(ValueError, match="needs the layers' GGUF blocks"):
        apply_linear_path(model, "gguf")
    with pytest.raises(ValueError, match="cannot run"):
        apply_linear_path(model.to(torch.bfloat16), "gguf", ({}, None))


def test_kernel_unavailable_says_why(monkeypatch):
    native_kernels.blocks_kernel.cache_clear()
    try:
        monkeypatch.setattr(native_kernels, "cpu_flags", lambda: {"sse2"})
        build = native_kernels.blocks_kernel()
        assert build.matmul is None and "avx2" in build.why
        native_kernels.blocks_kernel.cache_clear()
        monkeypatch.setattr(native_kernels, "cpu_flags", lambda: set(native_kernels.NEEDED_ISA))
        monkeypatch.setattr(native_kernels, "_compiler", lambda: None)
        assert "no C compiler" in native_kernels.blocks_kernel().why
    finally:
        native_kernels.blocks_kernel.cache_clear()


def test_header_reader_agrees_with_gguf_py(tmp_path):
    from gguf import GGUFReader, GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"] * 50)  # string arrays, as a tokenizer's
    writer.add_array("some.numbers", [1, 2, 3])
    writer.add_uint32("some.count", 7)
    expected = {}
    for name, fmt, shape in (("blk.0.attn_q.weight", "Q4_1", (5, 64)), ("token_embd.weight", "Q8_0", (3, 96))):
        values = np.random.default_rng(len(expected)).standard_normal(shape).astype(np.float32)
        raw = gguf_quantize(values, GGMLQuantizationType[fmt])
        writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[fmt])
        expected[name] = (fmt, raw)
    writer.add_tensor("norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    matrices = read_gguf_matrices(path)
    assert set(matrices) == set(expected)  # the 1-D float32 tensor is not a block matrix
    for tensor in GGUFReader(str(path)).tensors:
        if tensor.name in expected:
            assert matrices[tensor.name][0] == expected[tensor.name][0]
            assert np.array_equal(matrices[tensor.name][1], np.asarray(tensor.data))
            assert np.array_equal(matrices[tensor.name][1], expected[tensor.name][1])
    blocks = GgufBlocks.read(path)
    assert torch.equal(dequantize(blocks.tensors["token_embd.weight"]),
                       torch.from_numpy(gguf_dequantize(expected["token_embd.weight"][1],
                                                        GGMLQuantizationType.Q8_0).reshape(3, 96).copy()))


def test_not_a_gguf_file_is_a_user_error(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all, no")
    with pytest.raises(UserError, match="not a GGUF file"):
        read_gguf_matrices(path)
