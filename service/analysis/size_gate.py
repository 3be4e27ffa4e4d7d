"""Stage 8b: a white cell typed lymphocyte but larger than any lymphocyte goes to review.

The WBC head has no blast class; a blast it has never seen is typed as the nearest class, most
often lymphocyte (a large nucleus, little cytoplasm). Size tells them apart where the head's
open-set tests do not: a mature lymphocyte is 7-12 um across (large granular ones up to about
15 um), a myeloblast 14-20 um, a monocyte 12-20 um. So a cell typed lymphocyte whose mask is
wider than `MAX_LYMPHOCYTE_DIAMETER_UM` is `unidentified` and atypical, like a cell beyond the
open-set thresholds (report flag `atypical_wbc_present` when there are enough of them); a reactive
(variant) lymphocyte that large is one a hematologist reviews too.

The bound is the largest lymphocyte diameter on validation (the detector's mask, equivalent-area
diameter at 0.2 um/px, given scale): PBC 14.8 um (100 cells, median 11.7), BCCD 13.0 (9), the
Raspberry Pi station 11.9 (12); rounded up to 15.0 um. The scale being estimated from red cells
(a red cell's box taken as `scale_search.DETECTED_RBC_DIAMETER_UM`) keeps a cell's size relative
to the red cells, so the gate holds without calibration too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from smearscope.service.analysis.classify import UNIDENTIFIED
from smearscope.service.analysis.records import CellKind, ClassifiedCell

#: No lymphocyte of the validation labs was wider (um, equivalent-area diameter of the mask).
MAX_LYMPHOCYTE_DIAMETER_UM = 15.0


def gate_lymphocyte_size(cells: Sequence[ClassifiedCell], max_um: float | None = MAX_LYMPHOCYTE_DIAMETER_UM
                         ) -> list[ClassifiedCell]:
    """The cells, with every white cell typed lymphocyte wider than `max_um` made unidentified and
    atypical (its label score kept); `max_um` None leaves them as they are."""
    if max_um is None:
        return list(cells)
    return [dataclasses.replace(c, label=UNIDENTIFIED, atypical=True)
            if c.detection.kind is CellKind.WBC and c.label == "lymphocyte" and c.diameter_um > max_um else c
            for c in cells]
