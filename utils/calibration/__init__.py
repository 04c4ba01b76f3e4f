"""Per-machine calibration: which dtype and linear-layer kernels run each model fastest on this CPU.

Measured once per machine (CPU model, ISA flags and overrides, threads, library versions) and per model, cached
under `utils.models.cache_dir()/calibration/`; `--dtype auto` and `--kernel auto` then pick, per model, the
candidate with the least estimated time for the row counts the run's trees use. `--recalibrate` measures again.
"""
from utils.calibration.choose import (add_calibration_flags, choose_kernels, dynamic_step_rows, load_profile,
                                     pick_kernels, static_step_rows)
from utils.calibration.tree import pick_growmap

__all__ = ["add_calibration_flags", "choose_kernels", "dynamic_step_rows", "load_profile", "pick_growmap",
           "pick_kernels", "plan_static_run", "static_step_rows"]


def plan_static_run(args, need_draft: bool):
    """(growmap, how it was chosen, KernelChoice) of a static-tree run: the profile, then the tree (searched for
    the default pair unless --growmap), then each model's plan for that tree's rows. Same signature as
    utils.experiment.fixed_plan, its uncalibrated counterpart."""
    profile = load_profile(args, need_draft)
    growmap, origin = pick_growmap(args, profile)
    return growmap, origin, pick_kernels(profile, *static_step_rows(growmap, args.lookup), origin)
