"""Data-parallel sweeps under `accelerate launch` / `torchrun`: one process per device, the prompts of the
range split between them, rows merged by prompt index (utils/run_log.sweep).

A plain `python script.py` has no WORLD_SIZE in its environment and gets the one-process `SINGLE` without
importing accelerate, so that path stays exactly as it was. Under a launcher, accelerate's `PartialState`
joins the process group: NCCL on GPUs (each process on `cuda:<local rank>`), gloo on CPUs when there is no
GPU or `--device cpu` was asked for. Note that `accelerate launch --cpu --num_processes N` starts one process
(accelerate 1.16); two CPU processes come from `torchrun --nproc_per_node 2` or `accelerate launch --multi_gpu
--num_processes 2`.
"""
from __future__ import annotations

import torch

from utils.run_log import SINGLE, Processes, launched_world_size


class ProcessGroup(Processes):
    """This process's place in a launched sweep, over accelerate's PartialState."""

    def __init__(self, state) -> None:
        self.state = state
        self.rank = state.process_index
        self.world = state.num_processes
        self.device = str(state.device)

    def split(self, items: list) -> list:
        with self.state.split_between_processes(items) as mine:
            return list(mine)

    def share(self, value):
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def gather(self, items: list) -> list:
        from accelerate.utils import gather_object

        return gather_object(items)

    def barrier(self) -> None:
        self.state.wait_for_everyone()


def start_processes(device: str) -> Processes:
    """SINGLE for a plain run; under a launcher, this process's ProcessGroup (device: the --device flag,
    already resolved; "cpu" keeps every process on the CPU)."""
    if launched_world_size() <= 1:
        return SINGLE
    from accelerate import PartialState

    return ProcessGroup(PartialState(cpu=torch.device(device).type == "cpu" or not torch.cuda.is_available()))
