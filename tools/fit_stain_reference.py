"""Fit the Macenko stain reference once, offline, and write it as numbers.

Only service/data/stain_reference.json is committed, never the image. Usage:

    .venv/bin/python tools/fit_stain_reference.py \
        [--image ../shared/datasets/bccd/BCCD/JPEGImages/BloodImage_00000.jpg] [--out PATH]

BloodImage_00000 is a well-spread Wright-Giemsa field: a segmented neutrophil (purple nucleus)
among pink red cells on a pale background, so both stains are well represented.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smearscope.service.analysis.stain import (
    DEFAULT_REFERENCE_FILE,
    MacenkoNormalizer,
    StainReference,
)
from smearscope.service.ingest import IngestError, load_image

logger = logging.getLogger("fit_stain_reference")

DATA = Path(os.environ.get("SMEARSCOPE_DATA", REPO.parent / "shared" / "datasets"))
DEFAULT_IMAGE = DATA / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00000.jpg"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--out", type=Path, default=DEFAULT_REFERENCE_FILE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    try:
        image = load_image(args.image)
    except IngestError as exc:
        logger.error("cannot read reference image: %s", exc)
        return 2
    normalizer = MacenkoNormalizer(max_fit_pixels=None)  # offline: use every stained pixel
    normalizer.fit(image.pixels)
    assert normalizer.reference is not None
    try:
        source = str(args.image.resolve().relative_to(DATA.resolve()))
    except ValueError:
        source = args.image.name
    reference = StainReference(
        normalizer.reference.stain_matrix_rgb,
        normalizer.reference.max_concentrations,
        normalizer.io,
        normalizer.alpha,
        normalizer.beta,
        source=f"{source} ({image.width}x{image.height}), fitted by tools/fit_stain_reference.py",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(reference.to_json() + "\n", encoding="utf-8")
    logger.info("wrote %s:\n%s", args.out, reference.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
