"""`python -m utils.study`: a tiny 2 x 2 study run whole and killed mid-cell then resumed (same table), bad study
files refused in one line before any cell runs, the bootstrap against a known distribution, and the verdict
logic on synthetic tables."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from utils.cli import run_cli
from utils.models import REPO_ROOT
from utils.run_log import read_rows
from utils.study.__main__ import main
from utils.study.bootstrap import bootstrap, ratio, ratio_of_ratios
from utils.study.spec import parse_study
from utils.study.verdicts import FAILS, HOLDS, UNCLEAR, judge

TIMING = ("tokens_per_s", "speedup")  # measured figures: equal only in what they count, not in seconds
ROW_PAUSE_S = 0.3


def tiny_study(dirs: dict, launch: str = "", grid: str = 'T = [0, 0.6], growmap = ["growmaps/4-chain.pt", '
                                                             '"growmaps/4x8-tree.pt"]') -> str:
    return f"""
name = "tiny"
min_prompts = 3
launch = {json.dumps(launch)}
[experiments.trees]
script = "test_greedyS"
flags = {{ target = "{dirs['target']}", model = "{dirs['draft']}", end = 6, max-new-tokens = 12, prompt-len = 12, dtype = "float32", device = "cpu", kernel = "plain", Mode = "greedy" }}
grid = {{ {grid} }}
[[claims]]
text = "a bigger tree accepts more"
kind = "compare"
experiment = "trees"
metric = "tokens_per_step"
a = {{ growmap = "growmaps/4x8-tree.pt" }}
b = {{ growmap = "growmaps/4-chain.pt" }}
pair_on = ["T"]
"""


def run_study_cli(*argv: str) -> None:
    run_cli(lambda: main(list(argv)))


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=[c for c in table.columns if c.startswith(TIMING)])


@pytest.fixture(scope="module")
def whole_study(tiny_model_dirs, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("study")
    (folder / "tiny.toml").write_text(tiny_study(tiny_model_dirs))
    run_study_cli("run", str(folder / "tiny.toml"), "--out", str(folder / "out"), "--report")
    return folder / "out"


def test_whole_study_writes_table_figures_and_report(whole_study):
    table = pd.read_csv(whole_study / "table.csv")
    assert len(table) == 4 and set(table["method"]) == {"static"} and (table["prompts"] == 6).all()
    assert pd.read_parquet(whole_study / "table.parquet").shape == table.shape
    chain = table[table["growmap"] == "growmaps/4-chain.pt"]
    assert (chain["tree_size"] == 4).all() and (chain["tokens_per_step"] >= 1).all()
    assert ((table["tokens_per_step_low"] <= table["tokens_per_step"])
            & (table["tokens_per_step"] <= table["tokens_per_step_high"])).all()
    report = (whole_study / "report.md").read_text()
    assert "**a bigger tree accepts more**" in report


def test_killed_mid_cell_and_resumed_gives_the_same_table(whole_study, tiny_model_dirs, tmp_path, capsys):
    slowed = (f"import runpy, sys, time; from utils.run_log import RowWriter; append = RowWriter.append; "
              f"RowWriter.append = lambda self, row: (append(self, row), time.sleep({ROW_PAUSE_S}))[0]; "
              f"sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    (tmp_path / "slow.toml").write_text(tiny_study(tiny_model_dirs).replace(
        'launch = ""', "launch = " + json.dumps([sys.executable, "-c", slowed])))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "utils.study", "run", str(tmp_path / "slow.toml"), "--out",
                                str(out)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # stop in the second cell, rows on disk
        cells = sorted(out.glob("cells/*/cell.json"))
        cut = [p for p in out.glob("cells/*/*.jsonl") if not (p.parent / "cell.json").exists()]
        if len(cells) == 1 and cut and len(read_rows(cut)) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert len(list(out.glob("cells/*/cell.json"))) == 1
    (tmp_path / "tiny.toml").write_text(tiny_study(tiny_model_dirs))  # the same cells, without the pauses
    run_study_cli("run", str(tmp_path / "tiny.toml"), "--out", str(out), "--report")
    lines = capsys.readouterr().out.splitlines()
    assert "1 finished, 3 to run" in lines[0] and "(resumed)" in lines[1] and "3 left" not in lines[1]
    pd.testing.assert_frame_equal(comparable(pd.read_csv(out / "table.csv")),
                                  comparable(pd.read_csv(whole_study / "table.csv")))


@pytest.mark.parametrize("change, message", [
    (('script = "test_greedyS"', 'script = "test_greedyZ"'), "unknown script 'test_greedyZ'"),
    (('Mode = "greedy"', 'Mode = "greedy", no-such-flag = 3'), "unrecognized arguments: --no-such-flag 3"),
    (("T = [0, 0.6]", 'T = [0, "hot"]'), "argument --T"),
    (("T = [0, 0.6]", "T = [0, -1]"), "--T must be >= 0"),
    (("T = [0, 0.6]", "T = []"), "empty grid"),
    (("T = [0, 0.6]", "T = [0, 0]"), "duplicate cell"),
])
def test_bad_study_file_is_refused_in_one_line_before_any_cell_runs(change, message, tiny_model_dirs, tmp_path,
                                                                   capsys):
    (tmp_path / "bad.toml").write_text(tiny_study(tiny_model_dirs).replace(*change))
    with pytest.raises(SystemExit) as stop:
        run_study_cli("run", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing ran, no folder made


def test_study_folder_of_another_study_file_is_refused(whole_study, tiny_model_dirs, tmp_path, capsys):
    (tmp_path / "other.toml").write_text(tiny_study(tiny_model_dirs, grid="T = [0, 1.0]"))
    with pytest.raises(SystemExit) as stop:
        run_study_cli("run", str(tmp_path / "other.toml"), "--out", str(whole_study))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "made by a different study file" in err and len(err.splitlines()) == 1


def test_bootstrap_interval_matches_a_known_distribution():
    rng = np.random.default_rng(7)
    mean, sd, n = 3.0, 2.0, 60
    covered, widths = 0, []
    for trial in range(200):  # a 95% interval of the mean covers the true mean about 95% of the time
        x = rng.normal(mean, sd, n)
        estimate = bootstrap(ratio("x", "one"), {"x": x, "one": np.ones(n)}, resamples=1000, seed=trial)
        covered += estimate.low <= mean <= estimate.high
        widths.append(estimate.high - estimate.low)
    assert 0.88 <= covered / 200 <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * sd / np.sqrt(n), rel=0.1)  # normal theory's width


def test_paired_speedup_keeps_each_prompt_with_its_baseline():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 10, 40)  # prompts of very different lengths, each exactly twice as fast
    c = {"new": np.full(40, 8.0), "seconds": base / 2, "base_new": np.full(40, 8.0), "base_seconds": base}
    estimate = bootstrap(ratio_of_ratios("new", "seconds", "base_new", "base_seconds"), c)
    assert estimate.value == pytest.approx(2.0) and estimate.high - estimate.low < 1e-9


def synthetic(rows: list[tuple], metric: str = "drafted_per_step") -> pd.DataFrame:
    return pd.DataFrame([{"experiment": "e", "method": method, "T": t, "prompts": prompts, "lossless": True,
                          "model": None, metric: value, f"{metric}_low": value - half, f"{metric}_high": value + half}
                         for method, t, value, half, prompts in rows])


CLAIM = """
[experiments.e]
script = "test_greedyS"
[[claims]]
text = "dynamic beats static, especially at high T"
kind = "compare"
experiment = "e"
metric = "drafted_per_step"
a = { method = "dynamic" }
b = { method = "static" }
pair_on = ["T"]
especially_when = "T"
"""


@pytest.mark.parametrize("rows, verdict", [
    ([("dynamic", 0, 0.6, 0.04, 20), ("static", 0, 0.5, 0.04, 20),
      ("dynamic", 1, 0.9, 0.04, 20), ("static", 1, 0.5, 0.04, 20)], HOLDS),
    ([("dynamic", 0, 0.6, 0.04, 20), ("static", 0, 0.5, 0.04, 20),
      ("dynamic", 1, 0.3, 0.04, 20), ("static", 1, 0.5, 0.04, 20)], FAILS),
    ([("dynamic", 0, 0.6, 0.04, 3), ("static", 0, 0.5, 0.04, 3),
      ("dynamic", 1, 0.9, 0.04, 3), ("static", 1, 0.5, 0.04, 3)], UNCLEAR),  # too few prompts
    ([("dynamic", 0, 0.6, 0.2, 20), ("static", 0, 0.5, 0.2, 20),
      ("dynamic", 1, 0.9, 0.2, 20), ("static", 1, 0.5, 0.2, 20)], UNCLEAR),  # intervals overlap
])
def test_compare_verdicts_on_synthetic_tables(rows, verdict):
    claims = parse_study(CLAIM, None).claims
    assert judge(synthetic(rows), claims, min_prompts=5)[0].verdict == verdict


def test_expected_values_and_rank_verdicts():
    study = parse_study(CLAIM.replace('especially_when = "T"', "expect = { a = 0.5, b = 0.3, tolerance = 0.1 }"),
                        None)
    near = synthetic([("dynamic", 0, 0.52, 0.03, 20), ("static", 0, 0.3, 0.03, 20)])
    far = synthetic([("dynamic", 0, 0.9, 0.03, 20), ("static", 0, 0.3, 0.03, 20)])
    assert judge(near, study.claims, 5)[0].verdict == HOLDS and judge(far, study.claims, 5)[0].verdict == FAILS
    rank = parse_study("""[experiments.p]\nscript = "test_greedyS_logit"\n[experiments.d]\nscript = "test_greedyS"
[[claims]]
text = "smaller potential, stronger draft"
kind = "rank"
x_experiment = "p"
x = "potential_score"
y_experiment = "d"
y = "drafted_per_step"
key = "model"
""", None).claims

    def table(strengths: list[float], prompts: int = 20) -> pd.DataFrame:
        scores = [1.0, 2.0, 3.0]
        return pd.DataFrame(
            [{"experiment": "p", "model": m, "prompts": prompts, "potential_score": s, "potential_score_low": s - .1,
              "potential_score_high": s + .1, "drafted_per_step": np.nan, "drafted_per_step_low": np.nan,
              "drafted_per_step_high": np.nan} for m, s in zip("abc", scores)]
            + [{"experiment": "d", "model": m, "prompts": prompts, "potential_score": np.nan,
                "potential_score_low": np.nan, "potential_score_high": np.nan, "drafted_per_step": y,
                "drafted_per_step_low": y - .05, "drafted_per_step_high": y + .05} for m, y in zip("abc", strengths)])

    holds = judge(table([0.9, 0.6, 0.3]), rank, 5)[0]
    assert holds.verdict == HOLDS and holds.figures["spearman"] == pytest.approx(-1.0)
    assert judge(table([0.9, 0.3, 0.6]), rank, 5)[0].verdict == FAILS
    assert judge(table([0.9, 0.6, 0.3], prompts=2), rank, 5)[0].verdict == UNCLEAR
