"""Migrations, the batched writer, the spool and outages, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from feedback.db import make_engine, migrate
from feedback.log import FeedbackWriter, RecordRejectedError
from feedback.records import CompletionRecord, RatingRecord
from feedback.spool import Spool, adopt_orphaned_spools, worker_spool_dir
from tests.utils.db import skip_or_fail_without_postgres
from tests.utils.tcp_proxy import TCPProxy

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=2"


def completion(index: int, **overrides) -> CompletionRecord:
    fields = {
        "id": f"chatcmpl-{index:06d}-{uuid.uuid4().hex[:8]}",
        "conversation_id": f"conv-{index % 7}",
        "user_key": "u",
        "created_at": time.time(),
        "model_version": "base",
        "messages": [{"role": "user", "content": f"question {index}"}],
        "prompt_hash": f"{index:064d}",
        "response": f"answer {index}",
        "sampling": {"temperature": 0.0},
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "finish_reason": "stop",
    }
    return CompletionRecord(**{**fields, **overrides})


def rating(completion_id: str, thumb: str = "up") -> RatingRecord:
    return RatingRecord(
        event_id=uuid.uuid4().hex, completion_id=completion_id, user_key="u", thumb=thumb, at=time.time()
    )


# The spool and the writer's batches hold rows (dicts with their `kind`); `submit` takes records.
def completion_row(index: int, **overrides) -> dict:
    return completion(index, **overrides).row()


def rating_row(completion_id: str, thumb: str = "up") -> dict:
    return rating(completion_id, thumb).row()


def count(url: str, table: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


def writer_for(url: str, spool: Path, **options) -> FeedbackWriter:
    writer = FeedbackWriter(
        make_engine(url), spool, retry_interval=options.pop("retry_interval", 0.2), **options
    )
    writer.start()
    return writer


def wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def test_records_are_batched_and_drained_on_close(database_url: str, tmp_path: Path):
    migrate(database_url)
    batches: list[int] = []
    writer = writer_for(
        database_url,
        tmp_path / "spool",
        on_batch=lambda outcome, n, _s: batches.append(n) if outcome == "written" else None,
    )
    rows = [completion(i) for i in range(600)]
    for row in rows:
        writer.submit(row)
    for row in rows[:300]:
        writer.submit(rating(row.id))
    writer.close()  # a clean shutdown writes out everything queued
    assert count(database_url, "completion") == 600
    assert count(database_url, "rating") == 300
    assert count(database_url, "conversation") == 7
    assert sum(batches) == 900
    assert len(batches) < 100, "records should share transactions"
    assert writer.stats.spooled == 0


async def test_submit_and_wait_returns_after_commit(database_url: str, tmp_path: Path):
    migrate(database_url)
    writer = writer_for(database_url, tmp_path / "spool")
    try:
        row = completion(1)
        writer.submit(row)
        await writer.submit_and_wait(rating(row.id))
        assert count(database_url, "rating") == 1
    finally:
        writer.close()


async def test_a_bad_record_is_rejected_alone(database_url: str, tmp_path: Path):
    migrate(database_url)
    writer = writer_for(database_url, tmp_path / "spool", flush_interval=0.2)
    try:
        good = completion(1)
        writer.submit(good)
        # A rating of a completion that does not exist breaks the foreign key.
        results = await asyncio.gather(
            writer.submit_and_wait(rating("chatcmpl-missing")),
            writer.submit_and_wait(rating(good.id)),
            return_exceptions=True,
        )
        assert isinstance(results[0], RecordRejectedError)
        assert results[1] is None
        assert count(database_url, "completion") == 1 and count(database_url, "rating") == 1
        rejected = Spool(tmp_path / "spool" / "rejected")
        assert len(rejected) == 1
    finally:
        writer.close()


async def test_unreachable_database_spools_and_a_restart_replays(database_url: str, tmp_path: Path):
    migrate(database_url)
    spool_dir = tmp_path / "spool"
    down = writer_for(UNREACHABLE, spool_dir)
    rows = [completion(i) for i in range(50)]
    for row in rows:
        down.submit(row)
    # Acknowledged from the spool (fsynced), though the database never answered.
    await asyncio.wait_for(down.submit_and_wait(rating(rows[0].id, "down")), 30)
    down.close(timeout=30)
    assert not down.healthy
    assert len(Spool(spool_dir)) == 51

    up = writer_for(database_url, spool_dir)
    wait_until(lambda: len(up.spool) == 0)
    up.close()
    assert count(database_url, "completion") == 50
    assert count(database_url, "rating") == 1
    assert up.stats.replayed == 51


def test_replaying_a_batch_twice_adds_nothing(database_url: str, tmp_path: Path):
    migrate(database_url)
    row = completion(1)
    records = [row.row(), rating(row.id).row()]
    writer = FeedbackWriter(make_engine(database_url), tmp_path / "spool")
    writer._write(records)
    writer._write(records)  # as after a crash between commit and deleting the spool file
    assert (count(database_url, "completion"), count(database_url, "rating")) == (1, 1)
    assert count(database_url, "rating_event") == 1


def test_spool_reads_past_a_torn_last_line(tmp_path: Path):
    spool = Spool(tmp_path)
    spool.append([{"kind": "a"}, {"kind": "b"}])
    path = spool.files()[0]
    with open(path, "a") as handle:
        handle.write('{"kind": "c"')  # the process died mid-write
    reopened = Spool(tmp_path)
    assert len(reopened) == 2
    records, bad = reopened.read(path)
    assert [r["kind"] for r in records] == ["a", "b"]
    assert [(line.number, line.raw) for line in bad] == [(3, '{"kind": "c"')]


def test_a_worker_takes_over_the_spools_nobody_runs(database_url: str, tmp_path: Path):
    """`serve --workers N`: each worker spools in its own folder; files of workers that exited
    (or of an earlier single-process run) are replayed by whichever worker starts next."""
    migrate(database_url)
    root = tmp_path / "spool"
    rows = [completion(i).row() for i in range(4)]
    Spool(root).append(rows[:1])  # an earlier single-process run
    Spool(worker_spool_dir(root, 999_999_999)).append(rows[1:3])  # a worker that exited
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        Spool(worker_spool_dir(root, alive.pid)).append(rows[3:])  # a worker still running
        own = worker_spool_dir(root)
        assert adopt_orphaned_spools(root, own) == 2
        assert adopt_orphaned_spools(root, own) == 0
        assert not worker_spool_dir(root, 999_999_999).exists()
        assert len(Spool(worker_spool_dir(root, alive.pid))) == 1  # left to its owner
        writer = writer_for(database_url, own)
        writer.start()
        wait_until(lambda: count(database_url, "completion") == 3)
        writer.close()
        assert not writer.spool.files()
    finally:
        alive.kill()
        alive.wait()


async def test_postgres_outage_mid_run_loses_nothing(tmp_path: Path):
    """Cut the connection to PostgreSQL while records flow, then restore it."""
    skip_or_fail_without_postgres()
    from tests.utils.db import postgres_schema_url

    url, drop = postgres_schema_url()
    parsed = make_url(url)
    proxy = TCPProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    proxied = parsed.set(host="127.0.0.1", port=proxy.port).update_query_dict({"connect_timeout": "2"})
    try:
        migrate(url)
        writer = writer_for(proxied.render_as_string(hide_password=False), tmp_path / "spool")
        before = [completion(i) for i in range(100)]
        for row in before:
            writer.submit(row)
        wait_until(lambda: writer.stats.written == 100)

        proxy.cut()
        during = [completion(i) for i in range(100, 300)]
        for row in during:
            writer.submit(row)
        acks = [writer.submit_and_wait(rating(row.id)) for row in during[:50]]
        await asyncio.wait_for(asyncio.gather(*acks), 60)  # acknowledged while the database is down
        wait_until(lambda: not writer.healthy and len(writer.spool) >= 250)

        proxy.restore()
        wait_until(lambda: writer.healthy and len(writer.spool) == 0, timeout=60)
        writer.close()
        assert count(url, "completion") == 300
        assert count(url, "rating") == 50
        assert count(url, "rating_event") == 50
    finally:
        proxy.close()
        drop()


@pytest.mark.parametrize("bad", ["not-a-url", "mysql://x@127.0.0.1/db"])
def test_unsupported_database_urls_fail_clearly(bad: str):
    with pytest.raises(Exception):  # noqa: B017 - SQLAlchemy raises ArgumentError or NoSuchModuleError
        make_engine(bad)
