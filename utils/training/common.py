"""The loop both training loops run (`train_loop`: batches, learning rate, optimizer step, evaluation and
checkpoint schedule, --max-minutes, final export) and its pieces: output folder checks, AdamW groups, the
resume state beside each checkpoint, the progress bar and loss log.

A plain loop under `accelerate.Accelerator` keeps `accelerate launch` (multi-GPU) working with no code change,
while staying readable and resumable: the step count alone fixes the data position, because batches come
from a seeded per-epoch permutation.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from utils.errors import UserError
from utils.training.settings import CHECKPOINT_PREFIX, LOSS_LOG, SETTINGS_FILE, STATE_FILE, TrainSettings
from utils.training.training_data import epoch_batches

def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders that finished saving (they hold the training state), oldest first."""
    found = []
    for p in output_dir.glob(CHECKPOINT_PREFIX + "*"):
        m = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", p.name)
        if m and (p / STATE_FILE).is_file() and (p / "config.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def write_training_state(folder: Path, step: int, elapsed_s: float, optimizer,
                         model_fp32: dict[str, torch.Tensor] | None) -> None:
    """The resume state beside a checkpoint's model folder: step, time used, optimizer, RNG and (when the
    folder's weights are not float32) float32 weights. Written last and atomically: it marks the checkpoint
    complete, and a half-written one never does."""
    state = {"step": step, "elapsed_s": elapsed_s, "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if model_fp32 is not None:
        state["model_fp32"] = model_fp32
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / STATE_FILE)


def restore_training_state(folder: Path, model, optimizer, strict: bool = True) -> tuple[int, float]:
    """Load a checkpoint's resume state into `model` (its float32 weights, if stored) and `optimizer`;
    returns (step, seconds used so far)."""
    state = torch.load(folder / STATE_FILE, weights_only=False)
    if "model_fp32" in state:
        model.load_state_dict(state["model_fp32"], strict=strict)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state.get("elapsed_s", 0.0))


def prepare_output_dir(s: TrainSettings) -> list[Path]:
    """Create --output-dir; return its complete checkpoints when resuming, refuse a clash otherwise."""
    out_dir = Path(s.output_dir)
    found = checkpoints(out_dir) if s.resume else []
    if s.resume and not found:
        raise UserError(f"--resume: no complete checkpoint-N folder in {out_dir}")
    if s.resume and not s.resume_changed:
        check_same_settings(out_dir / SETTINGS_FILE, s)
    if not s.resume and checkpoints(out_dir):
        raise UserError(f"{out_dir} already holds checkpoints: pass --resume to continue, or another --output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    return found


# Flags that say how to continue and where the run's folder now is, not what is trained: not compared on --resume.
RESUME_FLAGS = ("resume", "resume_changed", "output_dir")


def changed_settings(stored: dict, s: TrainSettings) -> list[str]:
    """'name: stored -> now' for each setting of `s` that differs from a stored train_settings.json."""
    now = json.loads(json.dumps(asdict(s)))  # tuples as lists, as the file holds them
    return [f"{name}: {stored.get(name)!r} -> {value!r}" for name, value in now.items()
            if name not in RESUME_FLAGS and stored.get(name) != value]


def check_same_settings(path: Path, s: TrainSettings) -> None:
    """A resumed run continues the stored one only with its settings; a change is named, unless told to go on."""
    if not path.is_file():
        return  # a run from before settings were stored beside the checkpoints
    changed = changed_settings(json.loads(path.read_text()), s)
    if changed:
        raise UserError(f"--resume: settings differ from {path} ({'; '.join(changed)}): pass the stored values, "
                        "or --resume-changed to go on with the new ones")


def adamw(params: list[torch.nn.Parameter], s: TrainSettings, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=s.lr, betas=betas)


def due(step: int, every: int, s: TrainSettings, out_of_time: bool) -> bool:
    """Whether an evaluation or checkpoint (every `every` steps) falls on `step`; the last step always gets one."""
    return step % every == 0 or step == s.max_steps or out_of_time


def lr_factor(s: TrainSettings, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio.

    Progress is the larger of steps done / max_steps and, with --max-minutes, time used / time allowed,
    so a run cut by its time budget still ends at the low learning rate instead of mid-schedule.
    """
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    t = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    if s.max_minutes > 0:
        t = max(t, elapsed_s / (s.max_minutes * 60))
    t = min(1.0, t)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def make_accelerator(s: TrainSettings):
    """The run's `accelerate.Accelerator`. On a machine without a GPU it is told so (`cpu=True`): only then does
    a launched run (`torchrun`, `accelerate launch`) join one gloo process group instead of every process
    training alone on the whole batch and writing the same checkpoints."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=s.mixed_precision)


def optimizer_step(accelerator, loss: torch.Tensor, params, optimizer) -> None:
    """Backward, clip the gradient norm to 1, step, clear the gradients."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class TrainProgress:
    """Per-step bookkeeping shared by both training loops: progress bar, loss log, time used (including
    before a resume) and the --max-minutes budget."""

    def __init__(self, s: TrainSettings, step: int, elapsed_before: float, per_epoch: int, log_path: Path,
                 is_main: bool) -> None:
        from tqdm import tqdm

        self.max_minutes, self.elapsed_before, self.is_main = s.max_minutes, elapsed_before, is_main
        self.log = LossLog(log_path, s.logging_steps, per_epoch)
        self.bar = tqdm(total=s.max_steps, initial=step, disable=not is_main, desc="train")
        self.start = time.time()

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start

    def after_step(self, step: int, lr: float, losses: dict[str, torch.Tensor]) -> bool:
        """Record a finished step; True once the time budget is used up."""
        self.bar.update(1)
        elapsed = self.elapsed()
        if self.is_main:
            self.log.add(step, lr, elapsed, losses, self.bar)
        return self.max_minutes > 0 and elapsed > self.max_minutes * 60


class LossLog:
    """Averages the training losses between log lines and appends one line every `every` steps."""

    def __init__(self, path: Path, every: int, per_epoch: int) -> None:
        self.path, self.every, self.per_epoch = path, every, per_epoch
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, step: int, lr: float, elapsed_s: float, losses: dict[str, torch.Tensor], bar=None) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
        self.count += 1
        if step % self.every:
            return
        record = {"step": step, "epoch": round(step / self.per_epoch, 3), "lr": lr, "elapsed_s": round(elapsed_s, 1)}
        record |= {k: round(v / self.count, 5) for k, v in self.sums.items()}
        _append_log(self.path, record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        self.sums, self.count = {}, 0


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def export_final(save_folder: Callable[[Path], None], s: TrainSettings, metrics: dict[str, float]) -> None:
    """The shipped folder --final-dir, written anew: the model (`save_folder(folder)` writes it), its settings,
    loss log and held-out metrics, no optimizer."""
    folder = Path(s.final_dir)
    if folder.exists():
        shutil.rmtree(folder)
    save_folder(folder)
    for name in (LOSS_LOG, "data_info.json"):
        src = Path(s.output_dir) / name
        if src.is_file():
            shutil.copy(src, folder / name)
    (folder / "heldout_metrics.json").write_text(json.dumps(metrics, indent=1))



def write_run_info(out_dir: Path, s: TrainSettings, info: dict) -> None:
    """The run's settings and what it trains on, beside its checkpoints (both loops write these)."""
    (out_dir / SETTINGS_FILE).write_text(json.dumps(asdict(s), indent=1))
    (out_dir / "data_info.json").write_text(json.dumps(info, indent=1))


@dataclass
class LoopHooks:
    """What differs between the token and the feature loop; `train_loop` does the rest."""

    losses: Callable[[list[int], int], dict[str, torch.Tensor]]  # (this process's span indices, step) -> losses
    evaluate: Callable[[], dict[str, float]]      # held-out metrics
    save: Callable[[Path], None]                  # write a model folder (checkpoint or --final-dir)
    resume_weights: Callable[[], dict[str, torch.Tensor] | None]  # float32 weights for the resume state, if needed


def train_loop(s: TrainSettings, accelerator, spans: list[tuple[int, int]], step: int, elapsed_before: float,
               params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, hooks: LoopHooks) -> dict[str, float]:
    """Train from `step` to --max-steps (or --max-minutes): each process takes its share of the step's global
    batch; evaluation, checkpoints and the final export on their schedule. Returns the last held-out metrics."""
    out_dir = Path(s.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = max(1, math.ceil(len(spans) / (s.batch_size * world)))  # epoch_batches groups batch_size * world
    log_path = out_dir / LOSS_LOG
    progress = TrainProgress(s, step, elapsed_before, per_epoch, log_path, accelerator.is_main_process)
    last_eval: dict[str, float] = {}
    planned_epoch = -1
    while step < s.max_steps:
        epoch, index = divmod(step, per_epoch)
        if epoch != planned_epoch:  # an epoch's batches are planned once, not every step
            batches, planned_epoch = epoch_batches(spans, s.batch_size * world, s.seed, epoch), epoch
        global_batch = batches[index]
        mine = global_batch[rank::world] or global_batch[:1]
        lr = s.lr * lr_factor(s, step, progress.elapsed())
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = hooks.losses(mine, step)
        optimizer_step(accelerator, losses["loss"], params, optimizer)
        step += 1
        if world > 1:  # the log shows the global batch's losses, not the main process's share of it
            losses = {key: accelerator.reduce(value.detach(), "mean") for key, value in losses.items()}
        out_of_time = progress.after_step(step, lr, losses)
        if due(step, s.eval_steps, s, out_of_time) and accelerator.is_main_process:
            last_eval = hooks.evaluate()
            _append_log(log_path, {"step": step, **{k: round(v, 5) for k, v in last_eval.items()}})
        if due(step, s.save_steps, s, out_of_time):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                folder = out_dir / f"{CHECKPOINT_PREFIX}{step}"
                hooks.save(folder)
                write_training_state(folder, step, progress.elapsed(), optimizer, hooks.resume_weights())
        if out_of_time:
            break
    progress.bar.close()
    if s.final_dir and accelerator.is_main_process:
        export_final(hooks.save, s, last_eval)
    return last_eval
