"""`[fhir]` and `[review]`: what the station gives clinic systems besides its JSON reports.

`[fhir]`: a FHIR R4 Bundle per specimen report, stored in the outbox like the report itself.
`[review]`: small crops of the cells a technician should look at (unidentified and atypical ones,
or every white cell), served by the `get_review` command, and each field's overlay kept on disk for
the run; white cells the technician types there (`type_cells`) are kept for `smearscope adapt-wbc
--station`.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from smearscope.device.config_fields import ConfigPath
from smearscope.service.config.base import StationBaseModel

logger = logging.getLogger(__name__)


class FhirConfig(StationBaseModel):
    """The FHIR R4 Bundle published with each specimen report (docs/FHIR.md)."""

    enabled: bool = Field(
        default=True, title="Publish FHIR",
        description="Store a FHIR R4 Bundle (DiagnosticReport and Observations) in the outbox with "
        "every specimen report.")
    topic: str = Field(
        default="fhir", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
        title="FHIR topic",
        description="Topic levels under '<prefix>/<station_id>/' the bundle is published on "
        "(QoS of mqtt.qos, not retained, content type application/fhir+json).")


class ReviewConfig(StationBaseModel):
    """The review gallery (crops on demand) and the per-field overlays kept on disk."""

    enabled: bool = Field(
        default=True, title="Review gallery",
        description="Keep crops of unidentified and atypical cells per run (command get_review) "
        "and each field's overlay on disk.")
    directory: ConfigPath | None = Field(
        default=None, title="Review directory",
        description="Where per-field overlays are written, one folder per run, and the gallery's crops "
        "are kept (gallery.sqlite); default: 'review' beside the outbox file.")
    max_disk_mb: float = Field(
        default=200.0, gt=0, title="Review disk cap (MB)",
        description="Cap on what the review keeps in its directory: the overlays and the gallery's file "
        "(gallery.sqlite, up to 5 runs of max_cells_per_run crops). Above it the oldest overlays are "
        "deleted, oldest run first. The typed-cells file is not counted (its own bound: 5 000 cells).")
    min_free_disk_mb: float = Field(
        default=256.0, ge=0, title="Disk kept free (MB)",
        description="Overlays give way to the outbox: while the disk that holds them has less free "
        "space than this, the oldest are deleted and a new one is written only when that makes room; "
        "typed cells too: below it on the typed-cells file's disk type_cells stores none "
        "(typed_cells_disk_low).")
    crop_px: int = Field(
        default=80, ge=32, le=256, title="Crop size (px)",
        description="Side of each cell crop sent for review (JPEG, the cell and some context).")
    max_cells_per_run: int = Field(
        default=300, ge=1, le=5000, title="Crops per run",
        description="Crops kept per run (unidentified cells first), in memory and in the review "
        "directory's gallery.sqlite (read back at start; counted in max_disk_mb); later ones are counted.")
    max_message_kb: int = Field(
        default=48, ge=8, le=1024, title="Largest review message (KB)",
        description="Each get_review answer and live run message stays below this (a page of crops; "
        "ask again with next_offset); keep it under the broker's max_packet_size.")
    white_cells: Literal["review", "all"] = Field(
        default="review", title="White cells in the gallery",
        description="'review': only the white cells the analyzer did not decide (unidentified, atypical); "
        "'all': every white cell of the run too, so a technician can type a new station's cells "
        "(command type_cells) for its station means (smearscope adapt-wbc --station); at max_cells_per_run a "
        "cell to review takes the place of the newest white cell kept only for typing.")
    typing: bool = Field(
        default=True, title="Technicians type white cells",
        description="Keep each white cell's features (the WBC head's feature space) with its crop, so the "
        "type a technician gives it (command type_cells) is stored for smearscope adapt-wbc --station. Off "
        "by itself (with a warning) when the WBC head has no features output.")
    typed_cells_path: ConfigPath | None = Field(
        default=None, title="Typed cells file",
        description="SQLite file (WAL) of the white cells technicians typed, at most 5 000 cells (about "
        "15 MB; past that a red cell's type of a run that can no longer be verified gives its place, else type_cells "
        "answers typed_cells_full); default: typed_cells.sqlite3 beside the outbox file.")
