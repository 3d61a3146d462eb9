"""Append-only spool on local disk for records the database could not take.

Records are JSON lines in numbered files. `append` writes and fsyncs before it returns, so a
record acknowledged from the spool survives a crash. Files are replayed oldest first and
deleted only after their records are committed; a file holds at most `rotate_after` records
so one replay transaction stays small. The spool has a size cap: past it `append` raises
`SpoolFullError` rather than fill the disk. A line that cannot be read back (torn by a crash
or a full disk mid-write, or not JSON) goes to `rejected/` and the rest is replayed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REJECTED = "rejected"


class SpoolFullError(OSError):
    """The spool reached its size cap (`feedback.max_spool_bytes`)."""


@dataclass(frozen=True, slots=True)
class BadLine:
    """A spool line that could not be read back as a record."""

    number: int
    raw: str
    reason: str


class Spool:
    def __init__(self, directory: Path, *, rotate_after: int = 1000, max_bytes: int | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rotate_after = rotate_after
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._current: Path | None = None
        self._current_count = 0
        files = self.files()
        self._next_number = int(files[-1].stem.split("-")[1]) + 1 if files else 0
        self._count = sum(_count_lines(path) for path in files)
        self._bytes = sum(path.stat().st_size for path in files)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("spool-*.jsonl"))

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        lines = [
            (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode() for record in records
        ]
        if not lines:
            return 0
        size = sum(len(line) for line in lines)
        with self._lock:
            if self._max_bytes is not None and self._bytes + size > self._max_bytes:
                raise SpoolFullError(
                    f"spool {self.directory} is full ({self._bytes} of {self._max_bytes} bytes)"
                )
            if self._current is None or self._current_count >= self._rotate_after:
                self._current = self.directory / f"spool-{self._next_number:012d}.jsonl"
                self._next_number += 1
                self._current_count = 0
            with open(self._current, "ab") as handle:
                try:
                    handle.writelines(lines)
                    handle.flush()
                    os.fsync(handle.fileno())
                except OSError:
                    # A partial write (disk full) leaves a torn line; start a new file so that
                    # later records never follow it on the same line.
                    self._current = None
                    raise
            self._current_count += len(lines)
            self._count += len(lines)
            self._bytes += size
        return len(lines)

    def seal(self) -> None:
        """Start a new file for the next append, so that replay never reads a growing file."""
        with self._lock:
            self._current = None

    def read(self, path: Path) -> tuple[list[dict[str, Any]], list[BadLine]]:
        """The file's records, and the lines that are not records (torn, not UTF-8, not JSON)."""
        records: list[dict[str, Any]] = []
        bad: list[BadLine] = []
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                text = line.decode("utf-8", errors="replace")
                if not line.endswith(b"\n"):
                    bad.append(BadLine(number, text, "incomplete line (the write was cut short)"))
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
                    bad.append(BadLine(number, text, f"not a JSON record: {exc.__class__.__name__}"))
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
                    bad.append(BadLine(number, text, "not a feedback record"))
                    continue
                records.append(record)
        return records, bad

    def remove(self, path: Path) -> None:
        with self._lock:
            try:
                size = path.stat().st_size
                count = _count_lines(path)
            except FileNotFoundError:
                return
            path.unlink(missing_ok=True)
            self._count = max(0, self._count - count)
            self._bytes = max(0, self._bytes - size)
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


# -- rejected/: records the database refused, kept for an operator ----------------------------


def rejected_files(root: Path) -> list[Path]:
    """Every rejected/ file under the spool root (a single process's and each worker's)."""
    return sorted(root.glob(f"{REJECTED}/spool-*.jsonl")) + sorted(
        root.glob(f"worker-*/{REJECTED}/spool-*.jsonl")
    )


def purge_rejected(root: Path, older_than_s: float, *, dry_run: bool = False) -> int:
    """Delete rejected/ files last written more than `older_than_s` seconds ago; their count."""
    cutoff = time.time() - older_than_s
    removed = 0
    for path in rejected_files(root):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                if not dry_run:
                    path.unlink()
                removed += 1
    return removed


def erase_user_from_rejected(root: Path, user_key: str, *, dry_run: bool = False) -> int:
    """Remove a user's records from rejected/ (and raw lines that mention their key); the count.

    Each file is rewritten under a temporary name and renamed over the original, so a crash
    leaves either the old file or the new one.
    """
    needle = json.dumps(user_key)  # how the key appears inside a JSON line
    removed = 0
    for path in rejected_files(root):
        kept: list[bytes] = []
        dropped = 0
        with open(path, "rb") as handle:
            for line in handle:
                if _mentions(line, user_key, needle):
                    dropped += 1
                else:
                    kept.append(line)
        removed += dropped
        if dropped and not dry_run:
            if not kept:
                path.unlink(missing_ok=True)
                continue
            partial = path.with_name(path.name + ".partial")
            with open(partial, "wb") as out:
                out.writelines(kept)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(path)
    return removed


def _mentions(line: bytes, user_key: str, needle: str) -> bool:
    """Whether a rejected/ line is the user's: their record, or a raw line naming their key."""
    try:
        record = json.loads(line)
    except ValueError:
        return needle.encode() in line
    if not isinstance(record, dict):
        return needle.encode() in line
    return record.get("user_key") == user_key or needle in str(record.get("raw", ""))
