"""The "q8" linear path: the target's GGUF blocks with activations quantized to 8 bits (llama.cpp's numerics).
Lossy against float32 by design; what must hold is its own arithmetic (a reference in torch, to float32
rounding), batch invariance (a row's result never depends on the rows beside it, so tree greedy == autoregressive
greedy and the KV cache a tree writes == the one-token steps'), and the same bits from every ISA build."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.gguf_blocks import BLOCK, PACK_ROWS, Q8_PACKED, BlockLinear, BlockWeight, pack_columns
from engine.linear_paths import apply_linear_path
from tests.test_gguf_blocks import FORMATS, VOCAB, kernel, quantize_linears, quantized, small_tree
from tests.tiny_models import assert_tree_greedy_equals_autoregressive, random_prompt, tiny_llama, tree_model
from utils import native_kernels


def q8_reference(x: torch.Tensor, weight: BlockWeight) -> torch.Tensor:
    """x [M, K] @ W^T as the q8 kernel defines it, in float64 torch: rows quantized per block of 32 (scale
    max|x| / 127, round half to even), integer block products, times the two scales (plus min * scale * sum(q)
    for Q4_1)."""
    rows, blocks = weight.scales.shape
    xb = x.double().reshape(x.shape[0], blocks, BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    qx = torch.round(xb * torch.where(amax == 0, 0, 127 / amax)).double()
    dx = (amax / 127)[..., 0]
    if weight.format == "Q4_1":
        packed = weight.quants.reshape(rows, blocks, 16)
        qw = torch.cat([packed & 0x0F, packed >> 4], dim=-1).double()
    else:
        qw = weight.quants.reshape(rows, blocks, BLOCK).view(torch.int8).double()
    dots = torch.einsum("mbk,nbk->mnb", qx, qw)
    out = (dots * dx[:, None, :] * weight.scales.double()[None]).sum(-1)
    if weight.format == "Q4_1":
        out += (weight.mins.double()[None] * (dx * qx.sum(-1))[:, None, :]).sum(-1)
    return out


def q8_layer(fmt: str, rows: int = 13, width: int = 160) -> tuple[BlockLinear, torch.Tensor, BlockWeight]:
    reference, blocks = quantized(rows, width, fmt)
    linear = nn.Linear(width, rows, bias=False)
    linear.weight.data.copy_(reference)
    return BlockLinear(linear, blocks, kernel(), q8=True), reference, blocks


def isas() -> list[str]:
    flags = native_kernels._cpuinfo_flags()
    return [name for name, (_, needed) in native_kernels.Q8_ISAS.items() if set(needed) <= flags]


@pytest.mark.parametrize("rows", [13, 48])  # 13: unpacked on each call; 48: pack_columns' layout, 3 groups
@pytest.mark.parametrize("fmt", FORMATS)
def test_q8_kernel_is_its_reference_and_rows_are_independent(fmt, rows):
    layer, reference, blocks = q8_layer(fmt, rows=rows)
    assert bool(layer.kernel_id & Q8_PACKED) == (rows % PACK_ROWS == 0)
    x = torch.randn(40, 160, generator=torch.Generator().manual_seed(1))  # > 32 rows: quantized once, shared
    x[3, :32] = 0  # an all-zero block: scale 0
    with torch.inference_mode():
        together = layer(x)
        expected = q8_reference(x, blocks)
        assert (together.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert not torch.allclose(together, x @ reference.T, atol=1e-4, rtol=1e-5)  # lossy: really 8-bit
        assert torch.allclose(together, x @ reference.T, atol=0.05 * float((x @ reference.T).abs().max()))
        for count in (1, 2, 3, 5, 8, 32):  # tiles of 4, 2 and 1 rows; each thread quantizes them itself
            assert torch.equal(layer(x[:count]), together[:count])
        assert torch.equal(layer(x[6:7]), together[6:7])


@pytest.mark.parametrize("rows", [37, 48])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_isa_gives_the_same_bits(fmt, rows, monkeypatch):
    available = isas()
    if len(available) < 2:
        pytest.skip(f"this CPU runs one q8 ISA build only ({available})")
    layer, _, _ = q8_layer(fmt, rows=rows, width=576)
    x = torch.randn(7, 576, generator=torch.Generator().manual_seed(2)) * 3
    outputs = []
    for name in available:
        monkeypatch.setenv(native_kernels.Q8_ISA_ENV, name)
        with torch.inference_mode():
            outputs.append(layer(x))
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


def test_packed_and_unpacked_blocks_give_the_same_bits():
    layer, _, blocks = q8_layer("Q4_1", rows=32, width=576)
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(3))
    unpacked = torch.empty(6, 32)
    with torch.inference_mode():
        layer.matmul(layer.kernel_id - Q8_PACKED, x, blocks, unpacked)
        assert torch.equal(layer(x), unpacked)
    assert not torch.equal(layer.blocks.quants, blocks.quants)  # really reordered
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_columns(blocks.rows(torch.arange(20)))


def test_forcing_an_isa_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setenv(native_kernels.Q8_ISA_ENV, "avx_vnni")
    with pytest.raises(ValueError, match="TREESPEC_Q8_ISA"):
        native_kernels.q8_isa({"avx2", "fma"})
    monkeypatch.delenv(native_kernels.Q8_ISA_ENV)
    assert native_kernels.q8_isa({"avx2", "fma"}) == "avx2"
    assert native_kernels.q8_isa({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}) == "avx512_vnni"
    assert native_kernels.q8_isa({"avx2", "avx512_vnni", "avx512vl"}) == "avx2"  # no avx512bw: no 512-bit build
    assert native_kernels.q8_isa({"avx2", "avx_vnni"}) == "avx_vnni"


def q8_native(fmt: str = "Q4_1", seed: int = 0):
    """A tiny GGUF-block target on the q8 path, its layers through engine/llama_layer.c."""
    model = tiny_llama(seed=seed, vocab=VOCAB, tied=True)
    apply_linear_path(model, "q8", (quantize_linears(model, fmt).linears_found(model), kernel()))
    native = tree_model(model)
    native.layer_step = native_kernels.native_layer_step(native.layers, native.num_heads, native.kv_heads,
                                                         native.head_dim)
    assert native.layer_step is not None
    return native


@pytest.mark.parametrize("fmt", FORMATS)
def test_q8_tree_rows_and_cache_equal_one_token_steps_and_greedy_is_exact(fmt):
    native = q8_native(fmt)
    prompt = torch.tensor(random_prompt(10, VOCAB, seed=6))
    prefill = lambda: native.forward(prompt, torch.arange(10), torch.arange(10),  # noqa: E731
                                     torch.ones(10, 10, dtype=torch.bool).tril())
    depth, nodes, tree_mask = small_tree(prefix=10)
    prefill()
    tree = native.forward(nodes, torch.tensor(depth) + 10, torch.arange(10, 15), tree_mask)
    tree_keys = native.cache.keys[:, :, 10:15].clone()
    for path in ([0, 1, 3], [0, 2, 4]):
        prefill()
        for step, node in enumerate(path):
            one = native.forward(nodes[node:node + 1], torch.tensor([10 + step]), torch.tensor([10 + step]),
                                 torch.ones(1, 11 + step, dtype=torch.bool))
            assert torch.equal(native.cache.keys[:, :, 10 + step], tree_keys[:, :, node])
        assert torch.equal(one[0], tree[path[-1]])
    if fmt == "Q4_1":  # a draft that gets tokens accepted (it shares the target's first layer's values), on q8 too
        draft_hf = tiny_llama(seed=1, vocab=VOCAB, layers=1)
        apply_linear_path(draft_hf, "q8", (quantize_linears(draft_hf, fmt).linears_found(draft_hf), kernel()))
        assert_tree_greedy_equals_autoregressive(native, tree_model(draft_hf), VOCAB)


def test_q8_layers_differ_from_float32_but_stay_close():
    float32 = tiny_llama(seed=0, vocab=VOCAB, tied=True)
    blocks = quantize_linears(float32, "Q4_1")
    apply_linear_path(float32, "gguf", (blocks.linears_found(float32), kernel()))
    q8 = q8_native()
    prompt = torch.tensor(random_prompt(12, VOCAB, seed=3))
    slots, mask = torch.arange(12), torch.ones(12, 12, dtype=torch.bool).tril()
    exact, lossy = tree_model(float32).forward(prompt, slots, slots, mask), q8.forward(prompt, slots, slots, mask)
    assert not torch.equal(exact, lossy)
    assert (exact - lossy).abs().max() <= 0.1 * exact.abs().max()


def test_widths_the_kernel_does_not_take_fall_back_to_torch():
    layer, reference, _ = q8_layer("Q8_0")
    with torch.enable_grad():  # autograd: F.linear on the float32 weight, the exact product
        x = torch.randn(3, 160)
        assert torch.allclose(layer(x), x @ reference.T, atol=1e-5)
