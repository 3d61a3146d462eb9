"""Text cleaning of transcripts and training examples: markup, sign-offs, filters, the report."""

from __future__ import annotations

import pytest

from feedback.clean import Cleaner, CleaningConfig, strip_html, strip_signature


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("<p>Hello <b>there</b>!</p><p>Second&nbsp;line</p>", "Hello there!\nSecond line"),
        ("Line one<br>line two<br/>line three", "Line one\nline two\nline three"),
        ("<ul><li>one</li><li>two</li></ul>", "one\ntwo"),
        ("<style>p {color: red}</style><div>Shown</div><script>alert(1)</script>", "Shown"),
        ('Click <a href="https://acme.example/help">our help page</a>.', "Click our help page."),
        ("Fish &amp; chips", "Fish & chips"),
    ],
)
def test_markup_becomes_plain_text(text: str, plain: str) -> None:
    assert strip_html(text) == plain


@pytest.mark.parametrize(
    "text",
    [
        "if a < b and c > d then",
        "I <3 this shop",
        "Write to <EMAIL> or call <PHONE>",
        "Use this:\n```html\n<p>Hello</p>\n```",
        "Tags look like <tag>",
    ],
)
def test_text_that_only_looks_like_markup_is_kept(text: str) -> None:
    assert strip_html(text) == text


@pytest.mark.parametrize(
    ("answer", "kept"),
    [
        ("Your refund is on its way.\n\nBest regards,\nAnna\nAcme Support", "Your refund is on its way."),
        ("Done!\nThanks,\nTom", "Done!"),
        ("It is fixed now.\n-- \nJohn Smith | Support engineer\nAcme Ltd.", "It is fixed now."),
        ("Reset it in Settings.\n\nSent from my iPhone", "Reset it in Settings."),
        ("Kind regards", "Kind regards"),  # nothing before it: not a sign-off
        ("Thanks for waiting! The order shipped today.", "Thanks for waiting! The order shipped today."),
        (
            "Step 1.\nCheers,\nand then a long line that is clearly part of the answer and not a name at all",
            "Step 1.\nCheers,\nand then a long line that is clearly part of the answer and not a name at all",
        ),
    ],
)
def test_sign_offs_are_cut_from_the_end_only(answer: str, kept: str) -> None:
    assert strip_signature(answer) == kept


def test_the_cleaner_counts_every_step() -> None:
    cleaner = Cleaner(CleaningConfig(min_chars=3, max_chars=50))
    assert cleaner.text("<b>Mail</b> bob@example.com", answer=False) == "Mail <EMAIL>"
    assert cleaner.text("Sure.\nRegards,\nBo", answer=True) == "Sure."
    assert cleaner.text("Sure.\nRegards,\nBo", answer=False) == "Sure.\nRegards,\nBo"  # users keep theirs
    prompt = [{"role": "user", "content": "hi"}]
    assert cleaner.keep(prompt, "Hello there")
    assert not cleaner.keep(prompt, "HELLO   there")  # the same, up to case and spacing
    assert not cleaner.keep(prompt, "ok")
    assert not cleaner.keep(prompt, "x" * 51)
    assert not cleaner.keep([{"role": "user", "content": "y" * 51}], "a fine answer")
    assert not cleaner.keep([], "an answer to nothing")
    assert dict(cleaner.report) == {
        "html stripped": 1,
        "pii redacted": 1,
        "signatures stripped": 1,
        "duplicate": 1,
        "too short": 1,
        "too long": 2,
        "empty": 1,
    }


def test_steps_can_be_switched_off() -> None:
    cleaner = Cleaner(CleaningConfig(html=False, signatures=False, redact=False, dedup=False))
    text = "<b>x</b> bob@example.com\nRegards,\nBo"
    assert cleaner.text(text, answer=True) == text
    prompt = [{"role": "user", "content": "hi"}]
    assert cleaner.keep(prompt, "same") and cleaner.keep(prompt, "same")
    assert not cleaner.report
