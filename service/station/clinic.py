"""What the station gives clinic systems besides its JSON reports: the FHIR Bundle of each
specimen report, the live state of the open run for dashboards, and the review gallery.

- FHIR (`[fhir]`): `fhir_message(report)` is the Bundle the outbox writer stores with each
  specimen report, in the same transaction, on `<prefix>/<station>/<fhir.topic>`, bare (no
  envelope), never evicted (outbox kind `report`; service.fhir.bundle).
- Live run state: after each field, `<prefix>/<station>/run` (retained, QoS 1) carries the open
  run's interim aggregates (the specimen report without its cells), its progress toward the WBC
  target and how much review material it has; when the run ends, its final aggregates with
  `state: "closed"`. It goes through the outbox as an evictable message (kind `field`), so after
  an outage the states arrive in order and the last one stays retained.
- Review gallery (`[review]`): crops and overlays (service.station.review), served by the
  `get_review` command; white cells a technician types there (`type_cells`) are stored in the
  typed-cells file (service.station.typed_cells) for `smearscope adapt-wbc --station`.
All of it runs beside the analysis: a failure here is logged and never costs a field or a report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import numpy as np

from smearscope.service.analysis.morphology import SIZE_BASED
from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.analysis.records import ARTEFACT
from smearscope.service.analysis.report import Report, Verification
from smearscope.service.config import MqttConfig, StationConfig
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.fhir.report_view import rbc_grades
from smearscope.service.mqtt.outbox import MessageKind, NewMessage, Outbox, StateWriter
from smearscope.service.station.durable import KEEP_CLOSED_RUNS
from smearscope.service.station.live_state import LiveState
from smearscope.service.station.review import ReviewGallery, WbcTyping, needs_review
from smearscope.service.station.run_records import EndReason
from smearscope.service.station.specimen import (
    ClosedRun,
    SpecimenRun,
    SpecimenTracker,
    cell_keys,
    type_applies,
)
from smearscope.service.station.typed_cells import (
    TypedCellsError,
    TypedCellStore,
    review_directory,
    typed_cells_path,
)

logger = logging.getLogger(__name__)

#: Cells one type_cells command may type.
MAX_TYPED_PER_COMMAND = 500
#: Cells and errors an answer lists (the rest counted: `cells_count`, `errors_count`), so it stays small.
MAX_LISTED = 20
#: Longest field id a typed cell may name (the station's own are far shorter).
MAX_FIELD_ID = 256
#: Above any field's cell count (SQLite integers are 64-bit; a larger index is no cell).
MAX_CELL_INDEX = 2**31
RUN_TOPIC = "run"
RUN_SCHEMA = "run-1"
FHIR_CONTENT_TYPE = "application/fhir+json; fhirVersion=4.0"
FHIR_VERSION = "4.0.1"


class OutboxPublisher(Protocol):
    """What the feed needs of the publisher (service.mqtt.publisher.MqttPublisher)."""

    config: MqttConfig
    station_id: str
    outbox: Outbox
    on_reconnected: Callable[[], None] | None

    def publish_many(self, items: list[tuple[MessageKind, str, bytes, str]],
                     also: StateWriter | None = None, extra: Sequence[NewMessage] = ()) -> list[int]: ...


def _left_to_review(run: SpecimenRun, types: dict[tuple[str, int], tuple[str, str]]) -> int:
    """The run's cells the analyzer sent to review (unidentified, atypical) that no one typed with a
    type that counts (`type_applies`): a signed run says how many it was signed with."""
    return sum(needs_review(rec) is not None and not (key in types and type_applies(cell, *types[key]))
               for key, rec, cell in zip(cell_keys(run.records), run.records, run.cells))


def _topic(publisher: OutboxPublisher, name: str) -> str:
    return f"{publisher.config.topic_prefix}/{publisher.station_id}/{name}"


class ClinicFeed:
    """FHIR documents, live run state and the review gallery of one station."""

    def __init__(self, config: StationConfig) -> None:
        self.station_id = config.station_id
        self.fhir_topic = config.fhir.topic if config.fhir.enabled else None
        self.gallery: ReviewGallery | None = None
        if config.review.enabled:
            self.gallery = ReviewGallery(config.review, review_directory(config), config.mqtt.max_packet_size)
        self.typed_cells_path = typed_cells_path(config)
        self.microns_per_pixel = config.microns_per_pixel  # typed cells count at this scale (adapt-wbc --station)
        self._typing_wanted = config.review.enabled and config.review.typing
        self._min_free_bytes = config.review.min_free_disk_mb * 2**20  # typed cells give way to the outbox
        self._store: TypedCellStore | None = None
        #: Guards the typed-cells connection and the closed runs (command and analysis threads).
        self._lock = threading.Lock()
        #: The last closed runs, for a technician's verification (verify_run): their cells in
        #: memory only without `_load_run` (the station's outbox database, which holds them).
        self._closed: OrderedDict[str, ClosedRun] = OrderedDict()
        self._load_run: Callable[[str], SpecimenRun | None] | None = None
        # below the station's packet limit too (topic, properties and envelope need room)
        self.max_state_bytes = min(config.review.max_message_kb * 1024, config.mqtt.max_packet_size - 1024)
        self.live = LiveState()  # the last run state, sent after what it counts is stored

    def start(self, analyzer: Any, closed: Sequence[ClosedRun],
              load_run: Callable[[str], SpecimenRun | None] | None = None,
              publisher: OutboxPublisher | None = None, announce: Collection[str] = (),
              tracker: SpecimenTracker | None = None) -> None:
        """The station starts: the analyzer's heads for typing (`attach_wbc_head`), and the runs
        closed before (service.station.durable, oldest first) for verification. With `load_run`
        (`StationState.run_cells`) a closed run's cells are read back when it is verified instead
        of held in memory: an open run is then the only one whose cells the station holds. The
        runs in `announce` (those a previous process left open, closed at this start) publish
        their retained live state, closed, as a run that ends does: not "open" until the next run;
        without any, the last run closed publishes its state again (a broker restarted while the
        station was away may hold none, or an older one). The last live state goes out again
        after every reconnect of `publisher`, for the same reason. A run the `tracker`
        (SpecimenTracker) resumed, left open by the previous process, publishes its state, open
        (one with no field yet, started by start_run, publishes nothing until its first field)."""
        self._load_run = load_run
        self.attach_wbc_head(getattr(analyzer, "wbc_head", None), getattr(analyzer, "rbc_head", None))
        progress = tracker.progress() if tracker is not None else None
        if progress is not None and progress.fields == 0:  # a run with no field publishes nothing, as before
            progress = None
        for i, run in enumerate(closed):
            self.run_closed(run, publisher, live=run.run_id in announce or (
                not announce and progress is None and i == len(closed) - 1))
        if progress is not None and (interim := tracker.interim_report(with_cells=False)) is not None:
            self._publish(publisher, interim, "open", progress.as_dict(), None)
        if publisher is not None:
            publisher.on_reconnected = lambda: self.republish(publisher)
        if (watch := getattr(publisher, "run_watch", None)) is not None:  # the runs this state holds
            watch.known({r.run_id: r.fields for r in closed} | ({progress.run_id: progress.fields} if progress else {}),
                        closed_now=announce, resumed=progress.run_id if progress else None)
        if self._typing_wanted and self.typed_cells_path.exists():  # said now, not at the first typed cell
            try:
                TypedCellStore(self.typed_cells_path, read_only=True).close()
            except (TypedCellsError, sqlite3.Error) as exc:
                logger.warning("typed cells: %s: technicians' types cannot be stored or read until it is fixed "
                               "(smearscope doctor)", getattr(exc, "message", exc))

    def attach_wbc_head(self, wbc_head: Any, rbc_head: Any = None) -> None:
        """The analyzer's WBC head (service.analysis.classify.CropClassifier, or None): with typing
        on and the head keeping its features, the gallery keeps them with each white cell's crop;
        red cells to review are typed with the RBC head's classes (`rbc_head`, when there is one)."""
        if self.gallery is None:
            return
        typing = None
        if self._typing_wanted and wbc_head is not None:
            if getattr(wbc_head, "keep_features", False):
                m = wbc_head.engine.manifest
                rbc = rbc_head.engine.manifest if rbc_head is not None else None
                typing = WbcTyping(tuple(m.classes), m.sha256, tuple(wbc_head.views),
                                   tuple(t.method for t in wbc_head.open_sets),
                                   tuple(rbc.classes) if rbc else (), rbc.sha256 if rbc else "")
            else:
                logger.warning("[review] typing is on but the WBC head keeps no features (no features output: "
                               "python -m smearscope.export.feature_space); technicians cannot type cells")
        if typing is not None and self.typed_cells_path.exists():  # runs kept across a restart: their types,
            try:  # shown before typing opens (a type given meanwhile would be overwritten by an older one)
                for run_id in self.gallery.run_ids():
                    for (field_id, cell), (_, type_) in self._open_store().types_of_run(run_id).items():
                        self.gallery.mark_typed(run_id, field_id, cell, type_)
            except (TypedCellsError, sqlite3.Error) as exc:
                logger.warning("typed cells: the types given before this start are not shown: %s",
                               getattr(exc, "message", exc))
        self.gallery.set_wbc_typing(typing)

    def close(self) -> None:
        if self.gallery is not None:
            self.gallery.close()
        with self._lock:  # closed outside the feed's lock: a type_cells batch holding the file asks for it
            store, self._store = self._store, None
        if store is not None:
            store.close()  # once a batch under way has ended

    # ------------------------------------------------------------------ FHIR

    def fhir_message(self, report: Report, publisher: OutboxPublisher) -> NewMessage:
        assert self.fhir_topic is not None
        body = json.dumps(report_bundle(report), separators=(",", ":")).encode()
        return NewMessage("report", _topic(publisher, self.fhir_topic), body, report.report_id,
                          FHIR_VERSION, qos=publisher.config.qos, content_type=FHIR_CONTENT_TYPE)

    # ------------------------------------------------------------------ live state and review

    def field_added(self, image: np.ndarray, result: FieldResult, tracker: SpecimenTracker,
                    publisher: OutboxPublisher | None) -> None:
        """On the analysis thread, after the field joined its run (or stood alone)."""
        run_id = result.report.run_id
        if run_id is None:
            return
        try:
            if self.gallery is not None:
                self.gallery.add_field(run_id, image, result)
            progress = tracker.progress()
            interim = tracker.interim_report(with_cells=False) if progress is not None else None
            if progress is not None and interim is not None and progress.run_id == run_id:
                self._publish(publisher, interim, "open", progress.as_dict(), None)
        except Exception:
            logger.exception("review/live state of field %s failed (its analysis and report are not affected)",
                             result.report.report_id)

    def run_closed(self, closed: ClosedRun, publisher: OutboxPublisher | None, live: bool = True) -> None:
        """A run's report went out: kept for verification (the analyzer's run; its cells hold no masks),
        and, when `live`, published as the retained run state."""
        if closed.report is None:
            return
        with self._lock:
            known = self._closed.get(closed.run_id)
            run = None if self._load_run is not None else known.run if known is not None else closed.run
            # its report without the cell list (as the outbox file keeps it): a verification reads
            # only its id, and the cells of 4 long runs would be most of the station's memory
            slim = closed.report.model_copy(update={"cells": [], "cell_detail": None})
            self._closed[closed.run_id] = dataclasses.replace(closed, run=run, report=slim)  # a verified one keeps its place
            while len(self._closed) > KEEP_CLOSED_RUNS:
                self._closed.popitem(last=False)
        if not live:
            return
        try:
            self._publish(publisher, closed.report, "closed", closed.progress(), closed.end_reason)
        except Exception:
            logger.exception("live state of closed run %s failed (its report stands)", closed.run_id)

    def run_state(self, report: Report, state: str, progress: dict[str, Any],
                  end_reason: str | None) -> dict[str, Any]:
        """The live run message: the run's aggregates (no cells), progress and review counts."""
        body = report.model_dump(mode="json", exclude={"cells", "cell_detail"})
        review = self.gallery.summary(report.run_id) if self.gallery and report.run_id else None
        return {"station_id": self.station_id, "run_id": report.run_id, "state": state,
                "end_reason": end_reason, "updated_at": time.time(), "progress": progress,
                "report": body, "rbc_grades": rbc_grades(report), "review": review}

    def _publish(self, publisher: OutboxPublisher | None, report: Report, state: str,
                 progress: dict[str, Any], end_reason: str | None) -> None:
        if publisher is None:
            return
        payload = json.dumps(self.run_state(report, state, progress, end_reason)).encode()
        if len(payload) > self.max_state_bytes:
            logger.warning("live run state of %s is %d bytes, above review.max_message_kb; not sent",
                           report.run_id, len(payload))
            return
        message = NewMessage("field", _topic(publisher, RUN_TOPIC), payload, report.run_id or report.report_id,
                             RUN_SCHEMA, qos=1, retain=True)
        self.live.publish(publisher, message)

    def republish(self, publisher: OutboxPublisher) -> None:
        """The last live run state again (LiveState.republish)."""
        self.live.republish(publisher)

    def get_review(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """`cmd/get_review {"run_id": ..., "offset": 0}` (on the command thread)."""
        if self.gallery is None:
            return {"ok": False, "error": "review_off", "message": "the review gallery is off ([review] enabled = false)"}
        run_id, offset = arguments.get("run_id"), arguments.get("offset", 0)
        if run_id is not None and not isinstance(run_id, str):
            return {"ok": False, "error": "bad_arguments", "message": "run_id must be a string"}
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            return {"ok": False, "error": "bad_arguments", "message": "offset must be a non-negative integer"}
        page = self.gallery.page(run_id, offset)
        typing = self.gallery.typing
        if page.get("ok") and offset == 0 and typing is not None:  # what the station has typed so far
            try:
                page["typed_per_type"] = self._open_store().counts(typing.model_sha256, typing.views, self.microns_per_pixel)
            except (TypedCellsError, sqlite3.Error) as exc:
                logger.warning("typed cells: counting failed: %s", exc)
        return page


    def type_cells(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """`cmd/type_cells {"run_id": ..., "cells": [{"field_id": ..., "cell": 3, "type": "lymphocyte"}]}`
        (on the command thread): store the types a technician gave white cells of the gallery (a
        cell typed before may be retyped after its run left the gallery: its features are in the
        file); an empty type (or null) removes a cell's from the file. Each cell is answered on its
        own (`errors` by index)."""
        gallery = self.gallery
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
            store = self._open_store()
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
                                           f"{self._min_free_bytes / 2**20:.0f} MB free ([review] min_free_disk_mb): "
                                           "the outbox needs the room; nothing stored"})
                            continue
                        if not type_:  # removed from the file, whether or not the gallery still holds the cell
                            removed += store.remove(run_id, field_id, cell)
                        elif found is not None:
                            if not store.put(run_id, field_id, cell, type_, found, live_runs=self._live_runs()):
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
                        logger.error("typed cells: storing %s/%s/%s failed: %s", run_id, field_id, cell, exc)
                        errors.append({**where, "error": "typed_cells_unavailable", "message": str(exc)[:200]})
                        continue
                    done.append({"field_id": field_id, "cell": cell, "type": type_ or None})
        except (sqlite3.Error, OSError) as exc:  # the transaction lost: none of its cells is stored
            logger.error("typed cells: storing the %d cell(s) of a command for %s failed: %s", len(cells), run_id, exc)
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
            totals = store.counts(typing.model_sha256, typing.views, self.microns_per_pixel)
        except sqlite3.Error as exc:
            logger.error("typed cells: counting failed: %s", exc)
            totals = None
        # the answer stays small whatever was sent: lists trimmed, their lengths given
        return {"ok": not errors, "run_id": run_id, "stored": stored, "removed": removed,
                "cells": done[:MAX_LISTED], "cells_count": len(done), "errors": errors[:MAX_LISTED],
                "errors_count": len(errors), "typed_per_type": totals, "model_sha256": typing.model_sha256}

    def _live_runs(self) -> set[str]:
        """The runs whose types still count: the gallery's and the closed ones that can be verified."""
        with self._lock:
            closed = set(self._closed)
        return closed | set(self.gallery.run_ids() if self.gallery is not None else ())

    def get_runs(self) -> dict[str, Any]:
        """`cmd/get_runs` (on the command thread): the last closed runs, newest first, each as its
        closed run state (its latest report, a verified one after verify_run, without cells), for
        a dashboard to show and sign a run that is no longer the station's current one. Runs that
        would take the answer past the message bound are left out, oldest first (`omitted`)."""
        with self._lock:
            closed = list(reversed(self._closed.values()))
        runs = []
        for c in closed:
            if c.report is None:
                continue
            state = self.run_state(c.report, "closed", c.progress(), c.end_reason)
            runs.append({**state, "updated_at": c.report.created_at})  # when its latest report was made
        omitted = 0
        while runs and len(json.dumps(runs)) > self.max_state_bytes - 256:
            runs.pop()
            omitted += 1
        return {"ok": True, "runs": runs, "omitted": omitted}

    def closed_run(self, run_id: str) -> ClosedRun | None:
        """One of the last closed runs: its latest report (a verified one after verify_run) and
        the analyzer's run."""
        with self._lock:
            return self._closed.get(run_id)

    def verify(self, run_id: str, by: str, final_report: Callable[[SpecimenRun, EndReason], Report],
               open_run: str | None) -> tuple[ClosedRun | None, bool, dict[str, Any]]:
        """A closed run signed by a technician: its report again from the analyzer's run with the
        types given to its cells, superseding its latest report; whether the retained run state
        should follow (it is the last run closed and none is open); the command's answer."""
        closed = self.closed_run(run_id)
        if closed is not None and closed.report is not None and closed.run is None and self._load_run is not None:
            run = self._load_run(run_id)  # the analyzer's run as stored: every field its report counted
            if run is None or len(run.field_ids) != closed.report.fields_analyzed:
                stored = 0 if run is None else len(run.field_ids)
                return None, False, {"ok": False, "error": "run_not_stored", "message": (
                    f"run {run_id!r}: {stored} of its {closed.report.fields_analyzed} fields are stored; "
                    "a verification needs them all (the station may still be writing them: try again)")}
            closed = dataclasses.replace(closed, run=run)
        if closed is None or closed.run is None or closed.report is None:
            code = "run_open" if open_run == run_id else "unknown_run"
            return None, False, {"ok": False, "error": code, "message": f"run {run_id!r}: " + (
                "still open: stop it first (stop_run)" if code == "run_open" else
                "not one of the station's last closed runs")}
        try:
            types = self.run_types(run_id)
        except (TypedCellsError, sqlite3.Error) as exc:
            return None, False, {"ok": False, "error": "typed_cells_unavailable", "message": str(exc)[:200]}
        run, changed, typed = closed.run.verified(types)
        left = _left_to_review(closed.run, types)
        report = final_report(run, closed.end_reason)
        # the run's start as the report it supersedes gives it (created_at less run_ms, measured on
        # the monotonic clock): the wall clock's now less the run's stored start moved it by any
        # step of the clock since (an hour set back: a negative run_ms, an effective time after issue);
        # never less than nothing (the clock set back between that report and this one)
        if (before_ms := closed.report.timing_ms.get("run_ms")) is not None:
            report = report.model_copy(update={"timing_ms": {**report.timing_ms, "run_ms": round(
                max(0.0, before_ms + 1000.0 * (report.created_at - closed.report.created_at)), 1)}})
        earlier = closed.report.verification  # signed before: this signature amends that one
        report = report.model_copy(update={"verification": Verification(
            verified_by=by, verified_at=report.created_at, supersedes=closed.report.report_id, typed_cells=typed,
            reclassified=changed, left_to_review=left,
            supersedes_verified_by=None if earlier is None else earlier.verified_by,
            supersedes_verified_at=None if earlier is None else earlier.verified_at)})
        with self._lock:
            live = open_run is None and next(reversed(self._closed), None) == run_id
        return (dataclasses.replace(closed, classified_wbc=run.classified_wbc, report=report), live,
                {"ok": True, "run_id": run_id, "report_id": report.report_id,
                 "supersedes": closed.report.report_id, "typed_cells": typed, "reclassified": len(changed),
                 "left_to_review": left})

    def run_types(self, run_id: str) -> dict[tuple[str, int], tuple[str, str]]:
        """The types technicians gave this run's cells ({} with typing off or nothing typed)."""
        if self.gallery is None or self.gallery.typing is None:
            return {}
        return self._open_store().types_of_run(run_id)

    def _open_store(self) -> TypedCellStore:
        with self._lock:
            if self._store is None:
                self._store = TypedCellStore(self.typed_cells_path, min_free_bytes=self._min_free_bytes)
            return self._store
