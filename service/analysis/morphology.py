"""Red-cell morphology as a hematologist reports it: ICSH grades, size only from a calibrated scale.

Grades follow the ICSH 2015 recommendations for grading peripheral blood cell morphology
(Palmer et al., Int J Lab Hematol 2015;37:287-303): a semi-quantitative grade from the share of
red cells showing the feature, with thresholds per feature:

- size and colour (microcytes, macrocytes, hypochromic cells): 1+ 11-20 %, 2+ 21-50 %, 3+ > 50 %;
- shapes (spherocytes, target cells, stomatocytes, ovalocytes, elliptocytes, teardrop cells,
  echinocytes/burr cells, other poikilocytes): 1+ 5-20 %, 2+ 21-50 %, 3+ > 50 %;
- schistocytes, graded on their own lower thresholds (ICSH 2012/2021, Zini et al.: more than
  1 % is suspicious of a thrombotic microangiopathy): 1+ < 1 %, 2+ 1-2 %, 3+ > 2 %, on the calls
  the head made at the confidence their flag needs (`graded_count`; a normal-looking lab's red
  cells get a few unsure schistocyte calls, which go to review);
- sickle cells: not graded. ICSH reports them present, whatever their share, since any sickle
  cell matters: the grade is "present" when the head made a call at the confidence the critical
  flag needs (`graded_count`), else "none"; less sure calls are counted and listed for review by
  the flag. How much they matter is the flag's to say (`sickle_cells_present`, critical, from
  `sickle_critical_min_cells` sure calls; else `sickle_cells_review`), not a 1+ to 3+.

ICSH writes its ranges in whole percent and they are contiguous: a share between two of them
(20.5 % microcytes) is above the lower range and takes the grade above (2+), as 50.5 % takes 3+
("> 50 %") and 2.5 % schistocytes 3+ ("> 2 %"); so 1+ of size and colour starts above 10 %, 2+
above 20 %, 3+ above 50 %, and 1+ of shapes at 5 %.

Below 1+ the grade is "none" (the count stays in the report for audit). Each grade on the 1+ to
3+ scale comes with the grades at the ends of the share's Wilson 95 % interval, so a grade resting
on a handful of cells says so. "present" and a sickle "none" have no such ends: the interval of
one sure call or more starts above 0 (present at both ends), and that of none always reaches above
0 however many cells were counted (none to present), so the ends would say nothing the grade and
its count do not.

Size-based classes (microcyte, macrocyte, spherocyte) need micrometres: when the scale was
estimated from the red cells themselves, a "small" cell is small only relative to its field,
and such calls are circular. Then those classes are not assessable: each such cell is re-typed
to its most likely shape class, the size classes' probability counted as normal outline
(`shape_probs`), and the report says why. So is a red cell the image's edge cuts, at any scale:
it shows part of its size (it is left out of the diameters too; on four rendered fields the
head called 13 of the 85 cut red cells spherocytes, where 1 was drawn), and the size-based
shares are of the whole red cells (`of_cells`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Classes whose call rests on the cell's size in micrometres.
SIZE_BASED = frozenset({"microcyte", "macrocyte", "spherocyte"})


def _over(percent: float) -> float:
    """The least share above `percent` (a bound that ICSH's "> x %" or the range after "..-x %" starts at)."""
    return math.nextafter(percent, math.inf)


#: (1+, 2+, 3+) lower bounds in percent of red cells; grade "1+" starts at the first bound.
_SIZE_COLOUR = (_over(10.0), _over(20.0), _over(50.0))
_SHAPE = (5.0, _over(20.0), _over(50.0))
_LOW = (_over(0.0), 1.0, _over(2.0))
ICSH_THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "microcyte": _SIZE_COLOUR, "macrocyte": _SIZE_COLOUR, "hypochromia": _SIZE_COLOUR,
    "spherocyte": _SHAPE, "target": _SHAPE, "stomatocyte": _SHAPE, "ovalocyte": _SHAPE,
    "elliptocyte": _SHAPE, "teardrop": _SHAPE, "burr": _SHAPE, "other_poikilocyte": _SHAPE,
    "schistocyte": _LOW,
}
GRADES = ("none", "1+", "2+", "3+")
#: The grade of a finding ICSH reports present rather than graded.
PRESENT = "present"
#: Findings ICSH reports present (any share above 0), never 1+ to 3+: every sickle cell matters.
REPORTED_PRESENT = frozenset({"sickle"})
#: Every red-cell finding the report gives a grade: graded ones and those reported present.
GRADED = frozenset(ICSH_THRESHOLDS) | REPORTED_PRESENT


def icsh_grade(feature: str, percent: float) -> str:
    """The ICSH grade of `percent` of red cells showing `feature` ('none' below 1+); 'present' or
    'none' for a finding reported present (sickle cells)."""
    if feature in REPORTED_PRESENT:
        return PRESENT if percent > 0 else GRADES[0]
    bounds = ICSH_THRESHOLDS[feature]
    g = 0
    for i, b in enumerate(bounds):
        if percent >= b:
            g = i + 1
    return GRADES[g]


@dataclass(frozen=True)
class SizeDistribution:
    """Red-cell equivalent diameters (calibrated scale only): their CV (anisocytosis; not an RDW, which is of volumes) and a histogram."""

    n: int
    mean_um: float | None
    sd_um: float | None
    cv_percent: float | None
    bin_edges_um: tuple[float, ...]
    counts: tuple[int, ...]


#: Histogram bins of red-cell diameter (um): 0.5 um wide from 3 to 12, open at both ends.
DIAMETER_BIN_EDGES = tuple(float(x) for x in np.arange(3.0, 12.01, 0.5))


def size_distribution(diameters_um) -> SizeDistribution:
    d = np.asarray(list(diameters_um), float)
    d = d[np.isfinite(d)]
    edges = np.array((0.0,) + DIAMETER_BIN_EDGES + (1e9,))
    counts = np.histogram(d, bins=edges)[0] if d.size else np.zeros(len(edges) - 1, int)
    if d.size == 0:
        return SizeDistribution(0, None, None, None, DIAMETER_BIN_EDGES, tuple(int(c) for c in counts))
    mean = float(d.mean())
    if d.size < 2:  # one cell shows no spread: no SD rather than 0.0, which would read "no anisocytosis"
        return SizeDistribution(1, round(mean, 3), None, None, DIAMETER_BIN_EDGES, tuple(int(c) for c in counts))
    sd = float(d.std(ddof=1))
    return SizeDistribution(int(d.size), round(mean, 3), round(sd, 3), round(100 * sd / mean, 2) if mean else None,
                            DIAMETER_BIN_EDGES, tuple(int(c) for c in counts))


def shape_probs(classes: list[str], probs: np.ndarray) -> dict[str, float]:
    """The head's probabilities with size left out (for a cell at an estimated scale): a
    microcyte, macrocyte or spherocyte is a cell of normal outline at a size no one can judge, so
    its probability is normal's. Taking the next class instead had the size calls' cells inflate
    whichever abnormal shape came second (on Chula fields, ovalocytes 18 -> 27 %)."""
    out = {c: float(p) for c, p in zip(classes, probs) if c not in SIZE_BASED}
    out["normal"] = out.get("normal", 0.0) + sum(float(p) for c, p in zip(classes, probs) if c in SIZE_BASED)
    return out


def shape_label(classes: list[str], probs: np.ndarray) -> str:
    """The most likely class that does not rest on size (size calls counted as normal outline)."""
    merged = shape_probs(classes, probs)
    return max(merged, key=merged.__getitem__)
