"""The older-state check at a station's first connection (service.mqtt.run_watch) against the
run states the station itself stores: its own state coming back retained is no older state."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from smearscope.service.config import MqttConfig
from smearscope.service.mqtt.outbox import NewMessage, Outbox
from smearscope.service.mqtt.publisher import MqttPublisher


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
