"""test_greedyS.py end to end on tiny saved models, and every bad input as one line on stderr, exit 2."""
from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import growmap as G
from tests.conftest import TEST_CACHE, subprocess_env
from utils.models import REPO_ROOT

SCRIPT = str(REPO_ROOT / "test_greedyS.py")


def run_script(*args: str, script: str = SCRIPT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=subprocess_env())


@pytest.fixture(scope="module")
def tiny_args(tiny_model_dirs, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    return ["--target", tiny_model_dirs["target"], "--model", tiny_model_dirs["draft"], "--end", "3",
            "--max-new-tokens", "12", "--prompt-len", "24", "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt"),
            "--results-dir", str(results)]


def results_of(completed: subprocess.CompletedProcess) -> tuple[dict, list[dict]]:
    last = completed.stdout.strip().splitlines()[-1]
    assert last.startswith("results: ")
    path = Path(last.removeprefix("results: "))
    rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    return json.loads(path.read_text()), rows


def test_speculative_equals_baseline_and_writes_results(tiny_args):
    spec = run_script(*tiny_args)
    assert spec.returncode == 0, spec.stderr
    base = run_script(*tiny_args, "--Mode", "baseline")
    assert base.returncode == 0, base.stderr
    spec_summary, spec_rows = results_of(spec)
    _, base_rows = results_of(base)
    assert [r["output_ids"] for r in spec_rows] == [r["output_ids"] for r in base_rows]
    for key in ("prompts", "new_tokens", "target_steps", "mean_accepted_tokens", "acceptance_by_depth",
                "seconds_per_token", "tokens_per_second", "time_split", "flags", "versions", "growmap", "lossless"):
        assert key in spec_summary
    assert spec_summary["prompts"] == 3
    assert set(spec_rows[0]) >= {"index", "prompt_ids", "output_ids", "output_text", "target_steps", "accepted_per_step"}
    assert "mean accepted tokens" in spec.stdout


def test_benchmark_mode_reports_speedup_and_split(tiny_args):
    bench = run_script(*tiny_args, "--Mode", "benchmark", "--T", "0.8")
    assert bench.returncode == 0, bench.stderr
    summary, rows = results_of(bench)
    assert set(summary["time_split"]) == {"drafting", "verification", "bookkeeping"}
    assert summary["speedup"] > 0 and "baseline" in summary
    assert "baseline_output_ids" in rows[0]


def _bad_growmap(tmp_path: Path) -> str:
    data = G.chain(3).to_dict()
    data["depth"] = torch.tensor([0, 1, 1, 3])
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    return str(path)


BAD_INPUTS = {
    "missing growmap": (["--growmap", "no/such/file.pt"], "growmap file not found"),
    "malformed growmap": (["--growmap", "{bad}"], "'depth'"),
    "growmap too large for M": (["--M", "40"], "--M 40 is too small"),
    "start >= end": (["--start", "3", "--end", "3"], "--start (3) must be smaller than --end (3)"),
    "start past dataset": (["--start", "500", "--end", "510"], "500"),
    "negative T": (["--T", "-0.5"], "--T must be >= 0"),
    "P above 1": (["--P", "1.5"], "--P must be in (0, 1]"),
    "P zero": (["--P", "0"], "--P must be in (0, 1]"),
    "unknown dataset": (["--dataset", "nosuchset"], "nosuchset"),
    "missing model path": (["--model", "./no/such/draft"], "does not exist"),
    "vocab mismatch": (["--model", "{other_vocab}"], "vocabulary"),
    "cuda without gpu": (["--device", "cuda"], "no CUDA GPU"),
    "bad flag value": (["--end", "ten"], "invalid int value"),
    "lookup with specinfer": (["--T", "0.6", "--verify", "specinfer", "--lookup", "4"], "specinfer verification cannot"),
    "negative lookup": (["--lookup", "-1"], "--lookup must be >= 0"),
}


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the script's __main__ in this process (saves a torch import per case); (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = 0
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(case, tiny_args, tiny_model_dirs, tmp_path, monkeypatch, capsys):
    if case == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    extra, expected = BAD_INPUTS[case]
    extra = [value.replace("{bad}", _bad_growmap(tmp_path) if "{bad}" in value else "")
             .replace("{other_vocab}", tiny_model_dirs["other_vocab"]) if "{" in value else value for value in extra]
    code, stderr = run_in_process(monkeypatch, capsys, *tiny_args, *extra)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert expected in lines[0]


def test_bad_input_in_a_fresh_process_is_one_line(tiny_args):
    """One case as a real subprocess: no traceback, no stray output from library imports."""
    completed = run_script(*tiny_args, "--P", "1.5")
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == ["error: --P must be in (0, 1], got 1.5"]


NON_FINITE = {"T nan": ["--T", "nan"], "T inf": ["--T", "inf"], "P nan": ["--P", "nan"], "T -inf": ["--T=-inf"]}


@pytest.mark.parametrize("case", NON_FINITE)
def test_non_finite_temperature_or_top_p_is_one_line(case, tiny_args, monkeypatch, capsys):
    code, stderr = run_in_process(monkeypatch, capsys, *tiny_args, *NON_FINITE[case])
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "must be a finite number" in stderr


BROKEN_FOLDERS = {  # how a model folder is broken -> what the one line says
    "config not JSON": ("{bad json", "not a valid JSON file"),
    "config without model_type": ("{}", "model_type"),
    "config a list": ("[1, 2]", "cannot load"),
    "config with a bad value": ({"hidden_size": "big"}, "cannot load"),
    "missing weights": (None, "model.safetensors"),
}


def _broken_copy(source: str, folder: Path, how: str) -> str:
    shutil.copytree(source, folder)
    content, _ = BROKEN_FOLDERS[how]
    if content is None:
        (folder / "model.safetensors").unlink()
    elif isinstance(content, dict):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **content}))
    else:
        (folder / "config.json").write_text(content)
    return str(folder)


@pytest.mark.parametrize("role", ["--target", "--model"])
@pytest.mark.parametrize("how", BROKEN_FOLDERS)
def test_broken_model_folder_is_one_line(how, role, tiny_args, tiny_model_dirs, tmp_path, monkeypatch, capsys):
    folder = _broken_copy(tiny_model_dirs["target" if role == "--target" else "draft"], tmp_path / "broken", how)
    code, stderr = run_in_process(monkeypatch, capsys, *tiny_args, role, folder)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert BROKEN_FOLDERS[how][1] in lines[0] and "broken" in lines[0]


def test_unreachable_hub_is_one_line(tmp_path):
    """The seed's first command with hub models and no hub: one line, none of the libraries' retry warnings."""
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    del env["HF_HUB_OFFLINE"]
    completed = subprocess.run(
        [sys.executable, SCRIPT, "--model", "JackFram/llama-68m", "--target", "meta-llama/Llama-2-13b-hf", "--T", "0.6",
         "--P", "0.9", "--start", "0", "--end", "200", "--Mode", "greedy", "--M", "1024", "--growmap",
         "growmaps/68m_7b-64.pt", "--dataset", "cnn"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2 and len(lines) == 1, completed.stderr
    assert "meta-llama/Llama-2-13b-hf" in lines[0] and "unreachable" in lines[0]


def test_unreachable_hub_is_found_out_in_seconds(monkeypatch):
    """Timed in this process after the imports, so a busy machine's start-up does not count (the libraries'
    retries took 51 s)."""
    import huggingface_hub  # noqa: F401
    import transformers  # noqa: F401

    from utils import hub
    from utils.errors import UserError
    from utils.models import load_tokenizer

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    for variable in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    began = time.monotonic()
    with pytest.raises(UserError, match="unreachable"):
        load_tokenizer("meta-llama/Llama-2-13b-hf")
    assert time.monotonic() - began < 5.0


@pytest.mark.parametrize("case", ["bad row", "start past dataset", "vocab mismatch", "broken model folder",
                                  "vocab mismatch, not calibrated"])
def test_a_run_that_fails_before_its_first_prompt_leaves_no_result_files(case, tiny_args, tiny_model_dirs, tmp_path,
                                                                         monkeypatch, capsys):
    """Bad data or a bad model is found before the run's results files are written, so no empty run is left."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a fine row"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    extra = {"bad row": ["--dataset", str(rows)],
             "start past dataset": ["--start", "500", "--end", "510"],
             "vocab mismatch": ["--model", tiny_model_dirs["other_vocab"]],
             "broken model folder": ["--model", _broken_copy(tiny_model_dirs["draft"], tmp_path / "broken",
                                                             "missing weights")],
             # float16 is not calibrated on a CPU: the draft is first loaded by the run itself
             "vocab mismatch, not calibrated": ["--dtype", "float16", "--model", tiny_model_dirs["other_vocab"]]}[case]
    results = tmp_path / "results"
    code, stderr = run_in_process(monkeypatch, capsys, *tiny_args, *extra, "--results-dir", str(results))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert not list(results.glob("*")), sorted(path.name for path in results.glob("*"))


def test_a_wrong_resume_fails_before_the_models_load(tiny_args, tiny_model_dirs, tmp_path, monkeypatch, capsys):
    code, stderr = run_in_process(monkeypatch, capsys, *tiny_args, "--model", tiny_model_dirs["other_vocab"],
                                  "--dtype", "float16", "--resume", str(tmp_path / "nope.json"))
    assert code == 2 and "--resume" in stderr and "vocabulary" not in stderr, stderr


def test_scripts_run_by_tests_leave_home_alone(tiny_args, tmp_path):
    """A script started the way the tests start them writes its calibration, kernels and datasets cache into the
    session's test cache, nothing under $HOME."""
    home = tmp_path / "home"
    home.mkdir()
    completed = subprocess.run([sys.executable, SCRIPT, *tiny_args, "--end", "1"], capture_output=True, text=True,
                               timeout=300, cwd=REPO_ROOT, env=subprocess_env(HOME=str(home)))
    assert completed.returncode == 0, completed.stderr
    assert list(home.rglob("*")) == []
    assert any((TEST_CACHE / "calibration").glob("*.json"))  # its calibration entry is in the test cache
