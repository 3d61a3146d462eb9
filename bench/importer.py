"""Import benchmark: records per second of `loopchat import` for 100k records on this machine.

Synthetic support transcripts are written once under .data/bench/import/: a JSON lines file of
`--records` conversations (one to three exchanges; e-mail addresses, phone numbers, HTML and
sign-offs planted in a share of them; half carry labels; 1 % malformed lines; 2 % repeated
conversations) and a CSV file of `--records` rows (one message each) of the same kind. Each is
imported into a fresh SQLite database and a fresh PostgreSQL schema, timed end to end as the
command does it (read, validate, clean, redact, hash, write in batches of 500), then imported
again (everything already there).

The peer is a plain loader of the same JSON lines into the same tables: `json.loads`, no
validation, no cleaning or redaction, the rows inserted with the same batched statements. The
ratio plain / loopchat says what validation, cleaning and the duplicate checks cost.

Results: a table on the console and bench/results/import.{json,md}.

Usage: .venv/bin/python -m bench.importer [--records 100000] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from feedback.db import dialect_insert, make_engine, migrate
from feedback.importer import import_file
from feedback.models import Completion, Conversation
from feedback.service import prompt_hash

REPO = Path(__file__).resolve().parent.parent

OUT = REPO / "bench" / "results"
WORK = REPO / ".data" / "bench" / "import"
TOPICS = [
    "parcel",
    "invoice",
    "password",
    "refund",
    "subscription",
    "delivery address",
    "discount",
    "app crash",
]
NAMES = ["Anna", "Tom", "Priya", "Jamal", "Mei", "Lukas", "Sofia", "Omar"]


def _question(rng: random.Random, i: int) -> str:
    text = f"Hello, I have a question about my {rng.choice(TOPICS)} (case {i}). What should I do next?"
    roll = rng.random()
    if roll < 0.2:
        text += f" You can reach me at customer{i}@example.com."
    elif roll < 0.3:
        text += f" Call me on +44 20 7946 {i % 10000:04d}."
    return text


def _answer(rng: random.Random, i: int) -> str:
    topic = rng.choice(TOPICS)
    text = f"Thanks for asking about case {i}. Please open Settings, choose {topic} and follow the steps."
    roll = rng.random()
    if roll < 0.1:
        text = f"<p>{text}</p><p>More help: <a href='https://acme.example/help'>help centre</a></p>"
    elif roll < 0.2:
        text += f"\n\nBest regards,\n{rng.choice(NAMES)}\nAcme Support"
    return text


def write_jsonl(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    previous: list[str] = []
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(records):
            if rng.random() < 0.01:
                handle.write('{"messages": [{"role": "user", "content": "cut off"\n')
                continue
            if previous and rng.random() < 0.02:
                handle.write(rng.choice(previous))
                continue
            messages = []
            for turn in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": _question(rng, i * 3 + turn)})
                answer: dict[str, Any] = {"role": "assistant", "content": _answer(rng, i * 3 + turn)}
                if rng.random() < 0.3:
                    answer["approved"] = rng.random() < 0.8
                messages.append(answer)
            record: dict[str, Any] = {"messages": messages}
            if rng.random() < 0.3:
                record["resolved"] = rng.random() < 0.7
            if rng.random() < 0.2:
                record["rating"] = rng.randint(1, 5)
            line = json.dumps(record) + "\n"
            handle.write(line)
            if len(previous) < 1000:
                previous.append(line)


def write_csv(path: Path, rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    written, conversation = 0, 0
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["conversation_id", "role", "text", "timestamp", "approved", "rating", "resolved"])
        while written < rows:
            conversation += 1
            at = start + dt.timedelta(minutes=conversation)
            for turn in range(rng.randint(1, 3)):
                if written >= rows:
                    break
                stamp = (at + dt.timedelta(seconds=turn * 60)).isoformat()
                role = "robot" if conversation % 200 == 0 else "customer"  # a malformed row now and then
                writer.writerow(
                    [f"c{conversation}", role, _question(rng, conversation * 3 + turn), stamp, "", "", ""]
                )
                writer.writerow(
                    [
                        f"c{conversation}",
                        "agent",
                        _answer(rng, conversation * 3 + turn),
                        (at + dt.timedelta(seconds=turn * 60 + 30)).isoformat(),
                        rng.choice(["", "", "true", "false"]),
                        rng.choice(["", "", "", "5", "1"]),
                        "",
                    ]
                )
                written += 2


def plain_load(engine, path: Path, batch: int = 500) -> int:
    """The peer: JSON lines straight into the tables, nothing checked or cleaned."""
    conversations, completions, done = [], [], 0
    now = dt.datetime.now(dt.UTC)

    def flush() -> None:
        with engine.begin() as connection:
            insert = dialect_insert(connection)
            connection.execute(insert(Conversation.__table__).on_conflict_do_nothing(), conversations)
            connection.execute(insert(Completion.__table__).on_conflict_do_nothing(), completions)
        conversations.clear()
        completions.clear()

    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            done += 1
            conversation_id = "plain-" + hashlib.sha256(line.encode()).hexdigest()[:40]
            conversations.append(
                {"id": conversation_id, "user_key": "", "created_at": now, "last_active_at": now}
            )
            messages = record["messages"]
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prompt = messages[:index]
                completions.append(
                    {
                        "id": f"{conversation_id[:50]}-{index}",
                        "conversation_id": conversation_id,
                        "user_key": "",
                        "created_at": now,
                        "model_version": "plain",
                        "experiment": "",
                        "variant": "",
                        "messages": prompt,
                        "prompt_hash": prompt_hash(prompt),
                        "response": message["content"],
                        "sampling": {},
                        "redacted": False,
                        "source": "import",
                    }
                )
            if len(conversations) >= batch:
                flush()
    if conversations:
        flush()
    return done


def fresh_database(kind: str, name: str) -> tuple[str, Any]:
    if kind == "sqlite":
        path = WORK / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{path}"
        migrate(url)
        return url, lambda: None
    from sqlalchemy import create_engine, text

    admin = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    database = f"loopchat_bench_{name}"
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {database}"))
        connection.execute(text(f"CREATE DATABASE {database}"))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    migrate(url)

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        admin.dispose()

    return url, drop


def timed_import(url: str, path: Path, records: int) -> dict[str, Any]:
    engine = make_engine(url)
    started = time.perf_counter()
    report = import_file(engine, path)
    first = time.perf_counter() - started
    started = time.perf_counter()
    again = import_file(engine, path)
    second = time.perf_counter() - started
    engine.dispose()
    return {
        "records": records,
        "seconds": round(first, 2),
        "records_per_s": round(records / first),
        "reimport_seconds": round(second, 2),
        "reimport_records_per_s": round(records / second),
        "answers_added": report.counts["answers added"],
        "malformed": report.counts["malformed records"],
        "reimport_added": again.counts["answers added"],
        "cleaning": dict(report.cleaning),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    jsonl, table = WORK / f"transcripts-{args.records}.jsonl", WORK / f"transcripts-{args.records}.csv"
    if not jsonl.is_file():
        write_jsonl(jsonl, args.records)
    if not table.is_file():
        write_csv(table, args.records)

    results: dict[str, Any] = {}
    for kind in ("sqlite", *(() if args.skip_postgres else ("postgresql",))):
        for fmt, path in (("jsonl", jsonl), ("csv", table)):
            url, drop = fresh_database(kind, f"{fmt}")
            try:
                results[f"{kind}/{fmt}"] = timed_import(url, path, args.records)
            finally:
                drop()
            print(f"{kind}/{fmt}: {results[f'{kind}/{fmt}']}", flush=True)
        url, drop = fresh_database(kind, "plain")
        try:
            engine = make_engine(url)
            started = time.perf_counter()
            loaded = plain_load(engine, jsonl)
            seconds = time.perf_counter() - started
            engine.dispose()
        finally:
            drop()
        results[f"{kind}/plain-jsonl"] = {
            "records": args.records,
            "seconds": round(seconds, 2),
            "records_per_s": round(args.records / seconds),
            "loaded": loaded,
        }
        ours = results[f"{kind}/jsonl"]["records_per_s"]
        results[f"{kind}/ratio_vs_plain"] = round(ours / results[f"{kind}/plain-jsonl"]["records_per_s"], 3)
        print(f"{kind}/plain-jsonl: {results[f'{kind}/plain-jsonl']}", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    document = {
        "benchmark": "import",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "results": results,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "import.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [
        "# Import benchmark",
        "",
        f"{args.records:,} records per file, {os.cpu_count()} CPUs, commit {document['commit']}.",
        "",
        "| database / format | records/s | seconds | answers added | malformed "
        "| re-import records/s | re-import added |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, value in results.items():
        if key.endswith("ratio_vs_plain") or "plain" in key:
            continue
        lines.append(
            f"| {key} | {value['records_per_s']:,} | {value['seconds']} | {value['answers_added']:,} | "
            f"{value['malformed']:,} | {value['reimport_records_per_s']:,} | {value['reimport_added']} |"
        )
    lines += ["", "| plain loader (peer, JSON lines) | records/s | loopchat / plain |", "|---|---|---|"]
    for kind in ("sqlite", "postgresql"):
        if f"{kind}/plain-jsonl" in results:
            lines.append(
                f"| {kind} | {results[f'{kind}/plain-jsonl']['records_per_s']:,} | "
                f"{results[f'{kind}/ratio_vs_plain']} |"
            )
    (OUT / "import.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
