"""The A/B decision rule, by simulation with known true rates, checked after every batch."""

from __future__ import annotations

import random
import statistics

import pytest

from rollout.abstats import (
    DecisionPolicy,
    VariantOutcome,
    decide,
    msprt,
    msprt_share,
    predicted_samples_per_arm,
)

POLICY = DecisionPolicy()  # alpha 0.05, tau 0.08, at least 100 judged ratings per arm
BATCH = 20  # ratings per arm between two looks


def simulate(rng: random.Random, control_rate: float, candidate_rate: float, max_per_arm: int):
    """Ratings arrive in batches; `decide` runs after every batch. (action, ratings per arm)."""
    control, candidate = VariantOutcome("control", "a"), VariantOutcome("b", "b")
    n = 0
    while n < max_per_arm:
        n += BATCH
        for outcome, rate in ((control, control_rate), (candidate, candidate_rate)):
            wins = sum(rng.random() < rate for _ in range(BATCH))
            outcome.positive += wins
            outcome.negative += BATCH - wins
            outcome.requests += BATCH
            outcome.rated += BATCH
        decision = decide(control, [candidate], POLICY)
        if decision.action != "hold":
            return decision.action, n
    return "hold", n


def test_false_promotions_stay_under_five_percent_in_aa_experiments() -> None:
    rng = random.Random(20261125)
    runs = 300
    results = [simulate(rng, 0.5, 0.5, max_per_arm=3000) for _ in range(runs)]
    promoted = sum(action == "promote" for action, _ in results) / runs
    decided = sum(action != "hold" for action, _ in results) / runs
    print(f"A/A: {runs} runs, 150 looks each: false promotions {promoted:.3f}, any decision {decided:.3f}")
    assert promoted <= 0.05
    # The two-sided error is bounded by alpha too.
    assert decided <= POLICY.alpha


def test_a_better_candidate_is_promoted_within_the_predicted_sample_size() -> None:
    rng = random.Random(7)
    typical = predicted_samples_per_arm(0.5, 0.6, tau=POLICY.tau, alpha=POLICY.alpha)
    likely = predicted_samples_per_arm(0.5, 0.6, tau=POLICY.tau, alpha=POLICY.alpha, power=0.9)
    results = [simulate(rng, 0.5, 0.6, max_per_arm=20 * likely) for _ in range(200)]
    stops = [n for action, n in results if action == "promote"]
    within = sum(n <= likely for n in stops) / len(results)
    print(
        f"0.60 vs 0.50: predicted {typical} per arm (median), {likely} (90%); "
        f"observed median {statistics.median(stops)}, {within:.3f} promoted within {likely}"
    )
    assert len(stops) == len(results), "every run promotes the better candidate, none rolls it back"
    assert statistics.median(stops) <= typical + BATCH
    assert within >= 0.85


def test_a_worse_candidate_is_rolled_back() -> None:
    rng = random.Random(3)
    actions = [simulate(rng, 0.6, 0.4, max_per_arm=3000)[0] for _ in range(50)]
    assert actions.count("rollback") == 50


def test_guardrails_roll_back_at_once() -> None:
    control = VariantOutcome("control", "a", requests=100, errors=1, latency_p95_ms=800)
    erring = VariantOutcome("b", "b", requests=25, errors=3, latency_p95_ms=800)
    decision = decide(control, [erring], POLICY)
    assert decision.action == "rollback" and decision.candidate == "b"
    assert "error rate" in decision.reason

    slow = VariantOutcome("b", "b", requests=25, errors=0, latency_p95_ms=1300)
    assert "latency p95" in decide(control, [slow], POLICY).reason

    # Like for like: a candidate that answers at twice the length, at the control's speed, is
    # not slower; one whose tokens come 1.6x slower is, whatever its answers' length.
    speed = dict(requests=100, ttft_p95_ms=80, token_latency_p95_ms=20)
    control_timed = VariantOutcome("control", "a", latency_p95_ms=800, **speed)
    longer = VariantOutcome("b", "b", latency_p95_ms=1600, **{**speed, "requests": 25})
    assert decide(control_timed, [longer], POLICY).action == "hold"
    slow_tokens = VariantOutcome("b", "b", requests=25, ttft_p95_ms=80, token_latency_p95_ms=32)
    assert "time per output token p95 32.0 ms" in decide(control_timed, [slow_tokens], POLICY).reason
    slow_start = VariantOutcome("b", "b", requests=25, ttft_p95_ms=130, token_latency_p95_ms=20)
    assert "time to first token" in decide(control_timed, [slow_start], POLICY).reason

    # A spike of thumbs-down (0.20 -> 0.75 negative) on 60 ratings: far below the 100 ratings the
    # promotion test waits for, but beyond chance already.
    control_rated = VariantOutcome("control", "a", requests=100, positive=48, negative=12)
    disliked = VariantOutcome("b", "b", requests=100, positive=15, negative=45)
    decision = decide(control_rated, [disliked], POLICY)
    assert decision.action == "rollback" and "negative feedback" in decision.reason
    # The same margin on a handful of ratings is not yet evidence.
    few = VariantOutcome("b", "b", requests=100, positive=14, negative=16)
    assert decide(VariantOutcome("control", "a", positive=22, negative=8), [few], POLICY).action == "hold"

    # Too few requests for the guardrail to judge.
    early = VariantOutcome("b", "b", requests=5, errors=2)
    assert decide(control, [early], POLICY).action == "hold"


def test_no_decision_before_the_minimum_sample() -> None:
    control = VariantOutcome("control", "a", requests=60, positive=10, negative=40)
    candidate = VariantOutcome("b", "b", requests=60, positive=50, negative=10)
    assert msprt(10, 50, 50, 60).crossed(POLICY.alpha)
    assert decide(control, [candidate], POLICY).action == "hold"


def test_the_best_of_several_candidates_is_promoted_at_a_bonferroni_alpha() -> None:
    control = VariantOutcome("control", "a", positive=500, negative=500)
    good = VariantOutcome("good", "g", positive=600, negative=400)
    better = VariantOutcome("better", "h", positive=650, negative=350)
    decision = decide(control, [good, better], POLICY)
    assert decision.action == "promote" and decision.candidate == "better"
    assert decision.numbers["alpha"] == pytest.approx(POLICY.alpha / 2)


def test_msprt_interval_and_edge_cases() -> None:
    result = msprt(400, 1000, 460, 1000)
    low, high = result.interval
    assert low < result.difference < high
    assert result.difference == pytest.approx(0.06)
    # No data: nothing to say.
    empty = msprt(0, 0, 0, 0)
    assert empty.p_value == 1.0 and empty.interval is None
    # All-or-nothing rates do not make a difference look certain on a handful of samples.
    assert not msprt(0, 3, 3, 3).crossed(0.05)
    # The interval stays within what a difference of two rates (or a share - 1/2) can be.
    assert msprt(2, 22, 19, 26).interval[1] == 1.0 and msprt(19, 26, 2, 22).interval[0] == -1.0
    assert msprt_share(20, 20).interval[1] == 0.5 and msprt_share(0, 20).interval[0] == -0.5


def choices(wins: int, losses: int) -> VariantOutcome:
    return VariantOutcome("b", "b", pairwise_wins=wins, pairwise_losses=losses)


def test_side_by_side_choices_decide_a_policy_on_choices() -> None:
    policy = DecisionPolicy(metric="choices", min_ratings_per_variant=20)
    control = VariantOutcome("control", "a")
    # The candidate's share of choices against an even split; ratings do not count here.
    assert decide(control, [choices(26, 4)], policy).action == "promote"
    assert "share of side-by-side choices 0.867" in decide(control, [choices(26, 4)], policy).reason
    assert decide(control, [choices(4, 26)], policy).action == "rollback"
    assert decide(control, [choices(16, 14)], policy).action == "hold"
    # Below the minimum sample, however lopsided.
    assert decide(control, [choices(19, 0)], policy).action == "hold"
    rated = VariantOutcome("b", "b", positive=90, negative=10)
    assert decide(VariantOutcome("control", "a", positive=10, negative=90), [rated], policy).action == "hold"
    assert msprt_share(0, 0).p_value == 1.0 and msprt_share(15, 30).difference == 0.0


def test_a_policy_on_both_signals_tests_each_at_half_alpha() -> None:
    both = DecisionPolicy(metric="both", min_ratings_per_variant=20)
    control = VariantOutcome("control", "a", positive=50, negative=50)
    candidate = VariantOutcome("b", "b", positive=50, negative=50, pairwise_wins=26, pairwise_losses=4)
    decision = decide(control, [candidate], both)
    assert decision.action == "promote" and decision.numbers["alpha"] == pytest.approx(0.025)
    assert set(decision.numbers["variants"]["b"]) >= {"ratings", "choices", "p_value"}
    # A/A with looks after every batch: either test may fire, together still within alpha.
    rng = random.Random(11)
    runs, promoted = 200, 0
    for _ in range(runs):
        control, candidate = VariantOutcome("control", "a"), VariantOutcome("b", "b")
        for _ in range(60):
            for outcome in (control, candidate):
                up = sum(rng.random() < 0.5 for _ in range(BATCH))
                outcome.positive += up
                outcome.negative += BATCH - up
            wins = sum(rng.random() < 0.5 for _ in range(BATCH))
            candidate.pairwise_wins += wins
            candidate.pairwise_losses += BATCH - wins
            if decide(control, [candidate], DecisionPolicy(metric="both")).action == "promote":
                promoted += 1
                break
    assert promoted / runs <= 0.05
