"""Redaction policy, TRL-format export, purge and user deletion, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback.db import make_engine, migrate
from feedback.export import ExportFilter, examples, export_jsonl
from feedback.log import FeedbackWriter
from feedback.redact import Redactor
from feedback.retention import delete_user, parse_duration, purge_older_than
from loopchat.settings import FeedbackSettings, Settings
from serving.app import create_app
from tests.conftest import REPO, wait_ready
from tests.feedback.test_writer import completion_row as completion
from tests.feedback.test_writer import count
from tests.feedback.test_writer import rating_row as rating
from tests.utils.db import wait_for_rows
from tests.utils.fake_engine import FakeEngine

PII = "Mail me at jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111."


def seeded(url: str, tmp_path: Path) -> dict[str, str]:
    """A small log: rated, corrected, compared and unrated completions of two users."""
    migrate(url)
    writer = FeedbackWriter(make_engine(url), tmp_path / "spool")
    rows = {
        "good": completion(1, user_key="alice", messages=[{"role": "user", "content": PII}]),
        "bad": completion(2, user_key="alice"),
        "fixed": completion(3, user_key="bob"),
        "meh": completion(4, user_key="bob"),
        "left": completion(5, user_key="bob", prompt_hash="p" * 64, pair_id="cmp-1"),
        "right": completion(6, user_key="bob", prompt_hash="p" * 64, pair_id="cmp-1"),
        "old": completion(7, user_key="carol", created_at=time.time() - 100 * 86400),
        "unrated": completion(8, user_key="alice"),
    }
    up, down, fixed = (rating(rows[k]["id"]) for k in ("good", "bad", "fixed"))
    up.update(user_key="alice", thumb="up")
    down.update(user_key="alice", thumb="down")
    fixed.update(user_key="bob", thumb=None, correction=f"Better: write to {PII}")
    meh = {**rating(rows["meh"]["id"]), "user_key": "bob", "thumb": None, "score": 3}
    old = {**rating(rows["old"]["id"]), "user_key": "carol", "thumb": "up"}
    # Alice also rates one of Bob's (anonymous-looking) answers: her rating goes when she goes.
    alice_on_bob = {**rating(rows["meh"]["id"]), "user_key": "alice", "thumb": "down"}
    preference = {
        "kind": "preference",
        "chosen_completion_id": rows["right"]["id"],
        "rejected_completion_id": rows["left"]["id"],
        "user_key": "bob",
        "comment": None,
        "at": time.time(),
    }
    writer._write([*rows.values(), up, down, fixed, meh, old, alice_on_bob, preference])
    return {key: row["id"] for key, row in rows.items()}


def test_export_formats(database_url: str, tmp_path: Path):
    ids = seeded(database_url, tmp_path)
    engine = make_engine(database_url)
    redactor = Redactor()
    sft = list(examples(engine, "sft", redactor, metadata=True))
    assert {(r["completion_id"], r["source"]) for r in sft} == {
        (ids["good"], "rating"),
        (ids["old"], "rating"),
        (ids["fixed"], "correction"),
    }
    for row in sft:
        assert set(row) >= {"prompt", "completion"}
        assert row["prompt"][-1]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    kto = list(examples(engine, "kto", redactor, metadata=True))
    labels = {(r["completion_id"], r["source"]): r["label"] for r in kto}
    assert labels[(ids["good"], "rating")] is True
    assert labels[(ids["bad"], "rating")] is False
    assert labels[(ids["fixed"], "correction")] is True
    # Bob's 3 stars say nothing; only Alice's thumbs down on the same answer counts.
    assert [r["label"] for r in kto if r["completion_id"] == ids["meh"]] == [False]
    dpo = list(examples(engine, "dpo", redactor, metadata=True))
    by_source = {r["source"]: r for r in dpo}
    assert by_source["preference"]["chosen_completion_id"] == ids["right"]
    assert by_source["correction"]["chosen"][0]["content"].startswith("Better: write to")
    engine.dispose()


def test_export_is_redacted_whatever_was_stored(database_url: str, tmp_path: Path):
    seeded(database_url, tmp_path)
    engine = make_engine(database_url)
    out = tmp_path / "out" / "kto.jsonl"
    written = export_jsonl(engine, "kto", out, Redactor(), ExportFilter())
    text = out.read_text()
    assert written == len(text.splitlines()) > 0
    assert "jane.doe@example.com" not in text and "4111 1111 1111 1111" not in text
    assert "<EMAIL>" in text and "<CREDIT_CARD>" in text and "<PHONE>" in text
    only_recent = list(examples(engine, "sft", Redactor(), ExportFilter(model_version="nope")))
    assert only_recent == []
    engine.dispose()


def test_purge_older_than(database_url: str, tmp_path: Path):
    ids = seeded(database_url, tmp_path)
    engine = make_engine(database_url)
    dry = purge_older_than(engine, timedelta(days=90), dry_run=True)
    assert (dry.completions, dry.ratings) == (1, 1)
    assert count(database_url, "completion") == 8
    deleted = purge_older_than(engine, timedelta(days=90))
    assert (deleted.completions, deleted.ratings, deleted.preferences) == (1, 1, 0)
    assert count(database_url, "completion") == 7
    assert (
        wait_for_rows(database_url, "SELECT id FROM completion WHERE id = :i", 1, timeout=0, i=ids["old"])
        == []
    )
    # Ratings of the purged completion went with it, history included.
    assert count(database_url, "rating") == 5 and count(database_url, "rating_event") == 5
    engine.dispose()


def test_delete_user(database_url: str, tmp_path: Path):
    seeded(database_url, tmp_path)
    engine = make_engine(database_url)
    dry = delete_user(engine, "alice", dry_run=True)
    deleted = delete_user(engine, "alice")
    assert (dry.completions, dry.ratings) == (deleted.completions, deleted.ratings) == (3, 3)
    for table, column in (("completion", "user_key"), ("rating", "user_key"), ("rating_event", "user_key")):
        rows = wait_for_rows(database_url, f"SELECT * FROM {table} WHERE {column} = 'alice'", 1, timeout=0)
        assert rows == [], table
    assert count(database_url, "completion") == 5  # bob's and carol's stay
    assert count(database_url, "rating") == 3
    with pytest.raises(ValueError):
        delete_user(engine, "")
    engine.dispose()


@pytest.mark.parametrize(("text", "days"), [("90d", 90), ("2w", 14), ("12h", 0.5)])
def test_parse_duration(text: str, days: float):
    assert parse_duration(text) == timedelta(days=days)


@pytest.mark.parametrize("text", ["", "90", "d", "-5d", "0d", "5y", "1.5d"])
def test_parse_duration_refuses(text: str):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_redaction_before_storage(settings: Settings, tmp_path: Path):
    settings = settings.model_copy(
        update={
            "feedback": FeedbackSettings(redact="storage", custom_patterns={"order_id": r"\bORD-\d{6}\b"})
        }
    )
    engine = FakeEngine(max_model_len=512)
    with TestClient(create_app(settings, engine=engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)
        body = {"messages": [{"role": "user", "content": PII + " Order ORD-123456."}], "max_tokens": 8}
        response = client.post("/v1/chat/completions", json=body).json()
        answer = response["choices"][0]["message"]["content"]
        stored = client.post(
            "/v1/feedback", json={"completion_id": response["id"], "comment": "I am jane.doe@example.com"}
        )
        assert stored.status_code == 200
    rows = wait_for_rows(settings.db_url, "SELECT messages, response, redacted FROM completion", 1)
    messages = json.loads(rows[0]["messages"])
    assert "jane.doe" not in messages[0]["content"] and "ORD-123456" not in messages[0]["content"]
    assert "<EMAIL>" in messages[0]["content"] and "<ORDER_ID>" in messages[0]["content"]
    assert rows[0]["redacted"] in (1, True)
    assert answer  # the client got its answer as generated
    comment = wait_for_rows(settings.db_url, "SELECT comment FROM rating", 1)[0]["comment"]
    assert comment == "I am <EMAIL>"


def test_redaction_at_export_stores_text_as_sent(settings: Settings, fake_engine):
    settings = settings.model_copy(update={"feedback": FeedbackSettings(redact="export")})
    with TestClient(create_app(settings, engine=fake_engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PII}]})
    rows = wait_for_rows(settings.db_url, "SELECT messages, redacted FROM completion", 1)
    assert "jane.doe@example.com" in rows[0]["messages"]
    assert rows[0]["redacted"] in (0, False)


def test_logging_can_be_turned_off(settings: Settings, fake_engine):
    settings = settings.model_copy(update={"feedback": FeedbackSettings(log_completions=False)})
    with TestClient(create_app(settings, engine=fake_engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert wait_for_rows(settings.db_url, "SELECT id FROM completion", 1, timeout=0.3) == []


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loopchat.cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_export_purge_and_delete(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    ids = seeded(url, tmp_path)
    env = {"LOOPCHAT_DATABASE_URL": url, "LOOPCHAT_DATA_DIR": str(tmp_path)}
    out = tmp_path / "dpo.jsonl"
    result = cli("export", "--format", "dpo", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 dpo examples" in result.stdout and len(out.read_text().splitlines()) == 2
    bad = cli("export", "--format", "ppo", "--out", str(out), env=env)
    assert bad.returncode != 0 and "sft, kto, dpo" in bad.stderr
    assert cli("db", "purge", "--older-than", "ninety", env=env).returncode != 0
    purged = cli("db", "purge", "--older-than", "90d", env=env)
    assert purged.returncode == 0 and "1 completions" in purged.stdout, purged.stdout + purged.stderr
    erased = cli("db", "delete-user", "bob", env=env)
    assert erased.returncode == 0 and "4 completions" in erased.stdout, erased.stdout + erased.stderr
    assert count(url, "completion") == 3
    assert ids
    down = cli("db", "upgrade", env={**env, "LOOPCHAT_DATABASE_URL": "postgresql+psycopg://x@127.0.0.1:1/x"})
    assert down.returncode == 1 and "error: database" in down.stderr and "Traceback" not in down.stderr
