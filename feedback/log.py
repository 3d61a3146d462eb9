"""The background writer: completions, ratings and preferences into the database, in batches.

Request handlers only submit (`submit`) or submit and wait for the commit (`submit_and_wait`,
used by the feedback API so that a 200 means stored). A record is redacted first, when the
policy says so, in a small pool of its own: nothing unredacted is queued, spooled or written,
and a request with a lot of text pays for its own redaction without holding the writer. One
thread takes records off the queue (bounded in records and in bytes) and commits a batch per
transaction: many ratings share one commit. When the database fails, the batch goes to the
on-disk spool (fsynced before anyone is told it is stored) and later records follow it there,
so order is kept; the spool is replayed once the database answers again.

Replays are safe to repeat and to run late: inserts are idempotent, a stale rating never
overwrites a newer one, and records created before an erasure (`db delete-user`, `db purge`)
are dropped instead of bringing erased data back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, or_, select, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from feedback.db import upsert
from feedback.models import Completion, Conversation, Erasure, Preference, Rating, RatingEvent, pair_key
from feedback.records import LogRecord
from feedback.retention import user_hash
from feedback.spool import REJECTED, BadLine, Spool, SpoolFullError, purge_rejected

logger = logging.getLogger(__name__)

_STOP = object()
# Set on every record that went through redaction (the storage policy): replay redacts any
# spooled record without it, such as one spooled before this marker existed.
REDACTED = "_redacted"
# What a record costs in memory beyond its text (keys, numbers, the Record itself).
_RECORD_OVERHEAD = 512
# A malformed record (from an old or damaged spool) fails with one of these, not a database error.
_MALFORMED = (KeyError, TypeError, ValueError)


class QueueFullError(RuntimeError):
    """The writer is too far behind to take more records right now."""


class RecordRejectedError(RuntimeError):
    """The database refused a record for its content (not for an outage)."""


@dataclass(slots=True)
class Record:
    data: dict[str, Any]
    ack: concurrent.futures.Future | None = field(default=None)
    size: int = 0


@dataclass(slots=True)
class WriterStats:
    written: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected: int = 0
    dropped: int = 0
    erased: int = 0


def record_size(data: dict[str, Any]) -> int:
    """About how many bytes a record holds: its free text, plus a fixed overhead."""
    size = _RECORD_OVERHEAD
    for key in ("response", "comment", "correction"):
        value = data.get(key)
        if isinstance(value, str):
            size += len(value)
    for message in data.get("messages") or ():
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, str):
                size += len(content)
            elif content is not None:
                size += len(str(content))
    return size


class FeedbackWriter:
    def __init__(
        self,
        engine: Engine,
        spool_dir: Path,
        *,
        redact: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        batch_size: int = 256,
        flush_interval: float = 0.02,
        queue_size: int = 100_000,
        queue_bytes: int = 256 * 2**20,
        max_spool_bytes: int | None = None,
        redact_workers: int = 2,
        retry_interval: float = 5.0,
        rejected_retention_s: float | None = None,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self._engine = engine
        self.spool = Spool(spool_dir, rotate_after=max(batch_size * 4, 1000), max_bytes=max_spool_bytes)
        self._rejected: Spool | None = None
        self._redact = redact
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._on_batch = on_batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        # Redaction (and the spool write of a record the queue cannot take) runs here, never on
        # the event loop nor on the writer thread.
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=redact_workers, thread_name_prefix="feedback-redact"
        )
        self._thread: threading.Thread | None = None
        self._healthy = True
        self._next_retry = 0.0
        self._setup: Callable[[], None] | None = None
        self._rejected_retention_s = rejected_retention_s
        self._next_rejected_purge = 0.0
        self.stats = WriterStats()

    # -- caller side -------------------------------------------------------------------------

    def require_setup(self, setup: Callable[[], None]) -> None:
        """Spool everything until `setup` (migrations) has run against a reachable database."""
        self._setup = setup
        self._healthy = False
        self._next_retry = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """False while the database is failing (records go to the spool)."""
        return self._healthy

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def pending_bytes(self) -> int:
        return self._queued_bytes

    def _needs_redaction(self, data: dict[str, Any]) -> bool:
        return self._redact is not None and not data.get(REDACTED)

    def prepare(self, data: dict[str, Any]) -> dict[str, Any]:
        """The record as it may be stored: redacted under the storage policy, and marked so."""
        if not self._needs_redaction(data):
            return data
        return {**self._redact(data), REDACTED: True}

    def submit(self, record: LogRecord) -> concurrent.futures.Future:
        """Log a record without waiting; never blocks the event loop.

        The future resolves once the record is queued (or spooled, or dropped because the
        spool is full too, which is logged and counted). Records that need redaction are
        redacted in parallel, so they may reach the queue out of order: what depends on a
        record, such as a rating of this completion, waits for its future first.
        """
        data = record.row()
        if not self._needs_redaction(data) and self._put(Record(data)):
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)
            return done
        try:
            return self._prepare_pool.submit(self._prepare_and_queue, data)
        except RuntimeError:  # the pool is shut down: the writer is closing
            closing: concurrent.futures.Future = concurrent.futures.Future()
            self._prepare_and_queue(data)
            closing.set_result(None)
            return closing

    async def submit_and_wait(self, record: LogRecord) -> None:
        """Log a record and return once it is committed or safely spooled."""
        data = record.row()
        prepared = data
        if self._needs_redaction(data):  # no thread hop when there is nothing to redact
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self._prepare_pool, self.prepare, data)
        ack: concurrent.futures.Future = concurrent.futures.Future()
        if not self._put(Record(prepared, ack)):
            raise QueueFullError("feedback queue is full")
        await asyncio.wrap_future(ack)

    def close(self, timeout: float = 30.0) -> None:
        """Write out everything queued (or spool it), then stop the thread."""
        if self._thread is None:
            return
        self._prepare_pool.shutdown(wait=True)  # what is being redacted still gets queued
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("feedback writer did not finish within %.0f s", timeout)
        self._thread = None

    def _prepare_and_queue(self, data: dict[str, Any]) -> None:
        try:
            prepared = self.prepare(data)
        except Exception:
            # Never store what could not be redacted.
            logger.exception("redaction failed; a %s record was not logged", data.get("kind"))
            self._count_dropped(1)
            return
        if self._put(Record(prepared)):
            return
        # Far behind: keep the record rather than block generation.
        logger.warning("feedback queue full; spooling a %s record directly", prepared.get("kind"))
        try:
            self._spool([prepared])
        except OSError as exc:
            logger.error("a %s record was not logged: %s", prepared.get("kind"), exc)
            self._count_dropped(1)

    def _put(self, record: Record) -> bool:
        """Queue the record unless the queue is full in records or in bytes."""
        record.size = record_size(record.data)
        with self._bytes_lock:
            # One record larger than the whole budget still goes through an empty queue.
            if self._queued_bytes and self._queued_bytes + record.size > self._queue_bytes:
                return False
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                return False
            self._queued_bytes += record.size
        return True

    def _taken(self, record: Record) -> Record:
        with self._bytes_lock:
            self._queued_bytes -= record.size
        return record

    def _count_dropped(self, count: int) -> None:
        self.stats.dropped += count
        self._report("dropped", count, 0.0)

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take_batch()
            try:
                self._replay_if_due()
                if batch:
                    self._handle(batch)
                self._purge_rejected_if_due()
            except Exception:  # the thread must survive anything
                logger.exception("feedback writer failed on a batch; spooling it")
                self._spool_and_ack([r for r in batch if not (r.ack and r.ack.done())])
        # Drain: whatever is left in the spool gets one more chance before exit.
        self._replay_if_due(force=True)

    def _take_batch(self) -> tuple[list[Record], bool]:
        wait = self._retry_interval if len(self.spool) else None
        try:
            first = self._queue.get(timeout=wait)
        except queue.Empty:
            return [], False
        if first is _STOP:
            return [], True
        batch = [self._taken(first)]
        waited_on = first.ack is not None
        deadline = time.monotonic() + self._flush_interval
        while len(batch) < self._batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if waited_on:
                    # Group commit: someone waits for this batch, so write what has come in;
                    # whatever arrives during the commit makes the next batch.
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                return batch, True
            batch.append(self._taken(item))
            waited_on = waited_on or item.ack is not None
        return batch, False

    def _handle(self, batch: list[Record]) -> None:
        if not self._healthy or len(self.spool):
            # Keep order: nothing overtakes what is already waiting in the spool.
            self._spool_and_ack(batch)
            return
        started = time.perf_counter()
        try:
            self._write([r.data for r in batch])
        except (OperationalError, InterfaceError) as exc:
            self._mark_down(exc)
            self._spool_and_ack(batch)
            return
        except (SQLAlchemyError, *_MALFORMED):
            self._write_one_by_one(batch)
            return
        self.stats.written += len(batch)
        self._report("written", len(batch), time.perf_counter() - started)
        for record in batch:
            _resolve(record)

    def _write_one_by_one(self, batch: list[Record]) -> None:
        for index, record in enumerate(batch):
            try:
                self._write([record.data])
            except (OperationalError, InterfaceError) as exc:
                self._mark_down(exc)
                self._spool_and_ack(batch[index:])
                return
            except (SQLAlchemyError, *_MALFORMED) as exc:
                self._reject(record.data, exc)
                if record.ack is not None and not record.ack.done():
                    record.ack.set_exception(RecordRejectedError(str(exc.__class__.__name__)))
                continue
            self.stats.written += 1
            self._report("written", 1, 0.0)
            _resolve(record)

    def _spool(self, rows: list[dict[str, Any]]) -> None:
        count = self.spool.append(rows)
        self.stats.spooled += count
        self._report("spooled", count, 0.0)

    def _spool_and_ack(self, batch: list[Record]) -> None:
        try:
            self._spool([r.data for r in batch])
        except SpoolFullError as exc:
            logger.error("%s; refusing ratings and dropping log records until it drains", exc)
            # Whatever still fits goes in, in order; only what does not is refused.
            for record in batch:
                try:
                    self._spool([record.data])
                except OSError as one:
                    self._refuse([record], one)
                else:
                    _resolve(record)
            return
        except OSError as exc:
            logger.error("spool write failed: %s", exc)
            self._refuse(batch, exc)
            return
        for record in batch:
            _resolve(record)

    def _refuse(self, batch: list[Record], exc: OSError) -> None:
        """Records neither written nor spooled: their waiters get the error (a 503), the rest
        are counted as dropped."""
        dropped = 0
        for record in batch:
            if record.ack is None:
                dropped += 1
            elif not record.ack.done():
                record.ack.set_exception(exc)
        if dropped:
            self._count_dropped(dropped)

    def _mark_down(self, exc: Exception) -> None:
        if self._healthy:
            logger.error("database unavailable, spooling records: %s", _short(exc))
        self._healthy = False
        self._next_retry = time.monotonic() + self._retry_interval

    def _replay_if_due(self, *, force: bool = False) -> None:
        if not len(self.spool) and self._healthy:
            return
        if not force and time.monotonic() < self._next_retry:
            return
        try:
            with self._engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            if self._setup is not None:
                self._setup()
                self._setup = None
        except (OperationalError, InterfaceError, DBAPIError) as exc:
            self._mark_down(exc)
            return
        if not self._healthy:
            logger.info("database is back; replaying %d spooled records", len(self.spool))
        self._healthy = True
        self.spool.seal()
        for path in self.spool.files():
            rows, bad = self.spool.read(path)
            for line in bad:
                self._reject_line(path, line)
            try:
                rows = [self.prepare(row) for row in rows]
            except Exception:
                # Unredactable rows stay in the spool for an operator rather than be stored.
                logger.exception("spool %s: redaction failed; the file is kept", path.name)
                self._mark_down(RuntimeError("redaction failed during replay"))
                return
            try:
                self._write(rows)
            except (OperationalError, InterfaceError) as exc:
                self._mark_down(exc)
                return
            except (SQLAlchemyError, *_MALFORMED):
                for row in rows:
                    try:
                        self._write([row])
                    except (OperationalError, InterfaceError) as exc:
                        # Rows already written are idempotent on the next replay.
                        self._mark_down(exc)
                        return
                    except (SQLAlchemyError, *_MALFORMED) as exc:
                        self._reject(row, exc)
            self.spool.remove(path)
            self.stats.replayed += len(rows)
            self._report("replayed", len(rows), 0.0)

    def _purge_rejected_if_due(self) -> None:
        if self._rejected_retention_s is None or time.monotonic() < self._next_rejected_purge:
            return
        self._next_rejected_purge = time.monotonic() + 3600
        removed = purge_rejected(self.spool.directory, self._rejected_retention_s)
        if removed:
            logger.info("deleted %d rejected/ file(s) past feedback.rejected_retention_days", removed)

    def _rejected_spool(self) -> Spool:
        if self._rejected is None:
            self._rejected = Spool(self.spool.directory / REJECTED)
        return self._rejected

    def _reject(self, row: dict[str, Any], exc: Exception) -> None:
        # Kept beside the spool for an operator to inspect; never retried automatically.
        logger.error("database rejected a %s record: %s", row.get("kind"), _short(exc))
        self._rejected_spool().append([{**row, "_error": _short(exc)}])
        self.stats.rejected += 1
        self._report("rejected", 1, 0.0)

    def _reject_line(self, path: Path, line: BadLine) -> None:
        logger.error("spool %s line %d: %s; moved to rejected/", path.name, line.number, line.reason)
        self._rejected_spool().append(
            [{"kind": "unreadable", "raw": line.raw, "_error": line.reason, "_file": path.name}]
        )
        self.stats.rejected += 1
        self._report("rejected", 1, 0.0)

    def _report(self, outcome: str, count: int, seconds: float) -> None:
        if self._on_batch is not None:
            self._on_batch(outcome, count, seconds)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """One transaction for all rows; idempotent, so a replayed batch adds nothing twice."""
        with self._engine.begin() as connection:
            rows = self._without_erased(connection, rows)
            conversations: dict[str, dict] = {}
            completions, events = [], []
            ratings: dict[tuple[str, str], dict] = {}
            preferences: dict[tuple[str, str], dict] = {}
            for row in rows:
                kind = row["kind"]
                if kind == "completion":
                    at = _time(row["created_at"])
                    conversation = conversations.get(row["conversation_id"])
                    if conversation is None or conversation["last_active_at"] < at:
                        conversations[row["conversation_id"]] = {
                            "id": row["conversation_id"],
                            "user_key": row["user_key"],
                            "created_at": at,
                            "last_active_at": at,
                        }
                    completions.append(_completion_row(row, at))
                elif kind == "rating":
                    at = _time(row["at"])
                    fields = {k: row[k] for k in ("completion_id", "user_key", "thumb", "score", "comment")}
                    fields.update(correction=row["correction"], tags=row["tags"])
                    events.append({"id": row["event_id"], **fields, "created_at": at})
                    key = (row["completion_id"], row["user_key"])
                    if key not in ratings or ratings[key]["updated_at"] <= at:
                        ratings[key] = {**fields, "created_at": at, "updated_at": at}
                elif kind == "preference":
                    at = _time(row["at"])
                    pair = pair_key(row["chosen_completion_id"], row["rejected_completion_id"])
                    key = (pair, row["user_key"])
                    if key not in preferences or preferences[key]["updated_at"] <= at:
                        preferences[key] = {
                            "pair_key": pair,
                            "chosen_completion_id": row["chosen_completion_id"],
                            "rejected_completion_id": row["rejected_completion_id"],
                            "user_key": row["user_key"],
                            "comment": row.get("comment"),
                            "created_at": at,
                            "updated_at": at,
                        }
                else:
                    raise ValueError(f"unknown record kind {kind!r}")
            if conversations:
                upsert(
                    connection,
                    Conversation,
                    list(conversations.values()),
                    ["id"],
                    ["last_active_at"],
                    newer="last_active_at",
                )
            if completions:
                upsert(connection, Completion, completions, ["id"])
            if events:
                upsert(connection, RatingEvent, events, ["id"])
            if ratings:
                updated = ["thumb", "score", "comment", "correction", "tags", "updated_at"]
                upsert(
                    connection,
                    Rating,
                    list(ratings.values()),
                    ["completion_id", "user_key"],
                    updated,
                    newer="updated_at",
                )
            if preferences:
                updated = ["chosen_completion_id", "rejected_completion_id", "comment", "updated_at"]
                upsert(
                    connection,
                    Preference,
                    list(preferences.values()),
                    ["pair_key", "user_key"],
                    updated,
                    newer="updated_at",
                )

    def _without_erased(self, connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows no erasure covers: a replay must not bring back what was deleted meanwhile."""
        hashes = {row["user_key"]: user_hash(row["user_key"]) for row in rows if row.get("user_key")}
        erasures = connection.execute(
            select(Erasure.scope, Erasure.user_hash, Erasure.before).where(
                or_(Erasure.scope == "older_than", Erasure.user_hash.in_(set(hashes.values())))
            )
        ).all()
        if not erasures:
            return rows
        older_than = max((_aware(e.before) for e in erasures if e.scope == "older_than"), default=None)
        users: dict[str, datetime] = {}
        for erasure in erasures:
            if erasure.scope == "user":
                before = _aware(erasure.before)
                users[erasure.user_hash] = max(before, users.get(erasure.user_hash, before))
        kept = []
        for row in rows:
            at = _time(row["created_at"] if row["kind"] == "completion" else row["at"])
            erased_user = users.get(hashes.get(row.get("user_key"), ""))
            if (older_than is not None and at < older_than) or (
                erased_user is not None and at <= erased_user
            ):
                continue
            kept.append(row)
        if len(kept) < len(rows):
            self.stats.erased += len(rows) - len(kept)
            self._report("erased", len(rows) - len(kept), 0.0)
        return kept


_COMPLETION_COLUMNS = [c.name for c in Completion.__table__.columns if c.name not in ("created_at",)]


def _completion_row(row: dict[str, Any], at: datetime) -> dict[str, Any]:
    values = {name: row.get(name) for name in _COMPLETION_COLUMNS}
    values["created_at"] = at
    values["experiment"] = values["experiment"] or ""
    values["variant"] = values["variant"] or ""
    values["redacted"] = bool(values["redacted"])
    values["sampling"] = values["sampling"] or {}
    values["source"] = values["source"] or "live"
    return values


def _time(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes (stored as UTC).
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _resolve(record: Record) -> None:
    if record.ack is not None and not record.ack.done():
        record.ack.set_result(None)


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
