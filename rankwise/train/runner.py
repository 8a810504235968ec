"""The training loop fine-tuning and healing share: which parameters move, a step (its loss,
the non-finite check, the update), progress, a time budget, checkpoints and resume.

A checkpoint is one file of plain containers of tensors and numbers (torch.save), written
to a temporary sibling and renamed into place, and read back with torch.load's
`weights_only=True`, which runs no code from the file. It records the options it was
written with; resuming with other options is refused.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RankwiseError
from ..formats.atomic import write_file
from ..pipeline.distributed import ONE_PROCESS, Comm


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """`state` to `path` through the one atomic writer (rankwise.formats.atomic.write_file): a
    checkpoint is the old one or the new one, whichever process writes, and a full disk
    is one sentence."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:       # a Python file: a full disk raises OSError here
            torch.save(state, f)
    write_file(path, write)


def load_checkpoint(path: str | os.PathLike, options: dict) -> dict:
    """The state a checkpoint holds, refused when written with other `options`."""
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise RankwiseError(f"checkpoint {path} is unreadable or not a rankwise checkpoint: "
                            f"{str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("options") != options:
        raise RankwiseError(f"checkpoint {path} was written with other options; resume with "
                            "the same options")
    return state


@contextlib.contextmanager
def training(model: nn.Module, params: list[nn.Parameter]):
    """Only `params` move (the model in training mode); afterwards nothing moves and the
    model is in evaluation mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    try:
        yield
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)


class Runner:
    """Steps `start` .. `total` of a task on a model: `steps()` yields each step number,
    the caller takes it with `step()` (and does whatever else a step of its method
    needs), and between steps the runner keeps the time, the progress bar and the
    checkpoints (`state(next_step)` gives what to save)."""

    def __init__(self, model: nn.Module, task, total: int, *, desc: str, progress: bool = True,
                 seconds: float | None = None, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 50, elapsed: float = 0.0, comm: Comm = ONE_PROCESS):
        self.model, self.task, self.total, self.desc = model, task, total, desc
        self.progress, self.budget = progress, seconds
        self.checkpoint, self.every = checkpoint, checkpoint_every
        self.seconds, self.losses = elapsed, []
        self.comm = comm              # sums the gradients of processes sharing a step

    def steps(self, start: int, state: Callable[[int], dict]) -> Iterator[int]:
        bar = tqdm(range(start, self.total), desc=self.desc, unit="step", initial=start,
                   total=self.total, disable=not self.progress)
        done = start
        for step in bar:
            if self.budget is not None and self.seconds >= self.budget:
                break
            t0 = time.perf_counter()
            yield step
            self.seconds += time.perf_counter() - t0
            done = step + 1
            if self.losses:
                bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
            if self.checkpoint is not None and done % self.every == 0 and done < self.total:
                save_checkpoint(state(done), self.checkpoint)
        bar.close()
        if self.checkpoint is not None:
            save_checkpoint(state(done), self.checkpoint)

    def step(self, step: int, optimizer: torch.optim.Optimizer, scheduler=None) -> float:
        """One update on the task's batch for `step`; its loss."""
        loss = self.task.loss(self.model, self.task.batch(step))
        if not torch.isfinite(loss):
            lr = optimizer.param_groups[0]["lr"]
            raise RankwiseError(f"the loss became {float(loss)} at step {step}; lower the "
                                f"learning rate (now {lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.comm.all_reduce_gradients([p for group in optimizer.param_groups
                                        for p in group["params"]])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.losses.append(float(loss.detach()))
        return self.losses[-1]
