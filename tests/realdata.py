"""Locating the public datasets for real-data tests (they skip with a reason when absent)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SMEARSCOPE_DATA", ROOT.parent / "shared" / "datasets"))
BCCD = DATA / "bccd" / "BCCD"
#: BCCD's scale, measured from its train-split red-cell boxes by training/prep_seg.py (models/seg.json).
BCCD_MICRONS_PER_PIXEL = 0.0721

needs_bccd = pytest.mark.skipif(not (BCCD / "ImageSets" / "Main" / "test.txt").exists(),
                                reason=f"BCCD not found under {DATA} (set SMEARSCOPE_DATA)")
needs_models = pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")

_KIND = {"RBC": "rbc", "WBC": "wbc", "Platelets": "platelet"}


def bccd_test_ids() -> list[str]:
    """BCCD's held-out test images: its VOC test split without the fields another dataset the
    models trained or were chosen on also holds (training.overlap; 65 of 72)."""
    from training.data import bccd_split, txl_dir

    if not txl_dir().is_dir():  # without it the copies it holds cannot be told: the figures would not compare
        pytest.skip(f"TXL-PBC not found under {DATA}: BCCD's held-out test images are those it does not copy")
    return bccd_split("test")


def bccd_truth(image_id: str) -> list[tuple[str, list[float]]]:
    root = ET.parse(BCCD / "Annotations" / f"{image_id}.xml").getroot()
    out = []
    for obj in root.iter("object"):
        kind = _KIND.get(obj.findtext("name", "").strip())
        bb = obj.find("bndbox")
        if kind and bb is not None:
            out.append((kind, [float(bb.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax")]))
    return out
