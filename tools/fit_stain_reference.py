"""Fit a stain reference once, offline, and write it as numbers.

Only the JSON under service/analysis/data/ is committed, never an image. Usage:

    .venv/bin/python tools/fit_stain_reference.py                       # Macenko, one image
    .venv/bin/python tools/fit_stain_reference.py --method vahadane     # Vahadane, pooled
        [--image PATH | --pooled] [--per-lab 40] [--out PATH]

Macenko's shipped reference is one image as stored, BloodImage_00000 (BCCD): a well-spread
Wright-Giemsa field, a segmented neutrophil (purple nucleus) among pink red cells.

Vahadane's is pooled over the training distribution: `--per-lab` evenly spaced fields of the
training split of each lab (BCCD train, each TXL-PBC source's train, Chula RBC-12's seeded
train; never a validation or test image), each corrected for illumination as the analyzer's
frames are, each fitted on its own. Fields that do not show both stains are skipped. Each lab's
stain vectors are averaged (mean direction; fields further than TRIM_DEG from it are left out and
the mean taken again), then the labs' (so every lab weighs the same); the robust maxima are
medians the same way. The spread is logged: per lab, the angle of its mean
vectors from the pooled ones.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smearscope.service.analysis import stain, stain_vahadane
from smearscope.service.analysis.illumination import correct_illumination
from smearscope.service.ingest import IngestError, load_image
from training.data import bccd_image_path, bccd_split, data_root
from training.head_data import chula_splits
from training.labs import txl_images_by_source

logger = logging.getLogger("fit_stain_reference")

#: A field whose azure or eosin lies further than this from its lab's mean vector is left out.
TRIM_DEG = 15.0
OUT = {"macenko": stain.DEFAULT_REFERENCE_FILE, "vahadane": stain_vahadane.DEFAULT_REFERENCE_FILE}


def default_image() -> Path:
    return bccd_image_path("BloodImage_00000")


def training_fields(per_lab: int) -> dict[str, list[Path]]:
    """`per_lab` evenly spaced training-split images of each lab (sorted, so reproducible)."""
    chula = data_root() / "chula_rbc12" / "Dataset"
    labs = {"bccd": [bccd_image_path(i) for i in sorted(bccd_split("train"))]}
    labs.update({lab: sorted(paths) for lab, paths in txl_images_by_source("train").items()})
    labs["chula"] = [chula / f"{i}.jpg" for i in sorted(chula_splits()["train"], key=int)]
    out = {}
    for lab, paths in labs.items():
        take = np.unique(np.linspace(0, len(paths) - 1, min(per_lab, len(paths))).astype(int))
        out[lab] = [paths[k] for k in take]
    return out


def _normalizer(method: str) -> stain.MacenkoNormalizer | stain_vahadane.VahadaneNormalizer:
    if method == "macenko":
        return stain.MacenkoNormalizer(max_fit_pixels=None)  # offline: every stained pixel
    return stain_vahadane.VahadaneNormalizer(max_code_pixels=None, max_fit_pixels=50_000)


def fit_field(method: str, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(stain matrix 3 x 2, robust maxima (2,)) of one field, or None when it cannot give them."""
    normalizer = _normalizer(method)
    try:
        normalizer.fit(pixels)
    except ValueError as exc:
        logger.info("  skipped: %s", exc)
        return None
    ref = normalizer.reference
    assert ref is not None
    return np.array(ref.stain_matrix_rgb), np.array(ref.max_concentrations)


def _mean_direction(vectors: list[np.ndarray]) -> np.ndarray:
    """Mean of 3 x 2 matrices of unit columns, each column renormalized."""
    mean = np.mean(vectors, axis=0)
    return mean / np.linalg.norm(mean, axis=0)


def _angles(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.degrees(np.arccos(np.clip(a[:, k] @ b[:, k], -1, 1)))) for k in range(2)]


def pooled_fit(method: str, per_lab: int) -> tuple[np.ndarray, np.ndarray, str]:
    per_lab_fits: dict[str, tuple[np.ndarray, np.ndarray, int, int]] = {}
    for lab, paths in training_fields(per_lab).items():
        fits = []
        for path in paths:
            field = correct_illumination(load_image(path).pixels).pixels
            fitted = fit_field(method, field)
            if fitted is not None:
                fits.append(fitted)
        if not fits:
            logger.warning("%s: no field shows both stains; lab left out", lab)
            continue
        w = _mean_direction([f[0] for f in fits])
        # One pass of trimming: a field whose stains lie far from its lab's mean is an outlier
        # (a scratch, a scale bar, a field of red cells and debris), not the lab's stain.
        kept = [f for f in fits if max(_angles(f[0], w)) <= TRIM_DEG] or fits
        w = _mean_direction([f[0] for f in kept])
        max_c = np.median([f[1] for f in kept], axis=0)
        spread = np.max([_angles(f[0], w) for f in kept], axis=0)
        logger.info("%s: %d of %d fields fitted, %d kept; max concentrations %s; "
                    "kept fields within %.1f / %.1f deg", lab, len(fits), len(paths), len(kept),
                    np.round(max_c, 3).tolist(), *spread)
        fits = kept
        per_lab_fits[lab] = (w, max_c, len(fits), len(paths))
    if not per_lab_fits:
        raise SystemExit("no lab gave a usable field: is the dataset there (SMEARSCOPE_DATA)?")
    w = _mean_direction([v[0] for v in per_lab_fits.values()])
    max_c = np.median([v[1] for v in per_lab_fits.values()], axis=0)
    for lab, (lab_w, _, _, _) in per_lab_fits.items():
        logger.info("%s mean vectors are %.1f / %.1f deg from the pooled ones", lab, *_angles(lab_w, w))
    labs = ", ".join(f"{lab} {n}/{total}" for lab, (_, _, n, total) in per_lab_fits.items())
    source = (f"pooled over training-split fields, illumination-corrected ({labs}), "
              "fitted by tools/fit_stain_reference.py")
    return w, max_c, source


def single_fit(method: str, image: Path) -> tuple[np.ndarray, np.ndarray, str]:
    loaded = load_image(image)
    fitted = fit_field(method, loaded.pixels)
    if fitted is None:
        raise SystemExit(f"{image} cannot define a reference")
    try:
        name = str(image.resolve().relative_to(data_root().resolve()))
    except ValueError:
        name = image.name
    return (*fitted, f"{name} ({loaded.width}x{loaded.height}), fitted by tools/fit_stain_reference.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(OUT), default="macenko")
    parser.add_argument("--image", type=Path, default=None,
                        help="fit one image as stored (default for macenko: BloodImage_00000)")
    parser.add_argument("--pooled", action="store_true",
                        help="pool training fields of every lab (default for vahadane)")
    parser.add_argument("--per-lab", type=int, default=40, help="fields per lab when pooled")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    pooled = args.pooled or (args.image is None and args.method == "vahadane")
    try:
        if pooled:
            w, max_c, source = pooled_fit(args.method, args.per_lab)
        else:
            w, max_c, source = single_fit(args.method, args.image or default_image())
    except IngestError as exc:
        logger.error("cannot read an image: %s", exc)
        return 2
    normalizer = _normalizer(args.method)
    reference: stain.StainReference | stain_vahadane.VahadaneReference
    if isinstance(normalizer, stain.MacenkoNormalizer):
        reference = stain.StainReference(
            w, max_c, normalizer.io, normalizer.alpha, normalizer.beta, source=source
        )
    else:
        reference = stain_vahadane.VahadaneReference(w, max_c, normalizer.io, source=source)
    out = args.out or OUT[args.method]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(reference.to_json() + "\n", encoding="utf-8")
    logger.info("wrote %s:\n%s", out, reference.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
