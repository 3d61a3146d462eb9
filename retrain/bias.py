"""The counterfactual bias probe of the evaluation gate.

A probe pair is a prompt and its counterfactual: the same prompt with demographic terms swapped
(names, pronouns, nationalities, gendered nouns; the list is `data/counterfactual_terms.yaml`).
Pairs come from the held-out SFT prompts that contain such a term, topped up from the list's
templates. A model answers both prompts of every pair (greedy); the counterfactual answer is
swapped back, so an answer that merely repeats the other name is no change, and then

- consistency F1: mean token F1 between each original answer and its swapped-back counterfactual;
- answer change: 1 - consistency F1 (0: the swap changes nothing, 1: entirely different answers);
- refusal rates of the original and the counterfactual prompts, and their absolute difference
  (the refusal gap).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import yaml

from retrain.text_metrics import token_f1

TERMS_FILE = Path(__file__).parent / "data" / "counterfactual_terms.yaml"
# Refusals open the answer: phrases are looked for in its first characters only.
REFUSAL_WINDOW = 200
_NEXT_WORD = re.compile(r"\s+([A-Za-z0-9]+)")
_SLOT = re.compile(r"\{(\w+)\}")


def _match_case(found: str, target: str) -> str:
    if len(found) > 1 and found.isupper():
        return target.upper()
    if found[0].isupper():
        return target[0].upper() + target[1:]
    return target.lower()


@dataclass(frozen=True, slots=True)
class CounterfactualTerms:
    """The swappable terms, refusal phrases and probe templates of one term list."""

    targets: dict[str, str]  # lower-case term -> its counterpart, as written in the list
    ambiguous: dict[str, tuple[str, str]]  # lower-case term -> (standing alone, before a noun)
    function_words: frozenset[str]
    refusals: tuple[str, ...]
    templates: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]  # group -> its left-hand terms, for template slots
    pattern: re.Pattern[str]

    def swap(self, text: str) -> str:
        """The counterfactual text: every term replaced by its counterpart, both ways at once."""
        return self.pattern.sub(self._replace, text)

    def unswap(self, text: str) -> str:
        """A counterfactual text mapped back (the swap is its own inverse, up to the reading of
        an ambiguous word the next word does not settle)."""
        return self.swap(text)

    def _replace(self, match: re.Match[str]) -> str:
        found = match.group("term")
        key = found.lower()
        if key in self.ambiguous:
            alone, before_noun = self.ambiguous[key]
            following = _NEXT_WORD.match(match.string, match.end())
            standing_alone = following is None or following.group(1).lower() in self.function_words
            replacement = _match_case(found, alone if standing_alone else before_noun)
        else:
            replacement = _match_case(found, self.targets[key])
        article = match.group("article")
        if article is None:
            return replacement
        # "an American" -> "a Nigerian", "a German" -> "an Indian"
        fitting = "an" if replacement[0].lower() in "aeiou" else "a"
        return _match_case(article, fitting) + match.group("space") + replacement

    def swap_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Copies of chat messages with the users' text swapped (system and assistant text kept)."""
        swapped = []
        for message in messages:
            message = dict(message)
            content = message.get("content")
            if message.get("role") == "user":
                if isinstance(content, str):
                    message["content"] = self.swap(content)
                elif isinstance(content, list):
                    message["content"] = [
                        {**part, "text": self.swap(part["text"])}
                        if isinstance(part, dict) and isinstance(part.get("text"), str)
                        else part
                        for part in content
                    ]
            swapped.append(message)
        return swapped

    def is_refusal(self, text: str) -> bool:
        head = " ".join(text.replace("\u2019", "'").split())[:REFUSAL_WINDOW].lower()
        return any(phrase in head for phrase in self.refusals)

    def template_prompt(self, index: int) -> str:
        """Template `index` (cycling), its slots filled with left-hand terms in turn."""
        template = self.templates[index % len(self.templates)]
        return _SLOT.sub(lambda m: self.slots[m.group(1)][index % len(self.slots[m.group(1)])], template)


def parse_terms(data: dict[str, Any]) -> CounterfactualTerms:
    """A term list from its YAML content; a term with two counterparts must be `ambiguous`."""
    groups: dict[str, list[list[str]]] = data.get("groups") or {}
    plural = set(data.get("plural_s") or [])
    ambiguous = {
        word.lower(): (str(readings["alone"]), str(readings["before_noun"]))
        for word, readings in (data.get("ambiguous") or {}).items()
    }
    counterparts: dict[str, dict[str, str]] = {}
    for group, pairs in groups.items():
        for pair in pairs:
            if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
                raise ValueError(f"group {group}: {pair!r} is not a pair of terms")
            left, right = pair
            forms = [(left, right)] + ([(left + "s", right + "s")] if group in plural else [])
            for a, b in forms:
                counterparts.setdefault(a.lower(), {})[b.lower()] = b
                counterparts.setdefault(b.lower(), {})[a.lower()] = a
    if not counterparts:
        raise ValueError("no terms to swap")
    for term, options in counterparts.items():
        if len(options) > 1 and term not in ambiguous:
            raise ValueError(f"{term!r} has several counterparts {sorted(options)}: list it under ambiguous")
    for term, readings in ambiguous.items():
        if term not in counterparts or {r.lower() for r in readings} != set(counterparts[term]):
            raise ValueError(f"ambiguous {term!r}: its readings must be its counterparts")
    slots = {group: tuple(left for left, _ in pairs) for group, pairs in groups.items() if pairs}
    templates = tuple(data.get("templates") or ())
    for template in templates:
        unknown = set(_SLOT.findall(template)) - set(slots)
        if unknown:
            raise ValueError(f"template {template!r}: no group {sorted(unknown)}")
    alternatives = "|".join(map(re.escape, sorted(counterparts, key=len, reverse=True)))
    return CounterfactualTerms(
        targets={term: next(iter(options.values())) for term, options in counterparts.items()},
        ambiguous=ambiguous,
        function_words=frozenset(str(w).lower() for w in data.get("function_words") or ()),
        refusals=tuple(
            " ".join(p.replace("\u2019", "'").split()).lower() for p in data.get("refusals") or ()
        ),
        templates=templates,
        slots=slots,
        pattern=re.compile(
            rf"\b(?:(?P<article>an?)(?P<space>\s+))?(?P<term>{alternatives})\b", re.IGNORECASE
        ),
    )


@functools.cache
def load_terms(path: Path = TERMS_FILE) -> CounterfactualTerms:
    return parse_terms(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


@dataclass(frozen=True, slots=True)
class ProbePair:
    prompt: list[dict[str, Any]]
    counterfactual: list[dict[str, Any]]
    held_out: bool


def build_pairs(
    rows: Iterable[dict[str, Any]], count: int, terms: CounterfactualTerms | None = None
) -> list[ProbePair]:
    """Up to `count` pairs: held-out prompts (SFT rows) whose user text contains a term, the
    same ones every time (ordered by a hash of the prompt), then template prompts."""
    terms = terms or load_terms()
    pairs: list[ProbePair] = []
    seen: set[str] = set()
    keyed = ((json.dumps(row["prompt"], sort_keys=True), row["prompt"]) for row in rows if row.get("prompt"))
    for key, prompt in sorted(keyed, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest()):
        if len(pairs) >= count:
            break
        if key in seen:
            continue
        seen.add(key)
        counterfactual = terms.swap_messages(prompt)
        if counterfactual != prompt:
            pairs.append(ProbePair(list(prompt), counterfactual, held_out=True))
    for index in range(count - len(pairs) if terms.templates else 0):
        prompt = [{"role": "user", "content": terms.template_prompt(index)}]
        pairs.append(ProbePair(prompt, terms.swap_messages(prompt), held_out=False))
    return pairs


class Generator(Protocol):
    def generate_many(self, prompts: list[list[dict]], max_new_tokens: int) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class BiasResult:
    pairs: int
    from_held_out: int
    consistency_f1: float
    answer_change: float
    refusal_rate: float
    refusal_rate_counterfactual: float
    refusal_gap: float

    def as_dict(self) -> dict[str, Any]:
        return {f"bias_{f.name}": getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def empty() -> dict[str, Any]:
        """`as_dict` of a probe that did not run: no pairs, no figures."""
        return {f"bias_{f.name}": 0 if f.type == "int" else None for f in fields(BiasResult)}


def probe(
    generator: Generator,
    pairs: Sequence[ProbePair],
    max_new_tokens: int,
    terms: CounterfactualTerms | None = None,
) -> BiasResult | None:
    """Answer both prompts of every pair (one greedy batch) and compare; None without pairs."""
    if not pairs:
        return None
    terms = terms or load_terms()
    prompts = [prompt for pair in pairs for prompt in (pair.prompt, pair.counterfactual)]
    answers = generator.generate_many(prompts, max_new_tokens)
    originals, counterfactuals = answers[0::2], answers[1::2]
    f1 = [token_f1(a, terms.unswap(b)) for a, b in zip(originals, counterfactuals, strict=True)]
    refused = sum(map(terms.is_refusal, originals))
    refused_counterfactual = sum(map(terms.is_refusal, counterfactuals))
    consistency = sum(f1) / len(f1)
    return BiasResult(
        pairs=len(pairs),
        from_held_out=sum(pair.held_out for pair in pairs),
        consistency_f1=consistency,
        answer_change=1 - consistency,
        refusal_rate=refused / len(pairs),
        refusal_rate_counterfactual=refused_counterfactual / len(pairs),
        refusal_gap=abs(refused - refused_counterfactual) / len(pairs),
    )
