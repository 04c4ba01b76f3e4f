"""pretrain_draft_model.py under a launcher: two CPU processes from torchrun (gloo) train like one process at the
same global batch, write each checkpoint once, and resume; a resumed run with changed settings stops."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import subprocess_env
from utils.models import REPO_ROOT

SCRIPT = str(REPO_ROOT / "pretrain_draft_model.py")
GLOBAL_BATCH = 8
LOSS_TOLERANCE = 0.01  # relative: per-process means of windows with unequal label counts, and float sums in another order


def flags(target: Path, data: Path, out: Path) -> list[str]:
    return ["--target", str(target), "--dataset", str(data), "--output-dir", str(out), "--preset", "tiny",
            "--max-steps", "20", "--save-steps", "10", "--eval-steps", "10", "--logging-steps", "2", "--seq-len", "32",
            "--lr", "1e-2", "--warmup-steps", "5", "--mixed-precision", "no", "--eval-rows", "4", "--seed", "0"]


def train(argv: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    batch = ["--batch-size", str(GLOBAL_BATCH // processes)]  # per process
    env = subprocess_env(PATH=os.environ.get("PATH", "/usr/bin:/bin"))
    return subprocess.run([*launcher, SCRIPT, *argv, *batch], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT, env=env)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert len(steps) == len(set(steps)), "a loss line was written twice: more than one process logged"
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def runs(tiny_target, text_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrain_ddp")
    outs = {"one": root / "one", "two": root / "two"}
    for name, processes in (("one", 1), ("two", 2)):
        done = train(flags(tiny_target, text_file, outs[name]), processes)
        assert done.returncode == 0, done.stderr[-3000:]
    return outs


def test_two_processes_train_like_one_at_the_same_global_batch(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(2, 21, 2))  # the same steps
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=LOSS_TOLERANCE), step
    epochs = {json.loads(line)["step"]: json.loads(line)["epoch"]
              for line in (runs["two"] / "loss_log.jsonl").read_text().splitlines() if "epoch" in line}
    assert epochs[20] == pytest.approx(4.0)  # 40 windows / (4 per process x 2 processes) = 5 steps per epoch
    for run in runs.values():
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]


def test_two_processes_resume_their_run(runs, tiny_target, text_file, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["two"], resumed)
    shutil.rmtree(resumed / "checkpoint-20")  # cut after checkpoint-10
    done = train([*flags(tiny_target, text_file, resumed), "--resume"], processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(runs["two"] / "checkpoint-20" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-20" / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5, name


def test_resume_with_changed_settings_names_them_and_stops(runs, tiny_target, text_file, tmp_path):
    resumed = tmp_path / "changed"
    shutil.copytree(runs["one"], resumed)
    argv = [*flags(tiny_target, text_file, resumed), "--resume", "--lr", "5e-3", "--max-steps", "30"]
    done = train(argv)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "lr: 0.01 -> 0.005" in lines[0] and "max_steps: 20 -> 30" in lines[0] and "--resume-changed" in lines[0]
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    done = train([*argv, "--resume-changed"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((resumed / "train_settings.json").read_text())["lr"] == 5e-3
    assert (resumed / "checkpoint-30").is_dir()
