"""What the station gives clinic systems besides its JSON reports: the FHIR Bundle of each
specimen report, the live state of the open run for dashboards, and the review gallery.

- FHIR (`[fhir]`): `fhir_message(report)` is the Bundle the outbox writer stores with each
  specimen report, in the same transaction, on `<prefix>/<station>/<fhir.topic>`, bare (no
  envelope), never evicted (outbox kind `report`; service.fhir.bundle).
- Live run state: after each field, `<prefix>/<station>/run` (retained, QoS 1) carries the open
  run's interim aggregates (the specimen report without its cells), its progress toward the WBC
  target and how much review material it has; when the run ends, its final aggregates with
  `state: "closed"`. A run start_run opened says so at once (open, no field yet, `report` null)
  and, should it end without a field, closed with none. It goes through the outbox as an
  evictable message (kind `field`), so after an outage the states arrive in order and the last
  one stays retained.
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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from smearscope.service.analysis.pipeline import FieldResult
from smearscope.service.analysis.report import Report, Verification
from smearscope.service.config import MqttConfig, StationConfig
from smearscope.service.fhir.bundle import report_bundle
from smearscope.service.fhir.report_view import rbc_grades
from smearscope.service.mqtt.outbox import MessageKind, NewMessage, Outbox, StateWriter
from smearscope.service.station.durable import KEEP_CLOSED_RUNS
from smearscope.service.station.live_state import LiveState
from smearscope.service.station.review import ReviewGallery, WbcTyping, needs_review
from smearscope.service.station.run_records import EndReason, RunProgress, has_states
from smearscope.service.station.specimen import (
    ClosedRun,
    SpecimenRun,
    SpecimenTracker,
    cell_keys,
    type_applies,
)
from smearscope.service.station.type_cells_command import type_cells
from smearscope.service.station.typed_cells import (
    TypedCellsError,
    TypedCellStore,
    review_directory,
    typed_cells_path,
)

logger = logging.getLogger(__name__)

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
        self._last_closed: str | None = None  # the last run closed whose state went out: verify_run's live state

    def start(self, analyzer: Any, closed: Sequence[ClosedRun],
              load_run: Callable[[str], SpecimenRun | None] | None = None,
              publisher: OutboxPublisher | None = None, announce: Collection[str] = (),
              tracker: SpecimenTracker | None = None, numbers: Mapping[str, int] | None = None) -> None:
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
        (one start_run opened with no field yet: open with none). `closed` may hold runs start_run
        opened that ended without a field (report None): their state, closed with none, is the
        last one when they closed last. `numbers`: the run numbers the state keeps (run id ->
        number), to tell a run the broker shows as a later one (service.mqtt.run_order)."""
        self._load_run = load_run
        self.attach_wbc_head(getattr(analyzer, "wbc_head", None), getattr(analyzer, "rbc_head", None))
        progress = tracker.progress() if tracker is not None else None
        # the last run closed whose state went out (an auto run that ended before its first field said none)
        said = [i for i, run in enumerate(closed) if run.report is not None or has_states(run.started_by, run.fields)]
        for i, run in enumerate(closed):
            self.run_closed(run, publisher, live=run.run_id in announce or (
                not announce and progress is None and bool(said) and i == said[-1]))
        if progress is not None and progress.fields == 0:  # start_run's, taken back before its first field
            self.run_opened(progress, publisher)
        elif progress is not None and (interim := tracker.interim_report(with_cells=False)) is not None:
            self._publish(publisher, progress.run_id, interim, "open", progress.as_dict(), None)
        if publisher is not None:
            publisher.on_reconnected = lambda: self.republish(publisher)
        if (watch := getattr(publisher, "run_watch", None)) is not None:  # the runs this state holds
            watch.known({r.run_id: r.fields for r in closed} | ({progress.run_id: progress.fields} if progress else {}),
                        closed_now=[r.run_id for r in closed if r.run_id in announce],  # with or without a field
                        resumed=progress.run_id if progress else None,
                        starts={r.run_id: r.started_at for r in closed} | ({progress.run_id: progress.started_at}
                                                                            if progress else {}),
                        numbers=numbers)
        if self._typing_wanted and self.typed_cells_path.exists():  # said now, not at the first typed cell
            try:
                TypedCellStore(self.typed_cells_path, read_only=True).close()
            except (TypedCellsError, sqlite3.Error) as exc:
                if getattr(exc, "code", None) != "no_typed_cells":  # not a file its first open left without its table
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
                self._publish(publisher, run_id, interim, "open", progress.as_dict(), None)
        except Exception:
            logger.exception("review/live state of field %s failed (its analysis and report are not affected)",
                             result.report.report_id)

    def run_opened(self, progress: RunProgress, publisher: OutboxPublisher | None) -> None:
        """start_run opened a run: its state, open with no field yet (`report` null)."""
        try:
            self._publish(publisher, progress.run_id, None, "open", progress.as_dict(), None)
        except Exception:
            logger.exception("live state of run %s failed (the run is open all the same)", progress.run_id)

    def run_closed(self, closed: ClosedRun, publisher: OutboxPublisher | None, live: bool = True) -> None:
        """A run's report went out: kept for verification (the analyzer's run; its cells hold no masks),
        and, when `live`, published as the retained run state. A run with no field (report None) has
        nothing to keep: its state, closed with no field, goes out when start_run opened it (`has_states`)."""
        if closed.report is None:
            if not has_states(closed.started_by, closed.fields):
                # never said to anyone: the retained state is still the run before it, which a
                # verification then moves (its signed state, not its preliminary one, on a page opened later)
                return
            self._last_closed = closed.run_id
            if live:
                try:
                    self._publish(publisher, closed.run_id, None, "closed", closed.progress(), closed.end_reason)
                except Exception:
                    logger.exception("live state of closed run %s failed", closed.run_id)
            return
        with self._lock:
            known = self._closed.get(closed.run_id)
            if live or known is None:  # a verified run is the last closed only when it was
                self._last_closed = closed.run_id
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
            self._publish(publisher, closed.run_id, closed.report, "closed", closed.progress(), closed.end_reason)
        except Exception:
            logger.exception("live state of closed run %s failed (its report stands)", closed.run_id)

    def run_state(self, run_id: str | None, report: Report | None, state: str, progress: dict[str, Any],
                  end_reason: str | None) -> dict[str, Any]:
        """The live run message: the run's aggregates (no cells; null for a run with no field yet),
        progress and review counts."""
        body = report.model_dump(mode="json", exclude={"cells", "cell_detail"}) if report is not None else None
        review = self.gallery.summary(run_id) if self.gallery and run_id else None
        return {"station_id": self.station_id, "run_id": run_id, "state": state,
                "end_reason": end_reason, "updated_at": time.time(), "progress": progress,
                "report": body, "rbc_grades": rbc_grades(report) if report is not None else None, "review": review}

    def _publish(self, publisher: OutboxPublisher | None, run_id: str, report: Report | None, state: str,
                 progress: dict[str, Any], end_reason: str | None) -> None:
        if publisher is None:
            return
        payload = json.dumps(self.run_state(run_id, report, state, progress, end_reason)).encode()
        if len(payload) > self.max_state_bytes:
            logger.warning("live run state of %s is %d bytes, above review.max_message_kb; not sent",
                           run_id, len(payload))
            return
        message = NewMessage("field", _topic(publisher, RUN_TOPIC), payload, run_id, RUN_SCHEMA, qos=1, retain=True)
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
        """`cmd/type_cells` (on the command thread): service.station.type_cells_command."""
        return type_cells(arguments, self.gallery, self._open_store, self._live_runs, self._min_free_bytes,
                          self.microns_per_pixel)

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
            state = self.run_state(c.run_id, c.report, "closed", c.progress(), c.end_reason)
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
        before = closed.report
        # the report it supersedes names what analysed these fields (a signature only recounts them as typed):
        # a run stored before its fields named their version keeps what its verified report first said; the
        # analyzer's report of such a run (schema 1.4 and earlier): the version that made it analysed them
        if before.analysis_software is not None:
            report = report.model_copy(update={"analysis_software": list(before.analysis_software)})
        elif before.verification is None and before.software_version:
            report = report.model_copy(update={"analysis_software": [before.software_version]})
        earlier = closed.report.verification  # signed before: this signature amends that one
        report = report.model_copy(update={"verification": Verification(
            verified_by=by, verified_at=report.created_at, supersedes=closed.report.report_id, typed_cells=typed,
            reclassified=changed, left_to_review=left,
            supersedes_verified_by=None if earlier is None else earlier.verified_by,
            supersedes_verified_at=None if earlier is None else earlier.verified_at)})
        with self._lock:  # not when a run closed since, one with no field included
            live = open_run is None and self._last_closed == run_id
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
