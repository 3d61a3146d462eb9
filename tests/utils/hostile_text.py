"""Pathological texts for timing text processing: long runs on which a backtracking regular
expression (or an edit of a parsed HTML tree per tag) turns quadratic or worse."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

LENGTH = 50_000
# CPU seconds one call may take on LENGTH characters (CPU, not wall time: other tests and the
# engine share two cores). Linear passes take at most ~0.6 s here (validating thousands of phone
# candidates); a quadratic pattern takes 6 to 25 s on some of these.
MAX_CPU_SECONDS = 2.0

_REPEATED = {
    "spaces": " ",
    "tabs and newlines": "\t\n",
    "newlines": "\n",
    "crlf": "\r\n",
    "nbsp": "\u00a0",
    "letters": "a",
    "spaces and letters": " a",
    "digits": "1",
    "digits and spaces": "1 ",
    "digits and dashes": "1-",
    "digits and dots": "1.",
    "at signs": "@",
    "letters and at signs": "a@",
    "letters and dots": "a.",
    "colons": ":",
    "hex and colons": "a:",
    "punctuation": ",.!",
    "dashes": "-",
    "underscores": "_",
    "angle brackets": "<",
    "placeholders": "<A",
    "ampersands": "&",
    "entities": "&amp;",
    "bold tags": "<b>",
    "nested divs": "<div>",
    "line breaks": "<br>",
    "closing tags": "</p>",
    "phone groups": "(1) ",
    "international prefixes": "+1 ",
    "iban starts": "DE12 ",
    "e-mails": "a@b.co ",
    "ip addresses": "1.2.3.4 ",
    "phone numbers": "+44 20 7946 0958 ",
    "card numbers": "4111 1111 1111 1111 ",
}
# Words a pattern matches before a run of whitespace it then fails on (sign-offs, labels, terms).
_BEFORE_SPACES = ("best", "thanks", "yours", "new", "rewritten message", "a", "her", "<p class='", "--")


def _texts() -> list[tuple[str, str]]:
    texts = [(name, (unit * (LENGTH // len(unit) + 1))[:LENGTH]) for name, unit in _REPEATED.items()]
    for word in _BEFORE_SPACES:
        texts.append((f"{word!r} then spaces", f"{word}{' ' * LENGTH}x"))
        texts.append((f"last line {word!r} then spaces", f"Done.\n{word}{' ' * LENGTH}x"))
        texts.append((f"spaces then {word!r}", " " * LENGTH + word))
    return texts


HOSTILE_TEXTS = _texts()


def hostile_texts():
    """A parametrize decorator over HOSTILE_TEXTS (argument `text`), named by what repeats."""
    return pytest.mark.parametrize(
        "text", [text for _, text in HOSTILE_TEXTS], ids=[n for n, _ in HOSTILE_TEXTS]
    )


def assert_fast(functions: dict[str, Callable[[str], object]], text: str) -> None:
    slow = {}
    for name, function in functions.items():
        start = time.thread_time()
        function(text)
        spent = time.thread_time() - start
        if spent > MAX_CPU_SECONDS:
            slow[name] = round(spent, 2)
    assert not slow, f"CPU seconds on {len(text)} characters: {slow}"
