"""The background writer: completions, ratings and preferences into the database, in batches.

Request handlers only enqueue (`submit`) or enqueue and wait for the commit
(`submit_and_wait`, used by the feedback API so that a 200 means stored). One thread takes
records off the queue, redacts them when the policy says so, and commits a batch per
transaction: many ratings share one commit. When the database fails, the batch goes to the
on-disk spool (fsynced before anyone is told it is stored) and later records follow it there,
so order is kept; the spool is replayed once the database answers again.
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

from sqlalchemy import Engine, Table, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from feedback.db import dialect_insert
from feedback.models import Completion, Conversation, Preference, Rating, RatingEvent, pair_key
from feedback.spool import Spool

logger = logging.getLogger(__name__)

_STOP = object()


class QueueFullError(RuntimeError):
    """The writer is too far behind to take more records right now."""


class RecordRejectedError(RuntimeError):
    """The database refused a record for its content (not for an outage)."""


@dataclass(slots=True)
class Record:
    data: dict[str, Any]
    ack: concurrent.futures.Future | None = field(default=None)


@dataclass(slots=True)
class WriterStats:
    written: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected: int = 0


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
        retry_interval: float = 5.0,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self._engine = engine
        self.spool = Spool(spool_dir, rotate_after=max(batch_size * 4, 1000))
        self._redact = redact
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._on_batch = on_batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._healthy = True
        self._next_retry = 0.0
        self._setup: Callable[[], None] | None = None
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

    def submit(self, data: dict[str, Any]) -> None:
        """Log a record without waiting; never blocks the event loop."""
        try:
            self._queue.put_nowait(Record(data))
        except queue.Full:
            # Far behind: keep the record rather than block generation.
            logger.warning("feedback queue full; spooling a %s record directly", data.get("kind"))
            self._spool([data])

    async def submit_and_wait(self, data: dict[str, Any]) -> None:
        """Log a record and return once it is committed or safely spooled."""
        ack: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait(Record(data, ack))
        except queue.Full:
            raise QueueFullError("feedback queue is full") from None
        await asyncio.wrap_future(ack)

    def close(self, timeout: float = 30.0) -> None:
        """Write out everything queued (or spool it), then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("feedback writer did not finish within %.0f s", timeout)
        self._thread = None

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take_batch()
            try:
                self._replay_if_due()
                if batch:
                    self._handle(batch)
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
        batch = [first]
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
            batch.append(item)
            waited_on = waited_on or item.ack is not None
        return batch, False

    def _handle(self, batch: list[Record]) -> None:
        for record in batch:
            if self._redact is not None:
                record.data = self._redact(record.data)
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
        except SQLAlchemyError:
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
            except SQLAlchemyError as exc:
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
        except OSError as exc:
            logger.error("spool write failed: %s", exc)
            for record in batch:
                if record.ack is not None and not record.ack.done():
                    record.ack.set_exception(exc)
            return
        for record in batch:
            _resolve(record)

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
            rows = self.spool.read(path)
            try:
                self._write(rows)
            except (OperationalError, InterfaceError) as exc:
                self._mark_down(exc)
                return
            except SQLAlchemyError:
                for row in rows:
                    try:
                        self._write([row])
                    except (OperationalError, InterfaceError) as exc:
                        # Rows already written are idempotent on the next replay.
                        self._mark_down(exc)
                        return
                    except SQLAlchemyError as exc:
                        self._reject(row, exc)
            self.spool.remove(path, len(rows))
            self.stats.replayed += len(rows)
            self._report("replayed", len(rows), 0.0)

    def _reject(self, row: dict[str, Any], exc: Exception) -> None:
        # Kept beside the spool for an operator to inspect; never retried automatically.
        logger.error("database rejected a %s record: %s", row.get("kind"), _short(exc))
        Spool(self.spool.directory / "rejected").append([{**row, "_error": _short(exc)}])
        self.stats.rejected += 1
        self._report("rejected", 1, 0.0)

    def _report(self, outcome: str, count: int, seconds: float) -> None:
        if self._on_batch is not None:
            self._on_batch(outcome, count, seconds)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """One transaction for all rows; idempotent, so a replayed batch adds nothing twice."""
        conversations: dict[str, dict] = {}
        completions, events = [], []
        ratings: dict[tuple[str, str], dict] = {}
        preferences: dict[tuple[str, str], dict] = {}
        for row in rows:
            kind = row["kind"]
            if kind == "completion":
                at = _time(row["created_at"])
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
                ratings[(row["completion_id"], row["user_key"])] = {
                    **fields,
                    "created_at": at,
                    "updated_at": at,
                }
            elif kind == "preference":
                at = _time(row["at"])
                key = pair_key(row["chosen_completion_id"], row["rejected_completion_id"])
                preferences[(key, row["user_key"])] = {
                    "pair_key": key,
                    "chosen_completion_id": row["chosen_completion_id"],
                    "rejected_completion_id": row["rejected_completion_id"],
                    "user_key": row["user_key"],
                    "comment": row.get("comment"),
                    "created_at": at,
                    "updated_at": at,
                }
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        with self._engine.begin() as connection:
            insert = dialect_insert(connection)
            if conversations:
                _upsert(
                    connection, insert, Conversation, list(conversations.values()), ["id"], ["last_active_at"]
                )
            if completions:
                _upsert(connection, insert, Completion, completions, ["id"], None)
            if events:
                _upsert(connection, insert, RatingEvent, events, ["id"], None)
            if ratings:
                updated = ["thumb", "score", "comment", "correction", "tags", "updated_at"]
                _upsert(
                    connection, insert, Rating, list(ratings.values()), ["completion_id", "user_key"], updated
                )
            if preferences:
                updated = ["chosen_completion_id", "rejected_completion_id", "comment", "updated_at"]
                _upsert(
                    connection,
                    insert,
                    Preference,
                    list(preferences.values()),
                    ["pair_key", "user_key"],
                    updated,
                )


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


def _upsert(connection, insert, model, rows, keys, updated) -> None:
    table: Table = model.__table__
    statement = insert(table)
    if updated:
        statement = statement.on_conflict_do_update(
            index_elements=keys, set_={name: statement.excluded[name] for name in updated}
        )
    else:
        statement = statement.on_conflict_do_nothing(index_elements=keys)
    connection.execute(statement, rows)


def _time(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _resolve(record: Record) -> None:
    if record.ack is not None and not record.ack.done():
        record.ack.set_result(None)


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
