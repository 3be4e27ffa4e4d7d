"""An unknown scale, found from the red cells and never absurd.

A station should be calibrated (`smearscope calibrate-scale`, a stage micrometer). Without it,
the analyzer infers micrometres per pixel from red-cell size, a normal red cell being 7.5 um
(the convention the datasets' scales were measured with), which the detector's boxes read as
`DETECTED_RBC_DIAMETER_UM`:

1. a model-free first guess from the size of round stained blobs (on the frame as stored, else
   on the lamp-corrected frame: `scale.first_scale_guess`);
2. detection passes at that guess and a step either side, kept when one finds enough whole,
   confident red cells;
3. when none finds enough (`MIN_RBC_FOR_SCALE`) whole red cells, a search over the whole
   plausible range of microscope scales (`PLAUSIBLE_UM_PER_PX`); when the best finds only a
   handful (`SEARCH_BELOW_RBC`), a check at 2.5 times its scale (`UPWARD_CHECK`: clumps of cells
   taken for single red cells read the scale small), under the same rules. With not a single
   one at the guesses (a pale camera, an odd magnification) the scale whose pass finds the most
   is kept.
   With a few, the field may be sparse or the guess wrong (a detector finds a few "red cells" at
   any scale: a Raspberry Pi station's first guess reads a third of its scale): the searched
   scale is kept only where `SEARCH_WINS_FACTOR` times as many whole red cells show and
   refining from them settles, or keeps at least `UNSETTLED_MIN_RBC`; where the refinement
   drifts (each pass moves the scale on and shows fewer cells: a pale camera's cells measured
   large), the pass that showed the most whole red cells is kept if it showed that many;
4. refinement from the detected red cells' box size (at least `MIN_RBC_FOR_SCALE` of them),
   repeated until it agrees, because a detector sees cells far from the canonical size as
   nearer to it than they are. Where the whole red cells are fewer, the ones cut by one side of
   the frame that show their centre are measured too (`measurable_red_cells`; the decisions
   above still count whole cells only). On validation (30 images per lab, estimated scale)
   TXL-PBC 575, crops about four red cells wide, rose from 0.568 to 0.658 counted mAP50 and
   416 from 0.799 to 0.816, with BCCD, PBC, Chula and the Raspberry Pi station unchanged and
   TXL-PBC 360 0.001 lower. Counting the cut cells in those decisions too lost the station's
   white cells (0.765 -> 0.676 found): they made wrong first guesses look measured.

A searched pass that is not blood at its scale (`plausible`: five or more confident white cells,
at least one per ten whole red cells) is never taken, nor a refinement from a searched scale that
walks into one: far above its scale a pale camera's red cells are seen large and taken for white
cells while their pieces pass for red cells of the right size.

A search pass that upsamples a sparse field finds "red cells" at an absurd scale: on TXL-PBC
test (other labs' fields, scale estimated) taking the search's best whenever fewer than three
whole red cells were found, and guessing on the lamp-corrected frame first, lowered counted-cell
mAP50 from 0.696 to 0.643. Those "cells" are pieces, whose size points out of the plausible range
or which the refinement loses; the rules of step 3 keep the guess there.

The result is flagged uncertain (`scale_uncertain`) when it rests on a search, on too few red
cells or on a refinement that did not settle; it never leaves the plausible range.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from smearscope.service.analysis.records import Box, CellDetection, CellKind
from smearscope.service.analysis.scale import (
    CANONICAL_UM_PER_PX,
    ScaleEstimate,
    scale_from_rbc_diameters,
)
from smearscope.service.analysis.wording import counted

logger = logging.getLogger(__name__)

#: Scales a blood-smear microscope gives (100x oil on a fine sensor .. a 20x objective).
PLAUSIBLE_UM_PER_PX = (0.03, 0.6)
#: Factor between the guesses tried around the first guess.
GUESS_STEP = 1.4
#: Factor between the scales of the full search.
SEARCH_STEP = 1.5
#: Detection passes at most that refine the scale from the whole red cells.
REFINE_ROUNDS = 3
MIN_RBC_FOR_SCALE = 5
#: Below this many whole red cells at the guesses (but at least MIN_RBC_FOR_SCALE) the scales
#: `UPWARD_CHECK` times the best guess are tried instead of the full search: a first guess misled
#: by clumps of cells finds a handful of huge "red cells" that settle at its scale (a Raspberry Pi
#: station's field read 0.042 um/px from 5 of them, where 108 show at its scale of about 0.13). On
#: the lab table (validation, estimated scale) the Raspberry Pi station's estimates within 15 %
#: rose from 0.811 to 0.849 and its white cells found from 0.895 to 0.912, every other lab
#: unchanged; one check at 2.5 times did better than two at 2 and 3 times (0.830) for less time
#: (BCCD's median field 208 -> 244 ms against 442: a larger scale resamples the frame larger).
SEARCH_BELOW_RBC = 15
UPWARD_CHECK = (2.5,)
#: Below this many whole red cells at every guess (none), the search's best scale is taken.
MIN_RBC_TO_SKIP_SEARCH = 1
#: With a few whole red cells at the guesses (fewer than MIN_RBC_FOR_SCALE), a searched scale is
#: taken only when its pass finds this many times as many (and at least MIN_RBC_FOR_SCALE).
SEARCH_WINS_FACTOR = 4
#: ... and, when refining from them does not settle, at least this many still found at the end.
UNSETTLED_MIN_RBC = 20
#: A search pass that would resample the frame beyond this many canonical pixels is skipped.
MAX_SEARCH_CANONICAL_PIXELS = 12_000_000
#: A searched pass with at least this many confident white cells, and at least
#: `IMPLAUSIBLE_WBC_PER_RBC` of them per whole red cell, is not blood at its scale (`plausible`):
#: even a leukaemic smear with 200 000 white cells per uL has about one per 15 red cells.
IMPLAUSIBLE_WBC_MIN = 5
IMPLAUSIBLE_WBC_PER_RBC = 0.1
#: The refinement's ruler: what the detector's box of a normal red cell measures (um), at the
#: scales its training labs were given. Those scales rest on BCCD's boxes (a normal red cell
#: 7.5 um, `scale.NORMAL_RBC_DIAMETER_UM`); the committed detector's boxes of whole red cells at
#: those scales measure 7.37 um on BCCD, 7.65 to 7.84 on the three TXL-PBC sources and 8.30 on the
#: Raspberry Pi station (median, 12 validation fields each). On the lab table at an estimated
#: scale (validation, every lab) 7.5 x 1.06 was no lab's loss against 7.5 and found 0.895 of the
#: station's white cells instead of 0.825 (models/README.md, "The refinement's ruler").
DETECTED_RBC_DIAMETER_UM = 7.95


#: Within this many pixels of the frame's side a box counts as cut by it.
FRAME_EDGE_PX = 2.0


def _cut_sides(b: Box, width: int, height: int, edge_px: float) -> tuple[bool, bool, bool, bool]:
    """Whether the box reaches the frame's left, right, top and bottom side."""
    return b.x0 <= edge_px, b.x1 >= width - edge_px, b.y0 <= edge_px, b.y1 >= height - edge_px


def whole_red_cells(dets: list[CellDetection], width: int, height: int, min_score: float,
                    edge_px: float = FRAME_EDGE_PX) -> list[CellDetection]:
    """The confident red cells (`min_score`) no side of the frame cuts."""
    return [d for d in dets if d.kind is CellKind.RBC and d.score >= min_score
            and not any(_cut_sides(d.box, width, height, edge_px))]


def measurable_red_cells(dets: list[CellDetection], width: int, height: int, min_score: float,
                         edge_px: float = FRAME_EDGE_PX, enough: int = MIN_RBC_FOR_SCALE) -> list[CellDetection]:
    """The red cells whose diameter their box shows (confident ones, `min_score`).

    A whole cell's box does. With fewer than `enough` whole ones, so does the box of a cell cut by
    one side of the frame that shows its centre (the visible part at least half as deep as the
    cell is long, along the cut side): its extent along that side is the whole diameter. Such a
    cell comes back with a square box of that side, placed over its visible part. A field a few
    cells wide (a crop around a white cell) holds more of these than whole ones: on TXL-PBC's
    575 px crops, about four red cells across, the whole ones alone were too few to measure the
    scale by. Where whole cells are enough they alone are measured: taking the cut ones too on
    every field moved the Raspberry Pi station's estimates further from its scale (validation,
    white cells found 0.765 -> 0.588).
    """
    whole = whole_red_cells(dets, width, height, min_score, edge_px)
    if len(whole) >= enough:
        return whole
    out = []
    for d in dets:
        if d.kind is not CellKind.RBC or d.score < min_score:
            continue
        b = d.box
        cut = _cut_sides(b, width, height, edge_px)
        if not any(cut):
            out.append(d)
        elif sum(cut) > 1:
            continue  # cut by two sides: no side shows the whole diameter
        elif cut[0] or cut[1]:
            if b.width >= b.height / 2:
                x0 = b.x1 - b.height if cut[0] else b.x0
                out.append(dataclasses.replace(d, box=Box(x0, b.y0, x0 + b.height, b.y1), mask=None))
        elif b.height >= b.width / 2:
            y0 = b.y1 - b.width if cut[2] else b.y0
            out.append(dataclasses.replace(d, box=Box(b.x0, y0, b.x1, y0 + b.width), mask=None))
    return out


@dataclass
class Attempt:
    """One detection pass at an assumed scale: its detections and the whole, confident red cells."""

    mpp: float
    whole_rbc: list[CellDetection]
    payload: object  # what the caller needs to go on from this pass (its canonical field, detections)
    quick: bool = False  # a search pass (one detector view), not the analysis itself
    #: The red cells whose size the refinement reads (`measurable_red_cells`); None: `whole_rbc`.
    measured: list[CellDetection] | None = None
    #: Confident white cells this pass found (`plausible`).
    n_wbc: int = 0


def plausible(a: Attempt) -> bool:
    """Whether a searched pass could be blood at its scale: not `IMPLAUSIBLE_WBC_MIN` or more white
    cells at `IMPLAUSIBLE_WBC_PER_RBC` or more per whole red cell. Far above its true scale a pale
    camera's red cells are seen large, and the detector takes them for white cells while their
    pieces pass for red cells (a Raspberry Pi station's test field searched to 2.6 times its scale
    showed 101 "red cells" and 38 "white cells")."""
    return a.n_wbc < IMPLAUSIBLE_WBC_MIN or a.n_wbc < IMPLAUSIBLE_WBC_PER_RBC * len(a.whole_rbc)


@dataclass(frozen=True)
class ScaleOutcome:
    estimate: ScaleEstimate
    attempt: Attempt
    uncertain: bool
    reason: str | None = None


def clamp(mpp: float) -> float:
    return float(np.clip(mpp, *PLAUSIBLE_UM_PER_PX))


def search_grid() -> list[float]:
    lo, hi = PLAUSIBLE_UM_PER_PX
    n = int(np.floor(np.log(hi / lo) / np.log(SEARCH_STEP))) + 1
    return [lo * SEARCH_STEP**i for i in range(n)]


def find_scale(detect_at: Callable[[float, bool], Attempt], first: ScaleEstimate, input_pixels: int,
               tolerance: float = 0.05) -> ScaleOutcome:
    """Run detection passes until the scale is known, searched or refined (see the module doc).

    `detect_at(mpp, quick)` runs one pass; quick passes (the other guesses and the search) only
    count red cells, so they may use fewer views; the outcome's attempt is always a full pass.
    """
    if first.method == "given":
        return ScaleOutcome(first, detect_at(first.microns_per_pixel, False), uncertain=False)
    tried: list[Attempt] = []

    def attempt(mpp: float, quick: bool) -> Attempt:
        a = detect_at(mpp, quick)
        tried.append(a)
        return a

    def best() -> Attempt:
        return max(tried, key=lambda a: (len(a.whole_rbc), not a.quick))

    g = clamp(first.microns_per_pixel)
    for i, mpp in enumerate((g, clamp(g * GUESS_STEP), clamp(g / GUESS_STEP))):
        if any(abs(mpp / a.mpp - 1) < 0.05 for a in tried):
            continue
        if len(attempt(mpp, quick=i > 0).whole_rbc) >= MIN_RBC_FOR_SCALE:
            break

    def refine(current: Attempt) -> tuple[Attempt, str]:
        """Refine from the whole red cells' size until the scale agrees with itself. Returns the
        last pass and how it ended: "settled"; "pinned" (the cells' size points outside the
        plausible range: no scale agrees); "unsettled" (still moving, or no cells to go on)."""
        for _ in range(REFINE_ROUNDS):
            cells = current.whole_rbc if current.measured is None else current.measured
            diam_canon = [(d.box.width + d.box.height) / 2.0 for d in cells]
            implied = scale_from_rbc_diameters(np.array(diam_canon), min_cells=MIN_RBC_FOR_SCALE,
                                               normal_um=DETECTED_RBC_DIAMETER_UM)
            if implied is None:
                return current, "unsettled"
            implied_mpp = current.mpp * implied / CANONICAL_UM_PER_PX
            true_mpp = clamp(implied_mpp)
            if abs(implied_mpp / current.mpp - 1.0) <= tolerance:
                return current, "settled"
            if true_mpp != implied_mpp and true_mpp == current.mpp:
                return current, "pinned"
            logger.info("scale refined from %.4f to %.4f um/px by %d red cells", current.mpp, true_mpp,
                        len(current.whole_rbc))
            nxt = attempt(true_mpp, quick=False)
            if not nxt.whole_rbc:
                return current, "unsettled"
            current = nxt
        return current, "unsettled"

    searched, ending, few = False, None, False
    guessed = best()
    current = guessed
    if len(guessed.whole_rbc) < SEARCH_BELOW_RBC:
        n_guessed = len(tried)
        few = len(guessed.whole_rbc) < MIN_RBC_FOR_SCALE
        for mpp in search_grid() if few else [clamp(guessed.mpp * f) for f in UPWARD_CHECK]:
            canonical_pixels = input_pixels * (mpp / CANONICAL_UM_PER_PX) ** 2
            if canonical_pixels > MAX_SEARCH_CANONICAL_PIXELS or any(abs(mpp / a.mpp - 1) < 0.2 for a in tried):
                continue
            attempt(mpp, quick=True)
        found = max((a for a in tried[n_guessed:] if plausible(a)), key=lambda a: len(a.whole_rbc), default=guessed)
        logger.info("scale searched over %d passes: best %.4f um/px with %d whole red cells (guesses: %d)",
                    len(tried), found.mpp, len(found.whole_rbc), len(guessed.whole_rbc))
        if len(guessed.whole_rbc) < MIN_RBC_TO_SKIP_SEARCH:
            searched, current = True, max((a for a in tried if plausible(a) and a.whole_rbc), default=guessed,
                                          key=lambda a: (len(a.whole_rbc), not a.quick))
        elif len(found.whole_rbc) >= max(MIN_RBC_FOR_SCALE, SEARCH_WINS_FACTOR * len(guessed.whole_rbc)):
            # A few whole red cells at the guesses: the field may be sparse (the guess is right) or
            # the guess wrong (a detector finds a few "red cells" at any scale). The searched scale
            # wins only where far more whole red cells show, and refining from their size either
            # settles or keeps finding many more of them (a detector may see a camera's cells a
            # little large and converge slowly). At an absurd scale the "cells" are pieces: their
            # size points out of the plausible range, or the refinement loses them.
            n_before = len(tried)
            refined, how = refine(found)
            many = max(UNSETTLED_MIN_RBC, SEARCH_WINS_FACTOR * len(guessed.whole_rbc))
            # the searched pass and the refinement's passes from it
            held = max([a for a in (found, *tried[n_before:]) if plausible(a)], key=lambda a: len(a.whole_rbc),
                       default=found)
            if (how == "settled" or (how == "unsettled" and len(refined.whole_rbc) >= many)) and plausible(refined):
                searched, current, ending = True, refined, how
            elif how == "unsettled" and len(held.whole_rbc) >= many:
                # the size keeps pulling the scale away while the cells thin out (a camera's pale
                # cells measured large): the pass that showed the most whole red cells is kept
                searched, current, ending = True, held, "most cells"
            else:
                logger.info("searched scale %.4f did not hold: the guess %.4f is kept", found.mpp, guessed.mpp)
    reasons = []
    if searched:
        reasons.append("found by searching the plausible range" if few else
                       f"found at {' or '.join(f'{f:g}' for f in UPWARD_CHECK)} times the first guess's scale, "
                       f"where {counted(len(guessed.whole_rbc), 'whole red cell')} showed")
    if len(current.whole_rbc) < MIN_RBC_FOR_SCALE:
        reasons.append(f"only {counted(len(current.whole_rbc), 'whole red cell')}")
    if ending not in ("settled", "most cells"):  # a pass kept for its many cells is not refined again
        refined, ending = refine(current)
        if searched and not plausible(refined):  # refining a searched scale must not walk out of blood
            ending = "unsettled"
        else:
            current = refined
    if ending != "settled" and len(current.whole_rbc) >= MIN_RBC_FOR_SCALE:
        reasons.append("the refinement from red-cell size did not settle")
    if current.quick:
        current = attempt(current.mpp, quick=False)
    # no whole red cell measured in the end: a searched scale is no measurement (scale_unknown)
    method = "rbc_size_detection" if current.whole_rbc else "default" if searched else first.method
    est = ScaleEstimate(current.mpp, method, len(current.whole_rbc))
    return ScaleOutcome(est, current, uncertain=bool(reasons), reason="; ".join(reasons) or None)
