"""The gate judges each method on its own held-out data and catches worse generated answers."""

from __future__ import annotations

import pytest

from retrain.config import GateConfig
from retrain.gate import Scores, gate, reward_auc

OPEN = GateConfig(bias_probe=False)


def labeled(*pairs: tuple[bool, float]) -> Scores:
    return Scores(labeled=list(pairs))


def test_the_implicit_reward_ranks_liked_above_disliked() -> None:
    champion = labeled((True, -10.0), (False, -10.0), (False, -12.0))
    # The candidate raised the liked answer and lowered both disliked ones.
    assert reward_auc(labeled((True, -8.0), (False, -11.0), (False, -13.0)), champion) == 1.0
    # It raised everything alike: no better at telling them apart.
    assert reward_auc(labeled((True, -9.0), (False, -9.0), (False, -11.0)), champion) == 0.5
    # Disliked answers only (95 % thumbs down): the share pushed down.
    only_bad = labeled((False, -10.0), (False, -10.0))
    assert reward_auc(labeled((False, -11.0), (False, -9.0)), only_bad) == 0.5
    assert reward_auc(labeled((False, -11.0), (False, -12.0)), only_bad) == 1.0
    assert reward_auc(Scores(), Scores()) is None


def test_a_kto_run_is_not_rejected_for_lacking_sft_held_out_data() -> None:
    champion = labeled((True, -10.0), (False, -10.0))
    candidate = labeled((True, -9.0), (False, -12.0))
    result = gate(candidate, champion, OPEN, "kto")
    assert result.passed, result.reasons
    # The same candidate judged as an SFT run has none of SFT's own held-out data.
    assert any("only 0 held-out sft examples" in r for r in gate(candidate, champion, OPEN, "sft").reasons)
    # A KTO candidate that ranks liked answers below disliked ones fails on its own data, once
    # there are enough of them to tell from chance (the champion's AUC is 1/2 by construction).
    many = [(True, -10.0)] * 10 + [(False, -10.0)] * 10
    reversed_ = [(True, -11.0)] * 10 + [(False, -9.0)] * 10
    worse = gate(labeled(*reversed_), labeled(*many), OPEN, "kto")
    assert (
        not worse.passed
        and "AUC 0.000 (below 0.500 by more than 1.96 standard errors of 0.132)" in worse.reasons[0]
    )
    # One liked and four disliked answers, all in the wrong order, are well within chance.
    few = labeled((True, -10.0), *[(False, -10.0)] * 4)
    assert gate(labeled((True, -11.0), *[(False, -9.0)] * 4), few, OPEN, "kto").passed
    assert gate(labeled((True, -9.0), (False, -9.0)), champion, OPEN, "kto").passed


def test_likelihood_checks_are_the_sft_runs_own() -> None:
    worse_perplexity = Scores(
        examples=5, perplexity=9.0, token_accuracy=0.3, pairs=4, preference_accuracy=0.75
    )
    champion = Scores(examples=5, perplexity=5.0, token_accuracy=0.4, pairs=4, preference_accuracy=0.5)
    assert any("perplexity" in r for r in gate(worse_perplexity, champion, OPEN, "sft").reasons)
    assert gate(worse_perplexity, champion, OPEN, "dpo").passed


@pytest.mark.parametrize("method", ["sft", "kto", "dpo"])
def test_answers_further_from_what_users_wanted_fail_every_method(method: str) -> None:
    """The DPO run whose likelihoods improved while its answers lost the fact users asked for."""
    champion = Scores(
        examples=4,
        perplexity=5.0,
        token_accuracy=0.4,
        token_f1=0.31,
        pairs=4,
        preference_accuracy=0.5,
        labeled=[(True, -10.0), (False, -10.0)],
    )
    candidate = Scores(
        examples=4,
        perplexity=4.0,
        token_accuracy=0.5,
        token_f1=0.12,
        pairs=4,
        preference_accuracy=1.0,
        labeled=[(True, -9.0), (False, -12.0)],
    )
    result = gate(candidate, champion, OPEN, method)
    assert not result.passed
    assert result.reasons == [
        "generated answers are further from what users wanted: token F1 0.120 vs champion 0.310 "
        "(drop 0.190 > 0.020)"
    ]
    assert gate(candidate, champion, OPEN.model_copy(update={"max_f1_drop": 0.5}), method).passed


def test_a_token_accuracy_shortfall_counts_only_beyond_its_noise() -> None:
    """Two held-out prompts are ~60 tokens: 2 of them flipping is noise, 30 % of 6000 is not."""
    champion = Scores(examples=2, tokens=60, perplexity=5.0, token_accuracy=0.50)
    noisy = Scores(examples=2, tokens=60, perplexity=5.0, token_accuracy=0.465)
    assert gate(noisy, champion, OPEN, "sft").passed
    assert not gate(noisy, champion, OPEN.model_copy(update={"noise_z": 0.0}), "sft").passed
    big_champion = Scores(examples=200, tokens=6000, perplexity=5.0, token_accuracy=0.50)
    worse = Scores(examples=200, tokens=6000, perplexity=5.0, token_accuracy=0.465)
    failed = gate(worse, big_champion, OPEN, "sft")
    assert not failed.passed and "token accuracy gain -0.0350" in failed.reasons[0]


def test_a_dpo_candidate_fails_on_held_out_pairs_only_beyond_chance() -> None:
    champion = Scores(pairs=1, preference_accuracy=1.0)
    # One held-out pair the wrong way round is a coin toss, not evidence.
    assert gate(Scores(pairs=1, preference_accuracy=0.0), champion, OPEN, "dpo").passed
    # Twenty pairs mostly the wrong way round are.
    worse = gate(Scores(pairs=20, preference_accuracy=0.2), champion, OPEN, "dpo")
    assert not worse.passed
    assert "0.200 on 20 held-out pairs (below 0.500 by more than 1.96 standard errors" in worse.reasons[0]


def test_a_token_f1_drop_counts_only_beyond_the_spread_of_its_prompts() -> None:
    def answers(*f1: float) -> Scores:
        return Scores(
            examples=len(f1),
            pairs=len(f1),
            labeled=[(True, -1.0)] * len(f1),
            token_f1=sum(f1) / len(f1),
            f1_each=list(f1),
        )

    # One held-out prompt answered differently is no evidence either way.
    assert gate(answers(0.28), answers(0.55), OPEN, "kto").passed
    # Four prompts that all lost what users wanted are.
    lost = gate(answers(0.10, 0.12, 0.15, 0.11), answers(0.31, 0.33, 0.30, 0.35), OPEN, "dpo")
    assert not lost.passed and "standard errors of" in lost.reasons[0]
    # Four prompts of which one moved a lot and the others not at all: within their spread.
    assert gate(answers(0.0, 0.3, 0.3, 0.3), answers(0.5, 0.3, 0.3, 0.3), OPEN, "sft").passed
