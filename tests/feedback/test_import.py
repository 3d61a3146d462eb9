"""`loopchat import`: the committed transcript fixtures (planted PII, markup, sign-offs, malformed
lines) into SQLite and PostgreSQL; re-import, interruption, the command line."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from feedback import importer
from feedback.clean import CleaningConfig
from feedback.db import make_engine
from feedback.import_rows import IMPORT_RATER
from feedback.importer import import_file
from feedback.models import Completion, Conversation, ImportBatch, Rating, RatingEvent

DATA = Path(__file__).parent / "data" / "import"
JSONL, CSV = DATA / "transcripts.jsonl", DATA / "transcripts.csv"
# Planted in the fixtures; none may reach the database.
PII = ["jane.doe@example.com", "7946 0958", "4111 1111 1111 1111", "DE89 3704", "867-5309", "help.desk@acme"]


def counts(engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            model.__tablename__: connection.execute(
                select(func.count()).select_from(model.__table__)
            ).scalar_one()
            for model in (Conversation, Completion, Rating, RatingEvent)
        }


def stored_text(engine) -> str:
    with engine.connect() as connection:
        rows = connection.execute(select(Completion.messages, Completion.response)).all()
    return json.dumps([[m, r] for m, r in rows], ensure_ascii=False)


def imported(engine) -> dict[str, tuple[list, str, str | None, int | None, list]]:
    """Answer -> (prompt, source, thumb, stars, tags)."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                Completion.messages,
                Completion.response,
                Completion.source,
                Rating.thumb,
                Rating.score,
                Rating.tags,
            ).outerjoin(Rating, Rating.completion_id == Completion.id)
        ).all()
    return {r.response: (r.messages, r.source, r.thumb, r.score, r.tags) for r in rows}


def test_jsonl_transcripts_are_validated_cleaned_labelled_and_imported_once(engine) -> None:
    report = import_file(engine, JSONL, source="helpdesk")
    assert report.status == "finished"
    assert [(e.line, e.error.split(":")[0]) for e in report.errors] == [
        (3, "Expecting ',' delimiter"),
        (5, "messages.1.role"),
        (6, "messages"),
        (7, "rating"),
        (16, "not valid UTF-8 (invalid continuation byte at byte 46)"),
    ]
    assert "unknown role 'narrator'" in report.errors[1].error and "7 is not 1-5" in report.errors[3].error
    assert report.counts["conversations read"] == 10 and report.counts["malformed records"] == 5
    assert report.counts["answers added"] == 8 and report.counts["ratings added"] == 6
    assert report.cleaning == {
        "pii redacted": 4,
        "html stripped": 1,
        "signatures stripped": 1,
        "duplicate": 1,
        "too short": 1,
        "empty messages dropped": 1,
    }

    text = stored_text(engine)
    assert not [pii for pii in PII if pii in text]
    assert "<EMAIL>" in text and "<PHONE>" in text and "<CREDIT_CARD>" in text and "<IBAN>" in text
    answers = imported(engine)
    assert set(answers) >= {
        "Go to Account > Addresses and click Edit.\nChanges apply to new orders only.",  # HTML to text
        "Of course, a colleague will call you within the hour.",  # the sign-off cut
    }
    assert all(source == "import" for _, source, *_ in answers.values())
    # Labels as ratings: approval, stars on the conversation for its last answer, resolved, rejection.
    first = answers["Sorry to hear that! I've sent a reset link to your address. Please check your inbox."]
    assert first[2:] == ("up", None, ["import", "agent-approved", "resolved"])
    assert answers["Of course, a colleague will call you within the hour."][2:] == (
        None,
        5,
        ["import", "rated", "resolved"],
    )
    assert answers["I cannot refund without an order number."][2] == "down"
    assert answers["I'm sorry! I have re-sent it with express shipping at no cost."][2:] == (
        "down",
        None,
        ["import", "unresolved"],
    )
    assert answers["Yes, for orders above 50 euros."][2] is None  # no label, no rating
    # The greeting before the customer spoke stays as context of the next answer.
    prompt = answers["I'm sorry! I have re-sent it with express shipping at no cost."][0]
    assert [m["role"] for m in prompt] == ["assistant", "user"]

    with Session(engine) as session:
        batch = session.get(ImportBatch, report.batch)
        assert batch is not None and batch.status == "finished" and batch.source == "helpdesk"
        assert batch.counts["answers added"] == 8 and batch.errors[0]["line"] == 3 and batch.format == "jsonl"
        raters = session.exec(select(Rating.user_key).distinct()).scalars().all()
        assert raters == [IMPORT_RATER]

    before = counts(engine)
    again = import_file(engine, JSONL, source="helpdesk")
    assert counts(engine) == before
    assert again.counts["answers added"] == 0 and again.counts["answers already imported"] == 8
    assert again.counts["ratings added"] == 0 and again.counts["conversations added"] == 0


def test_csv_transcripts_group_rows_and_skip_whole_conversations_with_a_bad_row(engine) -> None:
    report = import_file(engine, CSV)
    assert report.source == "transcripts"
    assert [e.line for e in report.errors] == [13, 15, 21, 22]
    assert "unknown role 'robot'" in report.errors[0].error and "'c-3' skipped" in report.errors[0].error
    assert "contiguous" in report.errors[2].error and "3 fields" in report.errors[3].error
    answers = imported(engine)
    # c-3 and c-4 had a bad row: nothing of them was written.
    text = stored_text(engine)
    assert "cancel my subscription" not in text and "student discount" not in text
    assert not [pii for pii in PII if pii in text]
    # Two agent messages in a row are one answer, its sign-off cut; labels on the rows.
    assert answers["Please update to 2.4;\nit fixes that crash."][2:] == (
        "up",
        None,
        ["import", "agent-approved", "resolved"],
    )
    assert answers["Yes! Shipping to Canada takes 5-7 days."][2:4] == (None, 5)
    assert answers["Yes, within 30 days, with the gift receipt."][2:4] == (None, 2)
    assert report.counts["answers added"] == 6
    with engine.connect() as connection:
        times = (
            connection.execute(select(Completion.created_at).order_by(Completion.created_at)).scalars().all()
        )
    assert times[0].year == 2025 and times[0].month == 3  # the transcript's own timestamps
    before = counts(engine)
    assert import_file(engine, CSV).counts["answers added"] == 0 and counts(engine) == before


def test_an_interrupted_import_keeps_whole_conversations_and_resumes(
    engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    original, calls = importer._write, []

    def failing(engine, converter, transcripts, report):
        calls.append(len(transcripts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(engine, converter, transcripts, report)

    monkeypatch.setattr(importer, "_write", failing)
    with pytest.raises(KeyboardInterrupt):
        import_file(engine, JSONL, batch_size=2)
    with Session(engine) as session:
        batch = session.exec(select(ImportBatch)).scalars().one()
        assert batch.status == "interrupted" and batch.finished_at is not None
    partial = counts(engine)
    assert 0 < partial["completion"] < 8
    monkeypatch.setattr(importer, "_write", original)
    resumed = import_file(engine, JSONL, batch_size=2)
    assert resumed.counts["answers added"] == 8 - partial["completion"]
    assert counts(engine)["completion"] == 8
    # Every conversation has all its kept answers: none was cut in two.
    with engine.connect() as connection:
        per_conversation = dict(
            connection.execute(
                select(Completion.conversation_id, func.count()).group_by(Completion.conversation_id)
            ).all()
        )
    assert sorted(per_conversation.values()) == [1, 1, 1, 1, 1, 1, 2]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_gzip_tsv_and_cleaning_switches(engine, tmp_path: Path) -> None:
    tsv = tmp_path / "chats.tsv.gz"
    rows = [
        "conversation_id\trole\ttext",
        "a\tuser\tMail me: x.y@example.org",
        "a\tagent\t<p>Sure &amp; done</p>",
    ]
    tsv.write_bytes(gzip.compress("\n".join(rows).encode()))
    report = import_file(engine, tsv, cleaning=CleaningConfig(redact=False, html=False), assume_approved=True)
    assert report.counts["answers added"] == 1 and report.counts["ratings added"] == 1
    answers = imported(engine)
    prompt, _, thumb, _, tags = answers["<p>Sure &amp; done</p>"]
    assert prompt[0]["content"] == "Mail me: x.y@example.org" and thumb == "up" and "assumed-approved" in tags


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_formats_are_told_by_name_or_refused(engine, tmp_path: Path) -> None:
    unknown = tmp_path / "chats.txt"
    unknown.write_text("hello\n")
    with pytest.raises(ValueError, match="--format"):
        import_file(engine, unknown)
    header = tmp_path / "bad.csv"
    header.write_text("id,who,words\n1,user,hi\n")
    report = import_file(engine, header)
    assert (
        report.errors[0].line == 1 and "lacks column(s) conversation_id, role, text" in report.errors[0].error
    )
    assert report.counts["answers added"] == 0


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "LOOPCHAT_DATA_DIR": str(tmp_path),
        "COLUMNS": "160",
        "LOOPCHAT_BASE_MODEL": str(tmp_path / "no-model"),
        "LOOPCHAT_DATABASE_URL": f"sqlite:///{tmp_path / 'loopchat.db'}",
    }
    return subprocess.run(
        [sys.executable, "-m", "loopchat.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )


def test_the_import_command(tmp_path: Path) -> None:
    shutil.copy(JSONL, tmp_path / "support.jsonl")
    done = cli(tmp_path, "import", "support.jsonl")
    assert done.returncode == 0, done.stderr
    assert (
        "answers added" in done.stdout and "pii redacted" in done.stdout and "(source support)" in done.stdout
    )
    assert "line 3: Expecting ',' delimiter" in done.stderr and "line 16: not valid UTF-8" in done.stderr
    listed = cli(tmp_path, "imports", "list")
    assert "support" in listed.stdout and "finished" in listed.stdout
    batch_id = next(w for w in listed.stdout.split() if w.startswith("imp-"))
    shown = json.loads(cli(tmp_path, "imports", "show", batch_id).stdout)
    assert shown["counts"]["answers added"] == 8 and len(shown["errors"]) == 5
    assert cli(tmp_path, "import", "support.jsonl").returncode == 0
    url = f"sqlite:///{tmp_path / 'loopchat.db'}"
    engine = make_engine(url)
    assert counts(engine)["completion"] == 8
    engine.dispose()

    missing = cli(tmp_path, "import", "nope.jsonl")
    assert missing.returncode == 1 and "no such file" in missing.stderr
    (tmp_path / "notes.txt").write_text("x")
    unknown = cli(tmp_path, "import", "notes.txt")
    assert unknown.returncode == 1 and "--format" in unknown.stderr and "Traceback" not in unknown.stderr
