"""Text comparisons shared by the gate, the bias probe and augmentation."""

from __future__ import annotations

from collections import Counter


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the lower-cased whitespace tokens two texts share (1.0 for two empties)."""
    predicted, expected = prediction.lower().split(), reference.lower().split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)
