"""The few lines a technician reads for one report (analyze without --json, demo)."""

from __future__ import annotations

import logging

from smearscope.service.analysis.morphology import SIZE_BASED
from smearscope.service.analysis.report import ClassShare, Report
from smearscope.service.analysis.wording import counted
from smearscope.service.fhir import report_view

logger = logging.getLogger(__name__)


def _grade_text(share: ClassShare, grade: str) -> str:
    """The grade, and the grades at its 95 % interval's ends where they differ, as the dashboard
    shows them: 2 schistocytes of 91 red cells read 3+ on a share that could be 1+. A grade resting
    on fewer calls than the share counts (`graded_count`: the sure sickle or schistocyte calls)
    says so: '4.0% (1+)' would read as a grade below the share printed beside it. Sickle cells
    read "present" or "none", never 1+ to 3+."""
    text = report_view.shown_grade(share.label, grade)
    if share.graded_count is not None:
        text = f"{text} on the {share.graded_count} of {share.count} calls at its flag's confidence"
    ends = report_view.grade_interval(share)
    if ends is None or ends[0] == ends[1]:
        return text
    low, high = (report_view.shown_grade(share.label, g) for g in ends)
    return f"{text}, 95% interval {low} to {high}"


def _unassessed_line(report: Report, rows: list[ClassShare], doubted: bool) -> str:
    """The size-based rows not assessable, each with the cells the head gave it, and where those
    cells are: at an estimated scale counted under their shape above; with a calibration in doubt
    left out of the shares above (which then sum to less than 100 %); at a calibrated scale with no
    whole red cell, why."""
    named = ", ".join(f"{s.label} {s.count}" for s in rows)
    if not doubted and report_view.no_whole_rbc_sized(report):
        return f"  RBC {named}: not assessable, no whole red cell to size (each cut by the image's edge)"
    if not doubted:
        return f"  RBC {named}: not assessable at an estimated scale (those cells are counted by their shape)"
    n = sum(s.count for s in rows)
    # the shares' red cells: all counted, or those of the sharp fields when some were blurred
    of = next((s.of_cells for s in report.rbc_morphology if s.label not in SIZE_BASED and s.of_cells),
              report.counts.rbc)
    return (f"  RBC {named}: not assessable with a calibration in doubt ({n} of {counted(of, 'red cell')}, "
            "left out of the shares above)")


def _percent_text(share: ClassShare, of: int) -> str:
    """A share of `of` cells to one decimal (report_view.share_text); one some cell was given that rounds to 0.0
    says it is under a tenth of a percent and of how many cells, where '0.0%' would read as none seen; one that
    rounds to 100.0 with not every cell of that type reads '>99.9%'."""
    text = report_view.share_text(share.percent, share.count, of)
    if text == "<0.1":
        return f"<0.1% ({share.count} cell{'s' if share.count > 1 else ''})"
    return text + "%"


def _interval_text(share: ClassShare) -> str:
    """A share's 95 % interval as the dashboard's column reads it, rounded outward: 0 of 8 white cells is 'CI 0.0-32.5',
    and 0 of 10 000 'CI 0.0-0.1', never 0.0-0.0, which would claim a certainty the count does not have."""
    if share.ci95_low is None or share.ci95_high is None:
        return ""
    low, high = report_view.interval_shown(share.ci95_low, share.ci95_high)
    return f", 95% CI {low:.1f}-{high:.1f}"


def _together_text(hidden: list[ClassShare]) -> str:
    """The share of the rows left out, together; under a tenth of a percent with their cells, as a row's."""
    text = f"{sum(s.percent for s in hidden):.1f}% together"
    if text.startswith("0.0%"):
        n = sum(s.count for s in hidden)
        return f"<0.1% together, {n} cell{'s' if n > 1 else ''}"
    return text


#: Where a field's scale came from, in words (service.analysis.report.ScaleInfo.method).
SCALE_SOURCE = {"given": "calibrated", "rbc_size_classical": "estimated from the red cells",
                "rbc_size_detection": "estimated from the red cells",
                "specimen": "the specimen's, estimated from its fields' red cells", "default": "a default, nothing to measure"}


def summarize(report: Report) -> str:
    """A few lines a technician can read at a glance."""
    r = report
    # nucleated red cells, counted apart from the white cells (a report from before that has no per 100 WBC,
    # nor has a field of no white cell: its NRBC are still said)
    nrbc = (f"NRBC {r.counts.nrbc} ({report_view.share_text(r.nrbc_per_100_wbc, r.counts.nrbc)} per 100 WBC), " if r.nrbc_per_100_wbc is not None
            else f"NRBC {r.counts.nrbc} (no white cell to count them per 100), " if r.counts.nrbc else "")
    lines = [
        f"field {r.source.frame_id if r.source else r.report_id}: RBC {r.counts.rbc}, WBC {r.counts.wbc}, "
        f"{nrbc}platelets {r.counts.platelet}  (scale {r.scale.microns_per_pixel:.4f} um/px, "
        f"{SCALE_SOURCE.get(r.scale.method, 'method')}: {r.scale.method}; "
        f"{r.timing_ms.get('total_ms', 0):.0f} ms)" if r.scale else f"report {r.report_id}",
    ]
    if r.wbc_differential:
        of_wbc = report_view.differential_of(r)
        lines.append("  WBC: " + ", ".join(f"{s.label} {s.count} ({report_view.share_text(s.percent, s.count, of_wbc)}%{_interval_text(s)})"
                                           for s in r.wbc_differential))
    doubted = report_view.calibration_in_doubt(r)  # a calibration in doubt: sizes not read
    rows = report_view.morphology_rows(r)  # every size-based class when sizes cannot be read
    # a row no cell was given (the report lists every class of the head's) is left to --json: at a glance
    # "none seen" of a dozen findings would bury the ones seen
    shares = [s for s in rows if report_view.assessable(r, s) and s.count]
    graded = {s.label: _grade_text(s, g) for s in shares if (g := report_view.grade(s)) not in (None, "none")}
    # a share none of whose calls is sure enough for a grade: said, or its percent reads as a finding
    unsure = {s.label: _grade_text(s, "none") for s in shares if s.graded_count is not None
              and s.label not in graded and report_view.grade(s) == "none"}
    # the most frequent rows, and every finding graded 1+ or more (or present) however few its cells
    shown = [s for i, s in enumerate(shares) if i < 6 or s.label in graded]
    # a share of fewer red cells than the others says of how many, as the dashboard does: a size-based
    # one is of the whole red cells at a calibrated scale (a cell cut by the frame's edge has no size)
    base = next((s.of_cells for s in shares if s.label not in SIZE_BASED), None)
    of = {s.label: f" of {s.of_cells} RBC" for s in shares if s.of_cells is not None and s.of_cells != base}
    if shown:
        notes = {**unsure, **graded}
        line = "  RBC: " + ", ".join(f"{s.label} {_percent_text(s, s.of_cells or r.counts.rbc)}" + of.get(s.label, "")
                                     + (f" ({notes[s.label]})" if s.label in notes else "") for s in shown)
        # the rows left out, counted: the printed shares then sum to less than 100 % for a reason
        hidden = [s for s in shares if s not in shown]
        if hidden:
            line += (f"; {len(hidden)} more row{'s' if len(hidden) > 1 else ''} not shown "
                     f"({_together_text(hidden)}, --json lists every row)")
        lines.append(line)
    unassessed = [s for s in rows if not report_view.assessable(r, s)]
    blurred = [s.label for s in rows if report_view.out_of_focus(r, s)]
    if blurred:  # every row: the red cells were too blurred to judge their shape
        lines.append(f"  RBC morphology not assessable: the red cells were too blurred to judge their shape "
                     f"({r.counts.rbc} counted)")
        unassessed = [u for u in unassessed if u.label not in blurred]
    if unassessed:  # an estimated scale: a share of 0 would read as "none seen"
        lines.append(_unassessed_line(r, unassessed, doubted))
    size = r.rbc_size
    if size.n and size.mean_diameter_um is not None and not doubted:  # measured only at a calibrated scale
        cv = f"CV {size.cv_percent:.1f}%, " if size.cv_percent is not None else ""
        lines.append(f"  RBC diameter {size.mean_diameter_um:.1f} um ({cv}n={size.n})")
    lines.append("  " + report_view.review_line(r))  # the words of the dashboard and FHIR
    for f in r.flags:
        lines.append(f"  [{f.severity}] {f.code}: {f.message}")
    return "\n".join(lines)
