"""Results that survive: rows streamed as prompts finish, partial summaries on Ctrl-C, `--resume` ending with
the files an uninterrupted run writes, and `--results-dir` checked before any model loads."""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import SCRIPT, results_of, run_in_process
from utils.models import REPO_ROOT
from utils.run_log import read_rows

TIMING = ("seconds", "time_split", "baseline_seconds", "baseline_time_split")
FIGURES = ("prompts", "new_tokens", "target_steps", "mean_accepted_tokens", "acceptance_by_depth")
PROMPTS = 40
ROW_PAUSE_S = 0.25  # the interrupted run: at most ~10 s in all


def without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def exact_args(tiny_model_dirs) -> list[str]:
    """A T = 0 float32 run over enough prompts that one can be stopped part-way."""
    return ["--target", tiny_model_dirs["target"], "--model", tiny_model_dirs["draft"], "--end", str(PROMPTS),
            "--max-new-tokens", "24", "--prompt-len", "24", "--dtype", "float32", "--T", "0", "--device", "cpu",
            "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt")]


def run_here(*args: str) -> tuple[dict, list[dict], Path]:
    """The script in this process (no second interpreter start-up); its results and where they are."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [SCRIPT, *args])
        patch.setenv("HF_HUB_OFFLINE", "1")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            runpy.run_path(SCRIPT, run_name="__main__")
    path = Path(out.getvalue().strip().splitlines()[-1].removeprefix("results: "))
    return *results_of(subprocess.CompletedProcess([], 0, out.getvalue(), "")), path


@pytest.fixture(scope="module")
def uninterrupted(exact_args, tmp_path_factory) -> tuple[dict, list[dict]]:
    return run_here(*exact_args, "--results-dir", str(tmp_path_factory.mktemp("whole")))[:2]


def test_uninterrupted_run_is_complete(uninterrupted):
    summary, rows = uninterrupted
    assert summary["partial"] is False and summary["completed_prompts"] == PROMPTS == summary["prompts"]
    assert [row["index"] for row in rows] == list(range(PROMPTS))
    assert summary["processes"] == {"count": 1, "devices": ["cpu"]}


def test_ctrl_c_keeps_partial_results_and_resume_finishes_them(exact_args, uninterrupted, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # each written row is followed by a short pause, so that the tiny models cannot finish all the prompts
    # between two looks at the file (the run is stopped after its second row)
    slowed = (f"import runpy, sys, time; from utils.run_log import RowWriter; append = RowWriter.append; "
              f"RowWriter.append = lambda self, row: (append(self, row), time.sleep({ROW_PAUSE_S}))[0]; "
              f"sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", slowed, SCRIPT, *exact_args, "--results-dir", str(tmp_path)],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:  # stop once the first rows are on disk
        files = list(tmp_path.glob("*.jsonl"))
        if files and len(read_rows(files)) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]  # after the progress bar: one line saying what was kept
    assert last.startswith("interrupted: ") and "--resume" in last, stderr
    json_path = Path(last.split("--resume ")[1])
    partial = json.loads(json_path.read_text())
    kept = read_rows([json_path.with_suffix(".jsonl")])
    assert partial["partial"] is True and 2 <= len(kept) == partial["completed_prompts"] < PROMPTS
    assert partial["prompts"] == len(kept)  # the partial figures cover the rows kept

    summary, rows, path = run_here(*exact_args, "--results-dir", str(tmp_path / "elsewhere"), "--resume",
                                   str(json_path))
    assert path == json_path and summary["flags"]["resume"] == str(json_path)
    whole_summary, whole_rows = uninterrupted
    assert without_timing(rows) == without_timing(whole_rows)  # same rows, none missing or doubled
    assert summary["partial"] is False
    assert {key: summary[key] for key in FIGURES} == {key: whole_summary[key] for key in FIGURES}
    # the run's own two files, no shard or temp file left; a resumed run writes where it started
    assert sorted(path.name for path in tmp_path.iterdir()) == [json_path.name, json_path.stem + ".jsonl"]


def test_resume_after_a_crash_mid_line(exact_args, uninterrupted, tmp_path):
    """A run killed outright: a few rows, a half-written one, the summary still the one written at the start."""
    whole_summary, whole_rows = uninterrupted
    json_path = tmp_path / "test_greedyS-crashed.json"
    json_path.write_text(json.dumps({"script": "test_greedyS", "flags": whole_summary["flags"], "partial": True}))
    text = "".join(json.dumps(row) + "\n" for row in whole_rows[:3]) + json.dumps(whole_rows[3])[:40]
    json_path.with_suffix(".jsonl").write_text(text)
    summary, rows, _ = run_here(*exact_args, "--resume", str(json_path))
    assert without_timing(rows) == without_timing(whole_rows)
    assert summary["partial"] is False and summary["new_tokens"] == whole_summary["new_tokens"]


def test_resume_refuses_other_settings(exact_args, uninterrupted, monkeypatch, capsys):
    summary, _ = uninterrupted
    path = summary["flags"]["results_dir"]
    json_path = next(Path(path).glob("*.json"))
    code, stderr = run_in_process(monkeypatch, capsys, *exact_args, "--T", "0.5", "--resume", str(json_path))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "settings differ" in stderr and "T (0.0 then, 0.5 now)" in stderr


def test_unwritable_results_dir_fails_before_any_model_loads(exact_args, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = [*exact_args, "--target", str(tmp_path / "no-such-target"), "--results-dir", str(blocker / "results")]
    code, stderr = run_in_process(monkeypatch, capsys, *args)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "is not writable" in stderr  # not the missing target: the folder was checked first


def crash_after(json_path: Path, rows: list[dict], kept: int) -> Path:
    """A copy of a finished run as a crash leaves it: `kept` rows, half of the next, the starting summary."""
    summary = json.loads(json_path.read_text())
    stopped = json_path.with_name("stopped-" + json_path.name)
    stopped.write_text(json.dumps({"script": summary["script"], "flags": summary["flags"], "partial": True}))
    text = "".join(json.dumps(row) + "\n" for row in rows[:kept]) + json.dumps(rows[kept])[:30]
    stopped.with_suffix(".jsonl").write_text(text)
    return stopped


def test_potential_tool_resumes_to_the_same_figures(monkeypatch, capsys, tmp_path, tiny_model_dirs):
    from tests.test_potential import run_script as run_potential

    flags = ["--target", tiny_model_dirs["target"], "--model", tiny_model_dirs["target"], tiny_model_dirs["draft"],
             "--end", "3", "--prompt-len", "12", "--continuations", "--max-new-tokens", "5", "--M", "32",
             "--device", "cpu", "--results-dir", str(tmp_path)]

    def run(*extra: str) -> tuple[dict, list[dict], Path]:
        assert run_potential(monkeypatch, *flags, *extra) == 0
        path = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: "))
        return *results_of(subprocess.CompletedProcess([], 0, f"results: {path}", "")), path

    summary, rows, path = run()
    stopped = crash_after(path, rows, 1)
    resumed, resumed_rows, resumed_path = run("--resume", str(stopped))
    assert resumed_path == stopped and resumed_rows == rows and resumed["partial"] is False
    for key in ("potential", "continuation_potential", "ranking", "prompts"):
        assert resumed[key] == summary[key], key


def test_benchmark_resumes_to_the_same_outputs(capsys, tmp_path, tiny_model_dirs):
    from tests.test_bench import run_bench

    flags = ["--target", tiny_model_dirs["target"], "--model", tiny_model_dirs["draft"], "--end", "3",
             "--max-new-tokens", "8", "--prompt-len", "24", "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt"),
             "--hf-dtype", "float32", "--dtype", "float32", "--methods", "static_tree", "--results-dir", str(tmp_path)]
    summary, rows, _ = run_bench(capsys, *flags)
    stopped = crash_after(next(tmp_path.glob("bench-*.json")), rows, 1)
    resumed, resumed_rows, _ = run_bench(capsys, *flags, "--resume", str(stopped))

    def outputs(rows: list[dict]) -> list[dict]:
        return [{name: run["output_ids"] for name, run in row["outputs"].items()} for row in rows]

    assert outputs(resumed_rows) == outputs(rows) and resumed["partial"] is False
    for name in ("generate", "static_tree"):
        assert resumed["methods"][name]["exact_matches"] == summary["methods"][name]["exact_matches"] == 3
