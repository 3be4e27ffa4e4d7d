"""The review gallery: what the analyzer did not decide, kept for a technician to look at.

Per specimen run, small JPEG crops of the cells to review (unidentified first, then atypical
ones) are cut from the field's input image around the report's boxes and held in memory
(bounded per run, the last few runs kept) and in a SQLite file beside the overlays
(service.station.gallery_store), read back at start: a restart loses no review material; `page()` serves them in pages that fit one MQTT
message (the `get_review` command). Each field's overlay (outlines and labels on the input) is
written to disk under `<directory>/<run_id>/`, numbered as written (service.station.overlay_files),
with a size cap over all the directory holds (overlays and the gallery's file): the oldest
overlays, oldest run first, are deleted above it.

With `[review] white_cells = "all"` every white cell of the run follows the review cells, and with
typing on (`set_wbc_typing`: the WBC head keeps its features) each white cell's crop is marked
`typeable` and its features are kept here beside it, so the type a technician gives it
(`type_cells`, service.station.clinic) can be stored (service.station.typed_cells).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from smearscope.service.analysis.morphology import SIZE_BASED
from smearscope.service.analysis.overlay import draw_overlay
from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.analysis.records import ARTEFACT, CellKind
from smearscope.service.analysis.report import CellRecord
from smearscope.service.analysis.review_counts import UNIDENTIFIED, review_reason
from smearscope.service.config import ReviewConfig
from smearscope.service.station.disk_room import free_bytes
from smearscope.service.station.gallery_store import FILE_NAME, GalleryStore, RunChange, StoredRun
from smearscope.service.station.overlay_files import overlay_order, safe_name, write_overlay_file
from smearscope.service.station.typed_cells import TypeableCell

logger = logging.getLogger(__name__)

#: Closed runs whose galleries stay in memory (the open run is always kept).
KEEP_RUNS = 4
_JPEG = [int(cv2.IMWRITE_JPEG_QUALITY), 80]
THUMBNAIL_WIDTH = 320
#: The first page's share its overlay thumbnail may take.
THUMBNAIL_SHARE = 0.6
#: Room per WBC class for the first page's `typed_per_type` (added by the clinic feed).
TYPED_COUNT_BYTES = 40


@dataclass(frozen=True)
class WbcTyping:
    """The WBC head whose features the gallery keeps: its classes (the types a technician picks
    from), sha256, views and open-set methods (in the order of a cell's open_set_scores)."""

    classes: tuple[str, ...]
    model_sha256: str
    views: tuple[str, ...]
    methods: tuple[str, ...]
    #: The RBC head's classes and sha256: red cells to review are typed with them (no features).
    rbc_classes: tuple[str, ...] = ()
    rbc_sha256: str = ""


def needs_review(cell: CellRecord) -> int | None:
    """Review priority of a cell (0: unidentified, 1: atypical, rare or critical), None when it needs
    none (service.analysis.review_counts, whose rule the report's `review` counts by)."""
    if review_reason(cell.kind, cell.label, cell.atypical) is None:
        return None
    return 0 if cell.label == UNIDENTIFIED else 1


def cell_crop(image: np.ndarray, bbox: Sequence[float], size: int) -> np.ndarray | None:
    """A crop around `bbox` (input pixels) with half its side as context, its longer side `size`
    px; None when the box is not on the image."""
    x0, y0, x1, y1 = bbox
    side = max(x1 - x0, y1 - y0) * 1.5 + 4
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h, w = image.shape[:2]
    a, b = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    c, d = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    if c - a < 2 or d - b < 2:
        return None
    crop = image[b:d, a:c]
    scale = size / max(crop.shape[:2])
    return cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA)


def _as_bgr8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    scaled = cv2.normalize(pixels, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return scaled if scaled.ndim == 3 else cv2.cvtColor(scaled, cv2.COLOR_GRAY2BGR)


def _jpeg(image: np.ndarray, params: list[int] = _JPEG) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, params)
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


@dataclass
class _RunGallery:
    #: Kept crops in arrival order (pages stay put as fields arrive).
    crops: list[dict[str, Any]] = field(default_factory=list)
    #: Each kept crop's priority (needs_review's, 2 for a white cell shown for typing only).
    priorities: list[int] = field(default_factory=list)
    not_kept: int = 0
    overlays: list[Path] = field(default_factory=list)
    latest_thumbnail: dict[str, Any] | None = None
    #: (field_id, cell) -> what storing a technician's type for that crop needs.
    typeable: dict[tuple[str, int], TypeableCell] = field(default_factory=dict)
    #: (field_id, cell) -> the type a technician gave it (shown again on later pages).
    typed: dict[tuple[str, int], str] = field(default_factory=dict)


class ReviewGallery:
    """Crops and overlays per run; fed by the analysis thread, read by the command thread."""

    def __init__(self, config: ReviewConfig, directory: Path, max_packet_size: int | None = None) -> None:
        self.config = config
        self.directory = directory
        #: A page's budget: `max_message_kb`, and under the station's packet limit (less the room
        #: the topic, properties and the answer's own keys take).
        self.page_bytes = config.max_message_kb * 1024 - 512
        if max_packet_size is not None:
            self.page_bytes = min(self.page_bytes, max_packet_size - 1024)
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, _RunGallery] = OrderedDict()
        self._typing: WbcTyping | None = None
        self._low_disk_said = False  # the low-disk warning, once until there is room again
        self._over_cap_said = False  # the gallery's file alone over max_disk_mb: said once until it is not
        self._pruning_said = False  # overlays deleted for room: said once while every field needs it
        self._store = GalleryStore(directory / FILE_NAME)
        #: Runs whose changes the file lacks (written whole at the next write), runs to delete from it.
        self._unsaved: set[str] = set()
        self._drops: set[str] = set()
        for stored in self._store.load(KEEP_RUNS + 1):  # the runs kept before a restart
            g = _RunGallery(not_kept=stored.not_kept, latest_thumbnail=stored.thumbnail)
            for priority, crop, typeable in stored.crops:
                g.crops.append(crop)
                g.priorities.append(priority)
                if typeable is not None:
                    g.typeable[(crop["field_id"], crop["cell"])] = typeable
            try:
                g.overlays = sorted(self._run_folder(stored.run_id).glob("*.jpg"), key=overlay_order)
            except OSError:
                pass
            self._runs[stored.run_id] = g

    def set_wbc_typing(self, typing: WbcTyping | None) -> None:
        """The WBC head whose features come with the fields (None: no typing). Crops read back from
        the file that another head typed (a model installed since) are no longer typeable: their
        features are of that head's space."""
        with self._lock:
            self._typing = typing
            for g in self._runs.values():
                stale = {k for k, t in g.typeable.items() if typing is None
                         or t.model_sha256 != (typing.rbc_sha256 if t.kind == "rbc" else typing.model_sha256)}
                for k in stale:
                    del g.typeable[k]
                g.crops = [{**c, "typeable": False} if (c["field_id"], c["cell"]) in stale else c for c in g.crops]

    def close(self) -> None:
        self._store.close()

    @property
    def typing(self) -> WbcTyping | None:
        return self._typing

    def _typeable(self, result: FieldResult, i: int, typing: WbcTyping | None) -> TypeableCell | None:
        if typing is None or i >= len(result.cells):
            return None
        c = result.cells[i]
        scale = result.report.scale
        mpp = scale.microns_per_pixel if scale is not None else None
        if c.detection.kind is CellKind.RBC:
            if not typing.rbc_classes or c.label is None:
                return None
            empty = np.zeros((0,), np.float32)
            # at an estimated scale, or cut by the frame's edge, no size-based class can be judged (the analyzer gives none)
            types = None if c.size_calibrated and not c.touches_frame_edge else tuple(
                t for t in typing.rbc_classes if t not in SIZE_BASED)
            return TypeableCell(empty, empty.reshape(0, 0), c.label, {}, typing.rbc_sha256, (), mpp, kind="rbc",
                                types=types)
        hf = c.head_features
        if hf is None or len(c.open_set_scores) != len(typing.methods):
            return None
        return TypeableCell(np.asarray(hf.features, np.float32), np.asarray(hf.view_features, np.float32),
                            hf.closed_set_label, dict(zip(typing.methods, c.open_set_scores)), typing.model_sha256,
                            typing.views, mpp)

    def add_field(self, run_id: str, image: np.ndarray, result: FieldResult) -> int:
        """Take the field's review crops and write its overlay; the number of crops kept."""
        report = result.report
        field_id = report.source.frame_id if report.source is not None else report.report_id
        image = _as_bgr8(image)
        every_wbc = self.config.white_cells == "all"
        typing = self._typing

        def priority(c: CellRecord) -> int | None:
            p = needs_review(c)
            if p is None and every_wbc and c.kind in ("wbc", "nrbc") and c.label is not None:
                return 2
            return p

        wanted = sorted(((p, i, c) for i, c in enumerate(report.cells)
                         if (p := priority(c)) is not None), key=lambda t: (t[0], t[1]))
        crops, typeable = [], {}
        for p, i, c in wanted:
            pixels = cell_crop(image, c.bbox, self.config.crop_px)
            if pixels is None:
                continue
            t = self._typeable(result, i, typing)
            crop = {"field_id": field_id, "cell": i, "kind": c.kind, "label": c.label,
                    "label_score": c.label_score, "atypical": c.atypical, "bbox": c.bbox, "typeable": t is not None,
                    "jpeg": base64.b64encode(_jpeg(pixels)).decode()}
            if t is not None and t.types is not None:
                crop["types"] = [*t.types, ARTEFACT]  # fewer than the head's classes
            crops.append((p, crop))
            if t is not None:
                typeable[(field_id, i)] = t
        overlay = draw_overlay(image, result.cells, result.input_to_canonical)
        thumbnail, thumb_jpeg = self._thumbnail(overlay)
        written = self._write_overlay(run_id, field_id, overlay)
        path = written[0] if written is not None else None
        with self._lock:
            gallery = self._runs.setdefault(run_id, _RunGallery())
            self._runs.move_to_end(run_id)
            added: list[tuple[int, dict[str, Any], TypeableCell | None]] = []
            displaced: list[tuple[str, int]] = []
            # a field analysed again (a crash came after its crops, before its report was stored): its crops anew
            for k in [k for k, c in enumerate(gallery.crops) if c["field_id"] == field_id][::-1]:
                gone, _ = gallery.crops.pop(k), gallery.priorities.pop(k)
                gallery.typeable.pop((field_id, gone["cell"]), None)
                displaced.append((field_id, gone["cell"]))
            for p, crop in crops:
                if self._keep(gallery, p, crop, typeable, displaced):
                    added.append((p, crop, typeable.get((crop["field_id"], crop["cell"]))))
            kept = len(added)  # never displaced in its own field: a field's crops to review come first
            gallery.not_kept += len(crops) - kept
            if written is not None:
                gallery.overlays = [p for p in gallery.overlays if p not in written[1]] + [path]
            gallery.latest_thumbnail = {"field_id": field_id, "width": thumbnail.shape[1],
                                        "height": thumbnail.shape[0], "jpeg": thumb_jpeg}
            let_go = []
            while len(self._runs) > KEEP_RUNS + 1:
                gone = self._runs.popitem(last=False)[0]
                self._drops.add(gone)
                self._unsaved.discard(gone)
                let_go.append(gone)
            change = RunChange(run_id, added, displaced, gallery.not_kept, gallery.latest_thumbnail)
        self._persist(change, path is not None or self._free() >= self._floor)
        for gone in let_go:  # no command reaches a run the gallery let go: its overlays go with its crops
            self._remove_overlays(gone)
        self._enforce_disk_cap()  # a new overlay or more crops in the gallery's file: the cap again
        return kept

    def _persist(self, change: RunChange, room: bool) -> None:
        """A field's change to the gallery's file (on the analysis thread, the one that changes
        crops). On a disk low on space (the outbox comes first) or a failed write the run is
        marked, and written whole at the next write."""
        with self._lock:
            if not room:
                self._unsaved.add(change.run_id)
                return
            whole = [StoredRun(r, g.not_kept, g.latest_thumbnail,
                               [(p, c, g.typeable.get((c["field_id"], c["cell"])))
                                for p, c in zip(g.priorities, g.crops)])
                     for r, g in self._runs.items() if r in self._unsaved]
            order, drops = list(self._runs), set(self._drops)
            own = None if change.run_id in self._unsaved else change  # else among `whole`
        if self._store.write(order, own, whole, drops, keep=KEEP_RUNS + 1):
            with self._lock:
                self._unsaved -= {r.run_id for r in whole}
                self._drops -= drops
        else:
            with self._lock:
                self._unsaved.add(change.run_id)

    def _thumbnail(self, overlay: np.ndarray) -> tuple[np.ndarray, str]:
        """The overlay shrunk to THUMBNAIL_WIDTH and JPEG-encoded (base64) small enough for the
        first page (THUMBNAIL_SHARE of its budget): a busy 1280x960 overlay at quality 70 took
        38 kB, over the 29 kB the default 48 kB page allows, and no page ever carried one. Lower
        quality first, then narrower."""
        limit = THUMBNAIL_SHARE * self.page_bytes - 200
        for width in (THUMBNAIL_WIDTH, THUMBNAIL_WIDTH * 3 // 4, THUMBNAIL_WIDTH // 2, THUMBNAIL_WIDTH * 3 // 8):
            w = min(width, overlay.shape[1])
            small = cv2.resize(overlay, (w, max(1, round(overlay.shape[0] * w / overlay.shape[1]))),
                               interpolation=cv2.INTER_AREA)
            for quality in (70, 50, 35):
                data = base64.b64encode(_jpeg(small, [int(cv2.IMWRITE_JPEG_QUALITY), quality])).decode()
                if len(data) <= limit:
                    return small, data
        return small, data  # a page too small for any: page() leaves it out

    def _keep(self, gallery: _RunGallery, priority: int, crop: dict[str, Any],
              typeable: dict[tuple[str, int], TypeableCell], displaced: list[tuple[str, int]]) -> bool:
        """Keep one crop, in arrival order. At the cap a crop that needs review takes the place of
        the newest crop shown for typing only (priority 2; later pages move up by one; its key
        goes to `displaced`); otherwise it is not kept. Under the gallery's lock."""
        if len(gallery.crops) >= self.config.max_cells_per_run:
            lower = [k for k, p in enumerate(gallery.priorities) if p == 2] if priority < 2 else []
            if not lower:
                return False
            gone = gallery.crops.pop(lower[-1])
            gallery.priorities.pop(lower[-1])
            gallery.not_kept += 1
            gallery.typeable.pop((gone["field_id"], gone["cell"]), None)
            displaced.append((gone["field_id"], gone["cell"]))
        gallery.crops.append(crop)
        gallery.priorities.append(priority)
        key = (crop["field_id"], crop["cell"])
        if key in typeable:
            gallery.typeable[key] = typeable[key]
        return True

    def summary(self, run_id: str) -> dict[str, int]:
        with self._lock:
            g = self._runs.get(run_id)
            return {"cells": len(g.crops) if g else 0, "not_kept": g.not_kept if g else 0,
                    "overlays": len(g.overlays) if g else 0}

    def typeable(self, run_id: str, field_id: str, cell: int) -> TypeableCell | None:
        """What storing a type for this crop needs; None when the gallery does not hold it (another
        run's, one of a run no longer kept, or a cell without features)."""
        with self._lock:
            g = self._runs.get(run_id)
            return g.typeable.get((field_id, cell)) if g is not None else None

    def mark_typed(self, run_id: str, field_id: str, cell: int, type_: str | None) -> None:
        with self._lock:
            g = self._runs.get(run_id)
            if g is None:
                return
            if type_:
                g.typed[(field_id, cell)] = type_
            else:
                g.typed.pop((field_id, cell), None)

    def run_ids(self) -> list[str]:
        """The runs the gallery holds, oldest first."""
        with self._lock:
            return list(self._runs)

    def latest_run(self) -> str | None:
        with self._lock:
            return next(reversed(self._runs), None)

    def page(self, run_id: str | None, offset: int = 0) -> dict[str, Any]:
        """One message's worth of crops from `offset` (and the latest overlay thumbnail on the
        first page), below `page_bytes`; `next_offset` is None on the last page."""
        run_id = run_id or self.latest_run()
        with self._lock:
            g = self._runs.get(run_id) if run_id else None
            if g is None:
                return {"ok": False, "error": "no_review_material", "message": f"no review material for run {run_id!r}",
                        "runs": list(self._runs)}
            crops, thumbnail, not_kept, overlays = list(g.crops), g.latest_thumbnail, g.not_kept, len(g.overlays)
            typed = dict(g.typed)
            typing = self._typing
        budget = self.page_bytes
        out: dict[str, Any] = {"ok": True, "run_id": run_id, "total": len(crops), "not_kept": not_kept,
                               "overlays_on_disk": overlays, "offset": offset, "cells": [], "overlay": None,
                               "wbc_types": [*typing.classes, ARTEFACT] if typing is not None else None,
                               "rbc_types": [*typing.rbc_classes, ARTEFACT] if typing is not None and typing.rbc_classes
                               else None}
        crops = [{**c, "typed": typed.get((c["field_id"], c["cell"]))} if c.get("typeable") else c for c in crops]
        # the answer's own keys count too, and the typed counts the clinic adds to the first page
        header = len(json.dumps(out)) + 32 + (TYPED_COUNT_BYTES * len(typing.classes) if typing is not None else 0)
        used = header
        if offset == 0 and thumbnail is not None and len(thumbnail["jpeg"]) + 200 <= budget * THUMBNAIL_SHARE:
            first = len(json.dumps(crops[0])) if crops else 0
            # never at the cost of the first crop: a page must hold a crop, or paging would not move
            if not crops or header + first > budget or used + len(thumbnail["jpeg"]) + 200 + first <= budget:
                out["overlay"] = thumbnail
                used += len(thumbnail["jpeg"]) + 200
        i, out["skipped_too_large"] = max(0, offset), 0
        while i < len(crops):
            size = len(json.dumps(crops[i]))
            if header + size > budget:  # one crop alone over the limit (a tiny max_packet_size): skipped
                out["skipped_too_large"] += 1
            elif used + size > budget:
                break
            else:
                out["cells"].append(crops[i])
                used += size
            i += 1
        out["next_offset"] = i if i < len(crops) else None
        return out

    @property
    def _floor(self) -> int:
        """Bytes the overlays leave free on their disk (`min_free_disk_mb`)."""
        return int(self.config.min_free_disk_mb * 1024 * 1024)

    def _free(self) -> float:
        """Free bytes on the disk that holds the overlays (a disk that cannot be measured: infinite)."""
        return free_bytes(self.directory)

    def _run_folder(self, run_id: str) -> Path:
        """Where a run's overlays are written."""
        return self.directory / safe_name(run_id)

    def _remove_overlays(self, run_id: str) -> None:
        """Delete a run's overlay files and their folder (said at WARNING when one cannot be)."""
        folder = self._run_folder(run_id)
        try:
            for old in folder.glob("*.jpg"):
                old.unlink(missing_ok=True)
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove the overlays of run %s (%s): %s", run_id, folder, exc)

    def _write_overlay(self, run_id: str, field_id: str, overlay: np.ndarray) -> tuple[Path, list[Path]] | None:
        """The field's overlay file and its earlier ones it replaced; None when not written."""
        if self._free() < self._floor:  # the outbox needs the disk more: the oldest overlays make room first
            self._enforce_disk_cap()
            if self._free() < self._floor:
                if not self._low_disk_said:
                    logger.warning("review overlays not written while %s has under %.0f MB free ([review] "
                                   "min_free_disk_mb): the outbox needs the room", self.directory,
                                   self.config.min_free_disk_mb)
                    self._low_disk_said = True
                return None
        self._low_disk_said = False
        try:
            return write_overlay_file(self._run_folder(run_id), field_id, _jpeg(overlay))
        except (OSError, ValueError) as exc:  # a full disk must not stop the analysis
            logger.warning("overlay of field %s not kept: %s", field_id, exc)
            return None

    def _gallery_bytes(self) -> int:
        """What the gallery's file takes on disk (with its WAL and shared memory)."""
        size = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                size += Path(f"{self._store.path}{suffix}").stat().st_size
            except OSError:
                pass
        return size

    def _enforce_disk_cap(self) -> None:
        """`max_disk_mb` over all the review keeps in its directory: the overlays and the gallery's
        file. The overlays give way, oldest first (the crops are what a technician reviews)."""
        cap = int(self.config.max_disk_mb * 1024 * 1024)
        # oldest run first in the gallery's order (folders of runs it let go before them), within a
        # run in the order written (the files' numbers), never by file time: a clock set back must
        # not make the newest overlays the oldest
        with self._lock:
            rank = {self._run_folder(r).name: k for k, r in enumerate(self._runs)}
        try:
            files = sorted(self.directory.glob("*/*.jpg"),
                           key=lambda p: (rank.get(p.parent.name, -1), *overlay_order(p)))
            gallery = self._gallery_bytes()
            total = gallery + sum(p.stat().st_size for p in files)
        except OSError as exc:
            logger.warning("cannot measure the overlays under %s: %s", self.directory, exc)
            return
        if gallery > cap and not self._over_cap_said:
            logger.warning("review gallery file %s takes %.1f MB, over [review] max_disk_mb (%.1f MB) by itself: "
                           "no overlay is kept; raise max_disk_mb or lower max_cells_per_run (the gallery keeps "
                           "up to %d runs of max_cells_per_run crops)", self._store.path, gallery / 2**20,
                           self.config.max_disk_mb, KEEP_RUNS + 1)
        self._over_cap_said = gallery > cap
        removed = 0
        for old in files:
            if total <= cap and self._free() >= self._floor:
                break
            try:
                total -= old.stat().st_size
                old.unlink()
                removed += 1
                if not any(old.parent.iterdir()):
                    old.parent.rmdir()
            except OSError as exc:
                logger.warning("cannot remove overlay %s: %s", old, exc)
        if removed:  # at the cap every field deletes one: said once (then at DEBUG) until a field needs none
            logger.log(logging.DEBUG if self._pruning_said else logging.INFO,
                       "review (overlays and gallery) above %.0f MB or the disk's free space under %.0f MB: %d oldest "
                       "overlays deleted (said again once the review fits without deleting)",
                       self.config.max_disk_mb, self.config.min_free_disk_mb, removed)
            with self._lock:
                for g in self._runs.values():
                    g.overlays = [p for p in g.overlays if p.exists()]
        self._pruning_said = bool(removed)
