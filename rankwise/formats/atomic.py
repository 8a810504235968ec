"""Every folder a verb writes, written one way: checked before any slow work, built whole in
a temporary sibling folder, renamed into place.

  - never onto an input of the run (the model it reads, a teacher, a reference), nor onto a
    folder holding one;
  - an existing folder is replaced only when it is empty or was written by the same writer
    (its marker file says which), and only whole: the old one is moved aside, the new one
    renamed in, the old one removed;
  - what a killed run leaves beside the target (its temporary folder; an old output moved
    aside) is tidied the next time anything is written there: a temporary folder whose
    process is gone is removed, an output moved aside whose replacement never arrived is
    put back;
  - a full disk ends in one sentence, with nothing left behind.
Single files (eval.json inside an output, an HTML report, a picture) go through
`write_file`: a temporary file in the same folder, renamed over the old one.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import RankwiseError

MARKER = ".rankwise-output"      # {"writer": the verb or API call that wrote the folder}


def writer_of(folder: Path) -> str | None:
    """Who wrote a folder, by its marker (None: no readable marker)."""
    try:
        return json.loads((folder / MARKER).read_text()).get("writer")
    except (OSError, ValueError, AttributeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host_tag() -> str:
    """This machine, as temporary names carry it: a short hash of its host name (no dots
    or dashes, whatever the name holds)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """`{host}-{pid}`: who owns a temporary file or folder. A shared folder (a network
    --scratch, an output folder on a cluster's file system) is seen by several machines,
    where a process id means nothing."""
    return f"{host_tag()}-{os.getpid()}"


def left_by_dead_process(tag: str) -> bool:
    """Whether a temporary name's `{host}-{pid}-...` tag names a process of this machine
    that is gone; another machine's leftovers, and names of another form, are never ours
    to remove."""
    host, _, rest = tag.partition("-")
    pid = rest.split("-")[0]
    return host == host_tag() and pid.isdigit() and not pid_alive(int(pid))


def _disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)


class Output:
    """The folder `path` that `writer` (e.g. "compress") is about to write, reading
    `inputs` (paths, None skipped). Everything is checked at construction, before any
    slow work; `writing()` does the write."""

    def __init__(self, path: str | os.PathLike, writer: str,
                 inputs: Iterable[str | os.PathLike | None] = ()):
        self.path, self.writer = Path(path), writer
        self._check([Path(p) for p in inputs if p is not None])

    def _check(self, inputs: list[Path]) -> None:
        path = self.path
        target = path.resolve()
        for source in inputs:
            source = source.resolve()
            if source == target or target in source.parents:
                raise RankwiseError(f"refusing to write {path}: it is {'' if source == target else 'a folder holding '}"
                                    f"an input of this run ({source}); write the result elsewhere")
        if path.exists():
            if not path.is_dir():
                raise RankwiseError(f"refusing to overwrite {path}: it is a file")
            if any(path.iterdir()) and writer_of(path) != self.writer:
                who = writer_of(path)
                raise RankwiseError(f"refusing to overwrite {path}: it is not an output of "
                                    f"rankwise {self.writer}"
                                    + (f" (rankwise {who} wrote it)" if who else ""))
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise RankwiseError(f"cannot create {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RankwiseError(f"cannot create {path}: {parent} is not writable")

    def _tidy(self) -> None:
        """Remove what killed runs left beside the target; put back an output that was
        moved aside when its replacement never arrived."""
        parent, name = self.path.parent, self.path.name
        for left in parent.glob(f".{name}.*-*"):
            kind, _, tag = left.name[len(name) + 2:].partition("-")
            if kind not in ("tmp", "old") or not left_by_dead_process(tag):
                continue
            if kind == "old" and not self.path.exists():
                left.rename(self.path)
            else:
                shutil.rmtree(left, ignore_errors=True)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A fresh temporary folder to write everything into; on leaving it becomes the
        target, or on an error it is removed (a full disk: one sentence)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tidy()
        tag = f"{owner_tag()}-{uuid.uuid4().hex[:8]}"
        tmp = self.path.with_name(f".{self.path.name}.tmp-{tag}")
        tmp.mkdir()
        try:
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"writer": self.writer}))
            if self.path.exists():
                old = self.path.with_name(f".{self.path.name}.old-{tag}")
                self.path.rename(old)
                tmp.rename(self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(self.path)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(e):
                raise RankwiseError(f"no space left on the disk holding {self.path.parent} "
                                    f"while writing {self.path.name}; nothing was written") from None
            raise


def write_file(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write a file atomically: a temporary file beside it (named for its owner, unique),
    renamed over it. `data` is the content, or a function that writes the file it is given
    (torch.save of a checkpoint); a full disk is one sentence, with nothing left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{owner_tag()}-{uuid.uuid4().hex[:8]}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _disk_full(e):
            raise RankwiseError(f"no space left on the disk holding {path.parent} while "
                                f"writing {path.name}; nothing was written") from None
        if isinstance(e, OSError):
            raise RankwiseError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path
