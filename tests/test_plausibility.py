"""training.plausibility's virtual smears: the five diagnosis comparisons read the typed shares."""

from __future__ import annotations

import numpy as np

from training.plausibility import DIAGNOSES, virtual_smears
from training.rbc_data import CLASSES


def _cells(per_class: int = 60) -> np.ndarray:
    """True classes of a pool holding every class the diagnoses draw from, and normal cells."""
    wanted = {"normal", *(c for mix in DIAGNOSES.values() for c in mix)}
    return np.repeat([CLASSES.index(c) for c in sorted(wanted)], per_class)


def test_cells_typed_right_point_every_comparison_the_right_way():
    truth = _cells()
    out = virtual_smears(np.array([CLASSES[i] for i in truth]), truth, n_smears=5, n_cells=400)
    assert out["checks_passed"] == "5 of 5"
    assert out["virtual_smear_grades"]["hereditary_spherocytosis"]["spherocyte"] != "none"


def test_a_head_that_sees_only_normal_cells_points_nowhere():
    truth = _cells()
    out = virtual_smears(np.full(len(truth), "normal"), truth, n_smears=5, n_cells=400)
    assert out["checks_passed"] == "0 of 5"


def test_a_head_that_confuses_spherocytes_with_microcytes_fails_that_comparison():
    """Spherocytes typed microcyte: spherocytosis no longer shows the most spherocytes."""
    truth = _cells()
    labels = np.array([CLASSES[i] for i in truth], dtype=object)
    labels[truth == CLASSES.index("spherocyte")] = "microcyte"
    out = virtual_smears(labels.astype(str), truth, n_smears=5, n_cells=400)
    assert not out["checks"]["spherocytosis_most_spherocytes"]
    assert out["checks"]["elliptocytosis_most_elliptocytes_ovalocytes"]


def test_a_rival_diagnosis_that_shows_more_loses_the_comparison():
    """Elliptocytes typed spherocyte: elliptocytosis (35 % elliptocytes) then shows more
    spherocytes than spherocytosis (30 %), which no longer leads."""
    truth = _cells()
    labels = np.array([CLASSES[i] for i in truth], dtype=object)
    labels[truth == CLASSES.index("elliptocyte")] = "spherocyte"
    out = virtual_smears(labels.astype(str), truth, n_smears=5, n_cells=400)
    assert not out["checks"]["spherocytosis_most_spherocytes"]


def test_both_microcytic_diagnoses_must_lead():
    """Elliptocytes and ovalocytes typed microcyte: elliptocytosis (50 %) out-counts iron
    deficiency and thalassaemia in microcytic cells, so the joint comparison fails."""
    truth = _cells()
    labels = np.array([CLASSES[i] for i in truth], dtype=object)
    labels[np.isin(truth, [CLASSES.index("elliptocyte"), CLASSES.index("ovalocyte")])] = "microcyte"
    out = virtual_smears(labels.astype(str), truth, n_smears=5, n_cells=400)
    assert not out["checks"]["iron_deficiency_and_thalassaemia_most_microcytic_hypochromic"]
