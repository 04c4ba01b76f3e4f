"""The original project's README commands, as written (issue #21): each runs with its hub ids replaced by tiny
local models and --end small, and writes its results; with the hub unreachable, each ends at once with one line
saying what to pass instead. Also every original flag on every script, and `python pretrain_draft_model.py`
with no flags (the default recipe, shrunk to a tiny target)."""
from __future__ import annotations

import json
import runpy
import shlex
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from utils.models import REPO_ROOT

# The original README's commands, word for word (CUDA_VISIBLE_DEVICES dropped).
ORIGINAL_COMMANDS = {
    "test_greedyS.py": "--model JackFram/llama-68m --target meta-llama/Llama-2-13b-hf --T 0.6 --P 0.9 --start 0 "
                       "--end 200 --Mode greedy --M 1024 --growmap ./growmaps/68m_7b-64.pt --dataset cnn",
    "test_greedyS_dy.py": "--model JackFram/llama-68m --target meta-llama/Llama-2-13b-hf --T 0.6 --P 0.9 --start 0 "
                          "--end 200 --Mode greedy --M 1024 --growmap ./growmaps/68m_7b-64.pt --dataset cnn",
    "test_greedyS_logit.py": "--model JackFram/llama-68m --target meta-llama/Llama-2-13b-hf --T 0.6 --P 0.9 --start 0 "
                             "--end 3500 --Mode baseline --M 1024 --growmap ./growmaps/68m_7b-64.pt --dataset openwebtext",
    # the original's common-sense run is greedy verification (its substitution rule has no sampling form)
    "test_greedyS_commonsense.py": "--model JackFram/llama-68m --target meta-llama/Llama-2-13b-hf --T 0 --P 0.9 "
                                   "--start 0 --end 200 --Mode greedy --M 1024 --growmap ./growmaps/68m_7b-64.pt "
                                   "--dataset cnn",
    # test_llava.py's original command needs a LLaVA pair: tests/test_llava.py runs it on tiny saved LLaVA models
}
ORIGINAL_FLAGS = ("--model", "--target", "--dataset", "--growmap", "--start", "--end", "--T", "--P", "--DP", "--M",
                  "--Mode", "--B", "--W", "--D", "--decay", "--negative", "--static", "--offloading")
FAST = ["--max-new-tokens", "8", "--prompt-len", "16", "--device", "cpu"]  # suite flags that only shorten the run


def run(script: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run a script in this process as `python script argv...`; (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.chdir(REPO_ROOT)
    try:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def with_tiny_models(argv: list[str], models: dict[str, str], results: Path) -> list[str]:
    """The command with its hub models swapped for tiny local ones, the hub dataset for the built-in prompts,
    --end 2, results in `results`."""
    swap = {"--model": models["draft"], "--target": models["target"], "--dataset": "builtin", "--end": "2"}
    out = list(argv)
    for i, word in enumerate(argv[:-1]):
        if word in swap:
            out[i + 1] = swap[word]
    return out + FAST + ["--results-dir", str(results)]


def results_of(stdout: str) -> dict:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("results: ")
    path = Path(last.removeprefix("results: "))
    assert path.with_suffix(".jsonl").stat().st_size > 0
    return json.loads(path.read_text())


def tiny_follower_table(target: str, folder: Path) -> str:
    """A follower table for the tiny target (no table is shipped for it), counted over the built-in prompts."""
    from utils.commonsense.table import count_followers, prompt_pairs, save_tensor, target_vocab_size
    from utils.models import load_tokenizer

    pairs, source = prompt_pairs("builtin", load_tokenizer(target), 0, 12)
    path = folder / "followers.pt"
    save_tensor(count_followers(pairs, target_vocab_size(target), 12), path, {"source": source})
    return str(path)


@pytest.mark.parametrize("script", ORIGINAL_COMMANDS)
def test_original_command_runs_on_tiny_models(script, tiny_model_dirs, tmp_path, capsys, monkeypatch):
    argv = with_tiny_models(shlex.split(ORIGINAL_COMMANDS[script]), tiny_model_dirs, tmp_path)
    if script == "test_greedyS_commonsense.py":
        argv += ["--followers", tiny_follower_table(tiny_model_dirs["target"], tmp_path)]
    code, out, err = run(script, argv, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    summary = results_of(out)
    if script == "test_greedyS_commonsense.py":  # one file over the side-by-side runs, each with its own results
        assert summary["flags"]["M"] == 1024 and [run["run"] for run in summary["runs"]][:3] == [
            "plain", "substitute", "augment"]
        summary = json.loads(Path(summary["runs"][0]["results"]).read_text())
        assert summary["prompts"] == 2 and summary["new_tokens"] > 0
        return
    assert summary["prompts"] == 2 and summary["flags"]["M"] == 1024 and summary["flags"]["T"] == 0.6
    if script != "test_greedyS_logit.py":
        assert summary["new_tokens"] > 0 and summary["mean_accepted_tokens"] >= 1.0
        assert summary["flags"]["growmap"] == "./growmaps/68m_7b-64.pt"
    if script == "test_greedyS_dy.py":  # the original's growmap gives the dynamic tree its budget and depth
        assert (summary["dynamic_tree"]["budget"], summary["dynamic_tree"]["max_depth"]) == (64, 6)


@pytest.mark.parametrize("script", ORIGINAL_COMMANDS)
def test_original_command_with_hub_unreachable_says_what_to_pass(script, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = shlex.split(ORIGINAL_COMMANDS[script]) + ["--results-dir", str(tmp_path)]  # keeps the checkout clean
    code, out, err = run(script, argv, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert code == 2 and len(errors) == 1, err
    assert "meta-llama/Llama-2-13b-hf" in errors[0]
    # the common-sense script first needs a follower table for that target (none is shipped), before any download
    wanted = "pass --followers" if script == "test_greedyS_commonsense.py" else "pass a local folder or .gguf file"
    assert wanted in errors[0]


@pytest.mark.parametrize("script", [*ORIGINAL_COMMANDS, "test_llava.py", "utils/bench/compare.py"])
def test_help_shows_every_original_flag(script, capsys, monkeypatch):
    code, out, _ = run(script, ["--help"], capsys, monkeypatch)
    assert code == 0
    flags = ORIGINAL_FLAGS if script != "utils/bench/compare.py" else ("--B", "--W", "--D")
    for flag in flags:
        assert f"{flag} " in out, flag
    if script != "utils/bench/compare.py":
        assert "(default: 0.09, the value the original's score hard-codes)" in " ".join(out.split())


def test_flags_a_static_tree_does_not_use_are_reported_not_refused(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    argv = ["--model", tiny_model_dirs["draft"], "--target", tiny_model_dirs["target"], "--end", "1", *FAST,
            "--results-dir", str(tmp_path), "--B", "16", "--W", "4", "--D", "3", "--DP", "0.8", "--decay", "0.05",
            "--negative", "--static"]
    code, out, err = run("test_greedyS.py", argv, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert "note: --B ignored: static trees take their shape from --growmap" in notes
    assert {line.split()[1] for line in notes} == {"--B", "--W", "--D", "--DP", "--decay", "--negative", "--static"}
    results_of(out)


def test_dynamic_script_static_flag_verifies_the_growmap_tree(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    argv = ["--model", tiny_model_dirs["draft"], "--target", tiny_model_dirs["target"], "--end", "1", *FAST,
            "--results-dir", str(tmp_path), "--growmap", "./growmaps/4x8-tree.pt", "--dtype", "float32"]
    code, out, err = run("test_greedyS_dy.py", argv + ["--static", "--B", "9"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert "note: --B ignored: --static verifies the --growmap's static tree" in err
    summary = results_of(out)
    assert summary["static"] is True and summary["growmap"]["size"] == 33 and "dynamic_tree" not in summary
    code, out, err = run("test_greedyS.py", argv, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    static = results_of(out)
    assert static["new_tokens"] == summary["new_tokens"] and static["target_steps"] == summary["target_steps"]


@pytest.mark.parametrize("flags, message", [
    (["--DP", "0"], "--DP must be > 0"),
    (["--score", "original", "--decay", "-0.1"], "decay must be >= 0"),
])
def test_bad_original_flags_are_one_line(flags, message, tiny_model_dirs, tmp_path, capsys, monkeypatch):
    argv = ["--model", tiny_model_dirs["draft"], "--target", tiny_model_dirs["target"], "--end", "1", *FAST,
            "--results-dir", str(tmp_path), *flags]
    code, _, err = run("test_greedyS_dy.py", argv, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_pretrain_with_no_flags_runs_the_recipe(tiny_target, tiny_model_dirs, tmp_path, capsys, monkeypatch):
    """`python pretrain_draft_model.py` as written: the default recipe (here with a tiny target and a few steps
    appended, since later flags win), its time estimate first, ./outputs/checkpoint-N/ that --model accepts."""
    import pretrain_draft_model
    from utils.training import recipe

    tiny = ("--target", str(tiny_target), "--distill-tokens", "120", "--distill-workers", "1",
            "--distill-batch-size", "6", "--distill-max-new-tokens", "8", "--distill-dtype", "float32",
            "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2", "--max-minutes", "0", "--seq-len", "64",
            "--batch-size", "4", "--warmup-steps", "1")
    monkeypatch.setattr(recipe, "RECIPE_FLAGS", recipe.RECIPE_FLAGS + tiny)
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert pretrain_draft_model.main([]) == 0
    out = capsys.readouterr().out
    assert out.index("estimate for this machine") < out.index("checkpoints: outputs/checkpoint-N/")
    assert sorted(p.name for p in (tmp_path / "outputs").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert pretrain_draft_model.main([]) == 0  # run again: resumes from checkpoint-4, nothing left to do
    assert "--resume" in capsys.readouterr().out
    argv = ["--model", str(tmp_path / "outputs" / "checkpoint-4"), "--target", str(tiny_target), "--end", "1",
            *FAST, "--results-dir", str(tmp_path / "results")]
    code, out, err = run("test_greedyS.py", argv, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert results_of(out)["draft"].endswith("checkpoint-4")


def test_the_real_recipe_is_a_valid_feature_draft_run(monkeypatch):
    import pretrain_draft_model
    from utils.training.recipe import REFERENCE, estimate, recipe_argv
    from utils.training.settings import TrainSettings, validate

    args = pretrain_draft_model.build_parser().parse_args(recipe_argv("no-such-dir"))
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k != "measure_cost"})
    validate(settings)
    from utils.training import distill_data

    monkeypatch.setattr(distill_data, "cached_teacher_tokens", lambda settings: 0)  # as on a fresh machine
    assert (settings.arch, settings.distill, settings.target, settings.output_dir) == ("feature", True, None, "no-such-dir")
    on_reference = estimate(settings, REFERENCE.target_step_ms)
    assert on_reference.speed_factor == 1.0 and on_reference.train_min == settings.max_minutes
    assert on_reference.first_checkpoint_min < 15 and estimate(settings, 2 * REFERENCE.target_step_ms).total_min > \
        on_reference.total_min


@pytest.mark.parametrize("dp, top_p", [([], 0.9), (["--DP", "0.5"], 0.5), (["--DP", "1.1"], 1.1)])
def test_dp_is_the_draft_top_p_of_sampled_children(dp, top_p, tiny_model_dirs, tmp_path, capsys, monkeypatch):
    import engine.drafters
    from engine.sampling import Sampling

    seen = []

    class Recording(engine.drafters.StaticTreeDrafter):
        def __init__(self, draft, growmap, sampling, sample_children):
            seen.append((sampling, sample_children))
            super().__init__(draft, growmap, sampling, sample_children)

    monkeypatch.setattr(engine.drafters, "StaticTreeDrafter", Recording)
    argv = ["--model", tiny_model_dirs["draft"], "--target", tiny_model_dirs["target"], "--end", "1", *FAST,
            "--results-dir", str(tmp_path), "--T", "0.8", "--verify", "specinfer", *dp]
    code, out, err = run("test_greedyS.py", argv, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert seen == [(Sampling(0.8, top_p), True)] and "note:" not in err
