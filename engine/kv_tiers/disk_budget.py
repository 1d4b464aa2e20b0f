"""The disk tier's byte budget, shared by every engine (process) writing under one directory.

The bytes in use live in ``<root>/.usage``, read and updated under an exclusive ``flock``
on ``<root>/.lock``, so several engines on one disk together stay within
``disk_kv_bytes``. A writer holds the lock while it reserves a file's bytes *and* writes
the file, so no reservation is ever invisible to another writer's scan. When the budget
would overflow, the writer rescans the whole directory (which also corrects any drift
left by a crashed writer) and deletes block files oldest-mtime first (mtime is a block's
last use) until the new file fits. Deleting a file another engine still indexes is safe:
that engine's read fails, which is a miss.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.kv_tiers.block_file import SUFFIX

# Temporary files older than this were left by a writer that died mid-write.
STALE_TMP_S = 600.0


class DiskBudget:
    """Reserve / release bytes of block files under ``root`` (not thread-safe: one IO thread)."""

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"disk capacity must be positive, got {capacity_bytes}")
        self.root = root
        self.capacity_bytes = capacity_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._lock_path = root / ".lock"
        self._usage_path = root / ".usage"

    @contextmanager
    def reserving(self, nbytes: int) -> Iterator[list[Path]]:
        """Hold the budget while the caller writes an ``nbytes`` file; yields the files
        deleted to make room. The bytes count only if the body returns normally.

        Raises ``ValueError`` when one file is larger than the whole budget.
        """
        if nbytes > self.capacity_bytes:
            raise ValueError(f"a {nbytes}-byte block file exceeds disk_kv_bytes={self.capacity_bytes}")
        deleted: list[Path] = []
        with self._locked():
            used = self._read_usage()
            if used is None or used + nbytes > self.capacity_bytes:
                used, deleted = self._evict_for(nbytes)
                self._write_usage(used)
            yield deleted
            self._write_usage(used + nbytes)

    def release(self, nbytes: int) -> None:
        """``nbytes`` of block files were deleted (or never written)."""
        with self._locked():
            used = self._read_usage()
            if used is not None:
                self._write_usage(max(used - nbytes, 0))

    def used_bytes(self) -> int:
        """Bytes of block files under ``root`` now, by a full scan under the lock (so no
        write or eviction is half-seen; tests and operators)."""
        with self._locked():
            return sum(size for _, size, _ in self._scan())

    # ---------------------------------------------------------------- internals
    def _evict_for(self, nbytes: int) -> tuple[int, list[Path]]:
        files = sorted(self._scan(), key=lambda f: f[2])
        used = sum(size for _, size, _ in files)
        deleted = []
        for path, size, _ in files:
            if used + nbytes <= self.capacity_bytes:
                break
            if path.name.endswith(".tmp"):
                continue  # another writer's file in progress: reserved, not evictable
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # another engine got there first
            used -= size
            deleted.append(path)
        return used, deleted

    def _scan(self) -> Iterator[tuple[Path, int, float]]:
        """(path, size, mtime) of every block file; removes stale temporary files."""
        now = time.time()
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if name.startswith(".usage"):
                    continue
                if name.endswith(".tmp"):
                    if now - st.st_mtime > STALE_TMP_S:
                        path.unlink(missing_ok=True)
                    else:
                        yield path, st.st_size, st.st_mtime  # a write in progress counts too
                elif name.endswith(SUFFIX):
                    yield path, st.st_size, st.st_mtime

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _read_usage(self) -> int | None:
        try:
            return int(self._usage_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_usage(self, used: int) -> None:
        tmp = self._usage_path.with_name(f".usage.{os.getpid()}.tmp")
        tmp.write_text(str(used))
        os.replace(tmp, self._usage_path)
