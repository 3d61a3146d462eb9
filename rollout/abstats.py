"""A/B statistics that stay valid when the results are looked at after every batch.

Decisions use the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and
Walsh ("Always valid inference", 2017; the test behind Optimizely's and Eppo's sequential
results) on the difference of two proportions. With the normal approximation and a normal
mixing distribution N(0, tau^2) on the true difference theta, the likelihood ratio after the
data seen so far is

    Lambda = sqrt(V / (V + tau^2)) * exp(theta_hat^2 * tau^2 / (2 V (V + tau^2)))

where theta_hat is the observed difference and V its variance. Lambda is a martingale under
"no difference", so by Ville's inequality P(Lambda ever reaches 1/alpha) <= alpha however
often it is checked: the always-valid p-value is min(1, 1/Lambda) and its running minimum.
A candidate is promoted when Lambda >= 1/alpha and theta_hat > 0 (a one-sided decision of a
two-sided test, so the false-promotion rate is at most alpha, about alpha/2 in practice), and
`decide` adds a minimum sample size per arm and the guardrails.

tau is the effect size the test is tuned for (the standard deviation of the mixing prior): the
test is fastest for true differences near tau and still valid for any.

Side-by-side choices between a candidate's answer and the control's are the same test on one
proportion: the candidate's share of the choices against 1/2 (`msprt_share`). A policy decides
on ratings, on choices, or on both (each test at alpha/2, so a false promotion by either stays
within alpha).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["hold", "promote", "rollback"]
# What a policy decides on: judged ratings (thumbs, stars other than 3), side-by-side choices
# between the candidate and the control, or both.
Metric = Literal["ratings", "choices", "both"]
SIGNALS: dict[str, tuple[str, ...]] = {
    "ratings": ("ratings",),
    "choices": ("choices",),
    "both": ("ratings", "choices"),
}


@dataclass(frozen=True, slots=True)
class SequentialResult:
    """The always-valid comparison of a candidate's rate with the control's."""

    control_rate: float | None
    candidate_rate: float | None
    difference: float | None
    log_likelihood_ratio: float
    p_value: float
    # Always-valid (1 - alpha) confidence interval of candidate - control.
    interval: tuple[float, float] | None

    def crossed(self, alpha: float) -> bool:
        return self.log_likelihood_ratio >= math.log(1 / alpha)


def _variance(successes: int, trials: int) -> float:
    # Shrunk towards 1/2 (add one success and one failure) so that 0/n and n/n do not give a
    # variance of zero, which would make any difference look certain.
    p = (successes + 1) / (trials + 2)
    return p * (1 - p) / trials


def msprt(
    control_successes: int,
    control_trials: int,
    candidate_successes: int,
    candidate_trials: int,
    *,
    tau: float = 0.08,
    alpha: float = 0.05,
) -> SequentialResult:
    """mSPRT of candidate - control for two proportions (see the module docstring)."""
    if control_trials <= 0 or candidate_trials <= 0:
        return SequentialResult(
            control_successes / control_trials if control_trials else None,
            candidate_successes / candidate_trials if candidate_trials else None,
            None,
            0.0,
            1.0,
            None,
        )
    rate_a = control_successes / control_trials
    rate_b = candidate_successes / candidate_trials
    v = _variance(control_successes, control_trials) + _variance(candidate_successes, candidate_trials)
    return _tested(rate_a, rate_b, v, tau, alpha, (-1.0, 1.0))


def _tested(
    rate_a: float, rate_b: float, v: float, tau: float, alpha: float, bounds: tuple[float, float]
) -> SequentialResult:
    """Lambda for the estimate rate_b - rate_a of variance v, and the interval it implies
    (clipped to `bounds`, the values the difference can take)."""
    theta = rate_b - rate_a
    t2 = tau * tau
    log_lr = 0.5 * math.log(v / (v + t2)) + theta * theta * t2 / (2 * v * (v + t2))
    p_value = min(1.0, math.exp(-log_lr))
    # Inverting the test: the differences theta0 it would not reject at alpha.
    radius = rejection_radius(v, tau, alpha)
    interval = (max(bounds[0], theta - radius), min(bounds[1], theta + radius))
    return SequentialResult(rate_a, rate_b, theta, log_lr, p_value, interval)


def msprt_share(
    successes: int, trials: int, *, null: float = 0.5, tau: float = 0.08, alpha: float = 0.05
) -> SequentialResult:
    """mSPRT of one proportion against `null` (a candidate's share of side-by-side choices).

    The result reads as the two-sample one with the null as the "control rate": `difference`
    is share - null and `interval` its always-valid interval.
    """
    if trials <= 0:
        return SequentialResult(null, None, None, 0.0, 1.0, None)
    return _tested(null, successes / trials, _variance(successes, trials), tau, alpha, (-null, 1 - null))


def rejection_radius(v: float, tau: float, alpha: float) -> float:
    """The |theta_hat| at which Lambda reaches 1/alpha, for an estimate of variance v."""
    t2 = tau * tau
    radius_sq = v * (v + t2) / t2 * (2 * math.log(1 / alpha) - math.log(v / (v + t2)))
    return math.sqrt(max(radius_sq, 0.0))


def predicted_samples_per_arm(
    control_rate: float,
    candidate_rate: float,
    *,
    tau: float = 0.08,
    alpha: float = 0.05,
    power: float = 0.5,
    limit: int = 10**7,
) -> int:
    """Samples per arm by which a true difference is detected with probability >= `power`.

    At n samples per arm the estimate is about N(theta, V(n)); the test has fired by then at
    least when the estimate is beyond the rejection radius r(n), so the smallest n with
    theta - z_power * sqrt(V(n)) >= r(n) is a (slightly conservative) sample size for that
    power. power=0.5 is where the expected path of the statistic crosses the threshold.
    """
    theta = abs(candidate_rate - control_rate)
    if theta == 0:
        return limit
    spread = control_rate * (1 - control_rate) + candidate_rate * (1 - candidate_rate)
    z = NormalDist().inv_cdf(power)

    def detected(n: int) -> bool:
        v = spread / n
        return theta - z * math.sqrt(v) >= rejection_radius(v, tau, alpha)

    low, high = 1, 2
    while not detected(high):
        low, high = high, high * 2
        if high > limit:
            return limit
    while low < high:
        mid = (low + high) // 2
        if detected(mid):
            high = mid
        else:
            low = mid + 1
    return low


class DecisionPolicy(BaseModel):
    """When to promote and when to roll back: the sequential test's error rate and effect size,
    and the guardrails. Written as `policy:` in an experiment spec and `canary_policy:` in the
    retraining config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="Error rate of a promotion or roll-back on the metric."
    )
    tau: float = Field(0.08, gt=0, le=1, description="Effect size (rate difference) the test is tuned for.")
    min_ratings_per_variant: int = Field(
        100,
        ge=1,
        description="Judged ratings per arm (or choices between candidate and control) before a decision.",
    )
    metric: Metric = Field(
        "ratings",
        description="Decide on judged ratings, on side-by-side choices between candidate and control "
        "(the candidate's share against 1/2), or on both (each at alpha/2).",
    )
    guardrail_min_requests: int = Field(
        20, ge=1, description="Requests a variant serves before the error and latency guardrails apply."
    )
    max_error_rate: float = Field(0.05, ge=0, le=1)
    max_latency_p95_ratio: float = Field(1.5, gt=1, description="Candidate p95 over control p95.")
    max_negative_rate_increase: float = Field(
        0.15, gt=0, le=1, description="Candidate's negative rate minus the control's."
    )
    guardrail_min_ratings: int = Field(30, ge=1, description="Judged ratings per arm before that guardrail.")


@dataclass(slots=True)
class VariantOutcome:
    """What one variant's traffic produced (see rollout.outcomes)."""

    variant: str
    model_version: str
    requests: int = 0
    errors: int = 0
    latency_p95_ms: float | None = None
    # The serving speed, apart from how long the answers are: time to the first token, and
    # time per later token.
    ttft_p95_ms: float | None = None
    token_latency_p95_ms: float | None = None
    mean_completion_tokens: float | None = None
    positive: int = 0
    negative: int = 0
    rated: int = 0
    mean_stars: float | None = None
    corrections: int = 0
    pairwise_wins: int = 0
    pairwise_losses: int = 0

    @property
    def judged(self) -> int:
        """Ratings that say good or bad (thumbs, or stars other than 3)."""
        return self.positive + self.negative

    @property
    def positive_rate(self) -> float | None:
        return self.positive / self.judged if self.judged else None

    @property
    def negative_rate(self) -> float | None:
        return self.negative / self.judged if self.judged else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def correction_rate(self) -> float | None:
        return self.corrections / self.rated if self.rated else None

    @property
    def choices(self) -> int:
        """Side-by-side choices between this variant's answer and another variant's."""
        return self.pairwise_wins + self.pairwise_losses

    @property
    def win_rate(self) -> float | None:
        return self.pairwise_wins / self.choices if self.choices else None

    def as_dict(self) -> dict:
        """The counts and the rates derived from them."""
        numbers = asdict(self)
        numbers.update(
            positive_rate=self.positive_rate,
            error_rate=self.error_rate,
            correction_rate=self.correction_rate,
            win_rate=self.win_rate,
        )
        return numbers


@dataclass(slots=True)
class Decision:
    action: Action
    reason: str
    candidate: str | None = None
    numbers: dict = field(default_factory=dict)


def _slower(candidate: VariantOutcome, control: VariantOutcome, ratio: float) -> str | None:
    """Whether the candidate serves more than `ratio` times slower than the control, like for
    like: both arms run in the same engine batches (an unmerged candidate's LoRA slows the
    control's steps as much as its own), so its speed is compared on time to the first token and
    time per later token, which a candidate that merely answers at greater length does not
    change. Whole latencies are compared only where those are not logged."""
    pairs = [
        ("time to first token", candidate.ttft_p95_ms, control.ttft_p95_ms),
        ("time per output token", candidate.token_latency_p95_ms, control.token_latency_p95_ms),
    ]
    if all(c is None or k is None for _, c, k in pairs):
        pairs = [("latency", candidate.latency_p95_ms, control.latency_p95_ms)]
    for what, ours, theirs in pairs:
        if ours is not None and theirs and ours > ratio * theirs:
            return f"{what} p95 {ours:.1f} ms > {ratio:g} x control's {theirs:.1f} ms"
    return None


def guardrail_breach(
    control: VariantOutcome, candidate: VariantOutcome, policy: DecisionPolicy
) -> str | None:
    """Why the candidate must be rolled back at once, or None."""
    if candidate.requests >= policy.guardrail_min_requests:
        rate = candidate.error_rate or 0.0
        if rate > policy.max_error_rate:
            counts = f"{candidate.errors}/{candidate.requests}"
            return f"error rate {rate:.3f} > {policy.max_error_rate:.3f} ({counts})"
        if control.requests >= policy.guardrail_min_requests:
            slower = _slower(candidate, control, policy.max_latency_p95_ratio)
            if slower is not None:
                return slower
    if candidate.judged >= policy.guardrail_min_ratings and control.judged >= policy.guardrail_min_ratings:
        # A spike of negative ratings: larger than the margin and beyond chance (the same
        # always-valid test, on the negative rate), so checking often does not cause false alarms.
        spike = msprt(
            control.negative,
            control.judged,
            candidate.negative,
            candidate.judged,
            tau=policy.tau,
            alpha=policy.alpha,
        )
        increase = spike.difference or 0.0
        if increase > policy.max_negative_rate_increase and spike.crossed(policy.alpha):
            return (
                f"negative feedback {spike.candidate_rate:.3f} vs control {spike.control_rate:.3f} "
                f"(+{increase:.3f} > {policy.max_negative_rate_increase:.3f}, "
                f"always-valid p = {spike.p_value:.4f})"
            )
    return None


def compare(control: VariantOutcome, candidate: VariantOutcome, policy: DecisionPolicy, k: int = 1):
    """The sequential test of one candidate's positive rate against the control's (Bonferroni
    over k candidates)."""
    return msprt(
        control.positive,
        control.judged,
        candidate.positive,
        candidate.judged,
        tau=policy.tau,
        alpha=policy.alpha / k,
    )


def compare_choices(candidate: VariantOutcome, policy: DecisionPolicy, k: int = 1) -> SequentialResult:
    """The sequential test of the candidate's share of side-by-side choices against 1/2."""
    return msprt_share(candidate.pairwise_wins, candidate.choices, tau=policy.tau, alpha=policy.alpha / k)


def tests_per_alpha(policy: DecisionPolicy, k: int = 1) -> int:
    """How many tests share the policy's alpha (Bonferroni): k candidates times its signals."""
    return max(1, k) * len(SIGNALS[policy.metric])


def tests(
    control: VariantOutcome, candidate: VariantOutcome, policy: DecisionPolicy, k: int = 1
) -> dict[str, tuple[SequentialResult, int]]:
    """Each test the policy decides on, at its share of alpha: signal -> (result, sample)."""
    share = tests_per_alpha(policy, k)
    done: dict[str, tuple[SequentialResult, int]] = {}
    for signal in SIGNALS[policy.metric]:
        if signal == "ratings":
            done[signal] = (compare(control, candidate, policy, share), min(candidate.judged, control.judged))
        else:
            done[signal] = (compare_choices(candidate, policy, share), candidate.choices)
    return done


_WHAT = {"ratings": "positive rate", "choices": "share of side-by-side choices"}
_AGAINST = {"ratings": "control's", "choices": "an even split's"}


def decide(control: VariantOutcome, candidates: list[VariantOutcome], policy: DecisionPolicy) -> Decision:
    """Keep, promote or roll back: guardrails first, then the always-valid test(s).

    With several candidates each is compared with the control at alpha / k (Bonferroni), and
    with both signals each test at half of that; a breach or a significantly worse candidate is
    rolled back alone, and the best candidate that is significantly better than the control on
    a signal is promoted.
    """
    k = max(1, len(candidates))
    alpha = policy.alpha / tests_per_alpha(policy, k)
    numbers: dict = {"alpha": alpha, "tau": policy.tau, "metric": policy.metric, "variants": {}}
    best: tuple[float, VariantOutcome, SequentialResult, str] | None = None
    for candidate in candidates:
        results = tests(control, candidate, policy, k)
        # Each test's figures, and the first one's (ratings, unless the policy has only
        # choices) at the top level, where the p-value gauge reads them.
        first = next(iter(results.values()))
        numbers["variants"][candidate.variant] = {
            **_numbers(*first),
            "judged": candidate.judged,
            **{signal: _numbers(result, n) for signal, (result, n) in results.items()},
        }
        breach = guardrail_breach(control, candidate, policy)
        if breach is not None:
            return Decision("rollback", f"guardrail: {breach}", candidate.variant, numbers)
        for signal, (result, n) in results.items():
            if not (n >= policy.min_ratings_per_variant and result.crossed(alpha)):
                continue
            assert result.difference is not None
            if result.difference < 0:
                return Decision(
                    "rollback",
                    f"{_WHAT[signal]} {result.candidate_rate:.3f} below {_AGAINST[signal]} "
                    f"{result.control_rate:.3f} "
                    f"(always-valid p = {result.p_value:.4f} <= {alpha:.4f})",
                    candidate.variant,
                    numbers,
                )
            if best is None or result.difference > best[0]:
                best = (result.difference, candidate, result, signal)
    if best is not None:
        _, candidate, result, signal = best
        sample = (
            f"n = {candidate.judged} / {control.judged}"
            if signal == "ratings"
            else f"{candidate.pairwise_wins} of {candidate.choices} choices"
        )
        return Decision(
            "promote",
            f"{_WHAT[signal]} {result.candidate_rate:.3f} beats {_AGAINST[signal]} {result.control_rate:.3f} "
            f"(always-valid p = {result.p_value:.4f} <= {alpha:.4f}, {sample})",
            candidate.variant,
            numbers,
        )
    return Decision("hold", "no significant difference yet", None, numbers)


def _numbers(result: SequentialResult, n: int) -> dict:
    return {
        "difference": result.difference,
        "p_value": result.p_value,
        "log_lr": result.log_likelihood_ratio,
        "interval": result.interval,
        "n": n,
    }
