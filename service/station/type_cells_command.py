"""The `type_cells` command: the types a technician gives the review gallery's cells, stored in the
typed-cells file (service.station.typed_cells) with what a fit of the station's means needs;
ClinicFeed (service.station.clinic) answers the command with it."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from smearscope.service.analysis.morphology import SIZE_BASED
from smearscope.service.analysis.records import ARTEFACT
from smearscope.service.ingest import shown
from smearscope.service.station.review import ReviewGallery
from smearscope.service.station.typed_cells import TypedCellsError, TypedCellStore

#: What the command says is said, and filtered, as it was before it had a module of its own.
logger = logging.getLogger("smearscope.service.station.clinic")

#: Cells one type_cells command may type.
MAX_TYPED_PER_COMMAND = 500
#: Cells and errors an answer lists (the rest counted: `cells_count`, `errors_count`), so it stays small.
MAX_LISTED = 20
#: Longest field id a typed cell may name (the station's own are far shorter).
MAX_FIELD_ID = 256
#: Above any field's cell count (SQLite integers are 64-bit; a larger index is no cell).
MAX_CELL_INDEX = 2**31


def type_cells(arguments: dict[str, Any], gallery: ReviewGallery | None, open_store: Callable[[], TypedCellStore],
               live_runs: Callable[[], set[str]], min_free_bytes: int, microns_per_pixel: float | None) -> dict[str, Any]:
    """`cmd/type_cells {"run_id": ..., "cells": [{"field_id": ..., "cell": 3, "type": "lymphocyte"}]}`
    (on the command thread): store the types a technician gave white cells of the gallery (a
    cell typed before may be retyped after its run left the gallery: its features are in the
    file); an empty type (or null) removes a cell's from the file. Each cell is answered on its
    own (`errors` by index)."""
    if gallery is None:
        return {"ok": False, "error": "review_off", "message": "the review gallery is off ([review] enabled = false)"}
    typing = gallery.typing
    if typing is None:
        return {"ok": False, "error": "typing_off", "message": "this station keeps no white-cell features "
                "([review] typing = false, or the WBC head has no features output)"}
    run_id, cells = arguments.get("run_id"), arguments.get("cells")
    if run_id is not None and not isinstance(run_id, str):
        return {"ok": False, "error": "bad_arguments", "message": "run_id must be a string"}
    run_id = run_id or gallery.latest_run()
    if not run_id:
        return {"ok": False, "error": "bad_arguments", "message": "no run_id given and no run in the gallery"}
    if not isinstance(cells, list) or not cells or len(cells) > MAX_TYPED_PER_COMMAND:
        return {"ok": False, "error": "bad_arguments",
                "message": f"cells must be a list of 1 to {MAX_TYPED_PER_COMMAND} "
                '{"field_id": ..., "cell": N, "type": ...}'}
    try:
        store = open_store()
    except TypedCellsError as exc:
        logger.error("typed cells: %s", exc.message)
        return {"ok": False, "error": exc.code, "message": exc.message}
    stored = removed = 0
    errors: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []
    try:  # one transaction, synced once: every cell answered stored is on the disk before the answer
        with store.batch():
            for k, item in enumerate(cells):
                field_id = item.get("field_id") if isinstance(item, dict) else None
                cell = item.get("cell") if isinstance(item, dict) else None
                type_ = item.get("type") if isinstance(item, dict) else None
                if (not isinstance(item, dict) or not set(item) <= {"field_id", "cell", "type"}
                        or not isinstance(field_id, str) or not 0 < len(field_id) <= MAX_FIELD_ID
                        or not isinstance(cell, int) or isinstance(cell, bool) or not 0 <= cell < MAX_CELL_INDEX
                        or not (type_ is None or isinstance(type_, str))):
                    errors.append({"index": k, "error": "bad_cell", "message": "expected field_id (a string of 1 to "
                                   f"{MAX_FIELD_ID} characters), cell (integer from 0 to {MAX_CELL_INDEX - 1}) and "
                                   "type (string or null), and nothing else"})
                    continue
                where = {"index": k, "field_id": field_id, "cell": cell}
                found = gallery.typeable(run_id, field_id, cell)
                try:
                    # a white cell takes the WBC head's types, a red cell the RBC head's (at an
                    # estimated scale, none of the size-based ones)
                    kind = found.kind if found is not None else store.kind_of(run_id, field_id, cell)
                    if kind is None and type_:  # whatever the type: which head's types it takes is not known
                        errors.append({**where, "error": "not_typeable", "message": "not a cell of the gallery "
                                       "(of a run it no longer holds?) and not typed before"})
                        continue
                    if found is None and kind == "rbc" and type_ in SIZE_BASED:  # whether its scale was calibrated
                        errors.append({**where, "error": "unknown_type", "message": "a size-based type for a red "
                                       "cell the gallery no longer holds: whether its scale was calibrated is not known"})
                        continue
                    kind = kind or "wbc"
                    allowed = (*(found.types if found is not None and found.types is not None
                                 else typing.rbc_classes if kind == "rbc" else typing.classes), ARTEFACT)
                    if type_ and type_ not in allowed:
                        errors.append({**where, "error": "unknown_type",
                                       "message": f"not a type this {kind.upper()} cell can be given ({', '.join(allowed)})"})
                        continue
                    if type_ and store.disk_low():  # a removal still goes: it takes no room
                        errors.append({**where, "error": "typed_cells_disk_low", "message": "the disk has less than "
                                       f"{min_free_bytes / 2**20:.0f} MB free ([review] min_free_disk_mb): "
                                       "the outbox needs the room; nothing stored"})
                        continue
                    if not type_:  # removed from the file, whether or not the gallery still holds the cell
                        removed += store.remove(run_id, field_id, cell)
                    elif found is not None:
                        if not store.put(run_id, field_id, cell, type_, found, live_runs=live_runs()):
                            errors.append({**where, "error": "typed_cells_full",
                                           "message": f"the typed-cells file holds {store.max_rows} cells; fit the "
                                           "station means (smearscope adapt-wbc --station), verify the runs still to "
                                           "verify, then move it away to type more"})
                            continue
                        stored += 1
                    elif store.retype(run_id, field_id, cell, type_, kind):  # typed before: its features are stored
                        stored += 1
                    else:  # typed before, its row removed meanwhile (another page)
                        errors.append({**where, "error": "not_typeable", "message": "not a cell of the gallery "
                                       "(of a run it no longer holds?) and not typed before"})
                        continue
                except (sqlite3.Error, OSError) as exc:  # answered, never raised into the command thread
                    logger.error("typed cells: storing %s/%s/%s failed: %s", shown(run_id), shown(field_id), cell, exc)
                    errors.append({**where, "error": "typed_cells_unavailable", "message": str(exc)[:200]})
                    continue
                done.append({"field_id": field_id, "cell": cell, "type": type_ or None})
    except (sqlite3.Error, OSError) as exc:  # the transaction lost: none of its cells is stored
        logger.error("typed cells: storing the %d cell(s) of a command for %s failed: %s", len(cells), shown(run_id),
                     exc)  # the ids as the command sent them: control and bidi characters escaped
        answered = {e["index"] for e in errors}
        errors = sorted(errors + [{"index": k, **({"field_id": item.get("field_id"), "cell": item.get("cell")}
                                                  if isinstance(item, dict) else {}),
                                   "error": "typed_cells_unavailable", "message": str(exc)[:200]}
                                  for k, item in enumerate(cells) if k not in answered], key=lambda e: e["index"])
        stored = removed = 0
        done = []
    for d in done:  # shown typed once stored
        gallery.mark_typed(run_id, d["field_id"], d["cell"], d["type"])
    try:
        totals = store.counts(typing.model_sha256, typing.views, microns_per_pixel)
    except sqlite3.Error as exc:
        logger.error("typed cells: counting failed: %s", exc)
        totals = None
    # the answer stays small whatever was sent: lists trimmed, their lengths given
    return {"ok": not errors, "run_id": run_id, "stored": stored, "removed": removed,
            "cells": done[:MAX_LISTED], "cells_count": len(done), "errors": errors[:MAX_LISTED],
            "errors_count": len(errors), "typed_per_type": totals, "model_sha256": typing.model_sha256}
