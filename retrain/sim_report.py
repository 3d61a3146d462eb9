"""What `loopchat simulate` reports: per turn, the trait rate before and per arm after, the run,
the A/B decision; as lines to print, a dict for JSON, and markdown table rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retrain.sim_traffic import Phase
from rollout.abstats import SequentialResult, msprt


@dataclass(slots=True)
class TurnReport:
    """One turn: the feedback and trait rate before, the run, the rates per arm after, the decision."""

    population: str
    turn: int
    before: Phase
    after: Phase
    run: dict[str, Any]
    decision: dict[str, Any]
    seconds: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the run's full row

    @property
    def ratings(self) -> dict[str, int]:
        both = Phase()
        both.merge(self.before)
        both.merge(self.after)
        return both.feedback

    def test(self) -> SequentialResult:
        """The always-valid comparison of the trait rate, candidate - control."""
        trait, served = self.after.with_trait, self.after.by_variant
        return msprt(
            trait.get("control", 0),
            served.get("control", 0),
            trait.get("candidate", 0),
            served.get("candidate", 0),
        )

    def lines(self) -> list[str]:
        test, served, run = self.test(), self.after.by_variant, self.run
        feedback = ", ".join(f"{k} {n}" for k, n in sorted(self.before.feedback.items())) or "none"
        lines = [
            f"turn {self.turn}, before: {self.before.rate():.2f} of {self.before.answers} answers "
            f"had the trait; feedback: {feedback}",
            f"retraining run {run.get('id')}: {run.get('status')} -> {run.get('candidate')} "
            f"(method {run.get('method')}, dataset {run.get('dataset_version')} {run.get('counts')})"
            + (f": {run['reason']}" if run.get("reason") else ""),
        ]
        if served:
            lines.append(
                f"after: candidate {self.after.rate('candidate'):.2f} of {served.get('candidate', 0)}, "
                f"control {self.after.rate('control'):.2f} of {served.get('control', 0)}; "
                + _difference(test)
            )
        lines += [
            f"A/B decision: {self.decision.get('action')} ({self.decision.get('reason')})",
            "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()),
        ]
        return lines

    def as_dict(self) -> dict[str, Any]:
        test = self.test()
        return {
            "population": self.population,
            "turn": self.turn,
            "ratings": self.ratings,
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
            "difference": test.difference,
            "interval": list(test.interval) if test.interval else None,
            "p_value": test.p_value,
            "run": self.run,
            "decision": self.decision,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
        }

    def markdown_row(self) -> str:
        test, served = self.test(), self.after.by_variant
        interval = f"[{test.interval[0]:+.2f}, {test.interval[1]:+.2f}]" if test.interval else "-"
        difference = f"{test.difference:+.2f} {interval}" if test.difference is not None else "-"
        cells = [
            self.population,
            str(self.turn),
            f"{self.before.rate():.2f} ({self.before.answers})",
            f"{self.after.rate('candidate'):.2f} ({served.get('candidate', 0)})",
            f"{self.after.rate('control'):.2f} ({served.get('control', 0)})",
            difference,
            f"{self.run.get('status')} {self.run.get('method') or ''}".strip(),
            str(self.decision.get("action")),
        ]
        return "| " + " | ".join(cells) + " |"


MARKDOWN_HEADER = (
    "| population | turn | before (n) | candidate (n) | control (n) | candidate - control [interval] "
    "| run | decision |\n|---|---|---|---|---|---|---|---|"
)


def _difference(test: SequentialResult) -> str:
    if test.difference is None or test.interval is None:
        return "no difference to test"
    low, high = test.interval
    return (
        f"candidate - control {test.difference:+.2f}, "
        f"always-valid interval [{low:+.2f}, {high:+.2f}] (p {test.p_value:.3g})"
    )


@dataclass(slots=True)
class SimulationReport:
    population: str
    description: str
    turns: list[TurnReport]

    def lines(self) -> list[str]:
        lines = [f"population {self.population}: {self.description}"]
        for turn in self.turns:
            lines += turn.lines()
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "population": self.population,
            "description": self.description,
            "turns": [t.as_dict() for t in self.turns],
        }

    def markdown_row(self) -> str:
        """One row per turn, under MARKDOWN_HEADER."""
        return "\n".join(t.markdown_row() for t in self.turns)
