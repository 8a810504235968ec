"""A block's decompositions beside the walk: work handed over by one block runs while
the walk measures the next.

On a GPU the walk's forward and backward passes and a block's eigendecompositions are
independent, and cuSOLVER's solvers leave most of the device idle while they wait on
the host; running them on a worker thread and a stream of their own keeps the walk
going meanwhile. On a CPU both want every core, so there they run one after the other.
Two modes, chosen once per compression (`for_device`):

  Inline   runs the work at once, in the caller;
  Beside   runs it on one worker thread, on a stream of the device, at most one piece in
           flight: handing over the next waits for the last, so what is alive is one more
           block's statistics and decompositions, never a queue of them.

Each piece is (work, then): `work` is pure computation (no collectives, no bookkeeping);
`then(result)` runs in the caller's thread, in the order the pieces were handed over, so
collectives under torchrun are issued in the same order by every process whatever the
worker's timing. A failure in the work is raised in the caller by the next hand-over or by
`drain`.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch


def device_synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device (on a CPU it is already done)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


class Inline:
    """The work at once, in the caller."""

    def submit(self, work: Callable[[], Any], then: Callable[[Any], None]) -> None:
        then(work())

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class Beside:
    """The work on a worker thread and a stream of `device`, one piece in flight.

    Before a piece starts, the device's queued work is waited for (`synchronize`: the
    statistics it reads are complete; the walk synchronises at every block anyway), and
    the worker waits for its own stream before handing the result back, so the caller
    never reads a tensor still being written and no memory is freed under a running
    kernel. `synchronize` and `stream` (a factory of the device's streams) are what a
    test on the CPU stands in for."""

    def __init__(self, device: torch.device, synchronize=device_synchronize,
                 stream=torch.Stream):
        self.device, self.synchronize, self._make_stream = torch.device(device), synchronize, stream
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankwise-beside")
        self._stream: torch.Stream | None = None
        self._pending: tuple[Future, Callable[[Any], None]] | None = None

    def submit(self, work: Callable[[], Any], then: Callable[[Any], None]) -> None:
        self.drain()
        self.synchronize(self.device)
        if self._stream is None:     # made here, on the device this thread works on
            self._stream = self._make_stream(self.device)
        self._pending = (self._worker.submit(self._run, work), then)

    def _run(self, work):
        try:
            with self._stream:
                return work()
        finally:     # failed or not, nothing it queued is still running when it is let go
            self._stream.synchronize()

    def drain(self) -> None:
        """Wait for the piece in flight and run its `then`."""
        if self._pending is not None:
            future, then = self._pending
            self._pending = None
            then(future.result())

    def close(self) -> None:
        """Stop the worker, dropping a piece still in flight (after a failure elsewhere)."""
        self._pending = None
        self._worker.shutdown(wait=True)


def for_device(device: torch.device) -> Inline | Beside:
    """Beside on an accelerator, Inline on a CPU (where the two would share the cores)."""
    return Inline() if torch.device(device).type == "cpu" else Beside(device)
