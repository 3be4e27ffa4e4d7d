"""A station started on a state older than what it published: the run state the broker keeps
retained for its station id (`<prefix>/<station>/run`, the last run's) names a run the station's
state does not hold, or holds with fewer fields. That is a state directory restored from an
older backup, a new one on a replacement board, or another station under the same id; the runs
and fields analysed after that state was saved are not in it, and this start cannot tell the
systems that received them. Read once per process, at its first connection, and said at ERROR.

The first connection sends nothing from the outbox until the broker's retained run state is heard
(or known to be none: the SUBACK of a later subscription came first, the subscription was refused,
or HEAR_WAIT_S passed on a connection: a connection lost before it settles gives the next one
its own HEAR_WAIT_S, not what was left of the first's). Where that state shows a run of the station's further along (more fields,
or closed where the station's state still had it open), that run's own messages (its run states,
its specimen report and that report's FHIR Bundle) are held: parked in the outbox, not sent and not
deleted (but a run state superseded by a later one of that run: the latest alone is kept), so the shorter report of a restored backup never lands over the complete one. Its field
and cells messages go on (each is one field's, under its own report id: new data, or a repeat
consumers drop by message id). Where that state names a run the station's state does not hold,
begun after every run it holds (service.mqtt.run_order; or when that cannot be told), the runs the
state left open (closed at this start, or taken back) are held the same way: the station went on
after the state was saved and closed and reported them there; one begun before them is an older
state the broker kept, said at WARNING, nothing held. A hold is kept in the outbox file (table `held_runs`) and applies
again at every later start, from its first message, whatever run the broker's retained state
names by then (the station's own later runs replace it), or however many fields the station's
state holds for that run by then (a run taken back open goes on with other fields than the
broker's): only a start that finds no retained run state on the broker (cleared by the operator)
releases them (docs/STATION.md). Under MQTT 3.1.1 mosquitto grants a subscription its ACL denies
and sends nothing, which looks like no retained state: a 3.1.1 start that hears none keeps the
subscription, and the station's own run state (the outbox sends its last one at each start) coming
back on it shows the topic readable; one the broker acknowledged that does not come back within
echo_watch.ECHO_BOUND_S is said once at WARNING, with the ACL line to check. The runs held by an
earlier start stay held until that echo comes (the topic is readable: the broker keeps nothing,
they are released then, their parked messages sent on this connection); without it they stay
held. `decided` is set once the start's hold is decided (service.station.commands answers `held`
by it)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timezone
from typing import Any

from smearscope.service.mqtt import echo_watch
from smearscope.service.mqtt.outbox import Outbox, OutboxMessage
from smearscope.service.mqtt.run_order import order_of

logger = logging.getLogger(__name__)

#: The most of its own run states the watch remembers (the latest): one per field while the broker
#: is out of reach, so a station away for weeks does not hold them all.
OWN_KEPT = 10_000
#: How long the first connection's sending waits at most for the broker's retained run state (s).
HEAR_WAIT_S = 5.0
#: The runs held, kept across restarts in the outbox file (the held messages are there too).
#: After the outbox file refused the held runs' write (a full disk, an I/O error), the next try waits this long (s).
SAVE_RETRY_S = 60.0
HELD_TABLE = ("CREATE TABLE IF NOT EXISTS held_runs (run_id TEXT PRIMARY KEY, broker_state TEXT NOT NULL, "
              "broker_fields INTEGER NOT NULL, own_fields INTEGER NOT NULL, held_at REAL NOT NULL)")
#: Of those, the ones held because the broker showed a later run the station's state does not hold
#: (its id): a table of its own, which a version without it ignores.
HELD_AFTER_TABLE = "CREATE TABLE IF NOT EXISTS held_runs_after (run_id TEXT PRIMARY KEY, later_run TEXT NOT NULL)"


def held_said(run_id: str, held_at: float, held: tuple[str, int, int], later: str | None, topic: str) -> str:
    """What a start says of a run an earlier start held (at WARNING), and `smearscope doctor` of the
    outbox file: since when, what the broker showed (`held`: its state, its fields, the station's;
    `later`: the later run it showed, if that was why) and what releases it."""
    state, broker_fields, own_fields = held
    shown = (f"a later run, {later} ({state}, {broker_fields} fields), that this station's state does not hold, "
             f"where it held this one open with {own_fields}" if later is not None else
             f"that run {state} with {broker_fields} fields where this station's state holds {own_fields}")
    return (f"run {run_id}'s run states, specimen report and FHIR Bundle are held in the outbox since "
            f"{datetime.fromtimestamp(held_at, timezone.utc).isoformat(timespec='seconds')}: the broker showed {shown}. "
            "They are sent once a start finds no retained run state on the broker (mosquitto_pub -r -n -t "
            f"{topic}, then start the station again; docs/STATION.md)")


class RunStateWatch:
    """The broker's retained run state, compared once with the runs the station's own state holds."""

    def __init__(self, station_id: str, topic: str, wake: Callable[[], None] = lambda: None,
                 store: Outbox | None = None, user: str | None = None) -> None:
        self.station_id = station_id
        self.user = user  # the station's MQTT user name, for the ACL line (None: anonymous)
        self._v311 = False  # this connection speaks MQTT 3.1.1: a subscription the ACL denies is granted
        #: MQTT 3.1.1, nothing heard at the start: the station's own run state is waited for on the run
        #: topic, from its PUBACK on this connection (the connection's number: InFlight.connected).
        self._awaiting_own = False
        self._own_echo = echo_watch.AckedEcho(0)
        #: MQTT 3.1.1, nothing heard: the runs held by an earlier start, released once the own run state comes back
        self._release_pending: tuple[str, ...] = ()
        self.releases = 0  # held runs released so far: the drain gives their parked messages another try
        #: the hold decided: the broker's state heard and compared, known to be none (under 3.1.1: once
        #: readable or not), or the outbox sent without it
        self.decided = threading.Event()
        self._store = store  # the outbox file: the runs held, across restarts
        self.topic = topic
        self._wake = wake  # the drain thread, once the outbox may be sent
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
        self._resumed: str | None = None  # the run the station took back open at its start
        self._starts: dict[str, float | None] = {}  # when the runs the station's state holds began
        self._numbers: dict[str, int] = {}  # the runs' numbers the station's state keeps (run id -> number)
        #: held run id -> the later run the broker showed (one the station's state does not hold)
        self.held_after: dict[str, str] = {}
        self._settled = False  # the broker's retained run state heard, or known to be none
        self._run_mid: int | None = None  # the run topic's SUBSCRIBE of this connection
        self._run_acked = False  # its SUBACK came: the next SUBACK comes after any retained state
        self._wait_until: float | None = None  # HEAR_WAIT_S after the drain first asked on this connection
        #: run id -> (the broker's state, its fields, the station's fields): runs whose messages are held
        self.held: dict[str, tuple[str, int, int]] = {}
        self._held_reports: set[str] = set()  # report ids of held specimen reports (their FHIR Bundles too)
        self._held_states: dict[str, int] = {}  # held run id -> the outbox seq of its latest run state
        self._kept: set[str] = set()  # held runs as the outbox file has them
        self._released: set[str] = set()  # held runs a start found released, not yet gone from the file
        self._save_at = 0.0  # monotonic time the held runs' write may be tried (again)
        self._save_failing: str | None = None  # why it failed, said once while it fails
        if store is not None:
            self._load(store)

    def heard(self, payload: bytes, retained: bool) -> bool:
        """A message on the run topic (paho's thread); True when the watch has heard what it
        needs (the topic can be left): the broker's retained state, or this station's own
        state coming back (the broker kept none)."""
        with self._lock:
            if not self.listening:
                return True
            self.listening = False
            self._settled = True
            if self._awaiting_own:  # MQTT 3.1.1: a message on the topic, so it is readable
                self._awaiting_own = False
                logger.debug("MQTT 3.1.1: a message came back on %s: this station may read it", self.topic)
                if not retained:  # its own, live: the broker keeps no retained run state this station could not read
                    self._release_locked(self._release_pending, "the broker holds no retained run state (this "
                                         "station's own run state came back on its subscription: it may read it)")
            if retained and payload:
                try:
                    state = json.loads(payload)
                except ValueError:
                    return True
                if isinstance(state, dict):
                    self._heard = state.get("body", state) if isinstance(state.get("body"), dict) else state
            self._compare_locked()
        self.decided.set()
        self._wake()
        return True

    def subscribing(self, mid: int, v311: bool = False, connection: int = 0) -> None:
        """The run topic subscribed on a new connection (paho's thread), under packet id `mid`;
        `v311`: the connection speaks MQTT 3.1.1; `connection`: its number (InFlight.connected)."""
        with self._lock:
            # this connection's own bound: a reconnect after the first one's passed would send at once
            self._run_mid, self._run_acked, self._wait_until, self._v311 = mid, False, None, v311
            # a run state acknowledged on the connection before: its echo may have gone with it
            self._own_echo = echo_watch.AckedEcho(connection)

    def on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: list[Any], properties: Any) -> None:
        """paho's SUBACK callback. The broker sends the run topic's retained state (if any) before the
        SUBACK of a subscription made after it (mosquitto: in the order it reads them); a refused
        subscription (no read permission) brings none."""
        with self._lock:
            if self._settled or self._run_mid is None:
                return
            if mid == self._run_mid:
                self._run_acked = True
                if all(getattr(code, "is_failure", False) for code in reason_codes):
                    logger.warning("the broker refused this station's subscription to %s (%s): an older state "
                                   "restored cannot be told; its account must read that topic "
                                   "(config/mosquitto.acl.example)", self.topic,
                                   ", ".join(str(code) for code in reason_codes))
                    self._settled = True
            elif self._run_acked:
                self._settled = True  # no retained run state on the broker (it would have come by now)
                if self._v311:  # or none this station may read: its own run state coming back tells, and releases
                    self._awaiting_own = True
                    self._release_pending = tuple(sorted(r for r in self.held if r in self._kept))
                    logger.debug("MQTT 3.1.1: no retained run state came on %s: this station's own run state "
                                 "coming back there will show that it may read it (held till then: %s)", self.topic,
                                 ", ".join(self._release_pending) or "none")
                    if self._release_pending:  # the start's WARNING said a start that hears none sends them
                        logger.warning("the runs held by an earlier start (%s) are sent once this station's own run "
                                       "state comes back on its subscription: under MQTT 3.1.1 no retained run "
                                       "state came on %s at this start, which is also what an acl_file that keeps "
                                       "the topic from this station looks like. Where a held run's state is the "
                                       "last this station has to send (held too), that is its next run's state "
                                       "(start_run, or its next field)", ", ".join(self._release_pending), self.topic)
                else:
                    self._release_locked(list(self.held), "the broker holds no retained run state")
            settled = self._settled
            # 3.1.1 holding nothing from an earlier start: no echo (or its absence) can change what is held
            if settled and not (self._awaiting_own and self._release_pending):
                self.decided.set()
        if settled:
            self._wake()

    def acked(self, seq: int, topic: str, connection: int) -> None:
        """The broker acknowledged outbox message `seq` to `topic` on connection number `connection`
        (the drain thread): a run state of this connection's starts the wait for it to come back."""
        with self._lock:
            if topic == self.topic and self._awaiting_own:
                self._own_echo.acked(seq, connection)

    def check(self) -> None:
        """MQTT 3.1.1: say once at WARNING that the station's own run state did not come back (the
        drain thread): mosquitto (2.0.11) grants a subscription its ACL denies and sends nothing, so
        the older-state check heard nothing for that reason, not because the broker keeps none."""
        with self._lock:
            if not self._awaiting_own or not self._own_echo.overdue():
                return
            self._awaiting_own = False
            kept = tuple(r for r in self._release_pending if r in self.held)
        self.decided.set()
        where = f"under 'user {self.user}'" if self.user is not None else "for anonymous clients (before any 'user' line)"
        held = (f"; the runs held ({', '.join(kept)}) stay held, as the broker may keep a later state of them that "
                "this station cannot read" if kept else "")
        logger.warning("MQTT 3.1.1: no retained run state came on %s at this start, and this station's own run "
                       "state, which the broker acknowledged there, did not come back to its subscription within "
                       "%.0f s: the broker's acl_file does not let this station read that topic, or write it (under "
                       "3.1.1 mosquitto grants a subscription it denies and sends nothing, and acknowledges and drops "
                       "a message it denies; MQTT 5 refuses both and that is said). A state restored from an older "
                       "backup is then not told%s. Give it 'topic read %s' and 'topic write %s' %s in the broker's "
                       "acl_file (config/mosquitto.acl.example), or let the station speak MQTT 5 "
                       "(protocol = \"auto\")", self.topic, echo_watch.ECHO_BOUND_S, held, self.topic, self.topic,
                       where)

    def may_send(self) -> bool:
        """Whether the outbox may be sent (the drain thread, connected): not before the broker's
        retained run state is heard, known to be none, or HEAR_WAIT_S has passed."""
        with self._lock:
            timed_out = not self._settled
            if timed_out:
                now = time.monotonic()
                if self._wait_until is None:
                    self._wait_until = now + HEAR_WAIT_S
                if now < self._wait_until:
                    return False
                self._settled = True
                self.decided.set()
            saving = (not timed_out and (self._kept != set(self.held) or bool(self._released))
                      and time.monotonic() >= self._save_at)
        if timed_out:
            logger.warning("no retained run state heard on %s within %.0f s of connecting: the outbox is "
                           "sent without it", self.topic, HEAR_WAIT_S)
        elif saving:
            self._save()
        return True

    def holds(self, message: OutboxMessage) -> bool:
        """Whether an outbox message is one of a run the broker shows further along (parked, not sent)."""
        if not self.held:
            return False
        if message.topic == self.topic:  # a run state: its report id is its run id
            if message.report_id not in self.held:
                return False
            self._supersede(message.report_id, message.seq)
            return True
        if message.report_id in self._held_reports:  # a held report's FHIR Bundle
            return True
        if message.kind != "report":  # field and cells messages go on
            return False
        try:
            body = json.loads(message.payload).get("body")
        except (ValueError, AttributeError):
            return False
        run_id = body.get("run_id") if isinstance(body, dict) else None
        if run_id not in self.held:
            return False
        with self._lock:
            self._held_reports.add(message.report_id)
        return True

    def _supersede(self, run_id: str, seq: int) -> None:
        """One run state kept per held run, the latest (the drain thread, which meets them in order):
        the broker keeps only the last one retained, so an earlier one, parked since, would be sent
        at the release for nothing; without this, each start (which states the last run again) and
        each new state of a held open run left one more in the outbox."""
        earlier = self._held_states.get(run_id)
        self._held_states[run_id] = seq if earlier is None else max(seq, earlier)
        if earlier is None or earlier == seq or self._store is None:
            return
        try:
            self._store.ack(min(seq, earlier))
        except sqlite3.Error as exc:  # kept (sent at the release, before the later one): no harm but the room
            logger.warning("run %s's earlier held run state (outbox seq %d) could not be deleted: %s", run_id,
                           min(seq, earlier), exc)

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

    def known(self, runs: Mapping[str, int], closed_now: Collection[str] = (), resumed: str | None = None,
              starts: Mapping[str, float | None] | None = None, numbers: Mapping[str, int] | None = None) -> None:
        """The runs the station's state holds at its start (run id -> fields), the open one among
        them, those this start closed (left open by the previous process) and the one it took back;
        `starts`: when each began (run id -> started_at), and `numbers`: every run number the state
        keeps (run id -> number), to tell a run it does not hold as a later one (run_order)."""
        with self._lock:
            self._known = dict(runs)
            self._starts = dict(starts or {})
            self._numbers = dict(numbers or {})
            self._closed_now = tuple(closed_now)
            self._resumed = resumed
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
        if (run_id, fields, state.get("updated_at")) in self._own:
            return  # this station's own last state (of this process too)
        left_open = run_id in self._closed_now or run_id == self._resumed  # open in the state this start read
        behind = run_id in known and (fields > known[run_id] or (  # closed with no field: as this start closes it
            fields == known[run_id] > 0 and left_open and state.get("state") == "closed"))
        if run_id in known and not behind:
            return  # an older state of this station's the broker kept
        updated = state.get("updated_at")
        when = (datetime.fromtimestamp(updated, timezone.utc).isoformat(timespec="seconds")
                if isinstance(updated, (int, float)) else "at a time not said")
        stale = [r for r in (*self._closed_now, *([self._resumed] if self._resumed else []))
                 if r in known and r != run_id]  # open in the state this start read
        order = (order_of(run_id, state, self._starts, self._numbers, self.station_id)
                 if run_id not in known and known else None)
        if order is not None and order.later is False:
            clock = (" Were this station's clock set back since that run, it may be the later one"
                     if order.by == "start times" else "")
            logger.warning(
                "the broker holds run %s of station %s (%s, %d fields, updated %s), which this station's state does "
                "not hold, and %s: the broker kept an older run state (a broker restored from an older backup, or "
                "another station under this id), not one of a station that went on after this state was saved; "
                "nothing is held.%s (docs/STATION.md, 'Backing up, restoring and replacing a station')",
                run_id, self.station_id, state.get("state"), fields, when, order.said, clock)
            return
        self.newer = state
        held = (f"holds it with {known[run_id]} fields" if run_id in known
                else f"does not hold it (it holds {len(known)} run{'' if len(known) == 1 else 's'})")
        gone = (f"; run {run_id} is open there: this station will send no specimen report for it"
                if state.get("state") == "open" and run_id not in known else "")
        closed = [r for r in self._closed_now if known.get(r) and r != run_id]  # with a report (fields)
        again = (f"; the runs this start closed ({', '.join(closed)}, end reason restart) may have been reported "
                 "whole before: their reports from this start count only the fields this state holds, under new "
                 "report ids" if closed and not (order is not None and stale) else "")
        release = ("Where this state is the right one, clear the broker's retained run state (mosquitto_pub -r -n -t "
                   f"{self.topic}) and start the station again: it sends them then")
        if behind:
            self.held[run_id] = (str(state.get("state")), fields, known[run_id])
            again += (f"; run {run_id}'s run states, specimen report and FHIR Bundle from this state are held: parked "
                      "in the outbox, not sent and not deleted, so they do not replace what the broker shows (its "
                      f"field messages go on). {release}")
        elif order is not None and stale:
            for r in stale:
                self.held[r] = (str(state.get("state")), fields, known[r])
                self.held_after[r] = run_id
            began = (f"{order.said}: the station went on after this state was saved, and the runs it left open "
                     f"({', '.join(stale)}) were closed there and reported" if order.later else
                     f"{order.said}; it may have begun after them: the station then went on after this state was "
                     f"saved, and the runs it left open ({', '.join(stale)}) were closed there and reported")
            again += (f"; {began}. Their run states, specimen reports and FHIR Bundles from this state are held: "
                      "parked in the outbox, not sent and not deleted, so a shorter report under a new report id "
                      f"does not follow the one sent (their field messages go on). {release}")
        elif order is not None:  # no run left open to hold: the order said all the same
            again += f"; {order.said}"
        logger.error(
            "the broker holds run %s of station %s (%s, %d fields, updated %s) and this station's state %s: the "
            "state is older than what this station id published (restored from an older backup, a new state on a "
            "replacement board, or another station under this id); the fields and runs analysed after it was "
            "saved are not in it%s%s (docs/STATION.md, 'Backing up, restoring and replacing a station')",
            run_id, self.station_id, state.get("state"), fields, when, held, gone, again)

    def _load(self, store: Outbox) -> None:
        """The runs held by an earlier start (the outbox file's held_runs), held from this start's
        first message on; said at WARNING (the start that held them said it at ERROR)."""
        def rows(conn: Any) -> tuple[list[tuple[str, str, int, int, float]], dict[str, str]]:
            tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "held_runs" not in tables:
                return [], {}
            after = (dict(conn.execute("SELECT run_id, later_run FROM held_runs_after").fetchall())
                     if "held_runs_after" in tables else {})
            return conn.execute("SELECT run_id, broker_state, broker_fields, own_fields, held_at FROM held_runs").fetchall(), after

        held_rows, after = store.read(rows)
        for run_id, state, broker_fields, own_fields, held_at in held_rows:
            self.held[run_id] = (state, broker_fields, own_fields)
            self._kept.add(run_id)
            if run_id in after:
                self.held_after[run_id] = after[run_id]
            logger.warning("%s", held_said(run_id, held_at, (state, broker_fields, own_fields), after.get(run_id),
                                           self.topic))

    def held_published(self) -> tuple[str, ...] | None:
        """The telemetry's `held_runs`: the runs whose messages are held (ids, sorted), None while the
        start's hold is not decided (a command's `held` null: service.station.commands)."""
        if not self.decided.is_set():
            return None
        with self._lock:
            return tuple(sorted(self.held))

    def held_why(self, run_id: str) -> str:
        """Why run `run_id` is held, for a command's answer."""
        later = self.held_after.get(run_id)
        if later is not None:
            return (f"the broker shows run {later}, begun after the runs this station's state holds (run {run_id} "
                    "was left open in it and closed on the board that went on)")
        return f"the broker shows run {run_id} further along than this station's state"

    def _release_locked(self, run_ids: Collection[str], why: str) -> None:
        for run_id in run_ids:
            if run_id in self.held and run_id in self._kept:  # held by an earlier start, not by this one's state
                del self.held[run_id]
                self.held_after.pop(run_id, None)
                self._released.add(run_id)
                self.releases += 1
                logger.warning("run %s's held run states, specimen report and FHIR Bundle are sent now: %s",
                               run_id, why)

    def _save(self) -> None:
        """The held runs into the outbox file (the drain thread, once the wait settled)."""
        store = self._store
        with self._lock:
            held, released, after = dict(self.held), set(self._released), dict(self.held_after)
        if store is not None:
            now = time.time()

            def write(conn: Any) -> None:
                conn.execute(HELD_TABLE)
                conn.execute(HELD_AFTER_TABLE)
                for table in ("held_runs", "held_runs_after"):
                    conn.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(r,) for r in released])
                conn.executemany("INSERT OR REPLACE INTO held_runs VALUES (?, ?, ?, ?, ?)",
                                 [(r, *held[r], now) for r in held if r not in self._kept])
                conn.executemany("INSERT OR REPLACE INTO held_runs_after VALUES (?, ?)",
                                 [(r, after[r]) for r in held if r not in self._kept and r in after])
            try:
                store.write(write)
            except sqlite3.Error as exc:  # a full disk: held (or sent) in this process still; the file as it was
                said, self._save_failing = self._save_failing, f"{type(exc).__name__}: {exc}"
                self._save_at = time.monotonic() + SAVE_RETRY_S
                logger.log(logging.DEBUG if said == self._save_failing else logging.WARNING,
                           "the runs held (%s) and released (%s) could not be written to the outbox file (%s): "
                           "tried again every %.0f s; a start meanwhile holds the runs the file names",
                           ", ".join(sorted(held)) or "none", ", ".join(sorted(released)) or "none", exc,
                           SAVE_RETRY_S)
                return
            if self._save_failing is not None:
                logger.info("the runs held and released are written to the outbox file again")
                self._save_failing = None
        with self._lock:
            self._kept = (self._kept | set(held)) - released
            self._released -= released
