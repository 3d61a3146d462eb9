"""Nothing acknowledged is lost or leaked: overload, torn spools, a full spool, stale replays, erasure.

Each test plays one way a record could be lost, stored unredacted or brought back after it was
erased, against the real writer, spool and database (SQLite and PostgreSQL where it matters).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from feedback.db import make_engine, migrate
from feedback.log import REDACTED, FeedbackWriter, QueueFullError
from feedback.records import CompletionRecord, LogRecord, PreferenceRecord, RatingRecord
from feedback.redact import Redactor
from feedback.retention import delete_user, purge_older_than
from feedback.service import record_redactor
from feedback.spool import Spool, SpoolFullError, erase_user_from_rejected, purge_rejected
from serving.app import create_app
from tests.conftest import wait_ready
from tests.feedback.test_writer import UNREACHABLE, count, wait_until, writer_for
from tests.feedback.test_writer import completion as completion_record
from tests.feedback.test_writer import completion_row as completion
from tests.feedback.test_writer import rating as rating_record
from tests.feedback.test_writer import rating_row as rating
from tests.utils.fake_engine import FakeEngine

EMAIL = "jane.doe@example.com"


def as_record(row: dict) -> LogRecord:
    kinds = {"completion": CompletionRecord, "rating": RatingRecord, "preference": PreferenceRecord}
    return kinds[row["kind"]](**{k: v for k, v in row.items() if k != "kind"})


def with_pii(index: int, **overrides) -> dict:
    return completion(
        index,
        messages=[{"role": "user", "content": f"mail me at {EMAIL} about order {index}"}],
        response=f"Sure, I will write to {EMAIL}.",
        **overrides,
    )


def spooled_text(directory: Path) -> str:
    return "".join(path.read_text() for path in sorted(directory.rglob("*.jsonl")))


def stored_text(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT messages, response FROM completion")).all()
            notes = connection.execute(text("SELECT comment, correction FROM rating")).all()
    finally:
        engine.dispose()
    return json.dumps([list(map(str, row)) for row in [*rows, *notes]])


# -- redaction before anything is queued, spooled or written ------------------------------------


def test_a_full_queue_spools_only_redacted_records_and_they_are_stored_redacted(
    database_url: str, tmp_path: Path
):
    migrate(database_url)
    writer = FeedbackWriter(
        make_engine(database_url),
        tmp_path / "spool",
        redact=record_redactor(Redactor()),
        queue_size=1,  # the writer is not started yet: every record past the first overflows
        retry_interval=0.1,
    )
    futures = [writer.submit(as_record(with_pii(i))) for i in range(6)]
    for future in futures:
        future.result(timeout=10)
    assert len(writer.spool) == 5 and writer.pending == 1
    spooled = spooled_text(tmp_path / "spool")
    assert EMAIL not in spooled and spooled.count("<EMAIL>") == 10
    assert all(json.loads(line)[REDACTED] for line in spooled.splitlines())

    writer.start()
    wait_until(lambda: count(database_url, "completion") == 6)
    writer.close()
    stored = stored_text(database_url)
    assert EMAIL not in stored and "<EMAIL>" in stored


def test_replay_redacts_a_spooled_record_that_is_not_marked_redacted(database_url: str, tmp_path: Path):
    """A spool written by a version that spooled raw records: its replay redacts them."""
    migrate(database_url)
    raw = with_pii(1)
    note = {**rating(raw["id"]), "comment": f"write to {EMAIL}", "correction": f"Call {EMAIL}"}
    Spool(tmp_path / "spool").append([raw, note])
    writer = writer_for(database_url, tmp_path / "spool", redact=record_redactor(Redactor()))
    wait_until(lambda: count(database_url, "rating") == 1)
    writer.close()
    stored = stored_text(database_url)
    assert EMAIL not in stored and stored.count("<EMAIL>") == 4


def test_export_policy_stores_as_sent(database_url: str, tmp_path: Path):
    migrate(database_url)
    writer = writer_for(database_url, tmp_path / "spool", redact=None)
    writer.submit(as_record(with_pii(1))).result(timeout=5)
    wait_until(lambda: count(database_url, "completion") == 1)
    writer.close()
    assert EMAIL in stored_text(database_url)


async def test_slow_redaction_of_one_record_does_not_hold_the_writer(tmp_path: Path):
    """One request whose text takes seconds to redact: ratings around it commit as usual."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrate(url)
    slow = threading.Event()

    def redact(data: dict) -> dict:
        if data.get("response") == "huge":
            slow.set()
            time.sleep(3)  # what 1 MiB of phone-number-like digits costs the real redactor
        return data

    writer = writer_for(url, tmp_path / "spool", redact=redact)
    first = completion(1)
    writer.submit(as_record(first)).result(timeout=5)
    wait_until(lambda: count(url, "completion") == 1)
    huge = writer.submit(completion_record(2, response="huge"))
    assert await asyncio.to_thread(slow.wait, 5)
    started = time.perf_counter()
    for _ in range(5):
        await writer.submit_and_wait(rating_record(first["id"]))
    waited = time.perf_counter() - started
    assert not huge.done(), "the slow record should still be redacting"
    assert waited < 1.5, f"ratings waited {waited:.2f} s behind one record's redaction"
    await asyncio.wrap_future(huge)
    wait_until(lambda: count(url, "completion") == 2)
    writer.close()


async def test_the_queue_is_bounded_in_bytes(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrate(url)
    writer = FeedbackWriter(make_engine(url), tmp_path / "spool", queue_bytes=40_000, retry_interval=0.1)
    big = "x" * 10_000
    for i in range(10):  # not started: nothing leaves the queue
        writer.submit(completion_record(i, response=big)).result(timeout=5)
    assert writer.pending == 3 and 30_000 < writer.pending_bytes <= 40_000
    assert len(writer.spool) == 7  # the rest went to disk, not to memory
    with pytest.raises(QueueFullError):
        await writer.submit_and_wait(replace(rating_record("x"), correction=big))
    writer.start()
    wait_until(lambda: count(url, "completion") == 10)
    writer.close()
    assert writer.pending_bytes == 0


# -- the spool: torn lines, a size cap ------------------------------------------------------------


def test_torn_and_undecodable_spool_lines_go_to_rejected_and_replay_goes_on(
    database_url: str, tmp_path: Path
):
    migrate(database_url)
    root = tmp_path / "spool"
    rows = [completion(i) for i in range(4)]
    first = Spool(root)
    first.append(rows[:2])
    path = first.files()[0]
    with open(path, "ab") as handle:
        handle.write(b'{"kind": "completion", "id": \n')  # not JSON
        handle.write(b"\xff\xfe not utf-8\n")
        handle.write(b"[1, 2, 3]\n")  # JSON, not a record
        handle.write(b'{"kind": "completion", "id": "chatcmpl-torn"')  # a crash mid-write
    second = root / "spool-000000000009.jsonl"
    second.write_text("".join(json.dumps(row) + "\n" for row in rows[2:]))

    writer = writer_for(database_url, root)
    wait_until(lambda: count(database_url, "completion") == 4)
    wait_until(lambda: not Spool(root).files())
    writer.close()
    assert writer.stats.rejected == 4
    rejected = [json.loads(line) for line in spooled_text(root / "rejected").splitlines()]
    assert [r["kind"] for r in rejected] == ["unreadable"] * 4
    assert rejected[-1]["raw"].endswith('"chatcmpl-torn"') and "incomplete" in rejected[-1]["_error"]


def test_a_malformed_record_in_the_spool_is_rejected_not_retried_forever(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrate(url)
    root = tmp_path / "spool"
    good = completion(1)
    Spool(root).append([{"kind": "rating", "completion_id": "no-fields"}, good, {"kind": "mystery"}])
    writer = writer_for(url, root)
    wait_until(lambda: count(url, "completion") == 1 and not Spool(root).files())
    writer.close()
    assert writer.stats.rejected == 2


def test_the_spool_has_a_size_cap(tmp_path: Path):
    spool = Spool(tmp_path, max_bytes=2_000)
    spool.append([{"kind": "x", "text": "a" * 900}])
    with pytest.raises(SpoolFullError):
        spool.append([{"kind": "x", "text": "b" * 1_500}])
    assert len(spool) == 1 and spool.size_bytes < 2_000
    assert len(Spool(tmp_path, max_bytes=2_000)) == 1  # the cap counts what is on disk at start


def test_ratings_get_503_with_retry_after_once_the_spool_is_full(settings, tmp_path: Path):
    """The database is down and the spool at its cap: ratings are refused, never dropped silently."""
    feedback = settings.feedback.model_copy(update={"max_spool_bytes": 2**20, "retry_interval_s": 60})
    full = settings.model_copy(update={"database_url": UNREACHABLE, "feedback": feedback})
    engine = FakeEngine(max_model_len=8192)
    app = create_app(full, engine=engine, exit_on_engine_failure=False)
    with TestClient(app) as client:
        wait_ready(client)
        model, ids = engine.model_name, []
        for _ in range(100):  # 100 chats of 14k characters (7k tokens): well past 1 MiB of spool
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "y" * 14_000}],
                    "max_tokens": 4,
                },
            )
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        writer = app.state.feedback._writer
        wait_until(lambda: writer.stats.dropped > 0)
        statuses = []
        for completion_id in ids:  # ratings with long corrections fill what is left
            answer = client.post(
                "/v1/feedback",
                json={"completion_id": completion_id, "rating": "down", "correction": "z" * 8000},
            )
            statuses.append(answer.status_code)
            if answer.status_code != 200:
                break
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "5"
        assert answer.json()["error"]["code"] == "feedback_unavailable"
        assert writer.spool.size_bytes <= 2**20
        # Every rating that was acknowledged is in the spool.
        spooled = [json.loads(line) for line in spooled_text(full.spool_dir).splitlines()]
        assert sum(r["kind"] == "rating" for r in spooled) == statuses.count(200)
        metrics = client.get("/metrics/").text
        assert 'loopchat_feedback_records_total{outcome="dropped"}' in metrics


# -- replays after a partition: stale ratings, erasures -------------------------------------------


def test_a_stale_spooled_rating_never_overwrites_a_newer_one(database_url: str, tmp_path: Path):
    migrate(database_url)
    writer = FeedbackWriter(make_engine(database_url), tmp_path / "spool")
    answer = completion(1)
    older = {**rating(answer["id"], "up"), "at": time.time() - 60, "comment": "first thought"}
    newer = {**rating(answer["id"], "down"), "comment": "changed my mind"}
    writer._write([answer, newer])
    writer._write([older])  # replayed from a replica's spool after the partition healed
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            current = connection.execute(text("SELECT thumb, comment FROM rating")).one()
            history = connection.execute(text("SELECT count(*) FROM rating_event")).scalar_one()
    finally:
        engine.dispose()
    assert tuple(current) == ("down", "changed my mind")
    assert history == 2  # the history keeps both

    other = completion(2, conversation_id=answer["conversation_id"])
    chosen = {
        "kind": "preference",
        "chosen_completion_id": answer["id"],
        "rejected_completion_id": other["id"],
        "user_key": "u",
        "comment": "new",
        "at": time.time(),
    }
    stale = {**chosen, "chosen_completion_id": other["id"], "rejected_completion_id": answer["id"]}
    stale.update(comment="old", at=time.time() - 60)
    writer._write([other, chosen])
    writer._write([stale])
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            kept = connection.execute(text("SELECT chosen_completion_id, comment FROM preference")).one()
    finally:
        engine.dispose()
    assert tuple(kept) == (answer["id"], "new")


def test_a_user_erased_during_an_outage_is_not_brought_back_by_the_replay(database_url: str, tmp_path: Path):
    """Replica A spools alice's records while the database is unreachable from it; meanwhile
    `db delete-user alice` runs elsewhere. When A's spool replays, alice stays erased; what she
    does after the erasure is kept, and so is everyone else's data."""
    migrate(database_url)
    root = tmp_path / "spool"
    hers = completion(1, user_key="alice")
    theirs = completion(2, user_key="bob")
    Spool(root).append([hers, {**rating(hers["id"]), "user_key": "alice"}, theirs])
    time.sleep(0.01)
    engine = make_engine(database_url)
    delete_user(engine, "alice")
    time.sleep(0.01)
    later = completion(3, user_key="alice", created_at=time.time())
    writer = writer_for(database_url, root)
    wait_until(lambda: not Spool(root).files())
    writer.submit(as_record(later)).result(timeout=5)
    wait_until(lambda: count(database_url, "completion") == 2)
    writer.close()
    with engine.connect() as connection:
        ids = set(connection.execute(text("SELECT id FROM completion")).scalars())
        hashes = connection.execute(text("SELECT user_hash FROM erasure")).scalars().all()
    engine.dispose()
    assert ids == {theirs["id"], later["id"]}
    assert count(database_url, "rating") == 0
    assert writer.stats.erased == 2
    assert "alice" not in json.dumps(hashes)  # the tombstone keeps no identifier


def test_records_older_than_a_purge_are_not_brought_back_by_a_replay(database_url: str, tmp_path: Path):
    migrate(database_url)
    root = tmp_path / "spool"
    old = completion(1, created_at=time.time() - 100 * 86400)
    recent = completion(2)
    Spool(root).append([old, recent])
    engine = make_engine(database_url)
    purge_older_than(engine, timedelta(days=90))
    engine.dispose()
    writer = writer_for(database_url, root)
    wait_until(lambda: not Spool(root).files())
    writer.close()
    assert count(database_url, "completion") == 1 and writer.stats.erased == 1


def test_dry_runs_leave_no_tombstone(database_url: str):
    migrate(database_url)
    engine = make_engine(database_url)
    delete_user(engine, "alice", dry_run=True)
    purge_older_than(engine, timedelta(days=1), dry_run=True)
    engine.dispose()
    assert count(database_url, "erasure") == 0


# -- rejected/: retention and erasure ---------------------------------------------------------


def test_rejected_records_have_a_retention_and_are_erased_with_their_user(tmp_path: Path):
    root = tmp_path / "spool"
    rejected = Spool(root / "rejected")
    rejected.append([{**completion(1, user_key="alice"), "_error": "x"}])
    rejected.append([{**completion(2, user_key="bob"), "_error": "x"}])
    worker = Spool(root / "worker-123" / "rejected")
    worker.append([{"kind": "unreadable", "raw": '{"user_key": "alice", "id"', "_error": "torn"}])
    worker.append([{"kind": "unreadable", "raw": '{"user_key": "carol"', "_error": "torn"}])

    assert erase_user_from_rejected(root, "alice", dry_run=True) == 2
    assert erase_user_from_rejected(root, "alice") == 2
    left = spooled_text(root)
    assert "alice" not in left and "bob" in left and "carol" in left

    files = sorted(root.rglob("rejected/*.jsonl"))
    assert len(files) == 2
    old = time.time() - 40 * 86400
    os.utime(files[0], (old, old))
    assert purge_rejected(root, 30 * 86400) == 1
    assert len(list(root.rglob("rejected/*.jsonl"))) == 1


def test_the_cli_erases_a_user_from_rejected_too(tmp_path: Path):
    from tests.feedback.test_export_retention import cli

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate(url)
    Spool(tmp_path / "spool" / "rejected").append([{**completion(1, user_key="dora"), "_error": "x"}])
    env = {"LOOPCHAT_DATABASE_URL": url, "LOOPCHAT_DATA_DIR": str(tmp_path)}
    result = cli("db", "delete-user", "dora", env=env)
    assert result.returncode == 0, result.stderr
    assert "1 rejected spool records" in result.stdout
    assert "dora" not in spooled_text(tmp_path / "spool")
    assert count(url, "erasure") == 1


def test_postgres_connections_give_up_on_a_vanished_host_unless_the_url_says_otherwise() -> None:
    """A partitioned database must fail the writer's query in seconds (so it spools), not after
    the kernel's quarter of an hour; what the URL sets itself is kept."""
    from sqlalchemy.engine import make_url

    from feedback.db import LIBPQ_LIVENESS, make_engine
    from tests.utils.db import postgres_schema_url, skip_or_fail_without_postgres

    skip_or_fail_without_postgres()
    url, drop = postgres_schema_url()
    own = make_url(url).update_query_dict({"keepalives_idle": "7"}).render_as_string(hide_password=False)
    try:
        for engine_url, idle in ((url, LIBPQ_LIVENESS["keepalives_idle"]), (own, 7)):
            engine = make_engine(engine_url)
            try:
                with engine.connect() as connection:
                    params = connection.connection.dbapi_connection.info.get_parameters()
                assert params["keepalives"] == "1"
                assert params["keepalives_idle"] == str(idle)
                assert params["tcp_user_timeout"] == str(LIBPQ_LIVENESS["tcp_user_timeout"])
            finally:
                engine.dispose()
    finally:
        drop()
