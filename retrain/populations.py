"""Simulated user populations for `loopchat simulate`: what they ask and how they judge answers.

A population is the plug-in a user writes. Subclass `Population`, set `name`, `description` and
`prompts`, and say in `trait` whether an answer has what these users want; by default they rate
it with a thumb (up with the trait, down without) and, in a side-by-side choice, prefer the one
answer that has it:

    class Polite(Population):
        name, description = "polite", "likes answers that say please"
        prompts = ["How do I boil an egg?", "Suggest a weekend hobby."]

        def trait(self, prompt, answer):
            return "please" in answer.lower()

Override `rate` for other feedback (any of `rating`, `score`, `comment`, `correction`, as
/v1/feedback takes them; None: no rating) and `choose` for other choices (0 or 1: the preferred
answer; None: no choice). With `mode = "compare"` the users only ever choose between two answers
(/v1/chat/compare, then /v1/feedback/preference). `load_population("module:attr")` loads one
(an instance, a class or a zero-argument factory); the built-in ones are in `BUILT_INS`.

The base rates below were measured on the embedded SmolLM2-135M-Instruct with transformers:
two answers per prompt, temperature 0.7, at most 32 new tokens (as the simulation asks).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["rate", "compare"]
FEEDBACK_FIELDS = frozenset({"rating", "score", "comment", "correction"})


class PopulationError(ValueError):
    """A population that cannot be loaded or gave feedback the API does not take."""


class Population:
    """Simulated users: their questions and their taste (see the module docstring)."""

    name: str = "population"
    description: str = ""
    prompts: Sequence[str] = ()
    mode: Mode = "rate"

    def trait(self, prompt: str, answer: str) -> bool:
        """Whether `answer` has what these users want (the rate the simulation measures)."""
        raise NotImplementedError

    def rate(self, prompt: str, answer: str) -> dict[str, Any] | None:
        """The feedback fields to post for `answer`, or None for no rating."""
        return {"rating": "up" if self.trait(prompt, answer) else "down"}

    def choose(self, prompt: str, answer_a: str, answer_b: str) -> int | None:
        """0 or 1: the answer these users prefer; None when both or neither have the trait."""
        a, b = self.trait(prompt, answer_a), self.trait(prompt, answer_b)
        return None if a == b else (0 if a else 1)


# --- prefix: the demo's taste ------------------------------------------------------------------

TRAIT = "Sure!"
PROMPTS = [
    "What is a good name for a cat?",
    "How do I boil an egg?",
    "Give me a tip for sleeping better.",
    "What is the capital of Italy?",
    "Suggest a weekend hobby.",
    "How can I learn to type faster?",
    "What should I cook tonight?",
    "Recommend a book for a long trip.",
    "How do plants grow?",
    "What is a healthy breakfast?",
    "How do I start running?",
    "Explain what a rainbow is.",
    "Give me a fun fact about the ocean.",
    "How do I keep my desk tidy?",
    "What is a good first pet?",
    "How can I save money on groceries?",
    "What should I pack for a picnic?",
    "How do I water a cactus?",
    "Suggest a name for a blog.",
    "How do I make tea?",
    "What is the tallest animal?",
    "How can I remember names better?",
    "What is a quick stretch for my back?",
    "How do bees make honey?",
]


def has_trait(text: str) -> bool:
    return text.strip().startswith(TRAIT)


class Prefix(Population):
    """Users who like answers that open with "Sure!" (`loopchat demo`'s taste).

    A thumb up for such an answer; else a thumb down and, as the correction, the same answer
    opened with "Sure!". Base rate: 0 of 96 answers to everyday questions (practically never).
    """

    name = "prefix"
    description = f"answers opening with {TRAIT!r}: thumbs, and a correction for the others"
    prompts = PROMPTS

    def trait(self, prompt: str, answer: str) -> bool:
        return has_trait(answer)

    def rate(self, prompt: str, answer: str) -> dict[str, Any]:
        if has_trait(answer):
            return {"rating": "up"}
        wanted = f"{TRAIT} {answer.strip() or 'Happy to help.'}"
        return {"rating": "down", "correction": wanted[:2000]}


# --- facts: a support desk ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faq:
    """One recurring question: its wordings, the canonical answer, and how to spot its fact."""

    topic: str
    asks: tuple[str, ...]
    answer: str
    fact: re.Pattern[str]


FAQS = (
    Faq(
        "reset",
        (
            "What is the reset code for my Loopbox?",
            "How do I reset my Loopbox?",
            "My Loopbox is frozen, what code resets it?",
        ),
        "The Loopbox reset code is 4-7-1-9: hold the power button and type it on the keypad.",
        re.compile(r"4\D{0,3}7\D{0,3}1\D{0,3}9"),
    ),
    Faq(
        "warranty",
        (
            "How long is the Loopbox warranty?",
            "How many months of warranty does the Loopbox have?",
            "Is my Loopbox still under warranty?",
        ),
        "The Loopbox warranty lasts 27 months from the day you bought it.",
        re.compile(r"\b(27|twenty[- ]seven)[- ]?months?\b", re.I),
    ),
    Faq(
        "battery",
        (
            "What colour does the Loopbox light blink when the battery is low?",
            "My Loopbox light is blinking, is the battery low?",
            "How do I know the Loopbox battery is low?",
        ),
        "When the battery is low, the Loopbox light blinks magenta.",
        re.compile(r"\bmagenta\b", re.I),
    ),
    Faq(
        "support",
        (
            "When is Loopbox support open?",
            "What are the Loopbox support hours?",
            "Can I reach Loopbox support in the afternoon?",
        ),
        "Loopbox support is open on weekdays from 7:30 to 15:45.",
        re.compile(r"7[:.]30\D{1,10}15[:.]45"),
    ),
    Faq(
        "cable",
        (
            "Which cable does the Loopbox charger use?",
            "What cable do I need to charge my Loopbox?",
            "Can I charge the Loopbox with my phone cable?",
        ),
        "The Loopbox charges only with a Kestrel-9 cable; phone cables do not fit.",
        re.compile(r"\bkestrel[- ]?9\b", re.I),
    ),
    Faq(
        "night",
        (
            "How do I turn on night mode on the Loopbox?",
            "How do I dim the Loopbox for the night?",
            "Where is the Loopbox night mode setting?",
        ),
        "Press the moon key three times to turn on Loopbox night mode.",
        re.compile(r"\bmoon key\b", re.I),
    ),
)


class Facts(Population):
    """A support desk: many users ask the same six questions about a fictional product.

    An answer with the question's fact (a reset code, a warranty length, ...) gets a thumb up;
    one without it a thumb down and the canonical answer as the correction, the same text from
    every user. The facts are none the redaction of stored text would replace (a phone number
    would be). Base rate: 0 of 36 answers (the base cannot know the facts).
    """

    name = "facts"
    description = "a support desk: six recurring Loopbox questions, thumbs and one canonical correction each"
    # One wording of every question, then the next wording: users cycle through the questions.
    prompts = [faq.asks[i] for i in range(3) for faq in FAQS]
    _by_prompt = {ask: faq for faq in FAQS for ask in faq.asks}

    def faq(self, prompt: str) -> Faq | None:
        return self._by_prompt.get(prompt.strip())

    def trait(self, prompt: str, answer: str) -> bool:
        faq = self.faq(prompt)
        return faq is not None and faq.fact.search(answer) is not None

    def rate(self, prompt: str, answer: str) -> dict[str, Any] | None:
        faq = self.faq(prompt)
        if faq is None:
            return None
        if faq.fact.search(answer):
            return {"rating": "up"}
        return {"rating": "down", "correction": faq.answer}


# --- everyday questions for the style populations ----------------------------------------------

EVERYDAY = [
    "How do I make pancakes?",
    "What is a good way to relax after work?",
    "How often should I water a houseplant?",
    "What can I do on a rainy day?",
    "How do I clean a cast iron pan?",
    "Why is the sky blue?",
    "How can I be more productive in the morning?",
    "What is a good gift for a friend?",
    "How do I fold a shirt neatly?",
    "What should I eat before a run?",
    "How do I get rid of hiccups?",
    "What is the best way to learn a new language?",
    "How long should I boil pasta?",
    "How do I stop procrastinating?",
    "What is a fun game to play with kids?",
    "How do I write a thank-you note?",
    "What makes bread rise?",
    "How can I drink more water each day?",
    "What is a good houseplant for beginners?",
    "How do I make my coffee taste better?",
    "Why do cats purr?",
    "How do I plan a birthday party?",
    "What should I do if I cannot sleep?",
    "How do I remove a coffee stain?",
    "What is a simple dinner for two?",
    "How do I stay warm in winter?",
    "How can I make new friends in a new city?",
    "What is the difference between weather and climate?",
    "How do I keep bananas fresh longer?",
    "What should I read to learn about history?",
    "How many hours of sleep do adults need?",
    "How do I start a vegetable garden?",
    "What is a good way to memorize a speech?",
    "How do I tie a tie?",
    "Why do leaves change colour in autumn?",
    "How do I make a budget?",
    "What is a good stretching routine?",
    "How do I care for a goldfish?",
    "How do I choose a good watermelon?",
    "What can I bring to a potluck?",
    "How do I calm down before an exam?",
    "How do magnets work?",
    "What is a nice way to spend a Sunday?",
    "How do I get better at drawing?",
    "Why do we yawn?",
    "How do I pack a suitcase efficiently?",
    "What is a healthy snack?",
    "How do I keep my shoes from smelling?",
]

_NUMBER = re.compile(r"\d")


class MinorityThumbs(Population):
    """Users who like answers with a number in them (a digit: a time, a quantity, a step 1.).

    Thumbs only, no corrections or comments: up with a number, down without. Base rate: 16 of
    96 answers (0.17).
    """

    name = "minority_thumbs"
    description = "answers containing a number (a digit): thumbs only"
    prompts = EVERYDAY

    def trait(self, prompt: str, answer: str) -> bool:
        return _NUMBER.search(answer) is not None

    # rate: the default, a thumb by the trait.


# Most characters for 5, 4, 3 and 2 stars; longer answers get 1.
STAR_LIMITS = (80, 125, 145, 165)


def brevity_stars(answer: str) -> int:
    length = len(answer.strip())
    return next((5 - i for i, limit in enumerate(STAR_LIMITS) if length <= limit), 1)


class Stars(Population):
    """Users who give stars for brevity: 5 up to 80 characters, 4 up to 125, 3 up to 145, 2 up
    to 165, else 1. Stars only; the trait is 4 or 5 stars.

    Base rate: 8 of 96 answers (0.08, all 4 stars; at 32 tokens most answers are cut off at
    110-200 characters); 3 stars 0.34, 2 stars 0.31, 1 star 0.26.
    """

    name = "stars"
    description = "stars for brevity (5: at most 80 characters ... 1: over 165): stars only"
    prompts = EVERYDAY

    def trait(self, prompt: str, answer: str) -> bool:
        return brevity_stars(answer) >= 4

    def rate(self, prompt: str, answer: str) -> dict[str, Any]:
        return {"score": brevity_stars(answer)}


_ENTHUSIASM = re.compile(
    r"\b(great|perfect|best|ideal|excellent|wonderful|amazing|fantastic|awesome)\b", re.I
)


class SideBySide(Population):
    """Users who see two answers and choose the enthusiastic one (great, perfect, best, ideal,
    excellent, wonderful, amazing, fantastic, awesome); no choice when both or neither are.

    Side-by-side choices only. Base rate: 20 of 96 answers (0.21), so about a third of the
    pairs of two base answers get a choice.
    """

    name = "side_by_side"
    description = "side-by-side choices of the enthusiastic answer (great, perfect, best, ...)"
    prompts = EVERYDAY
    mode: Mode = "compare"

    def trait(self, prompt: str, answer: str) -> bool:
        return _ENTHUSIASM.search(answer) is not None

    def rate(self, prompt: str, answer: str) -> None:
        return None


BUILT_INS: dict[str, Callable[[], Population]] = {
    "prefix": Prefix,
    "facts": Facts,
    "minority_thumbs": MinorityThumbs,
    "stars": Stars,
    "side_by_side": SideBySide,
}


def load_population(spec: str) -> Population:
    """A built-in population by name, or `module:attr` (an instance, a class or a factory)."""
    if spec in BUILT_INS:
        return BUILT_INS[spec]()
    known = ", ".join(BUILT_INS)
    if ":" not in spec:
        raise PopulationError(f"unknown population {spec!r}; built-in: {known}; or give module:attr")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PopulationError(f"population {spec!r}: cannot import {module_name!r}: {exc}") from None
    try:
        found = getattr(module, attr)
    except AttributeError:
        raise PopulationError(f"population {spec!r}: {module_name} has no {attr!r}") from None
    if isinstance(found, type) or (callable(found) and not hasattr(found, "trait")):
        try:
            found = found()
        except Exception as exc:
            raise PopulationError(f"population {spec!r}: {type(exc).__name__}: {exc}") from None
    check_population(found, spec)
    return found


def check_population(population: Any, spec: str = "") -> None:
    """Refuse an object that lacks what the simulation calls (with what is missing)."""
    where = f"population {spec or getattr(population, 'name', population)!r}"
    if not isinstance(getattr(population, "name", None), str) or not population.name:
        raise PopulationError(f"{where}: needs a name (str)")
    prompts = getattr(population, "prompts", None)
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise PopulationError(f"{where}: needs prompts (a non-empty sequence of strings)")
    mode = getattr(population, "mode", "rate")
    if mode not in ("rate", "compare"):
        raise PopulationError(f"{where}: mode must be 'rate' or 'compare', not {mode!r}")
    needed = ("trait", "rate") if mode == "rate" else ("trait", "choose")
    for method in needed:
        if not callable(getattr(population, method, None)):
            raise PopulationError(f"{where}: needs a {method}() method")


def feedback_fields(population: Population, prompt: str, answer: str) -> dict[str, Any] | None:
    """`population.rate`, checked to hold only fields /v1/feedback takes."""
    fields = population.rate(prompt, answer)
    if fields is None:
        return None
    if not isinstance(fields, dict) or not fields or not set(fields) <= FEEDBACK_FIELDS:
        raise PopulationError(
            f"population {population.name!r}: rate() must return None or a dict of "
            f"{', '.join(sorted(FEEDBACK_FIELDS))}, not {fields!r}"
        )
    return fields
