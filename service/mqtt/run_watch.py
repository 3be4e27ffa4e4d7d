"""A station started on a state older than what it published: the run state the broker keeps
retained for its station id (`<prefix>/<station>/run`, the last run's) names a run the station's
state does not hold, or holds with fewer fields. That is a state directory restored from an
older backup, a new one on a replacement board, or another station under the same id; the runs
and fields analysed after that state was saved are not in it, and this start cannot tell the
systems that received them. Read once per process, at its first connection, and said at ERROR."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Collection, Mapping
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger(__name__)

#: The most of its own run states the watch remembers (the latest): one per field while the broker
#: is out of reach, so a station away for weeks does not hold them all.
OWN_KEPT = 10_000


class RunStateWatch:
    """The broker's retained run state, compared once with the runs the station's own state holds."""

    def __init__(self, station_id: str, topic: str) -> None:
        self.station_id = station_id
        self.topic = topic
        self._lock = threading.Lock()
        self.listening = True  # subscribed at each connection until the first message is heard
        self._heard: dict[str, Any] | None = None
        self._known: dict[str, int] | None = None
        self._closed_now: tuple[str, ...] = ()
        self.newer: dict[str, Any] | None = None  # the broker's state, when newer than the station's
        #: The run states this process stored to send (run id, fields, updated_at): one of them retained
        #: on the broker (its echo lost with a connection, or sent before the subscription) is no older
        #: state; another with as many fields (a previous board's, the station started out of reach
        #: and analysing on) still is.
        self._own: dict[tuple[str, int, object], None] = {}  # in the order stored

    def heard(self, payload: bytes, retained: bool) -> bool:
        """A message on the run topic (paho's thread); True when the watch has heard what it
        needs (the topic can be left): the broker's retained state, or this station's own
        state coming back (the broker kept none)."""
        with self._lock:
            if not self.listening:
                return True
            self.listening = False
            if retained and payload:
                try:
                    state = json.loads(payload)
                except ValueError:
                    return True
                if isinstance(state, dict):
                    self._heard = state.get("body", state) if isinstance(state.get("body"), dict) else state
            self._compare_locked()
        return True

    def stored(self, payload: bytes) -> None:
        """A run state this process stored in its outbox (before it can reach the broker)."""
        with self._lock:
            if not self.listening:
                return
            try:
                state = json.loads(payload)
                run_id, fields = state["run_id"], state["progress"]["fields"]
            except (ValueError, KeyError, TypeError):
                return
            if isinstance(run_id, str) and isinstance(fields, int):
                self._own[(run_id, fields, state.get("updated_at"))] = None
                if len(self._own) > OWN_KEPT:
                    del self._own[next(iter(self._own))]

    def known(self, runs: Mapping[str, int], closed_now: Collection[str] = ()) -> None:
        """The runs the station's state holds at its start (run id -> fields), the open one among
        them, and those this start closed (left open by the previous process)."""
        with self._lock:
            self._known = dict(runs)
            self._closed_now = tuple(closed_now)
            self._compare_locked()

    def _compare_locked(self) -> None:
        state, known = self._heard, self._known
        if state is None or known is None or self.newer is not None:
            return
        run_id = state.get("run_id")
        progress = state.get("progress") if isinstance(state.get("progress"), dict) else {}
        fields = progress.get("fields")
        if not isinstance(run_id, str) or not isinstance(fields, int):
            return
        if (run_id in known and fields <= known[run_id]) or (run_id, fields, state.get("updated_at")) in self._own:
            return  # this station's own last state (of this process too), or an older one the broker kept
        self.newer = state
        updated = state.get("updated_at")
        when = (datetime.fromtimestamp(updated, timezone.utc).isoformat(timespec="seconds")
                if isinstance(updated, (int, float)) else "at a time not said")
        held = (f"holds it with {known[run_id]} fields" if run_id in known
                else f"does not hold it (it holds {len(known)} run{'' if len(known) == 1 else 's'})")
        gone = (f"; run {run_id} is open there: this station will send no specimen report for it"
                if state.get("state") == "open" and run_id not in known else "")
        closed = [r for r in self._closed_now if r in known]
        again = (f"; the runs this start closed ({', '.join(closed)}, end reason restart) may have been reported "
                 "whole before: their reports from this start count only the fields this state holds, under new "
                 "report ids" if closed else "")
        logger.error(
            "the broker holds run %s of station %s (%s, %d fields, updated %s) and this station's state %s: the "
            "state is older than what this station id published (restored from an older backup, a new state on a "
            "replacement board, or another station under this id); the fields and runs analysed after it was "
            "saved are not in it%s%s (docs/STATION.md, 'Backing up, restoring and replacing a station')",
            run_id, self.station_id, state.get("state"), fields, when, held, gone, again)
