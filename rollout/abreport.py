"""The A/B report chart: each variant's positive rate over time, with its always-valid interval.

The interval is the confidence sequence of the same mixture test the decisions use (for one
proportion), so it may be read at every point of the chart, not only at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rollout.abstats import rejection_radius
from rollout.outcomes import RatingPoint


@dataclass(frozen=True, slots=True)
class RatePoint:
    at: datetime
    judged: int
    rate: float
    low: float
    high: float


def rate_series(
    points: Sequence[RatingPoint], *, alpha: float = 0.05, tau: float = 0.08, steps: int = 50
) -> dict[str, list[RatePoint]]:
    """Cumulative positive rate per variant at up to `steps` moments, with its interval."""
    series: dict[str, list[RatePoint]] = {}
    if not points:
        return series
    counts: dict[str, list[int]] = {}
    every = max(1, math.ceil(len(points) / steps))
    for index, point in enumerate(points):
        judged, positive = counts.setdefault(point.variant, [0, 0])
        counts[point.variant] = [judged + 1, positive + int(point.positive)]
        if (index + 1) % every and index + 1 != len(points):
            continue
        for variant, (n, k) in counts.items():
            p = (k + 1) / (n + 2)
            radius = rejection_radius(p * (1 - p) / n, tau, alpha)
            rate = k / n
            series.setdefault(variant, []).append(
                RatePoint(point.at, n, rate, max(0.0, rate - radius), min(1.0, rate + radius))
            )
    return series


def plot_rates(series: dict[str, list[RatePoint]], out: Path, *, title: str) -> Path:
    """Write the chart as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.8), dpi=110)
    for variant, rows in sorted(series.items()):
        times = [r.at for r in rows]
        line = axes.plot(times, [r.rate for r in rows], marker=".", label=f"{variant} (n={rows[-1].judged})")
        axes.fill_between(
            times, [r.low for r in rows], [r.high for r in rows], alpha=0.2, color=line[0].get_color()
        )
    axes.set_ylim(0, 1)
    axes.set_ylabel("positive rate (judged ratings)")
    axes.set_xlabel("time (UTC)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if series:
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "no judged ratings yet", ha="center", va="center", transform=axes.transAxes)
    figure.autofmt_xdate()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    plt.close(figure)
    return out
