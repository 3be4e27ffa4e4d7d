"""The station's MQTT commands (`cmd/<name>`): status, reload, start_run, stop_run, analyze_file,
get_review, get_runs, type_cells, verify_run.

Commands arrive on the publisher's command thread and never touch another thread's state
themselves: whatever touches the specimen state is run by the analysis thread, which owns it
(through the analysis `RequestQueue`, served between frames; service.station.requests), and
`reload` is run by the daemon's own thread (the `reload` callable it hands over), as SIGHUP is.
The commands see the station through what they are given, not through the daemon.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smearscope.device.frame import Frame
from smearscope.service.analysis.report import MAX_SPECIMEN_ID
from smearscope.service.config.specimen import MAX_TARGET_WBC
from smearscope.service.ingest import (
    IngestError,
    IngestLimits,
    OutsideFolders,
    load_image,
    read_image_file_within,
    shown,
    within,
)
from smearscope.service.station.clinic import ClinicFeed
from smearscope.service.station.requests import RequestQueue
from smearscope.service.station.signed_name import (
    MAX_SIGNED_NAME,
    signed_name_error,
    unseen_character,
)
from smearscope.service.station.specimen import RunAlreadyOpen, SpecimenTracker
from smearscope.service.station.verifications import keep_verification
from smearscope.service.station.workers import StationWorkers

logger = logging.getLogger(__name__)

#: Each command and the arguments it takes; any other is refused (`bad_arguments`), as a config's
#: unknown key is: a misspelt `target_wbc` must not start a run with the default target.
COMMAND_ARGUMENTS: dict[str, frozenset[str]] = {
    "analyze_file": frozenset({"path"}), "get_review": frozenset({"run_id", "offset"}), "get_runs": frozenset(),
    "reload": frozenset(), "start_run": frozenset({"target_wbc", "specimen_id"}), "status": frozenset(), "stop_run": frozenset(),
    "type_cells": frozenset({"run_id", "cells"}), "verify_run": frozenset({"run_id", "verified_by"})}
COMMAND_NAMES = tuple(COMMAND_ARGUMENTS)
#: Longest name a verification may be signed with.
MAX_VERIFIED_BY = MAX_SIGNED_NAME
#: How long stop_run and verify_run wait at most (s, on the command thread) for the start's hold decision
#: (service.mqtt.run_watch) before answering `held`: null: the broker's SUBACK settles it in
#: milliseconds, a broker that keeps no retained run state within run_watch.HEAR_WAIT_S.
HOLD_DECISION_WAIT_S = 5.0


def _specimen_id_error(value: Any) -> str | None:
    """Why start_run's `specimen_id` cannot name a specimen on a report, a label and a FHIR
    identifier; None where it can (1 to MAX_SPECIMEN_ID characters, all printable: no control,
    format (bidi, zero-width) or separator character but the space, and no space at either end: an
    identifier is matched as typed)."""
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_SPECIMEN_ID or value != value.strip()):
        return (f"specimen_id must be the specimen's identifier as text: 1 to {MAX_SPECIMEN_ID} printable "
                "characters, no space at either end")
    found = unseen_character(value, spaces=False)
    return None if found is None else f"specimen_id holds {found}: only printable characters, as typed"


def _not_unicode(value: Any, where: str = "arguments", depth: int = 0) -> str | None:
    """Where `value` (a command's JSON) holds a string that is not valid Unicode: JSON may carry a
    lone UTF-16 surrogate (a name cut inside an emoji), which no report can be written with."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if depth > 32:
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _not_unicode(key, f"{where} key", depth + 1) if isinstance(key, str) else None
        found = found or _not_unicode(item, f"{key}" if where == "arguments" else f"{where}[{key!r}]", depth + 1)
        if found is not None:
            return found
    return None


class StationCommands:
    """Answers one station's commands."""

    def __init__(self, *, workers: StationWorkers, tracker: SpecimenTracker, analysis: RequestQueue,
                 status: Callable[[], Mapping[str, Any]], reload: Callable[[], dict[str, Any]],
                 clinic: ClinicFeed | None = None, file_scale: float | None = None,
                 file_folders: tuple[Path, ...] = ()) -> None:
        self._workers = workers
        self._tracker = tracker
        #: Served by the analysis thread, which owns the specimen state.
        self._analysis = analysis
        self._status = status
        #: Re-reads and applies the config on the daemon's own thread; returns its answer.
        self._reload = reload
        #: The review gallery's pages and the types a technician gives its white cells
        #: (service.station.clinic; thread-safe, served right here).
        self._clinic = clinic
        #: The scale of a file analyze_file names: the source's configured one (the station's microscope).
        self._file_scale = file_scale
        #: The folders analyze_file may read ([commands] analyze_file_folders; empty: anywhere).
        self._file_folders = tuple(os.path.realpath(f) for f in file_folders)

    def handle(self, name: str, arguments: dict[str, Any]) -> Mapping[str, Any]:
        """MQTT cmd/<name> (called on the publisher's command thread); the response body."""
        unknown = sorted(set(arguments) - COMMAND_ARGUMENTS.get(name, frozenset(arguments)))
        if unknown:
            takes = ", ".join(sorted(COMMAND_ARGUMENTS[name])) or "none"
            return {"ok": False, "error": "bad_arguments", "message": f"{name} does not take "
                    f"{', '.join(map(repr, unknown))[:200]} (its arguments: {takes})"}
        where = _not_unicode({k: v for k, v in arguments.items() if (name, k) != ("analyze_file", "path")})
        if where is not None:  # a report or a signature holding it could never be stored or published
            return {"ok": False, "error": "bad_arguments", "message": f"{name}: {where} holds a lone UTF-16 "
                    "surrogate (text cut inside a character), not valid Unicode"}
        if name == "status":
            return {"ok": True, **self._status()}
        if name == "reload":
            return self._reload()
        if name == "start_run":
            target = arguments.get("target_wbc")
            if "target_wbc" in arguments and (not isinstance(target, int) or isinstance(target, bool)
                                              or not 1 <= target <= MAX_TARGET_WBC):  # null too: leave it out
                return {"ok": False, "error": "bad_arguments",
                        "message": f"target_wbc must be an integer from 1 to {MAX_TARGET_WBC}"}
            specimen = arguments.get("specimen_id")
            if "specimen_id" in arguments and (error := _specimen_id_error(specimen)) is not None:
                return {"ok": False, "error": "bad_arguments", "message": error}
            return self._analysis.call(name, lambda: self._start_run(target, specimen))
        if name == "stop_run":  # the run stops now; only its answer's `held` waits for the hold decision
            return self._held_after_stop(self._analysis.call(name, self._stop_run))
        if name == "analyze_file":
            return self._analyze_file(arguments.get("path"))
        if name == "get_review" and self._clinic is not None:
            return self._clinic.get_review(arguments)
        if name == "get_runs" and self._clinic is not None:
            return self._clinic.get_runs()
        if name == "type_cells" and self._clinic is not None:
            return self._clinic.type_cells(arguments)
        if name == "verify_run" and self._clinic is not None:
            run_id, by = arguments.get("run_id"), arguments.get("verified_by")
            if not isinstance(run_id, str) or not isinstance(by, str):
                return {"ok": False, "error": "bad_arguments", "message": "verify_run needs {\"run_id\": \"...\", "
                        f"\"verified_by\": \"initials\"}} (1 to {MAX_VERIFIED_BY} characters, all printable)"}
            if (problem := signed_name_error(by, "verified_by")) is not None:  # printed on the report as it is
                return {"ok": False, "error": "bad_arguments", "message": problem}
            self._await_hold_decision()
            return self._analysis.call(name, lambda: self._verify_run(run_id, by.strip()))
        return {"ok": False, "error": "unknown_command", "message": f"unknown command {name!r}",
                "commands": list(COMMAND_NAMES)}

    def _analyze_file(self, path: object) -> dict[str, Any]:
        if not isinstance(path, str) or not path:
            return {"ok": False, "error": "bad_arguments", "message": "analyze_file needs {\"path\": \"/absolute/file\"}"}
        if not Path(path).is_absolute():
            return {"ok": False, "error": "bad_arguments", "message": "path must be absolute"}
        if "\0" in path:  # no file has that name; the OS would refuse it with a ValueError
            return {"ok": False, "error": "bad_arguments", "message": "the path holds a NUL character"}
        try:  # a name that is not UTF-8 comes as surrogate escapes (\udc80-\udcff); other surrogates name nothing
            os.fsencode(path)
        except UnicodeEncodeError:
            return {"ok": False, "error": "bad_arguments", "message": "the path holds a lone UTF-16 surrogate "
                    "that is no file name's byte"}
        name = Path(path).name
        refused = {"ok": False, "error": "path_not_allowed", "message": "analyze_file reads only files in "
                   f"[commands] analyze_file_folders ({', '.join(self._file_folders)})"}
        if self._file_folders:
            # where the path leads, links followed: a link in an allowed folder reaches nothing outside
            real = os.path.realpath(path)
            if not within(real, self._file_folders):
                logger.warning("analyze_file refused: %s is outside [commands] analyze_file_folders", shown(path))
                return refused
            path = real  # the resolved path is opened, and judged again on the file opened
        workers = self._workers
        try:
            if self._file_folders:  # a link swapped in since the check leads the read nowhere
                image = load_image(read_image_file_within(path, self._file_folders, IngestLimits().max_file_bytes,
                                                          shown(path)), source_name=shown(path))
            else:
                image = load_image(path)
        except OutsideFolders as exc:
            logger.warning("analyze_file refused: %s led to %s, outside [commands] analyze_file_folders (a link "
                           "changed after the path was checked)", shown(path), shown(str(exc)))
            return refused
        except IngestError as exc:
            reason = getattr(exc.code, "value", str(exc.code))
            workers.reject(f"file:{shown(path)}", "failed", reason)
            return {"ok": False, "error": reason, "message": str(exc)}
        digest = hashlib.sha1(image.pixels.tobytes()).hexdigest()[:12]
        frame_id = f"file:{shown(name)}@{digest}"  # a name that is not UTF-8 as \xNN, as the folder's
        frame = workers.with_scale(Frame(pixels=image.pixels, frame_id=frame_id, source="command",
                                         microns_per_pixel=self._file_scale))

        def run() -> dict[str, Any]:
            verdict = workers.gate.check(frame, self._tracker.specimen_scale())  # uncalibrated: the run's
            if not verdict.accepted:
                workers.reject(frame.frame_id, "rejected", verdict.reason or "unknown")
                return {"ok": False, "frame_id": frame.frame_id, "error": verdict.reason,
                        "message": workers.gate.explain(verdict)}
            return workers.analyse(frame)

        return self._analysis.call("analyze_file", run)

    def _start_run(self, target: int | None, specimen_id: str | None) -> dict[str, Any]:
        """On the analysis thread."""
        tracker = self._tracker
        try:
            run_id = tracker.start(started_by="command", target_wbc=target, specimen_id=specimen_id)
        except RunAlreadyOpen as exc:
            return {"ok": False, "error": "run_open", "message": str(exc)}
        run = tracker.open_run()
        if run is not None and self._workers.state is not None:
            self._workers.state.run_started(run)  # a restart before its first field takes it back
        self._workers.emit_started()  # its state, open with no field: every dashboard sees it started
        progress = tracker.progress()
        target_wbc = progress.target_wbc if progress else None
        return {"ok": True, "run_id": run_id, "target_wbc": target_wbc, "specimen_id": specimen_id}

    def _verify_run(self, run_id: str, by: str) -> dict[str, Any]:
        """On the analysis thread: the run's report again, counting the types a technician gave
        its cells, signed; it goes out like the run's report did and supersedes it."""
        assert self._clinic is not None
        progress = self._tracker.progress()
        closed, live, answer = self._clinic.verify(run_id, by, self._tracker.final_report,
                                                   progress.run_id if progress else None)
        state = getattr(self._workers, "state", None) if closed is not None else None
        if state is not None and closed is not None and closed.report is not None and not keep_verification(
                state.outbox, closed.report):  # an ok answer is a signature the station cannot lose
            return {"ok": False, "error": "verification_not_kept", "run_id": run_id, "message": (
                "the verification could not be kept in the station's outbox file (a full disk? see the station's "
                "log): nothing was signed; verify the run again once the station can write")}
        if closed is not None:
            self._workers.emit_closed(closed, live)
        if answer.get("ok"):
            self._say_held(answer, run_id, "the signed report")
        return answer

    def _run_watch(self) -> Any:
        """The publisher's run-state watch (service.mqtt.run_watch); None without MQTT."""
        return getattr(getattr(self._workers, "publisher", None), "run_watch", None)

    def _await_hold_decision(self) -> None:
        """Wait (bounded, on the command thread: the analysis thread goes on) for the start's hold
        decision, so that a command just after connecting answers `held` true or false."""
        if (watch := self._run_watch()) is not None:
            watch.decided.wait(HOLD_DECISION_WAIT_S)

    def _say_held(self, answer: dict[str, Any], run_id: str, what: str) -> None:
        """`held` in an ok answer naming a report of run `run_id`: true, with a message saying why and
        how it is released, where the station holds the run's messages (the broker shows it further
        along, or a later run: service.mqtt.run_watch), so the id answered does not arrive until then;
        null (`hold_decided` false), with a message, before the start has compared its state with the
        broker's retained run state (not connected yet): a false then could turn true."""
        watch = self._run_watch()
        answer["hold_decided"] = watch is None or watch.decided.is_set()
        if not answer["hold_decided"]:
            answer["held"] = None
            answer["message"] = (f"{what} is stored at the station; whether it is held there is not decided yet: the "
                                 "station has not compared its state with the run state the broker keeps (its first "
                                 "connection to the broker has not settled, or, under MQTT 3.1.1, the runs an earlier "
                                 "start held wait for its own run state to come back). Where the broker shows this "
                                 "run further along, or a later run, it is held until the broker's retained run state "
                                 "is cleared (docs/STATION.md); otherwise it is sent")
            return
        answer["held"] = watch is not None and run_id in watch.held
        if answer["held"]:
            answer["message"] = (f"{what} is held at the station: {watch.held_why(run_id)} (restored from an older "
                                 "backup, or another station under this id); it is sent once the broker's retained "
                                 f"run state is cleared (mosquitto_pub -r -n -t {watch.topic}) and the station "
                                 "started again (docs/STATION.md)")

    def _stop_run(self) -> dict[str, Any]:
        """On the analysis thread: the closed run's report goes out like any other."""
        closed = self._tracker.stop("stopped")
        if closed is None:
            return {"ok": False, "error": "no_run_open", "message": "no specimen run is open"}
        report_id = closed.report.report_id if closed.report else None
        kept = True
        if report_id is not None and self._workers.state is not None:
            # never taken back by a restart, and its report stored under this id whatever comes first
            kept = self._workers.state.run_ending(closed.run_id, "stopped", report_id)
        self._workers.emit_closed(closed)
        answer = {"ok": True, "run_id": closed.run_id, "fields": closed.fields,
                  "classified_wbc": closed.classified_wbc, "target_wbc": closed.target_wbc,
                  "complete": closed.complete, "report_id": report_id}
        if report_id is not None:  # its end (and report id) kept in the outbox file, or not (a full disk)
            answer["kept"] = kept
        if not kept:  # after the held message, if any (_held_after_stop)
            answer["message"] = (f"the run's end could not be kept in the outbox file (see the station's log): its "
                                 f"report is sent under {report_id} unless the station stops before storing it; a "
                                 "start after that reports the run under another id")
        return answer

    def _held_after_stop(self, answer: Mapping[str, Any]) -> Mapping[str, Any]:
        """stop_run's answer with `held` (the command thread, once the run is stopped): waited for
        here, not before the stop, so no field analysed during the wait joins the stopped run."""
        if not answer.get("ok") or answer.get("report_id") is None:
            return answer
        self._await_hold_decision()
        answer = dict(answer)
        not_kept = answer.pop("message", None)
        self._say_held(answer, answer["run_id"], "the run's report")
        if not_kept is not None:  # a sentence apart from the hold's message, if any
            held = answer.get("message")
            answer["message"] = f"{held}. {not_kept[:1].upper()}{not_kept[1:]}" if held else not_kept
        return answer
