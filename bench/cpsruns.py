"""One caller run of a calls/s bench and its verdict (`Run`), and the figures every report takes
from runs: CPU per call and its table column, each one's last run per rate, the rates several
configurations passed, paired ratios at those rates, the ratio of two top rates against a goal.
Pure arithmetic on runs, no processes: bench/cpslib.py runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# uac-call.xml holds every call 200 ms between ACK and BYE: a run of N calls at rate R cannot
# end before N/R + 0.2 s, which is what "ideal" calls/s below is measured against.
CALL_PAUSE_S = 0.2
# A run "keeps the rate" when it reaches this share of the ideal calls/s; below it sipp (or
# the SuT) is queueing calls, the call rate is no longer what was asked for.
KEEP_FRACTION = 0.95


@dataclass
class Run:
    """One caller run: its counts and times (from sipp's -trace_stat file) and verdict."""

    config: str
    rate: float
    calls: int
    successful: int
    failed: int
    elapsed: float  # sipp's own StartTime -> last CurrentTime, seconds
    wall: float  # our wall clock, including `fdkeeper sipp`'s start-up
    returncode: int | None
    retry: bool = False
    measured: dict = field(default_factory=dict)  # whatever the bench's end_run() measured

    @property
    def achieved(self) -> float:
        """The figure: successful calls per second of the run."""
        return self.successful / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ideal(self) -> float:
        """Calls/s of a run that creates every call on time and answers at once."""
        return self.calls / (self.calls / self.rate + CALL_PAUSE_S)

    @property
    def all_answered(self) -> bool:
        return self.returncode == 0 and self.failed == 0 and self.successful == self.calls

    @property
    def passed(self) -> bool:
        return self.all_answered and self.achieved >= KEEP_FRACTION * self.ideal

    @property
    def verdict(self) -> str:
        if self.failed:
            return f"FAILED ({self.failed} failed calls)"
        if not self.all_answered:
            return f"FAILED (exit {self.returncode}, {self.successful}/{self.calls} calls)"
        if not self.passed:
            return f"rate not kept (< {KEEP_FRACTION:.0%} of ideal)"
        return "ok"


def per_call_ms(run: Run, key: str) -> float | None:
    """run.measured[key] (CPU-seconds) per successful call, in ms."""
    if key not in run.measured or run.successful == 0:
        return None
    return 1000.0 * run.measured[key] / run.successful


def ms_column(run: Run, key: str, width: int) -> str:
    """per_call_ms as a table column ("-" when not measured)."""
    value = per_call_ms(run, key)
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def print_best_rates(best: dict[str, Run | None], labels: dict[str, str], width: int) -> float | None:
    """One line per configuration with its highest passing rate; the achieved ratio b/a."""
    for config, label in labels.items():
        run = best[config]
        figure = (
            f"highest rate with no failed call {run.rate:g} calls/s, achieved {run.achieved:.1f} calls/s"
            if run
            else "no rate passed"
        )
        print(f"  ({config}) {label:<{width}} {figure}")
    return best["b"].achieved / best["a"].achieved if best["a"] and best["b"] else None


def last_runs(runs: list[Run]) -> dict[tuple[float, str], Run]:
    """Each (rate, configuration)'s last run (a retry replaces the failed first try)."""
    return {(r.rate, r.config): r for r in runs}


def common_rates(runs: list[Run], configs: tuple[str, ...]) -> list[float]:
    """The rates where the last run of every one of ``configs`` passed, lowest first."""
    last = last_runs(runs)
    return [
        rate
        for rate in sorted({r.rate for r in runs})
        if all((rate, c) in last and last[(rate, c)].passed for c in configs)
    ]


def paired_ratios(runs: list[Run], configs: tuple[str, str] = ("a", "b")) -> list[float]:
    """second/first achieved calls/s at every rate where the last run of both passed: a noise gauge."""
    first, second = configs
    last = last_runs(runs)
    return [last[(rate, second)].achieved / last[(rate, first)].achieved for rate in common_rates(runs, configs)]


def paired(runs: list[Run], top: str, bottom: str) -> str:
    """The spread of top/bottom achieved calls/s over the rates both passed."""
    ratios = sorted(paired_ratios(runs, (bottom, top)))
    if not ratios:
        return "no rate where both passed"
    return (
        f"at the {len(ratios)} rates both passed: median {ratios[len(ratios) // 2]:.3f}, "
        f"min {ratios[0]:.3f}, max {ratios[-1]:.3f}"
    )


def ratio_line(best: dict[str, Run | None], top: str, bottom: str, goal: float) -> tuple[str, bool]:
    """top/bottom achieved calls/s at each one's highest passing rate, against ``goal`` (at least)."""
    high, low = best[top], best[bottom]
    if not (high and low):
        return f"({top})/({bottom}): n/a, a configuration passed no rate", False
    ratio = high.achieved / low.achieved
    met = ratio >= goal
    return (
        f"({top})/({bottom}) achieved calls/s: {high.achieved:.1f} / {low.achieved:.1f} = "
        f"{ratio:.3f}  goal {'met' if met else 'missed'} (>= {goal:g})"
    ), met
