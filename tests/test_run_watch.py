"""The older-state check at a station's first connection (service.mqtt.run_watch) against the
run states the station itself stores: its own state coming back retained is no older state."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from smearscope.service.config import MqttConfig
from smearscope.service.mqtt.outbox import NewMessage, Outbox
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.mqtt.run_watch import RunStateWatch


def _state(run_id: str, fields: int, state: str = "open", updated_at: float = 1764660843.2) -> bytes:
    return json.dumps({"station_id": "lab-7", "run_id": run_id, "state": state, "end_reason": None,
                       "updated_at": updated_at, "progress": {"run_id": run_id, "fields": fields}}).encode()


def test_a_run_state_this_station_stored_coming_back_retained_is_not_said_to_be_newer_than_its_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A new board (its state holds no run) on a broker holding none starts a run while the broker
    is away or the connection flaps: its run state reaches the broker and is retained there, but
    the echo that ends the watch is lost with the connection (a QoS 0 subscription), or the state
    went out ahead of the subscription. At the next connection the broker's retained state is the
    station's own; it used to be said at ERROR as a state older than what this station id
    published ('it holds 0 runs'). A run state it did not store still is."""
    config = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "o.sqlite3")}})
    publisher = MqttPublisher(config, "lab-7", Outbox.from_config(config.outbox))
    watch = publisher.run_watch
    watch.known({})  # the station's state at its start: no run
    publisher.publish_many([], extra=[NewMessage("field", watch.topic, _state("r-new", 2), "r-new", "run-1",
                                                 qos=1, retain=True)])
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.run_watch"):
        assert watch.heard(_state("r-new", 2), retained=True)
    assert watch.newer is None and not caplog.records, caplog.text

    second = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "p.sqlite3")}})
    other = MqttPublisher(second, "lab-7", Outbox.from_config(second.outbox))
    other.run_watch.known({})
    other.publish_many([], extra=[NewMessage("field", other.run_watch.topic, _state("r-new", 2), "r-new", "run-1",
                                             qos=1, retain=True)])
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.run_watch"):
        assert other.run_watch.heard(_state("r-new", 3), retained=True)  # a field more than it stored
    assert other.run_watch.newer is not None and "this station's state does not hold it" in caplog.text


def test_a_restored_station_analysing_before_its_first_connection_still_says_the_brokers_newer_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A state restored from an older backup holds run r-1 at 5 fields; the broker keeps r-1's state
    at 10 from the board that went on after that backup. The station takes r-1 back and, the broker
    out of reach at its start, analyses 5 more fields before its first connection: its own states
    count 6 to 10 fields of r-1, other fields than the broker's. The broker's state is still said:
    it is not one this station stored (counting fields alone took it for the station's own)."""
    config = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "o.sqlite3")}})
    publisher = MqttPublisher(config, "lab-7", Outbox.from_config(config.outbox))
    watch = publisher.run_watch
    watch.known({"r-1": 5})
    for fields in range(6, 11):  # this board's fields 6 to 10, stored while the broker is away
        own = _state("r-1", fields, updated_at=1764670000.0 + fields)
        publisher.publish_many([], extra=[NewMessage("field", watch.topic, own, "r-1", "run-1", qos=1, retain=True)])
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.run_watch"):
        assert watch.heard(_state("r-1", 10, updated_at=1764660843.2), retained=True)  # the other board's
    assert watch.newer is not None and "this station's state holds it with 5 fields" in caplog.text, caplog.text


def test_the_run_state_is_subscribed_before_the_drain_loop_can_see_the_connection(tmp_path: Path) -> None:
    """The drain loop sends the outbox's backlog once the state says connected (it also wakes on
    its own every 0.5 s): a run state of this start's backlog sent ahead of the run subscription
    would be retained before it and come back in place of the broker's own. The subscription is
    asked for while the state does not say connected yet."""
    from types import SimpleNamespace

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    config = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "o.sqlite3")}})
    publisher = MqttPublisher(config, "lab-7", Outbox.from_config(config.outbox))
    calls: list[tuple[str, str, bool]] = []

    class Client:
        def drop_out_messages(self) -> list[object]:
            return []

        def subscribe(self, topic: str, *args: object, **kwargs: object) -> tuple[int, int]:
            calls.append(("subscribe", topic if isinstance(topic, str) else str(topic), publisher.state.connected))
            return 0, len(calls)  # paho's (result, packet id)

        def publish(self, topic: str, *args: object, **kwargs: object) -> None:
            calls.append(("publish", topic, publisher.state.connected))

    publisher._on_connect(Client(), None, SimpleNamespace(session_present=False),  # type: ignore[arg-type]
                          ReasonCode(PacketTypes.CONNACK, identifier=0), None)
    assert publisher.state.connected
    assert ("subscribe", publisher.run_watch.topic, False) in calls, calls


def test_a_station_away_from_the_broker_for_weeks_remembers_only_its_latest_run_states() -> None:
    """One run state per field is remembered until the first connection: a station that cannot reach
    the broker for weeks keeps the latest OWN_KEPT of them, not every one, and still knows its
    latest coming back retained."""
    from smearscope.service.mqtt.run_watch import OWN_KEPT, RunStateWatch

    watch = RunStateWatch("lab-7", "smearscope/lab-7/run")
    watch.known({})
    for fields in range(1, OWN_KEPT + 101):
        watch.stored(_state("r-long", fields, updated_at=1764670000.0 + fields))
    assert len(watch._own) == OWN_KEPT
    assert watch.heard(_state("r-long", OWN_KEPT + 100, updated_at=1764670000.0 + OWN_KEPT + 100), retained=True)
    assert watch.newer is None


def test_the_outbox_waits_for_the_retained_run_state_and_a_refused_or_empty_subscription_ends_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At the first connection nothing is sent before the broker's retained run state is heard. A
    subscription the broker refuses (no read permission) ends the wait at once, said at WARNING; so
    does the answer to a subscription made after the run topic's (the broker had no retained state
    to send before it); a message heard on the topic ends it too."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from smearscope.service.mqtt.run_watch import RunStateWatch

    granted, refused = ReasonCode(PacketTypes.SUBACK, identifier=0), ReasonCode(PacketTypes.SUBACK, identifier=0x87)
    woken: list[str] = []
    refusing = RunStateWatch("lab-7", "smearscope/lab-7/run", wake=lambda: woken.append("refused"))
    refusing.subscribing(4)
    assert not refusing.may_send()
    with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.run_watch"):
        refusing.on_subscribe(None, None, 4, [refused], None)
    assert refusing.may_send() and woken == ["refused"]
    assert "refused this station's subscription to smearscope/lab-7/run" in caplog.text, caplog.text

    empty = RunStateWatch("lab-7", "smearscope/lab-7/run")
    empty.subscribing(4)
    empty.on_subscribe(None, None, 5, [granted], None)  # another subscription's, before the run topic's answer
    assert not empty.may_send()
    empty.on_subscribe(None, None, 4, [granted], None)
    assert not empty.may_send()  # a retained state may still come
    empty.on_subscribe(None, None, 6, [granted], None)  # the commands' answer: none came before it
    assert empty.may_send()

    heard = RunStateWatch("lab-7", "smearscope/lab-7/run")
    heard.subscribing(4)
    heard.on_subscribe(None, None, 4, [granted], None)
    assert not heard.may_send()
    heard.heard(_state("r-1", 3), retained=True)
    assert heard.may_send()


def test_the_messages_of_a_run_the_broker_shows_closed_and_further_along_are_held_its_fields_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker keeps r-1 closed at 6 fields, the restored state closed it at this start with 3:
    its run state, its specimen report and that report's FHIR Bundle (same report id) are held; its
    field and cells messages, and another run's report, are not. Closed with as many fields as
    the state held open is held too; an older state of the broker (fewer fields) holds nothing."""
    from smearscope.service.mqtt.outbox import OutboxMessage
    from smearscope.service.mqtt.run_watch import RunStateWatch

    def message(kind: str, topic: str, report_id: str, body: dict[str, object]) -> OutboxMessage:
        payload = json.dumps({"kind": kind, "report_id": report_id, "body": body}).encode()
        return OutboxMessage(1, kind, topic, payload, 1, False, report_id, "m", "application/json", "1", 0.0, 0)  # type: ignore[arg-type]

    watch = RunStateWatch("lab-7", "smearscope/lab-7/run")
    watch.known({"r-0": 4, "r-1": 3}, closed_now=["r-1"])
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.run_watch"):
        watch.heard(_state("r-1", 6, state="closed"), retained=True)
    assert watch.held == {"r-1": ("closed", 6, 3)}
    assert len(caplog.records) == 1 and "this station's state holds it with 3 fields" in caplog.text
    assert "are held: parked in the outbox" in caplog.text and "mosquitto_pub -r -n -t smearscope/lab-7/run" in caplog.text
    assert watch.holds(message("field", watch.topic, "r-1", {}))
    assert watch.holds(message("report", "smearscope/lab-7/report", "rep-3", {"run_id": "r-1"}))
    assert watch.holds(message("report", "smearscope/lab-7/fhir", "rep-3", {"resourceType": "Bundle"}))
    assert not watch.holds(message("field", "smearscope/lab-7/field", "f-1", {"run_id": "r-1"}))
    assert not watch.holds(message("cells", "smearscope/lab-7/cells", "f-1", {"run_id": "r-1"}))
    assert not watch.holds(message("report", "smearscope/lab-7/report", "rep-0", {"run_id": "r-0"}))
    assert not watch.holds(message("field", watch.topic, "r-0", {}))

    same = RunStateWatch("lab-7", "smearscope/lab-7/run")
    same.known({"r-1": 3}, resumed="r-1")  # taken back open at 3; the broker has it closed at 3
    same.heard(_state("r-1", 3, state="closed"), retained=True)
    assert same.held == {"r-1": ("closed", 3, 3)}

    older = RunStateWatch("lab-7", "smearscope/lab-7/run")
    older.known({"r-1": 5}, closed_now=["r-1"])
    older.heard(_state("r-1", 3), retained=True)  # an older state of its own the broker kept
    assert not older.held and older.newer is None


def test_a_connection_lost_before_the_wait_settles_gives_the_next_one_its_own_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first connection is lost before the broker answers the run topic's subscription (a broker
    restarted as the station starts), and the reconnect comes after more than HEAR_WAIT_S (paho's
    backoff). The new connection waits for the retained run state again: the bound is each
    connection's, not what was left of the first's, which sent the outbox at once, unheard, and a
    restored station's shorter report with it."""
    from smearscope.service.mqtt import run_watch as module
    from smearscope.service.mqtt.run_watch import HEAR_WAIT_S, RunStateWatch

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    watch = RunStateWatch("lab-7", "smearscope/lab-7/run")
    watch.known({"r-1": 3}, closed_now=["r-1"])
    watch.subscribing(4)
    assert not watch.may_send()  # the first connection's wait begins
    clock[0] += HEAR_WAIT_S + 3  # lost; the reconnect comes later than the bound
    watch.subscribing(9)
    assert not watch.may_send()  # the new connection waits for its answer
    watch.heard(_state("r-1", 6, state="closed"), retained=True)
    assert watch.may_send() and watch.held == {"r-1": ("closed", 6, 3)}
    clock[0] += HEAR_WAIT_S + 1  # a connection that never answers still ends its wait at the bound
    silent = RunStateWatch("lab-7", "smearscope/lab-7/run")
    silent.subscribing(4)
    assert not silent.may_send()
    clock[0] += HEAR_WAIT_S
    assert silent.may_send()


def _kept_hold(outbox: Outbox) -> None:
    """A start whose run r-1 (3 fields, taken back open) the broker shows closed at 6: r-1 is held,
    and the hold kept in `outbox`'s file."""
    first = RunStateWatch("lab-7", "smearscope/lab-7/run", store=outbox)
    first.known({"r-1": 3}, resumed="r-1")
    first.subscribing(1)
    first.heard(_state("r-1", 6, state="closed"), retained=True)
    assert first.may_send() and first.held == {"r-1": ("closed", 6, 3)}


def _start_finding_no_retained_state(outbox: Outbox, fields: int) -> RunStateWatch:
    """A start (its run r-1 at `fields`) that finds no retained run state: the answer to a later
    subscription came before any."""
    granted = ReasonCode(PacketTypes.SUBACK, identifier=0)
    cleared = RunStateWatch("lab-7", "smearscope/lab-7/run", store=outbox)
    cleared.known({"r-1": fields})
    cleared.subscribing(1)
    cleared.on_subscribe(None, None, 1, [granted], None)
    cleared.on_subscribe(None, None, 2, [granted], None)  # no retained run state came before it
    return cleared


def test_a_kept_hold_is_released_only_by_a_start_that_finds_no_retained_run_state(tmp_path: Path) -> None:
    """A hold kept in the outbox file: a later start whose run r-1 went on past the broker's 6 fields
    (taken back open, 7 fields of which 4 are not the broker's) still holds it; a start that finds
    no retained run state (the answer to a later subscription came first) releases it, and the
    file no longer has it."""
    config = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "o.sqlite3")}})
    with Outbox.from_config(config.outbox) as outbox:
        _kept_hold(outbox)

        grown = RunStateWatch("lab-7", "smearscope/lab-7/run", store=outbox)
        assert grown.held == {"r-1": ("closed", 6, 3)}  # from the file, before anything is heard
        grown.known({"r-1": 7}, resumed="r-1")
        grown.subscribing(1)
        grown.heard(_state("r-1", 6, state="closed"), retained=True)
        assert grown.may_send() and "r-1" in grown.held

        cleared = _start_finding_no_retained_state(outbox, 7)
        assert cleared.may_send() and not cleared.held
        assert not RunStateWatch("lab-7", "smearscope/lab-7/run", store=outbox).held


def test_under_mqtt_311_no_retained_run_state_is_said_only_when_the_stations_own_run_state_does_not_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A 3.1.1 start hears nothing on the run topic: nothing is said then, nor while the station has
    sent no run state (a new station), nor for an acknowledgement on another topic or connection.
    A run state acknowledged whose connection is lost before the echo bound passes is waited for
    again on the next one. One that comes back ends it without a word and releases the hold an earlier
    start kept in the outbox file; one that does not within echo_watch.ECHO_BOUND_S of its PUBACK is
    said once at WARNING, naming that hold, kept (the ACL may hide a later state of that run). Until
    either, the hold stands and is not decided."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from smearscope.service.mqtt import run_watch as module
    from smearscope.service.mqtt.echo_watch import ECHO_BOUND_S
    from smearscope.service.mqtt.run_watch import RunStateWatch

    granted = ReasonCode(PacketTypes.SUBACK, identifier=0)
    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    topic = "smearscope/lab-7/run"
    config = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "o.sqlite3")}})

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("MQTT 3.1.1")]

    def started(watch: RunStateWatch, connection: int) -> RunStateWatch:
        watch.known({"r-1": 3})
        watch.subscribing(1, True, connection)
        watch.on_subscribe(None, None, 1, [granted], None)
        watch.on_subscribe(None, None, 2, [granted], None)  # nothing came before the next subscription's answer
        assert watch.may_send()
        return watch

    with Outbox.from_config(config.outbox) as outbox, caplog.at_level(logging.WARNING, logger=module.__name__):
        first = RunStateWatch("lab-7", topic, store=outbox, user="station")
        first.known({"r-1": 3}, closed_now=["r-1"])
        first.subscribing(1)
        first.heard(_state("r-1", 6, state="closed"), retained=True)
        assert first.may_send() and set(first.held) == {"r-1"}  # kept in the file
        watch = started(RunStateWatch("lab-7", topic, store=outbox, user="station"), 1)
        assert set(watch.held) == {"r-1"} and not said(), said()  # the hold kept till told, nothing said yet
        assert not watch.decided.is_set()
        watch.acked(7, "smearscope/lab-7/report", 1)
        clock[0] += 10 * ECHO_BOUND_S
        watch.check()
        assert not said(), said()  # no run state sent yet: nothing to tell by
        watch.acked(8, topic, 1)
        clock[0] += ECHO_BOUND_S / 2
        watch.subscribing(3, True, 2)  # lost and connected again before the bound
        watch.acked(8, topic, 1)  # the connection before's acknowledgement, settled late
        clock[0] += ECHO_BOUND_S
        watch.check()
        assert not said(), said()
        watch.acked(9, topic, 2)
        clock[0] += ECHO_BOUND_S / 2
        watch.check()
        assert not said(), said()
        clock[0] += ECHO_BOUND_S  # past the bound of its PUBACK on this connection, and not back
        watch.check()
        watch.check()
        assert len(said()) == 1, said()
        warning = said()[0]
        assert warning.startswith(f"MQTT 3.1.1: no retained run state came on {topic}"), warning
        assert "the runs held (r-1) stay held" in warning and f"'topic read {topic}'" in warning, warning
        assert set(watch.held) == {"r-1"} and watch.decided.is_set() and watch.releases == 0
        watch.subscribing(5, True, 3)  # a reconnect: said once per process
        watch.acked(11, topic, 3)
        clock[0] += 2 * ECHO_BOUND_S
        watch.check()
        assert len(said()) == 1, said()

        caplog.clear()
        readable = started(RunStateWatch("lab-7", topic, store=outbox, user="station"), 1)
        assert set(readable.held) == {"r-1"} and not readable.decided.is_set()
        readable.acked(4, topic, 1)
        assert readable.heard(_state("r-1", 3, state="closed"), retained=False)  # its own, back
        assert not readable.held and readable.decided.is_set() and readable.releases == 1  # readable: released
        clock[0] += 2 * ECHO_BOUND_S
        readable.check()
        assert not said(), said()


def test_a_release_the_outbox_file_refuses_to_keep_is_written_once_the_file_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A start that finds no retained run state releases a kept hold, and the outbox file refuses the
    write that forgets it (a full disk, an I/O error: here a trigger). The write is tried again until
    the file takes it. Before, the watch took it as written: the file kept the hold, and every later
    start held that run's new messages again (a signature), while the broker then showed the run's
    own state, which never releases it."""
    from smearscope.service.mqtt import run_watch as module
    from smearscope.service.mqtt.run_watch import SAVE_RETRY_S

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    config = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "outbox": {"path": str(tmp_path / "o.sqlite3")}})
    with Outbox.from_config(config.outbox) as outbox:
        _kept_hold(outbox)
        outbox.write(lambda conn: conn.execute("CREATE TRIGGER refuse BEFORE DELETE ON held_runs "
                                               "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"))
        caplog.set_level(logging.WARNING, logger="smearscope.service.mqtt.run_watch")
        cleared = _start_finding_no_retained_state(outbox, 3)
        assert cleared.may_send() and not cleared.held  # the sending goes on
        assert cleared.may_send()  # not tried again at once
        refused = [r.getMessage() for r in caplog.records if "could not be" in r.getMessage()]
        assert len(refused) == 1 and "disk I/O error" in refused[0], refused
        outbox.write(lambda conn: conn.execute("DROP TRIGGER refuse"))
        clock[0] += SAVE_RETRY_S
        assert cleared.may_send()
        assert not RunStateWatch("lab-7", "smearscope/lab-7/run", store=outbox).held


def test_an_unknown_run_whose_start_reads_before_this_release_holds_the_runs_left_open_saying_the_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Which run began first is judged from the runs' start times; one that reads before this release
    (wall_clock.RELEASED) is a wrong clock's (a board without a clock battery, before network time),
    so the order is not told: the run the restored state left open is held as for a later run, and
    the ERROR says the clock. A run state with no start time is held the same way; a run taken back
    open (not closed at the start) is held for a later run as one closed is. With no run left open,
    nothing is held."""
    from smearscope.service.mqtt.run_watch import RunStateWatch
    from smearscope.service.mqtt.wall_clock import RELEASED

    def state(started_at: float | None) -> bytes:
        body = json.loads(_state("r-9", 4, state="closed"))
        if started_at is not None:
            body["progress"]["started_at"] = started_at
        return json.dumps(body).encode()

    good = RELEASED + 86400.0
    for broker_start, starts in ((86400.0, {"r-1": good}), (good + 60, {"r-1": 86400.0}), (None, {"r-1": good})):
        caplog.clear()
        watch = RunStateWatch("lab-7", "smearscope/lab-7/run")
        watch.known({"r-1": 3}, closed_now=["r-1"], starts=starts)
        with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.run_watch"):
            watch.heard(state(broker_start), retained=True)
        assert watch.held == {"r-1": ("closed", 4, 3)}, (broker_start, starts)
        assert len(caplog.records) == 1 and "it may have begun after them" in caplog.text, caplog.text
        assert ("read from a wrong clock" in caplog.text) == (broker_start is not None), caplog.text

    taken_back = RunStateWatch("lab-7", "smearscope/lab-7/run")  # left open, taken back within its idle timeout
    taken_back.known({"r-0": 8, "r-1": 3}, resumed="r-1", starts={"r-0": good - 600, "r-1": good})
    taken_back.heard(state(good + 60), retained=True)  # begun after both: the run taken back is held
    assert taken_back.held == {"r-1": ("closed", 4, 3)} and taken_back.held_after == {"r-1": "r-9"}

    quiet = RunStateWatch("lab-7", "smearscope/lab-7/run")
    quiet.known({"r-1": 3}, starts={"r-1": good})  # closed before this start: nothing open to hold
    quiet.heard(state(86400.0), retained=True)
    assert not quiet.held and quiet.newer is not None


def test_a_run_without_a_field_closed_again_at_a_start_is_not_taken_for_an_older_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run start_run opened, closed with no field, its closed state published, and closed again at
    the next start (the write that ends it refused by a full disk): the broker showing it closed
    with 0 fields is this station's own state, nothing newer; a run with fields closed at a start
    that the broker shows closed is held as before."""
    empty = RunStateWatch("lab-7", "smearscope/lab-7/run")
    empty.known({"r-0": 0}, closed_now=["r-0"])
    with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.run_watch"):
        empty.heard(_state("r-0", 0, state="closed"), retained=True)
    assert empty.newer is None and not empty.held and not caplog.records
    counted = RunStateWatch("lab-7", "smearscope/lab-7/run")
    counted.known({"r-1": 3}, closed_now=["r-1"])
    counted.heard(_state("r-1", 3, state="closed"), retained=True)
    assert set(counted.held) == {"r-1"}
