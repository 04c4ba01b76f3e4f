"""Cells: every combination of an experiment's grid values, each one run of its script, with its command-line
flags, its own results folder and a name that says what varies."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass

from utils.errors import UserError
from utils.study.spec import Experiment, Study, Value

STUDY_PLACEHOLDER = "{study}"  # in a flag value: the study folder (e.g. a draft trained by an earlier cell)


@dataclass(frozen=True)
class Cell:
    experiment: str
    script: str
    values: dict[str, Value]    # this cell's grid values, by flag name
    flags: dict[str, Value]     # every flag it passes (fixed flags and grid values)

    @property
    def name(self) -> str:
        varying = ",".join(f"{key}={_short(value)}" for key, value in self.values.items())
        return f"{self.experiment}[{varying}]" if varying else self.experiment

    @property
    def folder(self) -> str:
        """A file-system-safe folder name, unique per cell (a short hash of its flags disambiguates)."""
        stem = re.sub(r"[^A-Za-z0-9.=,_-]+", "_", self.name.replace("[", "__").replace("]", ""))[:80]
        digest = hashlib.sha1(json.dumps([self.script, self.flags], sort_keys=True).encode()).hexdigest()[:8]
        return f"{stem}-{digest}"

    def argv(self, study_dir: str) -> list[str]:
        """The script's flags: `--name value`; a true boolean is `--name` alone, a false one is left out."""
        out: list[str] = []
        for key, value in self.flags.items():
            if value is False:
                continue
            out.append(f"--{key}")
            if value is not True:  # a list is a flag taking several values (e.g. test_greedyS_logit --model)
                out.extend(str(item).replace(STUDY_PLACEHOLDER, study_dir)
                           for item in (value if isinstance(value, list) else [value]))
        return out


def _short(value: Value) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text.rsplit("/", 1)[-1].removesuffix(".pt").removesuffix(".json") if "/" in text else text


def experiment_cells(experiment: Experiment) -> list[Cell]:
    keys = list(experiment.grid)
    cells = []
    for combination in itertools.product(*(experiment.grid[key] for key in keys)):
        values = dict(zip(keys, combination))
        cells.append(Cell(experiment.name, experiment.script, values, {**experiment.flags, **values}))
    return cells


def study_cells(study: Study) -> list[Cell]:
    """Every cell of the study in file order; a cell that repeats another (same script and flags) is refused."""
    cells, seen = [], {}
    for experiment in study.experiments:
        for cell in experiment_cells(experiment):
            key = json.dumps([cell.script, sorted(cell.flags.items(), key=lambda item: item[0])], default=str)
            if key in seen:
                raise UserError(f"duplicate cell: {cell.name} runs the same {cell.script} flags as {seen[key]}; "
                                "remove one of them from the grid")
            seen[key] = cell.name
            cells.append(cell)
    if not cells:
        raise UserError("the study has no cells: the grid is empty")
    return cells


def study_fingerprint(study: Study, cells: list[Cell]) -> str:
    """What a study folder was made by: the size and every cell's script and flags."""
    return hashlib.sha1(json.dumps([study.name, study.size, [[c.script, c.flags] for c in cells]],
                                   sort_keys=True, default=str).encode()).hexdigest()
