"""Cleaning and redaction take time linear in the text, whatever the text: 50k characters of
spaces, digits, at signs or tags are handled in well under a second, not in tens of seconds."""

from __future__ import annotations

import pytest

from feedback.clean import Cleaner, strip_html, strip_signature
from feedback.redact import Redactor
from tests.utils.hostile_text import assert_fast, hostile_texts

REDACTOR = Redactor({"order_id": r"\bORD-\d{6,}\b"})


@hostile_texts()
def test_cleaning_and_redaction_are_linear(text: str) -> None:
    cleaner = Cleaner(redactor=REDACTOR)
    assert_fast(
        {
            "strip_html": strip_html,
            "strip_signature": strip_signature,
            "redact": REDACTOR.redact,
            "Cleaner.text (answer)": lambda t: cleaner.text(t, answer=True),
            "Cleaner.text (prompt)": lambda t: cleaner.text(t, answer=False),
        },
        text,
    )


@pytest.mark.parametrize(
    ("answer", "kept"),
    [
        ("Done.\n   Best \t regards ,  \nAnna", "Done."),
        ("Done.\nTHANKS AGAIN!\nTom", "Done."),
        ("Done.\n  __  \nAcme", "Done."),
        ("Done.\nbest" + " " * 5000 + "x\nAnna", "Done.\nbest" + " " * 5000 + "x\nAnna"),
    ],
)
def test_sign_offs_with_odd_spacing_are_still_recognised(answer: str, kept: str) -> None:
    assert strip_signature(answer) == kept


def test_many_tags_keep_their_line_breaks() -> None:
    assert strip_html("one<br>" * 20_000).split("\n") == ["one"] * 20_000
    assert strip_html("<div>" * 10_000 + "deep" + "</div>" * 10_000) == "deep"
    assert strip_html("<p>a</p><script>b</script>" * 5_000) == "\n".join(["a"] * 5_000)
