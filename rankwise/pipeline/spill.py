"""Tensors parked on disk until they are needed again, so that what a compression holds in
memory does not grow with the model's depth.

Two things would otherwise pile up, one block at a time: the inputs of every block, which
the backward walk needs in reverse order (rankwise.pipeline.walk), and each layer's factors,
which the cut needs once the allocation has seen every layer's spectrum. Each group of
tensors goes to one safetensors file in a private temporary folder; a group is read back
whole, or as a prefix of rows (factors of a lower rank), and the folder is removed when
the spill is closed, also after an error; a folder left by a killed process is removed by
the next spill made beside it.

With a memory budget (`keep_bytes`) groups are kept where they are (on the device that
made them) as long as all kept groups fit it, and only the rest goes to disk: a model
whose activations fit its device writes nothing.

Writes overlap the compute: `put` copies the group to the CPU (a private copy, so the
caller may reuse its tensors at once) and one background thread writes it, while the
next block is computed. At most `IN_FLIGHT` groups wait to be written (a `put` beyond
that waits for the oldest), so memory stays flat however slow the disk; reading or
dropping a group waits for its own write, and a failed write is raised, as the sentence
a synchronous write would have given, by the next call that touches the spill.
"""
from __future__ import annotations

import errno
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import RankwiseError
from ..formats.atomic import left_by_dead_process, owner_tag

_PREFIX = "rankwise-spill-"
IN_FLIGHT = 2             # groups copied to the host and waiting for the writer


def _tidy(folder: Path) -> None:
    """Remove the spills of this machine's processes that are gone (killed before they
    could); a shared --scratch also holds other machines' live runs, never touched."""
    for left in folder.glob(f"{_PREFIX}*-*"):
        if left_by_dead_process(left.name[len(_PREFIX):]):
            shutil.rmtree(left, ignore_errors=True)


class Spill:
    """A private temporary folder of safetensors files, one per group of tensors."""

    def __init__(self, folder: str | Path | None = None, keep_bytes: int = 0):
        if folder is not None and not Path(folder).is_dir():
            raise RankwiseError(f"scratch folder {folder} does not exist")
        _tidy(Path(folder or tempfile.gettempdir()))
        try:
            self.root = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{owner_tag()}-", dir=folder))
        except OSError as e:
            raise RankwiseError(f"cannot create a temporary folder in "
                                f"{folder or tempfile.gettempdir()}: {e.strerror}") from None
        self.written = 0          # bytes, for the record
        self.keep_bytes, self.kept = keep_bytes, {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankwise-spill")
        self._pending: dict[str, Future] = {}

    def _kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.kept.values() for t in g.values())

    def _path(self, group: str) -> Path:
        return self.root / f"{group}.safetensors"

    def put(self, group: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors` as one group: in memory where they are while the budget allows,
        else written to disk (copied to the CPU, contiguous; the write in the background)."""
        self.drop(group)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size and self._kept_bytes() + size <= self.keep_bytes:
            self.kept[group] = {k: t.detach().clone() for k, t in tensors.items()}
            return
        from safetensors.torch import save_file  # looked up now: a test may stand in
        host = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
        while len(self._pending) >= IN_FLIGHT:
            self._settle(next(iter(self._pending)))
        self._pending[group] = self._writer.submit(self._write, group, host, save_file)
        self.written += size

    def _write(self, group: str, host: dict[str, torch.Tensor], save_file) -> None:
        from safetensors import SafetensorError
        try:
            save_file(host, str(self._path(group)))
        except (OSError, SafetensorError) as e:
            self._path(group).unlink(missing_ok=True)
            full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
            raise RankwiseError(
                f"no space left in {self.root.parent} for the temporary spill of {group}; free "
                "space there or point --scratch at a larger folder" if full else
                f"cannot write the temporary spill {self._path(group)}: {e}") from None

    def _settle(self, group: str) -> None:
        """Wait for a group's write; its failure raised here."""
        pending = self._pending.pop(group, None)
        if pending is not None:
            pending.result()

    def flush(self) -> None:
        """Wait for every write; the first failure raised."""
        for group in list(self._pending):
            self._settle(group)

    def get(self, group: str, key: str, rows: int | None = None) -> torch.Tensor:
        """One tensor of a group, or only its first `rows` rows (read without the rest)."""
        self._settle(group)
        if group in self.kept:
            t = self.kept[group][key]
            return t if rows is None else t[:rows]
        from safetensors import safe_open
        with safe_open(str(self._path(group)), framework="pt") as f:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[:rows]

    def read(self, group: str) -> dict[str, torch.Tensor]:
        """Every tensor of a group, which stays parked."""
        self._settle(group)
        if group in self.kept:
            return dict(self.kept[group])
        from safetensors.torch import load_file
        return load_file(str(self._path(group)))

    def drop(self, group: str) -> None:
        self._settle(group)
        self.kept.pop(group, None)
        self._path(group).unlink(missing_ok=True)

    def take(self, group: str) -> dict[str, torch.Tensor]:
        """Every tensor of a group, which is then deleted."""
        self._settle(group)
        if group in self.kept:
            return self.kept.pop(group)
        from safetensors.torch import load_file
        path = self._path(group)
        tensors = load_file(str(path))
        path.unlink()
        return tensors

    def close(self) -> None:
        """Wait for the writer (failures ignored: the folder goes), then remove it all."""
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self.kept.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, kind, *exc) -> None:
        try:
            if kind is None:
                self.flush()          # a write that failed unread still fails the run
        finally:
            self.close()
