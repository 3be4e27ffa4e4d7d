"""How often the station's calibration watch (service.station.calibration_watch) flags a right
calibration, and how soon it flags a wrong one: simulated stations over a lab's measured fields.

Each field's calibration check is measured once, at its known scale (`FieldCheck`: the field's own
estimate over the known scale and the whole red cells it showed); the own estimate does not
depend on the calibration, so a station calibrated `factor` times the known scale reads
own / (known x factor). A simulated station runs `horizon` runs of that lab; each run's first
`checks_per_run` fields are checked (the station's `calibration_check_fields`), and every check
goes through the station's own functions: `kept_ratio` (measurable or not), `with_check` (a run's
first 3, the last 48) and `verdict` (18 checks of 4 runs, median outside 0.85..1.32). A run's
fields are drawn two ways: `random` (any fields of the lab) or `block` (consecutive fields of one
unit: an rpi slide, a single specimen; for the labs without a slide record, neighbours in file
order). Fields of one lab come from few slides of one stain, so either way the runs are more alike
than a clinic's patients are: the rates are those of the lab's look, not of its patients' spread.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smearscope.service.analysis.calibration_check import CalibrationCheck
from smearscope.service.config.specimen import SpecimenConfig
from smearscope.service.station.calibration_watch import kept_ratio, verdict, with_check

MODES = ("random", "block")
#: Calibrations tried, as factors of the true scale: right, 1.25, 1.5 and 2 times off either way.
WATCH_FACTORS = (1.0, 0.8, 1.25, 0.667, 1.5, 0.5, 2.0)


def _default(name: str) -> int:
    return int(SpecimenConfig.model_fields[name].default)


#: The station's defaults: checked fields per run, checks and runs the watch needs.
CHECKS_PER_RUN = _default("calibration_check_fields")
MIN_FIELDS = _default("calibration_watch_fields")
MIN_RUNS = _default("calibration_watch_runs")


@dataclass(frozen=True)
class FieldCheck:
    """A field's calibration check at its known scale: its own estimate over the known scale (None:
    not measured) and the whole red cells found at the own scale; `unit` and `order` place it in
    its specimen (an rpi slide and frame) or in its lab's file order."""

    image: str
    unit: str
    order: int
    own_over_known: float | None
    own_rbc: int

    def ratio_at(self, factor: float) -> float | None:
        """What the station's watch keeps of this check at a calibration `factor` times the known scale."""
        return kept_ratio(CalibrationCheck(factor, 0, self.own_over_known, self.own_rbc))


Run = Sequence[FieldCheck]


def run_sampler(fields: Sequence[FieldCheck], mode: str, size: int) -> Callable[[random.Random], Run]:
    """Draws one run's fields: `random`, any `size` of them; `block`, `size` consecutive ones of one unit."""
    if mode == "random":
        pool = list(fields)
        return lambda rng: rng.sample(pool, min(size, len(pool)))
    if mode != "block":
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    units: dict[str, list[FieldCheck]] = {}
    for f in sorted(fields, key=lambda f: (f.unit, f.order, f.image)):
        units.setdefault(f.unit, []).append(f)
    names = sorted(units)

    def block(rng: random.Random) -> Run:
        unit = units[rng.choice(names)]
        start = rng.randrange(max(1, len(unit) - size + 1))
        return unit[start:start + size]
    return block


def first_flag(runs: Sequence[Run], factor: float, checks_per_run: int = CHECKS_PER_RUN,
               min_fields: int = MIN_FIELDS, min_runs: int = MIN_RUNS) -> int | None:
    """The run (1-based) during which a station calibrated `factor` times the true scale is first
    flagged `calibration_drift_suspected` over these runs; None if never."""
    rows: list[tuple[str, float]] = []
    for i, run in enumerate(runs, 1):
        for field in run[:checks_per_run]:
            ratio = field.ratio_at(factor)
            more = None if ratio is None else with_check(rows, f"run{i}", ratio)
            if more is None:
                continue
            rows = more
            if verdict(rows, min_fields, min_runs).suspected:
                return i
    return None


@dataclass(frozen=True)
class TrialRow:
    """One lab, way of drawing runs and calibration: when each simulated station was first flagged."""

    lab: str
    mode: str
    factor: float
    fields: int
    measurable: int
    horizon: int
    firsts: tuple[int | None, ...]

    def flagged_by(self, runs: int) -> float:
        return sum(1 for f in self.firsts if f is not None and f <= runs) / len(self.firsts)

    def run_quantile(self, q: float) -> int | None:
        """The run by which a share `q` of the stations was flagged (None: fewer were, by the horizon)."""
        hit = sorted(f for f in self.firsts if f is not None)
        need = max(1, round(q * len(self.firsts)))
        return hit[need - 1] if len(hit) >= need else None


def watch_trials(lab: str, fields: Sequence[FieldCheck], trials: int, horizon: int,
                 factors: Sequence[float] = WATCH_FACTORS, modes: Sequence[str] = MODES, seed: int = 20261207,
                 checks_per_run: int = CHECKS_PER_RUN, min_fields: int = MIN_FIELDS,
                 min_runs: int = MIN_RUNS) -> list[TrialRow]:
    """`trials` simulated stations of `horizon` runs per mode and factor; the same runs at every factor."""
    measurable = sum(1 for f in fields if f.ratio_at(1.0) is not None)
    out = []
    for mode in modes:
        draw = run_sampler(fields, mode, checks_per_run)
        stations = []
        for t in range(trials):
            rng = random.Random(f"{seed}-{lab}-{mode}-{t}")
            stations.append([draw(rng) for _ in range(horizon)])
        for factor in factors:
            firsts = tuple(first_flag(runs, factor, checks_per_run, min_fields, min_runs) for runs in stations)
            out.append(TrialRow(lab, mode, factor, len(fields), measurable, horizon, firsts))
    return out


def render(rows: Sequence[TrialRow], early: Sequence[int] = (10, 25)) -> str:
    """The table: per lab, mode and factor, the share of stations flagged by run `early` and by the
    horizon, and the run by which half and 95 % of them were flagged ('-': not by the horizon)."""
    if not rows:
        return "no lab measured"
    horizon = rows[0].horizon
    marks = [r for r in early if r < horizon] + [horizon]
    head = (f"{'lab':9s} {'mode':6s} {'factor':>6s} {'fields':>6s} {'checks':>6s} "
            + " ".join(f"{'by ' + str(m):>7s}" for m in marks) + f" {'run 50%':>7s} {'run 95%':>7s}")
    lines = [head]
    for r in rows:
        half, most = r.run_quantile(0.5), r.run_quantile(0.95)
        lines.append(f"{r.lab:9s} {r.mode:6s} {r.factor:>6g} {r.fields:>6d} {r.measurable:>6d} "
                     + " ".join(f"{100 * r.flagged_by(m):>6.1f}%" for m in marks)
                     + f" {'-' if half is None else half:>7} {'-' if most is None else most:>7}")
    return "\n".join(lines)


def lab_median(fields: Sequence[FieldCheck]) -> float | None:
    """The lab's median own / known over its measurable checks (a right calibration's median)."""
    ratios = [r for f in fields if (r := f.ratio_at(1.0)) is not None]
    return statistics.median(ratios) if ratios else None
