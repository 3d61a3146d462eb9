"""Append-only spool on local disk for records the database could not take.

Records are JSON lines in numbered files. `append` writes and fsyncs before it returns, so a
record acknowledged from the spool survives a crash. Files are replayed oldest first and
deleted only after their records are committed; a file holds at most `rotate_after` records
so one replay transaction stays small.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Spool:
    def __init__(self, directory: Path, *, rotate_after: int = 1000) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rotate_after = rotate_after
        self._lock = threading.Lock()
        self._current: Path | None = None
        self._current_count = 0
        files = self.files()
        self._next_number = int(files[-1].stem.split("-")[1]) + 1 if files else 0
        self._count = sum(_count_lines(path) for path in files)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("spool-*.jsonl"))

    def __len__(self) -> int:
        return self._count

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        lines = [json.dumps(record, separators=(",", ":"), default=str) + "\n" for record in records]
        if not lines:
            return 0
        with self._lock:
            if self._current is None or self._current_count >= self._rotate_after:
                self._current = self.directory / f"spool-{self._next_number:012d}.jsonl"
                self._next_number += 1
                self._current_count = 0
            with open(self._current, "a", encoding="utf-8") as handle:
                handle.writelines(lines)
                handle.flush()
                os.fsync(handle.fileno())
            self._current_count += len(lines)
            self._count += len(lines)
        return len(lines)

    def seal(self) -> None:
        """Start a new file for the next append, so that replay never reads a growing file."""
        with self._lock:
            self._current = None

    def read(self, path: Path) -> list[dict[str, Any]]:
        records = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith("\n"):
                    # A torn last line: the process died mid-write, before acknowledging it.
                    logger.warning("spool %s: dropping incomplete line %d", path.name, number)
                    break
                records.append(json.loads(line))
        return records

    def remove(self, path: Path, count: int) -> None:
        with self._lock:
            path.unlink(missing_ok=True)
            self._count = max(0, self._count - count)
            if path == self._current:
                self._current = None


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.endswith(b"\n"))


def worker_spool_dir(root: Path, pid: int | None = None) -> Path:
    """The spool of one worker process when several serve from one data directory."""
    return root / f"worker-{pid or os.getpid()}"


def adopt_orphaned_spools(root: Path, own: Path) -> int:
    """Move into `own` the spool files that no running process owns, so they are replayed.

    With several workers (`loopchat serve --workers N`) each spools under `root/worker-<pid>`;
    a single process spools in `root` itself. Files left by a worker that exited, or by an
    earlier run with another worker count, would otherwise wait for their owner forever. Each
    file moves with one atomic rename: two workers starting together never take the same file.
    Returns how many files were taken over.
    """
    own.mkdir(parents=True, exist_ok=True)
    sources = [root] if root != own else []
    for folder in root.glob("worker-*"):
        pid = folder.name.removeprefix("worker-")
        if folder != own and pid.isdigit() and not _running(int(pid)):
            sources.append(folder)
    existing = sorted(own.glob("spool-*.jsonl"))
    number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
    taken = 0
    for source in sources:
        for path in sorted(source.glob("spool-*.jsonl")):
            target = own / f"spool-{number:012d}.jsonl"
            try:
                path.rename(target)
            except FileNotFoundError:  # another worker took it first
                continue
            number += 1
            taken += 1
        if source != root:
            # Left when not empty (a rejected/ folder) or already gone.
            with contextlib.suppress(OSError):
                source.rmdir()
    if taken:
        logger.info("spool: took over %d file(s) left by processes that no longer run", taken)
    return taken


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
