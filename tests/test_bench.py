"""utils.bench end to end on a tiny saved pair (subset-vocabulary draft, so the assisted wrapper runs), and its
pure pieces: statistics, rotation, the tie check, the table."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.tiny_models import tiny_llama
from utils.bench import compare as bench
from utils.bench.methods import METHODS, Run, rotated
from utils.models import REPO_ROOT, DraftVocab

FIGURE_KEYS = {"tokens_per_second", "ms_per_token", "mean_accepted_tokens", "speedup_vs_generate",
               "matches_generate"}


@pytest.fixture(scope="module")
def subset_pair(tmp_path_factory, tiny_tokenizer) -> dict[str, str]:
    """A tiny target over the tokenizer's vocabulary and a draft predicting a 64-token subset of it."""
    root = tmp_path_factory.mktemp("bench_models")
    vocab = len(tiny_tokenizer)
    subset = sorted(torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:64].tolist())
    eos = tiny_tokenizer.eos_token_id
    subset = subset if eos in subset else sorted(subset[1:] + [eos])
    models = {"target": tiny_llama(seed=0, vocab=vocab),
              "draft": tiny_llama(seed=1, vocab=len(subset), hidden=32, layers=1, heads=2, kv_heads=1)}
    dirs = {}
    for name, model in models.items():
        folder = root / name
        model.generation_config.eos_token_id = eos
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        dirs[name] = str(folder)
    DraftVocab(vocab, subset, oov_input_id=0).save(dirs["draft"])
    return dirs


def run_bench(capsys, *args: str) -> tuple[dict, list[dict], str]:
    bench.main(list(args))
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("results: ")
    path = Path(last.removeprefix("results: "))
    rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    return json.loads(path.read_text()), rows, out


def test_bench_end_to_end_greedy_matches_generate(subset_pair, tmp_path, capsys):
    summary, rows, out = run_bench(
        capsys, "--target", subset_pair["target"], "--model", subset_pair["draft"], "--end", "2",
        "--max-new-tokens", "8", "--prompt-len", "24", "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt"),
        "--hf-dtype", "float32", "--results-dir", str(tmp_path))
    assert set(summary["methods"]) == set(METHODS)
    for name, figures in summary["methods"].items():
        assert FIGURE_KEYS <= set(figures), name
        if figures.get("skipped"):
            assert name in ("dynamic_tree", "llama_cpp", "llama_cpp_lookup")  # llama.cpp: not a GGUF target
            continue
        assert figures["matches_generate"] is True, name
        assert figures["exact_matches"] == 2, name
        assert figures["tokens_per_second"] > 0 and figures["ms_per_token"] > 0
        assert figures["mean_accepted_tokens"] >= 1.0 - 1e-9
    assert summary["methods"]["generate"]["speedup_vs_generate"] == pytest.approx(1.0)
    assert summary["methods"]["generate"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert summary["divergences"] == []
    assert summary["assistant"]["draft_vocab_size"] == 64
    for key in ("versions", "hardware", "dtype", "hf_dtype", "flags", "growmap", "sampling"):
        assert key in summary
    assert summary["hardware"]["threads"] >= 1
    assert {"cpu_model", "isa"} <= set(summary["hardware"])  # every figure names its CPU
    assert len(rows) == 2 and set(rows[0]["outputs"]) >= {"generate", "assisted", "baseline"}
    assert Path(out.split("chart: ")[1].splitlines()[0]).stat().st_size > 0
    assert "speedup" in out and "assisted: the draft predicts 64" in out


def test_hf_dtype_auto_times_both_and_sampling_runs(subset_pair, tmp_path, capsys):
    summary, _, _ = run_bench(
        capsys, "--target", subset_pair["target"], "--model", subset_pair["draft"], "--end", "1",
        "--max-new-tokens", "4", "--prompt-len", "16", "--growmap", str(REPO_ROOT / "growmaps" / "4-chain.pt"),
        "--methods", "prompt_lookup,static_tree", "--T", "0.8", "--results-dir", str(tmp_path))
    assert set(summary["methods"]) == {"generate", "prompt_lookup", "static_tree"}
    choice = summary["hf_dtype"]["generate"]
    assert set(choice["seconds_per_token"]) == {"float32", "bfloat16"}
    assert choice["chosen"] == min(choice["seconds_per_token"], key=choice["seconds_per_token"].get)
    assert all(f["matches_generate"] is None for f in summary["methods"].values())


def test_unknown_method_is_a_user_error():
    with pytest.raises(bench.UserError, match="unknown --methods"):
        bench.selected_methods("generate,beam")
    assert bench.selected_methods("static_tree") == ["generate", "static_tree"]


def test_tie_check_flags_a_near_tie_not_a_clear_divergence():
    near = torch.tensor([0.0, 3.0, 3.0 + 5e-5, -1.0])
    clear = torch.tensor([0.0, 3.0, 3.5, -1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.5])
    assert bench.is_near_tie(near, (2, 1), bench.TIE_TOLERANCE)
    assert not bench.is_near_tie(clear, (2, 1), bench.TIE_TOLERANCE)
    assert not bench.is_near_tie(near, (2, 0), bench.TIE_TOLERANCE)  # tied best pair, but the method left it

    reference = [Run([5, 2, 1], 1.0, 3), Run([7, 7, 7], 1.0, 3)]
    runs = [Run([5, 1, 4], 1.0, 2), Run([7, 7, 9], 1.0, 2)]
    logits = {0: near, 1: clear}
    seen = []

    def next_logits(prompt_ids: list[int], prefix: list[int]) -> torch.Tensor:
        seen.append((prompt_ids, prefix))
        return logits[len(seen) - 1]

    found = bench.find_divergences("m", "float32", [[1], [2]], [10, 11], reference, runs, next_logits)
    assert seen == [([1], [5]), ([2], [7, 7])]
    assert [(d.prompt_index, d.position, d.generate_token, d.method_token, d.tie) for d in found] == [
        (10, 1, 2, 1, True), (11, 2, 7, 9, False)]
    assert found[0].token_gap == pytest.approx(5e-5, abs=1e-6) and found[1].token_gap == pytest.approx(0.5)
    assert bench.matches_generate(found[:1], greedy=True) is True
    assert bench.matches_generate(found, greedy=True) is False


def test_divergence_report_measures_the_two_diverging_tokens():
    """A tie between two other tokens is not a gap of 0 between the diverging ones (it used to print 'top-two
    logit gap 0.00e+00' for a divergence a quarter of a logit wide)."""
    logits = torch.tensor([5.0, 5.0, 4.0, 3.75])  # tokens 0 and 1 tie for the top; generate 2, the method 3
    (d,) = bench.find_divergences("m", "bfloat16", [[1]], [4], [Run([2], 1.0, 1)], [Run([3], 1.0, 1)],
                                  lambda ids, prefix: logits)
    assert not d.tie and d.token_gap == pytest.approx(0.25) and d.check_top_token == 0
    line = bench.describe_divergence(asdict(d))
    assert "3 scores 2.50e-01 below 2" in line and line.startswith("DIVERGENCE")
    (ended,) = bench.find_divergences("m", "bfloat16", [[1]], [4], [Run([2, 2], 1.0, 1)], [Run([2], 1.0, 1)],
                                      lambda ids, prefix: logits)
    assert ended.token_gap is None and "one output ended there" in bench.describe_divergence(asdict(ended))


def test_first_divergence_and_spread_and_rotation():
    assert bench.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_divergence([1, 2, 3], [1, 2]) == 2
    assert bench.spread([3.0]) == {"min": 3.0, "q1": 3.0, "median": 3.0, "q3": 3.0, "max": 3.0}
    assert bench.spread([1.0, 2.0, 3.0, 4.0, 5.0])["q1"] == 2.0
    assert [rotated(["a", "b", "c"], i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_figures_and_table():
    reference = [Run([1] * 10, 1.0, 10), Run([1] * 10, 2.0, 10)]
    fast = [Run([1] * 10, 0.5, 4), Run([1] * 10, 0.5, 4)]
    figures = bench.method_figures(fast, reference)
    assert figures["tokens_per_second"] == pytest.approx(20.0)
    assert figures["ms_per_token"] == pytest.approx(50.0)
    assert figures["mean_accepted_tokens"] == pytest.approx(2.5)
    assert figures["speedup_spread"]["min"] == pytest.approx(2.0)
    assert figures["speedup_spread"]["max"] == pytest.approx(4.0)
    table = bench.format_table({"static_tree": {**figures, "matches_generate": True, "dtype": "float32"},
                                "dynamic_tree": {"skipped": "not there yet"}})
    assert "static_tree" in table and "skipped: not there yet" in table and "yes" in table


def test_rows_on_a_lossy_path_are_marked_with_their_numerics_and_baseline_match():
    runs = {"baseline": [Run([1, 2], 1.0, 2)], "static_tree": [Run([1, 2], 0.5, 1)],
            "dynamic_tree": [Run([1, 3], 0.5, 1)], "generate": [Run([1, 2], 1.0, 2)]}
    figures = {name: {**bench.method_figures(r, runs["generate"]), "matches_generate": False, "dtype": "float32"}
               for name, r in runs.items()}
    bench.mark_numerics(figures, runs, {"lossy": False})
    assert "numerics" not in figures["static_tree"]
    bench.mark_numerics(figures, runs, {"lossy": True, "target_numerics": "8-bit activations, llama.cpp-style"})
    assert figures["static_tree"]["matches_suite_baseline"] and not figures["dynamic_tree"]["matches_suite_baseline"]
    assert "numerics" not in figures["generate"]
    table = bench.format_table(figures)
    assert table.count("LOSSY: 8-bit activations") == 3


def test_llama_cpp_adapter_runs_greedy_on_the_gguf_file_and_is_skipped_without_it(tmp_path):
    from types import SimpleNamespace

    from utils.bench.llama_cpp import llama_cpp_runners

    made = []

    class FakeLlama:
        def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, draft_model, verbose):
            made.append((model_path, n_threads, n_threads_batch, draft_model))

        def generate(self, tokens, temp, top_k, **kwargs):
            assert temp == 0.0 and top_k == 1 and kwargs["repeat_penalty"] == 1.0
            yield from (len(tokens), 7, 9, 5)  # 9 is EOS

    fake = SimpleNamespace(Llama=FakeLlama, llama_speculative=SimpleNamespace(
        LlamaPromptLookupDecoding=lambda num_pred_tokens: ("lookup", num_pred_tokens)))
    gguf = tmp_path / "t.gguf"
    runners, skipped = llama_cpp_runners(["llama_cpp", "llama_cpp_lookup"], gguf, 2, 64, {9}, 10, module=fake)
    assert not skipped and made == [(str(gguf), 2, 2, None), (str(gguf), 2, 2, ("lookup", 10))]
    run = runners["llama_cpp"](SimpleNamespace(ids=[1, 2, 3]), 10)
    assert run.output_ids == [3, 7, 9] and run.target_calls == 3
    assert runners["llama_cpp_lookup"](SimpleNamespace(ids=[1]), 2).output_ids == [1, 7]
    _, skipped = llama_cpp_runners(["llama_cpp"], None, 2, 64, {9}, 10, module=fake)
    assert skipped == {"llama_cpp": "the target is not a GGUF file"}


def test_llama_cpp_rows_compare_tokens_with_generate_and_the_suite():
    runs = {"generate": [Run([1, 2, 3], 1.0, 3)], "baseline": [Run([1, 2, 4], 1.0, 3)],
            "llama_cpp": [Run([1, 2, 4], 0.5, 3)]}
    found = bench.llama_cpp_matches(runs, "llama_cpp", 1)
    assert found["matches_generate"] is False and found["vs_generate"]["share_of_tokens_equal"] == 0.6667
    assert found["vs_suite_baseline"] == {"identical_outputs": 1, "share_of_tokens_equal": 1.0}
