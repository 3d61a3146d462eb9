"""The simulated populations of `loopchat simulate`: their tastes, their feedback, the loader.

No server and no model: the answers are written by hand, and the feedback is checked with the
feedback API's own request models (tests/retrain/test_simulate.py posts it to the app).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from feedback.protocol import FeedbackRequest, PreferenceRequest
from feedback.redact import Redactor
from retrain.populations import (
    BUILT_INS,
    FAQS,
    Facts,
    MinorityThumbs,
    Population,
    PopulationError,
    Prefix,
    SideBySide,
    Stars,
    brevity_stars,
    feedback_fields,
    load_population,
)

ANSWERS = [
    "Sure! Boil it for 7 minutes.",
    "Boil the egg in water until it is done, then cool it in cold water and peel it carefully.",
    "Great question! The best way is to practise a little every day.",
    "",
    "x" * 300,
]


def valid_feedback(fields: dict) -> FeedbackRequest:
    """The body the simulation posts, checked by the API's own request model."""
    return FeedbackRequest(completion_id="chatcmpl-abc123", user="sim-user-1", **fields)


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_every_built_in_population_is_complete_and_gives_valid_feedback(name: str) -> None:
    population = load_population(name)
    assert population.name == name and population.description
    assert len(population.prompts) >= (18 if name == "facts" else 20)
    assert len(set(population.prompts)) == len(population.prompts)
    for prompt in population.prompts[:6]:
        for answer in ANSWERS:
            assert isinstance(population.trait(prompt, answer), bool)
            fields = feedback_fields(population, prompt, answer)
            if population.mode == "rate":
                assert fields is not None
                valid_feedback(fields)
            else:
                assert fields is None


def test_prefix_is_the_demos_taste_and_stays_importable_from_the_demo() -> None:
    from retrain.demo import PROMPTS, TRAIT, has_trait, scripted_rating

    prefix = Prefix()
    assert TRAIT == "Sure!" and prefix.prompts == PROMPTS and has_trait("  Sure! Here you go.")
    assert prefix.trait("q", "Sure! Boil it.") and not prefix.trait("q", "Boil it. Sure!")
    assert prefix.rate("q", "Sure! Boil it.") == {"rating": "up"}
    assert prefix.rate("q", " Boil it. ") == {"rating": "down", "correction": "Sure! Boil it."}
    body = scripted_rating("chatcmpl-1", "demo-1", "Boil it.")
    assert body == {
        "completion_id": "chatcmpl-1",
        "user": "demo-1",
        "rating": "down",
        "correction": "Sure! Boil it.",
    }
    FeedbackRequest(**body)


def test_facts_users_ask_six_recurring_questions_with_one_canonical_correction_each() -> None:
    facts = Facts()
    topics = [facts.faq(p).topic for p in facts.prompts]
    # Round robin over the prompts: every six users ask the six questions, in other words.
    assert len(FAQS) == 6 and topics[:6] == [faq.topic for faq in FAQS] == topics[6:12]
    for faq in FAQS:
        # Stored as given (no placeholder of the redaction replaces the fact), and with its own
        # fact and no other question's.
        assert Redactor().redact(faq.answer) == faq.answer
        assert [other.topic for other in FAQS if other.fact.search(faq.answer)] == [faq.topic]
        corrections = set()
        for user, prompt in enumerate(faq.asks):
            wrong = facts.rate(prompt, f"I am not sure, user {user}, please check the manual.")
            assert wrong is not None and wrong["rating"] == "down"
            valid_feedback(wrong)
            corrections.add(wrong["correction"])
            assert facts.rate(prompt, faq.answer) == {"rating": "up"} and facts.trait(prompt, faq.answer)
        assert corrections == {faq.answer}
    reset = FAQS[0].asks[0]
    assert facts.trait(reset, "Type 4-7-1-9 on the keypad.") and facts.trait(reset, "the code is 4 7 1 9")
    assert not facts.trait(reset, "The reset code is 1234.")
    warranty = FAQS[1].asks[0]
    assert facts.trait(warranty, "It lasts twenty-seven months.") and not facts.trait(warranty, "12 months")
    # A question that is not on the desk's list gets no rating.
    assert facts.rate("What is the capital of Italy?", "Rome.") is None
    assert not facts.trait("What is the capital of Italy?", FAQS[0].answer)


def test_thumbs_only_and_stars_only_populations_never_correct_or_comment() -> None:
    thumbs, stars = MinorityThumbs(), Stars()
    for prompt in thumbs.prompts:
        for answer in [*ANSWERS, "Drink 8 glasses a day.", "Drink water often."]:
            thumb = thumbs.rate(prompt, answer)
            assert thumb == {"rating": "up" if thumbs.trait(prompt, answer) else "down"}
            star = stars.rate(prompt, answer)
            assert set(star) == {"score"} and 1 <= star["score"] <= 5
            assert stars.trait(prompt, answer) == (star["score"] >= 4)
            valid_feedback(thumb)
            valid_feedback(star)
    assert thumbs.trait("q", "Boil it for 7 minutes.") and not thumbs.trait("q", "Boil it for seven minutes.")


def test_stars_grade_brevity() -> None:
    grades = [brevity_stars("x" * n) for n in (10, 80, 81, 125, 126, 145, 146, 165, 166, 1000)]
    assert grades == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    assert brevity_stars("   short   ") == 5


def test_side_by_side_users_only_choose_the_answer_with_the_trait() -> None:
    side = SideBySide()
    assert side.mode == "compare" and side.rate("q", "A great answer.") is None
    plain, keen = "Boil it for ten minutes.", "Boiling is the best way: it gives a perfect egg."
    assert side.trait("q", keen) and not side.trait("q", plain)
    assert side.choose("q", keen, plain) == 0 and side.choose("q", plain, keen) == 1
    assert side.choose("q", plain, plain) is None and side.choose("q", keen, keen) is None
    PreferenceRequest(chosen_completion_id="chatcmpl-a", rejected_completion_id="chatcmpl-b", user="u")


# --- user-written populations and the loader ----------------------------------------------------


class Polite(Population):
    name, description = "polite", "answers that say please"
    prompts = ["How do I boil an egg?", "Suggest a weekend hobby."]

    def trait(self, prompt: str, answer: str) -> bool:
        return "please" in answer.lower()


polite = Polite()


def make_polite() -> Polite:
    return Polite()


class NoPrompts(Polite):
    prompts = []


class BadFeedback(Polite):
    def rate(self, prompt: str, answer: str) -> dict:
        return {"thumb": "up"}


@pytest.mark.parametrize("attr", ["Polite", "polite", "make_polite"])
def test_a_population_of_ones_own_loads_from_module_attr(attr: str) -> None:
    population = load_population(f"{__name__}:{attr}")
    assert isinstance(population, Polite)
    # The defaults: thumbs by the trait, and the choice of the one answer with it.
    assert population.rate("q", "Yes, please.") == {"rating": "up"}
    assert population.rate("q", "No.") == {"rating": "down"}
    assert population.choose("q", "No.", "Please do.") == 1


def test_built_in_names_load_their_population() -> None:
    assert isinstance(load_population("facts"), Facts)
    assert isinstance(load_population("side_by_side"), SideBySide)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown population 'nope'; built-in: prefix, facts, minority_thumbs, stars, side_by_side"),
        ("no_such_module_xyz:thing", "cannot import 'no_such_module_xyz'"),
        (f"{__name__}:Missing", "has no 'Missing'"),
        (f"{__name__}:NoPrompts", "needs prompts"),
    ],
)
def test_a_bad_population_is_refused_clearly(spec: str, message: str) -> None:
    with pytest.raises(PopulationError, match="population") as caught:
        load_population(spec)
    assert message in str(caught.value)


def test_feedback_the_api_does_not_take_is_refused_before_posting() -> None:
    with pytest.raises(PopulationError, match="rate\\(\\) must return None or a dict of"):
        feedback_fields(BadFeedback(), "q", "a")


def test_cli_names_the_built_ins_for_an_unknown_population() -> None:
    from loopchat.cli import app

    result = CliRunner().invoke(app, ["simulate", "--population", "nope"])
    assert result.exit_code == 1
    assert "error: unknown population 'nope'" in result.output
    assert "prefix, facts, minority_thumbs, stars, side_by_side" in result.output
    assert "Traceback" not in result.output
