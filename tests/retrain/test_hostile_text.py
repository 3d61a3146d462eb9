"""Text steps of retraining (paraphrase tidying, counterfactual swaps) take time linear in the
text, whatever the text."""

from __future__ import annotations

from retrain.augment import tidy
from retrain.bias import load_terms
from tests.utils.hostile_text import assert_fast, hostile_texts

TERMS = load_terms()


@hostile_texts()
def test_retraining_text_steps_are_linear(text: str) -> None:
    assert_fast({"tidy": tidy, "swap": TERMS.swap}, text)


def test_tidy_still_drops_labels_with_any_spacing() -> None:
    assert tidy("New   version :  Where is it?") == "Where is it?"
    assert tidy("paraphrased:Where is it?") == "Where is it?"
    assert tidy("new" + " " * 1000 + "idea") == "new" + " " * 1000 + "idea"
