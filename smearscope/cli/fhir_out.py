"""`smearscope analyze --fhir OUT`: each report also written as a FHIR R4 Bundle (docs/FHIR.md).

One image: OUT is the bundle's file. A folder, an @LIST or several images: OUT is a directory
and each image's bundle goes to STEM.fhir.json in it (STEM-2.fhir.json, ... for repeated stems).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class FhirOutputError(Exception):
    """--fhir names a path that cannot be written (a usage error, found before any work)."""


def is_directory(path: Path) -> bool:
    """An existing directory; False where the path cannot even be looked at (a name too long, a
    folder this user may not enter): the output checks then say why, as `bad_output`."""
    try:
        return path.is_dir()
    except OSError:
        return False


def check_fhir_output(out: Path, folder: bool) -> None:
    if folder:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FhirOutputError(f"--fhir {out}: not a usable directory ({exc})") from exc
    elif is_directory(out) or not is_directory(out.parent):
        raise FhirOutputError(f"--fhir {out}: needs a file name in an existing directory")


def write_bundle(path: Path, report) -> bool:
    """Write the report's bundle; False (logged) when the file cannot be written."""
    from smearscope.service.fhir.bundle import report_bundle

    try:
        path.write_text(json.dumps(report_bundle(report), indent=1) + "\n")
    except OSError as exc:
        logger.error("could not write the FHIR bundle to %s: %s", path, exc)
        return False
    return True
