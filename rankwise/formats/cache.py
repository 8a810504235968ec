"""The user's cache: what a repeated run would compute again for nothing, kept between runs
and keyed by content.

An entry is a folder under $RANKWISE_CACHE (default $XDG_CACHE_HOME/rankwise, or
~/.cache/rankwise), named by the sha256 of its key: a JSON of everything that determines
it (a model file's sha256, sampling settings, the versions that could change the bytes).
It holds its files and `entry.json`, the key and each file's sha256; an entry whose files
do not match, whose record is not what this code writes, or that names a file outside its
own folder is corrupted: removed and computed again, never trusted. Entries are written to
a temporary folder renamed into place, so a reader sees a whole entry or none; a cache that
cannot be written (read-only, full disk) costs only the time. The cache folder is created
private to the user; one that others may write to (another user could plant an entry) is
not used, and the run says so once.

Kept: a GGUF model converted to a Hugging Face folder (loading the GGUF parses its whole
vocabulary twice: ~20 s for the embedded 135M model, against ~0.5 s for the folder), and
the windows sampled from a model for `self` calibration. `record` says, per kind, whether
this run found its entry ("hit"), computed it ("miss") or ran without the cache ("off"),
for the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from ..errors import RankwiseError
from .atomic import owner_tag, write_file

log = logging.getLogger(__name__)

VERSION = 1          # of the entries' layout


def default_root() -> Path:
    if os.environ.get("RANKWISE_CACHE"):
        return Path(os.environ["RANKWISE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rankwise"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class Cache:
    def __init__(self, enabled: bool = True, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.enabled = enabled and _private(self.root)
        self.record: dict[str, str] = {}

    def digest(self, path: str | os.PathLike) -> str:
        """sha256 of a model's content: a file's bytes, or a folder's files' (names and
        bytes), memoised by path, size and modification time (for files not modified in
        the last seconds)."""
        path = Path(path).resolve()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        memo_path = self.root / "digests.json"
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        h, changed, now = hashlib.sha256(), False, time.time_ns()
        for f in files:
            st = f.stat()
            stamp = f"{f}:{st.st_size}:{st.st_mtime_ns}"
            digest = memo.get(stamp) or file_digest(f)
            # a file changed within the last seconds could change again within one tick of
            # the clock, keeping its stamp: such a digest is not memoised
            if stamp not in memo and now - st.st_mtime_ns > 2e9:
                memo[stamp], changed = digest, True
            h.update(f"{f.relative_to(path) if f != path else f.name}:{digest}".encode())
        if changed and self.enabled:
            self._write_json(memo_path, memo)
        return h.hexdigest()

    def _folder(self, kind: str, key: dict) -> Path:
        name = hashlib.sha256(json.dumps({"v": VERSION, **key}, sort_keys=True).encode()).hexdigest()
        return self.root / kind / name[:32]

    def get(self, kind: str, key: dict) -> Path | None:
        """The folder of a whole, intact entry, or None (a damaged one is removed)."""
        if not self.enabled:
            self.record[kind] = "off"
            return None
        folder = self._folder(kind, key)
        try:
            entry = json.loads((folder / "entry.json").read_text())
            files = entry["files"]
            intact = entry.get("key") == key and isinstance(files, dict) and all(
                _plain_name(name) and isinstance(digest, str) and
                file_digest(folder / name) == digest for name, digest in files.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            intact = False
        if not intact:
            if folder.exists():
                log.warning("cache entry %s is damaged; computing it again", folder)
                shutil.rmtree(folder, ignore_errors=True)
            self.record[kind] = "miss"
            return None
        self.record[kind] = "hit"
        return folder

    def put(self, kind: str, key: dict, write: Callable[[Path], None]) -> Path | None:
        """Store an entry whose files `write(folder)` writes; None when the cache is off or
        cannot be written."""
        if not self.enabled:
            return None
        folder = self._folder(kind, key)
        tmp = folder.with_name(f".{folder.name}.tmp-{owner_tag()}-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            files = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / "entry.json").write_text(json.dumps({"key": key, "files": files}))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("could not write the cache entry %s (%s); continuing without it",
                        folder, e.strerror or e)
            return None
        return folder

    def usable(self, read) -> object | None:
        """`read()` of an entry's files, or None when what they hold is not what this code
        reads (the entry is then computed again, never a crash)."""
        try:
            return read()
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            log.warning("a cache entry holds what this version cannot read (%s); computing it "
                        "again", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None

    @staticmethod
    def _write_json(path: Path, data) -> None:
        try:
            write_file(path, json.dumps(data))
        except (OSError, RankwiseError):    # a cache that cannot be written costs only time
            pass


def _plain_name(name) -> bool:
    """A file name an entry may hold: one component, no way out of its folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and \
        "\\" not in name and "\0" not in name


_WARNED: set[Path] = set()


def _private(root: Path) -> bool:
    """Create the cache folder private to this user (0700); False, said once, for one that
    another user owns or that group or others may write to."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = root.stat()
    except OSError:
        return True                  # unwritable: every put fails quietly, as documented
    if st.st_uid == os.getuid() and not st.st_mode & 0o022:
        return True
    if root not in _WARNED:
        _WARNED.add(root)
        log.warning("the cache folder %s can be written by other users; not using it (make "
                    "it yours with chmod go-w, or set RANKWISE_CACHE)", root)
    return False
