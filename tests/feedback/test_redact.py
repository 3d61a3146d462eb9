"""PII redaction: precision and recall on the labelled set, and the Redactor's contract."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from feedback.redact import PIISpan, Redactor, iban_valid, luhn_valid

DATA = Path(__file__).parent / "data" / "pii_labelled.jsonl"
CUSTOM = {"order_id": r"\bORD-\d{6,}\b", "account_id": r"\bACC-\d{2}-\d{4}\b"}
ENTITIES = {"EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "ORDER_ID", "ACCOUNT_ID"}
MIN_OVERALL, MIN_PER_ENTITY = 0.95, 0.90


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(CUSTOM)


@pytest.fixture(scope="module")
def labelled() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_labelled_set_is_consistent(labelled: list[dict]) -> None:
    assert len(labelled) >= 250
    assert len({row["text"] for row in labelled}) == len(labelled), "duplicate texts"
    without = sum(1 for row in labelled if not row["spans"])
    assert 0.25 <= without / len(labelled) <= 0.5, f"{without} of {len(labelled)} rows without PII"
    counts: Counter[str] = Counter()
    for row in labelled:
        text, spans = row["text"], row["spans"]
        previous_end = 0
        for span in spans:
            assert span["entity"] in ENTITIES, row
            assert previous_end <= span["start"] < span["end"] <= len(text), row
            value = text[span["start"] : span["end"]]
            assert value == value.strip() and value[0] not in ".,;" and value[-1] not in ".,;:", row
            assert _plausible(span["entity"], value), row
            previous_end = span["end"]
            counts[span["entity"]] += 1
    assert all(counts[entity] >= 8 for entity in ENTITIES), counts


def _plausible(entity: str, value: str) -> bool:
    """The labelled text is a value of its entity (offsets that slipped would fail this)."""
    digits = re.sub(r"\D", "", value)
    if entity == "EMAIL":
        return re.fullmatch(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}", value) is not None
    if entity == "PHONE":
        return 7 <= len(digits) <= 17 and re.fullmatch(r"[+(]?[\d][\d ()./-]*\d", value) is not None
    if entity == "CREDIT_CARD":
        return re.fullmatch(r"[\d -]+", value) is not None and 13 <= len(digits) <= 19 and luhn_valid(digits)
    if entity == "IBAN":
        return iban_valid(value.replace(" ", ""))
    if entity == "IP_ADDRESS":
        return ipaddress.ip_address(value) is not None
    return re.fullmatch(CUSTOM[entity.lower()], value) is not None


def _scores(redactor: Redactor, labelled: list[dict]) -> tuple[dict[str, tuple[float, float, int]], str]:
    """Exact matches only: a predicted span counts as a true positive when start, end and entity
    all equal a labelled span's. A partial overlap (or a wrong entity on the right text) is one
    false positive and one false negative."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    mistakes = []
    for row in labelled:
        gold = {(s["start"], s["end"], s["entity"]) for s in row["spans"]}
        found = {(s.start, s.end, s.entity) for s in redactor.find(row["text"])}
        tp.update(entity for _, _, entity in gold & found)
        for start, end, entity in found - gold:
            fp[entity] += 1
            mistakes.append(f"  FP {entity}: {row['text'][start:end]!r} in {row['text']!r}")
        for start, end, entity in gold - found:
            fn[entity] += 1
            mistakes.append(f"  FN {entity}: {row['text'][start:end]!r} in {row['text']!r}")
    scores = {}
    lines = [f"{'entity':<12} {'precision':>9} {'recall':>7} {'tp':>4} {'fp':>4} {'fn':>4}"]
    for entity in [*sorted(ENTITIES), "ALL"]:
        t, p, n = (
            (sum(tp.values()), sum(fp.values()), sum(fn.values()))
            if entity == "ALL"
            else (tp[entity], fp[entity], fn[entity])
        )
        precision, recall = t / (t + p) if t + p else 1.0, t / (t + n) if t + n else 1.0
        scores[entity] = (precision, recall, t + n)
        lines.append(f"{entity:<12} {precision:>9.3f} {recall:>7.3f} {t:>4} {p:>4} {n:>4}")
    return scores, "\n".join(lines + mistakes)


def test_precision_and_recall(redactor: Redactor, labelled: list[dict]) -> None:
    scores, table = _scores(redactor, labelled)
    print(f"\nPII redaction on {len(labelled)} labelled strings (exact span match):\n{table}")
    precision, recall, _ = scores.pop("ALL")
    assert precision >= MIN_OVERALL and recall >= MIN_OVERALL, table
    for entity, (precision, recall, support) in scores.items():
        assert support > 0, f"no labelled {entity}\n{table}"
        assert precision >= MIN_PER_ENTITY and recall >= MIN_PER_ENTITY, f"{entity}\n{table}"


def test_redaction_is_idempotent_and_leaves_no_pii(redactor: Redactor, labelled: list[dict]) -> None:
    for row in labelled:
        once = redactor.redact(row["text"])
        assert redactor.redact(once) == once, row["text"]
        assert redactor.find(once) == [], once


def test_typed_placeholders(redactor: Redactor) -> None:
    text = (
        "Mail john.doe@example.com, call +44 20 7946 0958, card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, from 10.0.0.1 and 2001:db8::1, order ORD-123456, ACC-12-3456."
    )
    assert redactor.redact(text) == (
        "Mail <EMAIL>, call <PHONE>, card <CREDIT_CARD>, IBAN <IBAN>, from <IP_ADDRESS> and <IP_ADDRESS>, "
        "order <ORDER_ID>, <ACCOUNT_ID>."
    )
    assert redactor.find("write to a@example.org") == [PIISpan(9, 22, "EMAIL")]


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 was declined",  # Luhn-invalid
        "IBAN DE00 3704 0044 0532 0130 00",  # bad checksum
        "999.999.999.999 and version 1.2.3 and 10:30:45",
        "On 15.04.2024 it cost $1,299.99 for 3 items in 2023",
        "ISBN 978-3-16-148410-0, 9780306406157",
    ],
)
def test_hard_negatives_are_kept(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text) == text


def test_phone_formats(redactor: Redactor) -> None:
    for phone in [
        "+44 20 7946 0958",
        "+1 (415) 555-0132",
        "0049 30 123456",
        "(415) 555-0132",
        "030 12345678",
    ]:
        assert redactor.redact(f"call me on {phone} today") == "call me on <PHONE> today", phone
    # Unseparated national numbers only with a phone word before them.
    assert redactor.redact("call me at 4155550132") == "call me at <PHONE>"
    assert redactor.redact("customer 4155550132") == "customer 4155550132"
    assert redactor.redact("tell me 4155550132") == "tell me 4155550132"
    # A trailing group that would spoil the number is left out of the span.
    assert redactor.redact("Call +44 20 7946 0958 2 times") == "Call <PHONE> 2 times"
    assert redactor.redact("card 4111 1111 1111 1111 123") == "card <CREDIT_CARD> 123"


def test_custom_patterns() -> None:
    redactor = Redactor({"Ticket": r"TCK\d{4}", "employee_id": r"\bE-\d{5}\b"})
    assert redactor.redact("TCK1234 by E-00042") == "<TICKET> by <EMPLOYEE_ID>"
    assert Redactor().redact("TCK1234 by E-00042") == "TCK1234 by E-00042"
    # A custom pattern that could match its own placeholder still redacts only once.
    greedy = Redactor({"secret": r"[A-Z]{4,}"})
    assert greedy.redact("KEEP THIS") == "<SECRET> <SECRET>"
    assert greedy.redact(greedy.redact("KEEP THIS")) == "<SECRET> <SECRET>"


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ({"order_id": r"ORD-(\d+"}, "'order_id' is not a valid regular expression"),
        ({"anything": r"\d*"}, "'anything' matches the empty string"),
        ({"bad name!": r"x"}, "'bad name!' must be letters"),
    ],
)
def test_invalid_custom_pattern(patterns: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Redactor(patterns)


def test_overlaps_keep_the_longer_then_more_specific_span() -> None:
    # The e-mail contains a phone-like number; the IBAN contains card- and phone-like digits.
    redactor = Redactor({"short_digits": r"\d{6}", "same_as_card": r"4111 1111 1111 1111"})
    assert redactor.find("mail 0301234567@example.com") == [PIISpan(5, 27, "EMAIL")]
    assert redactor.redact("IBAN DE89370400440532013000") == "IBAN <IBAN>"
    # Equal length: a custom pattern is more specific than a built-in entity.
    assert redactor.redact("card 4111 1111 1111 1111") == "card <SAME_AS_CARD>"
    spans = redactor.find("x 123456 y +44 20 7946 0958 z")
    assert [s.entity for s in spans] == ["SHORT_DIGITS", "PHONE"]
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:], strict=False))


def test_redact_messages_copies(redactor: Redactor) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "I am bob@example.com", "name": "bob"},
        {"role": "user", "content": [{"type": "text", "text": "call +1 (415) 555-0132"}]},
        {"role": "assistant", "content": None},
    ]
    before = copy.deepcopy(messages)
    redacted = redactor.redact_messages(messages)
    assert messages == before
    assert redacted == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "I am <EMAIL>", "name": "bob"},
        {"role": "user", "content": [{"type": "text", "text": "call <PHONE>"}]},
        {"role": "assistant", "content": None},
    ]
    assert all(a is not b for a, b in zip(redacted, messages, strict=True))


@pytest.mark.parametrize(
    "text",
    ["", " ", "\n\t", "日本語のテキスト😀", "<EMAIL>", "@", "::", "+", "0" * 40, "\x00\ud800", "é" * 1000],
)
def test_odd_input_does_not_crash(redactor: Redactor, text: str) -> None:
    out = redactor.redact(text)
    assert redactor.redact(out) == out


def test_unicode_around_pii(redactor: Redactor) -> None:
    assert redactor.redact("请发邮件到li.wei@example.cn，谢谢") == "请发邮件到<EMAIL>，谢谢"
    assert redactor.redact("Müller: +49 30 1234567 📞") == "Müller: <PHONE> 📞"


def test_huge_input_is_linear(redactor: Redactor) -> None:
    chunk = "mail a@example.com or call +44 20 7946 0958, ip 10.0.0.1; "
    text = chunk * 2000 + "1 " * 100_000 + "x" * 500_000
    start = time.perf_counter()
    spans = redactor.find(text)
    assert time.perf_counter() - start < 5
    assert len(spans) == 6000


def test_thread_safe(redactor: Redactor, labelled: list[dict]) -> None:
    texts = [row["text"] for row in labelled]
    expected = [redactor.redact(t) for t in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: [redactor.redact(t) for t in texts], range(8)))
    assert all(result == expected for result in results)


def test_import_is_cheap() -> None:
    code = "import sys, feedback.redact; print('phonenumbers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
