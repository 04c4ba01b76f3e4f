"""The per-machine calibration cache (utils/calibration/): miss, hit, invalid file, recalibration, a changed
machine key, and the per-model choice it feeds. Timings come from a stand-in measurement (no real timing)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from engine.linear_paths import KernelPlan
from utils.calibration import choose as C
from utils.calibration.cache import machine_key, profile_path
from utils.calibration.measure import CALIBRATION_ROWS
from utils.report import cpu_description

PLANS = [KernelPlan(torch.float32, "plain"), KernelPlan(torch.float32, "onednn"), KernelPlan(torch.bfloat16, "plain")]
# ms per forward over CALIBRATION_ROWS (1, 2, 4, 8, 16, 32) tokens, shaped like an AVX2 CPU's: float32 plain jumps
# from 1 to 2 rows, packed float32 does not, bfloat16 is fastest for one row and pays for every row
TARGET_MS = {"float32/plain": [100, 170, 180, 185, 210, 260], "float32/onednn": [95, 100, 105, 110, 125, 160],
             "bfloat16/plain": [55, 70, 120, 220, 400, 800]}
DRAFT_MS = {"float32/plain": [8, 12, 12, 13, 14, 16], "float32/onednn": [7, 8, 8, 9, 10, 12],
            "bfloat16/plain": [3, 4, 6, 9, 16, 30]}


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Cache under tmp_path, three candidate plans, and a stand-in measure_pair that logs what it measured."""
    log = []

    def fake_measure(target, draft, device, plans, progress=None):
        log.append({"target": target, "draft": draft, "plans": [p.label for p in plans]})
        return ({p.label: TARGET_MS[p.label] for p in plans},
                None if draft is None else {p.label: DRAFT_MS[p.label] for p in plans})

    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(C, "candidates", lambda device, target: PLANS)
    monkeypatch.setattr(C, "measure_pair", fake_measure)
    monkeypatch.setattr(C, "machine_load", lambda: 0.0)  # a quiet machine, whatever else runs beside the tests
    return log


def _args(dirs, **overrides) -> argparse.Namespace:
    values = {"device": "cpu", "dtype": "auto", "kernel": "auto", "recalibrate": False,
              "target": dirs["target"], "model": dirs["draft"]} | overrides
    return argparse.Namespace(**values)


def _choose(dirs, **overrides):
    return C.choose_kernels(_args(dirs, **overrides), [18], [8, 3], need_draft=True)


def test_miss_measures_then_hit_reads_the_cache(calls, tiny_model_dirs):
    first = _choose(tiny_model_dirs)
    assert len(calls) == 1 and calls[0]["draft"] == tiny_model_dirs["draft"]
    assert first.record["cache"] == "measured"
    path = profile_path(machine_key())
    assert path.is_file() and len(json.loads(path.read_text())["models"]) == 2
    second = _choose(tiny_model_dirs)
    assert len(calls) == 1  # nothing measured again
    assert second.record["cache"] == "hit"
    assert (second.target, second.draft) == (first.target, first.draft)


def test_each_model_gets_its_fastest_plan_for_its_rows(calls, tiny_model_dirs):
    choice = _choose(tiny_model_dirs)
    # an 18-token verification: packed float32 (~128 ms) beats plain float32 (~213) and bfloat16 (~445)
    assert choice.target == KernelPlan(torch.float32, "onednn")
    # the draft's 8- and 3-row forwards: bfloat16 (9 + ~5 ms) beats packed float32 (9 + ~8.5)
    assert choice.draft == KernelPlan(torch.bfloat16, "plain")
    assert "target float32/onednn" in choice.line and "draft bfloat16/plain" in choice.line
    one_row = C.choose_kernels(_args(tiny_model_dirs), [1], [1], need_draft=True)
    assert one_row.target == KernelPlan(torch.bfloat16, "plain")


def test_invalid_file_is_measured_again(calls, tiny_model_dirs, capsys):
    path = profile_path(machine_key())
    path.parent.mkdir(parents=True)
    mismatched = {"machine": machine_key(), "models": {"x": {"rows": [1], "ms": {"a": []}}}}
    for broken in ("{not json", json.dumps(mismatched)):
        path.write_text(broken)
        choice = _choose(tiny_model_dirs)
        assert choice.record["cache"] == "measured"
        assert "measuring again" in capsys.readouterr().out
    assert len(calls) == 2
    assert _choose(tiny_model_dirs).record["cache"] == "hit"


def test_recalibrate_and_a_changed_machine_measure_again(calls, tiny_model_dirs, monkeypatch):
    _choose(tiny_model_dirs)
    _choose(tiny_model_dirs, recalibrate=True)
    assert len(calls) == 2
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # kernels capped: another machine key, another file
    assert _choose(tiny_model_dirs).record["cache"] == "measured"
    assert len(calls) == 3


def test_timings_taken_on_a_busy_machine_are_taken_again_when_it_is_quieter(calls, tiny_model_dirs, monkeypatch,
                                                                           capsys):
    load = {"now": 1.6}  # per core: another job on every core
    monkeypatch.setattr(C, "machine_load", lambda: load["now"])
    assert _choose(tiny_model_dirs).record["cache"] == "measured"
    assert "busy (load 1.60 per core)" in capsys.readouterr().out
    entries = json.loads(profile_path(machine_key()).read_text())["models"].values()
    assert [entry["load"] for entry in entries] == [1.6, 1.6]
    assert _choose(tiny_model_dirs).record["cache"] == "hit"  # still busy: kept, not measured over and over
    load["now"] = 0.1
    assert _choose(tiny_model_dirs).record["cache"] == "measured"
    assert "taken on a busy machine; measuring again" in capsys.readouterr().out
    assert _choose(tiny_model_dirs).record["cache"] == "hit"
    assert len(calls) == 2


def test_baseline_needs_no_draft_and_a_fixed_plan_is_still_profiled(calls, tiny_model_dirs):
    choice = C.choose_kernels(_args(tiny_model_dirs), [18], [8, 3], need_draft=False)
    assert calls[0]["draft"] is None and "draft" not in choice.record
    fixed = _choose(tiny_model_dirs, dtype="bfloat16", kernel="plain")
    assert fixed.target == fixed.draft == KernelPlan(torch.bfloat16, "plain")
    # still calibrated (the draft's timings join the cached profile), so the default tree fits the plan asked for
    assert fixed.record["calibrated"] is True and len(calls) == 2 and calls[1]["draft"] is not None
    restricted = _choose(tiny_model_dirs, dtype="float32")
    assert restricted.draft == KernelPlan(torch.float32, "onednn")


def test_gguf_path_is_offered_only_for_a_gguf_target(tiny_model_dirs, monkeypatch):
    from utils.calibration.measure import candidates
    from utils.errors import UserError

    labels = [plan.label for plan in candidates("cpu", tiny_model_dirs["target"])]
    assert "float32/plain" in labels and "float32/gguf" not in labels  # a folder of float32 weights
    with pytest.raises(UserError, match="--kernel gguf cannot run.*not a GGUF file"):
        _choose(tiny_model_dirs, kernel="gguf")
    with pytest.raises(UserError, match="--kernel q8 cannot run.*not a GGUF file"):
        _choose(tiny_model_dirs, kernel="q8")
    monkeypatch.setattr(C, "gguf_path_unavailable", lambda target: None)
    monkeypatch.setattr(C, "candidates", lambda device, target: PLANS + [KernelPlan(torch.float32, "gguf")])
    assert C._allowed(_args(tiny_model_dirs, kernel="gguf"), "cpu") == [KernelPlan(torch.float32, "gguf")]


def test_estimate_interpolates_and_extrapolates():
    rows, ms = list(CALIBRATION_ROWS), TARGET_MS["float32/plain"]
    assert C.estimate_ms(rows, ms, 1) == 100
    assert C.estimate_ms(rows, ms, 3) == 175
    assert C.estimate_ms(rows, ms, 24) == 235
    assert C.estimate_ms(rows, ms, 64) == 360


def test_cpu_description_reads_model_and_isa():
    text = "processor: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 xyz\n" \
           "processor: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n"
    assert cpu_description(text) == ("AMD EPYC 7B13", ["avx2", "avx512_bf16", "avx512f", "fma"])


def test_searched_tree_grows_when_rows_are_cheap(tiny_model_dirs):
    from utils.calibration.choose import Profile
    from utils.calibration.tree import searched_growmap, shipped_acceptance

    vectors = shipped_acceptance()
    rows = list(CALIBRATION_ROWS)
    draft = {"rows": rows, "ms": {"float32/onednn": [1.0] * 6, "bfloat16/plain": [1.0] * 6}}
    flat = Profile([PLANS[1]], {"rows": rows, "ms": {"float32/onednn": [100, 101, 102, 103, 104, 105]}}, draft)
    steep = Profile([PLANS[2]], {"rows": rows, "ms": {"bfloat16/plain": [50, 100, 200, 400, 800, 1600]}}, draft)
    big, big_record = searched_growmap(flat, 0, *vectors)
    small, small_record = searched_growmap(steep, 0, *vectors)
    assert big.size > small.size
    assert big_record["target_plan"] == "float32/onednn" and small_record["size"] == small.size
    both = Profile([PLANS[1], PLANS[2]], {"rows": rows, "ms": flat.target["ms"] | steep.target["ms"]}, draft)
    _, record = searched_growmap(both, 0, *vectors)
    assert record["target_plan"] == min(record["per_target_plan"],
                                        key=lambda label: record["per_target_plan"][label]["predicted_ms_per_token"])
