"""Cleaning of conversation text for training: imported transcripts and retraining datasets alike.

Text steps, for transcripts (each changes a message and is counted when it did):
- html: markup turned into plain text (BeautifulSoup's html.parser; line breaks kept for
  block elements, script and style dropped, entities unescaped), only where a message holds
  real HTML tags or entities, so "a < b" or "<3" stay as written, and never in a message with a
  code fence (an answer about HTML keeps its markup);
- signature: the sign-off block of an answer ("Best regards,\\nAnna\\nSupport team", a "-- "
  separator and what follows it, "Sent from my phone") cut from its end;
- redact: PII replaced by typed placeholders (feedback/redact.py).
The first two run on imported transcripts only: a served answer may end with a sign-off or
show markup on purpose (a letter, a web page); redaction runs everywhere (the export does it).

Filter steps (each removes an example and is counted):
- empty: nothing left of the answer or of the prompt;
- too short / too long: an answer under `min_chars`, or an answer or user turn over `max_chars`;
- duplicate: the same prompt and answer again (compared case- and space-insensitively).

`CleaningReport` is what `loopchat import` prints and stores, and what a dataset manifest
records under `removed`.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feedback.redact import Redactor


class CleaningConfig(BaseModel):
    """What cleaning does to transcripts and training examples (`cleaning:` in the retrain config)."""

    model_config = ConfigDict(extra="forbid")

    html: bool = Field(True, description="Turn HTML markup into plain text.")
    signatures: bool = Field(True, description="Cut sign-off blocks from the end of answers.")
    redact: bool = Field(True, description="Replace PII with typed placeholders (always on for datasets).")
    min_chars: int = Field(2, ge=0, description="Answers shorter than this (after cleaning) are removed.")
    max_chars: int = Field(
        8000, ge=1, description="Answers or user turns longer than this (after cleaning) are removed."
    )
    dedup: bool = Field(True, description="Remove repeated prompt and answer pairs.")


# Tags that make a message HTML; anything else in angle brackets (placeholders, "<3") is text.
_HTML_TAG = re.compile(
    r"</?(?:a|abbr|b|blockquote|body|br|code|div|em|font|h[1-6]|head|hr|html|i|img|li|meta|ol|p|pre"
    r"|script|small|span|strong|style|sub|sup|table|tbody|td|th|thead|tr|u|ul)\b[^<>]*>",
    re.IGNORECASE,
)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});")
_HIDDEN = frozenset(("script", "style", "head"))
_BLOCK = ("p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")
_SPACES = re.compile(r"[ \t\u00a0]+")

# A sign-off: a valediction alone on its line, then at most a few short lines (name, title, team).
# Both are matched against the stripped line, so neither ends in optional whitespace: `\s*[,.!]?\s*$`
# would split a long run of spaces between two optional runs every possible way (quadratic:
# seconds for 50k characters). Here each run is followed by a letter or a punctuation mark, so a
# line that is no sign-off fails after one pass per alternative.
_VALEDICTION = re.compile(
    r"(?:(?:best|kind|warm|warmest|many)\s+(?:regards|wishes)|regards|best|cheers|sincerely"
    r"|yours(?:\s+(?:truly|sincerely))?|thanks(?:\s+again)?|thank\s+you|many\s+thanks|all\s+the\s+best"
    r"|take\s+care|with\s+thanks)(?:\s*[,.!])?",
    re.IGNORECASE,
)
_SEPARATOR = re.compile(r"--|__+|—")
_SENT_FROM = re.compile(r"^\s*sent from my \w+", re.IGNORECASE)
_SIGNATURE_LINES = 4  # lines after a valediction that may still be the signature
_SIGNATURE_LINE_CHARS = 60


def strip_html(text: str) -> str:
    """Plain text of a message holding HTML; other text unchanged."""
    if ("<" not in text and "&" not in text) or "```" in text:
        return text
    if not _HTML_TAG.search(text):
        return html.unescape(text) if _ENTITY.search(text) else text
    from bs4 import BeautifulSoup

    plain = _SPACES.sub(" ", _visible_text(BeautifulSoup(text, "html.parser")))
    plain = "\n".join(line.strip() for line in plain.splitlines())
    return _BLANK_LINES.sub("\n\n", plain).strip()


def _visible_text(soup: Any) -> str:
    """The tree's text without script, style and head, with a line break for each <br> and after
    each block element. One pass, without a stack frame per level: editing the tree instead
    (replace_with, insert_after) scans the siblings or the descendants of every tag it touches,
    seconds for a message of a few thousand <br> or nested <div>."""
    from bs4 import CData, NavigableString, Tag

    parts: list[str] = []
    pending: list[Any] = [soup]  # nodes still to visit, last first; a plain str ends a block
    while pending:
        node = pending.pop()
        if isinstance(node, Tag):
            if node.name in _HIDDEN:
                continue
            if node.name == "br":
                parts.append("\n")
                continue
            if node.name in _BLOCK:
                pending.append("\n")
            pending.extend(reversed(node.contents))
        elif type(node) in (NavigableString, CData, str):  # not comments, doctypes, script text
            parts.append(node)
    return "".join(parts)


def strip_signature(text: str) -> str:
    """The answer without its sign-off block (only from the end, and never all of it)."""
    lines = text.rstrip().splitlines()
    while lines and _SENT_FROM.match(lines[-1]):
        lines.pop()
    for index in range(len(lines) - 1, max(-1, len(lines) - 2 - _SIGNATURE_LINES), -1):
        line = lines[index].strip()
        tail = [t for t in lines[index + 1 :] if t.strip()]
        short_tail = all(len(t.strip()) <= _SIGNATURE_LINE_CHARS for t in tail)
        if short_tail and (_VALEDICTION.fullmatch(line) or _SEPARATOR.fullmatch(line)):
            if any(earlier.strip() for earlier in lines[:index]):
                lines = lines[:index]
            break
    return "\n".join(lines).rstrip()


def dedup_key(*texts: Any) -> str:
    """Case- and space-insensitive identity of a prompt and answer."""
    joined = "\x1f".join(" ".join(str(t).casefold().split()) for t in texts)
    return hashlib.sha256(joined.encode()).hexdigest()


class Cleaner:
    """The text steps and filters above, counting what each did (`report`)."""

    def __init__(self, config: CleaningConfig | None = None, redactor: Redactor | None = None) -> None:
        self.config = config or CleaningConfig()
        self.redactor = redactor if redactor is not None else Redactor()
        self.report: Counter[str] = Counter()
        self._seen: set[str] = set()

    def text(self, text: str, *, answer: bool) -> str:
        """One message through the text steps."""
        config = self.config
        if config.html:
            stripped = strip_html(text)
            if stripped != text:
                self.report["html stripped"] += 1
                text = stripped
        if answer and config.signatures:
            stripped = strip_signature(text)
            if stripped != text.rstrip():
                self.report["signatures stripped"] += 1
            text = stripped
        if config.redact:
            redacted = self.redactor.redact(text)
            if redacted != text:
                self.report["pii redacted"] += 1
                text = redacted
        return text.strip()

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {**m, "content": self.text(m["content"], answer=m.get("role") == "assistant")}
            for m in messages
            if isinstance(m.get("content"), str)
        ]

    def keep(self, prompt: list[dict[str, Any]], answer: str, *, extra: Any = "") -> bool:
        """Whether an example passes the filters (the reason counted when it does not). `extra`
        joins the identity for duplicates (a KTO label, a rejected answer)."""
        config = self.config
        if not answer.strip() or not prompt:
            return self._drop("empty")
        if len(answer) < config.min_chars:
            return self._drop("too short")
        last_user = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
        if len(answer) > config.max_chars or len(last_user) > config.max_chars:
            return self._drop("too long")
        if config.dedup:
            key = dedup_key(*(m.get("content", "") for m in prompt), answer, extra)
            if key in self._seen:
                return self._drop("duplicate")
            self._seen.add(key)
        return True

    def _drop(self, reason: str) -> bool:
        self.report[reason] += 1
        return False


def load_cleaning_config(path: Path | None) -> CleaningConfig:
    """The `cleaning:` section of a retraining config file (YAML), or the defaults."""
    if path is None:
        return CleaningConfig()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return CleaningConfig.model_validate(data.get("cleaning") or {} if isinstance(data, dict) else data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
