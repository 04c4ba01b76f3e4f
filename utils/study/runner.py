"""Running a study: every cell's flags checked by its script's own parser first, then each cell run as one
process of its script (`python script.py FLAGS --results-dir CELL`, or the study's launcher), durably: a
finished cell is skipped, a cut one continued with --resume (or run again whole, for the scripts that cannot),
so a killed study loses at most the prompt in flight. One progress line per cell."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from utils.errors import UserError
from utils.models import REPO_ROOT
from utils.report import atomic_write_text
from utils.study.grid import Cell, study_cells, study_fingerprint
from utils.study.scripts import SCRIPTS, check_flags, script_parser
from utils.study.spec import Study

STUDY_FILE = "study.json"
DONE_FILE = "cell.json"   # written when a cell's process exits 0: the cell is finished
LOG_FILE = "log.txt"


class CellFailed(Exception):
    """A cell's script exited with an error: the study stops there (finished cells stay)."""


def cells_dir(study_dir: Path) -> Path:
    return study_dir / "cells"


def check_cells(cells: list[Cell], study_dir: Path) -> None:
    """Every cell's flags through its script's own parser (and the shared checks), before any cell runs."""
    parsers = {}
    for cell in cells:
        script = SCRIPTS[cell.script]
        if script.name not in parsers:
            parsers[script.name] = script_parser(script)
        check_flags(script, parsers[script.name], cell.argv(str(study_dir)), cell.name)


def open_study_dir(study: Study, cells: list[Cell], study_dir: Path, study_path: str) -> None:
    """Create the study folder, or check that an existing one was made by this study file and size."""
    fingerprint = study_fingerprint(study, cells)
    record = study_dir / STUDY_FILE
    if record.is_file():
        made_by = json.loads(record.read_text())
        if made_by.get("fingerprint") != fingerprint:
            raise UserError(f"{study_dir} was made by a different study file ({made_by.get('file')}, size "
                            f"{made_by.get('size')}): pass another --out, or delete the folder to start again")
        return
    if study_dir.exists() and any(study_dir.iterdir()):
        raise UserError(f"{study_dir} exists and is not a study folder: pass another --out")
    cells_dir(study_dir).mkdir(parents=True, exist_ok=True)
    (study_dir / "study.toml").write_text(study.source)
    atomic_write_text(record, json.dumps({
        "name": study.name, "size": study.size, "file": study_path, "fingerprint": fingerprint,
        "min_prompts": study.min_prompts,
        "cells": [{"name": c.name, "experiment": c.experiment, "script": c.script, "folder": c.folder,
                   "values": c.values, "flags": c.flags} for c in cells]}, indent=2) + "\n")


def is_done(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file()


def partial_results(folder: Path) -> Path | None:
    """The results .json of a cut run in a cell's folder, if there is one to --resume."""
    for path in sorted(folder.glob("*.json")):
        if path.name == DONE_FILE:
            continue
        try:
            if json.loads(path.read_text()).get("partial"):
                return path
        except (OSError, json.JSONDecodeError):
            continue
    return None


def cell_command(study: Study, cell: Cell, study_dir: Path, folder: Path) -> list[str]:
    """The cell's command line; a cut run of a resumable script continues from its files."""
    script = SCRIPTS[cell.script]
    argv = cell.argv(str(study_dir))
    if script.shared_checks:
        argv += ["--results-dir", str(folder)]
    cut = partial_results(folder) if script.resumable else None
    if cut is not None:
        argv += ["--resume", str(cut)]
    elif folder.exists() and any(p.name != LOG_FILE for p in folder.iterdir()):
        shutil.rmtree(folder)  # a cut run that cannot be continued starts again
    folder.mkdir(parents=True, exist_ok=True)
    return [*(study.launch or [sys.executable]), *script.command, *argv]


def run_cell(command: list[str], folder: Path) -> float:
    """One cell's process, its output appended to the cell's log; its seconds. Ctrl-C/SIGTERM stops it with
    SIGTERM (the scripts then write their partial results) and goes on as KeyboardInterrupt."""
    start = time.monotonic()
    with open(folder / LOG_FILE, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            code = process.wait()
        except BaseException:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if code != 0:
        lines = (folder / LOG_FILE).read_text().strip().splitlines()
        raise CellFailed(f"exit status {code}: {lines[-1] if lines else ''} (log: {folder / LOG_FILE})")
    return time.monotonic() - start


def format_eta(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def say_now(line: str) -> None:
    print(line, flush=True)


def run_study(study: Study, study_dir: Path, study_path: str, say: Callable[[str], None] = say_now) -> list[Cell]:
    """Check every cell, then run those not finished, in file order; returns the cells."""
    cells = study_cells(study)
    check_cells(cells, study_dir)
    open_study_dir(study, cells, study_dir, study_path)
    todo = [cell for cell in cells if not is_done(cells_dir(study_dir) / cell.folder)]
    say(f"study {study.name} ({study.size}): {len(cells)} cells, {len(cells) - len(todo)} finished, "
        f"{len(todo)} to run; folder {study_dir}")
    spent: list[float] = []
    for number, cell in enumerate(todo, 1):
        folder = cells_dir(study_dir) / cell.folder
        command = cell_command(study, cell, study_dir, folder)
        resumed = " (resumed)" if "--resume" in command else ""
        try:
            seconds = run_cell(command, folder)
        except CellFailed as exc:
            raise UserError(f"cell {cell.name} failed, {exc}; fix it and run the study again (finished cells "
                            "are kept)") from None
        spent.append(seconds)
        atomic_write_text(folder / DONE_FILE, json.dumps({"name": cell.name, "command": command, "seconds": seconds,
                                                           "load_average": os.getloadavg()[0]}, indent=2) + "\n")
        left = len(todo) - number
        eta = f", ETA {format_eta(sum(spent) / len(spent) * left)}" if left else ""
        say(f"[{number}/{len(todo)}] {cell.name}{resumed}: {seconds:.0f} s; {left} left{eta}")
    return cells
