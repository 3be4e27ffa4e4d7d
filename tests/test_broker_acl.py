"""The broker ACL shipped as config/mosquitto.acl.example, loaded by a real mosquitto: each account
may send what docs/MQTT.md says and nothing more (a refused publish is dropped by the broker); and
config/mosquitto.conf.example, which loads that ACL, run by a real mosquitto."""

from __future__ import annotations

import json
import os
from pathlib import Path

import paho.mqtt.client as mqtt
import tomllib
from broker import MQTT_USERS, MosquittoBroker, Subscriber, TlsMaterial, wait_until
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from smearscope.service.config import MqttConfig
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.mqtt.publisher import MqttPublisher

ROOT = Path(__file__).resolve().parents[1]
ACL = ROOT / "config" / "mosquitto.acl.example"
CONF = ROOT / "config" / "mosquitto.conf.example"
USERS = {"station-lab-7": "s7", "station-lab-8": "s8", "technician": "t", "dashboard": "d"}


def _client(port: int, user: str) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(user, USERS[user])
    client.connect("127.0.0.1", port, 10)
    client.loop_start()
    return client


def test_the_example_acl_keeps_commands_to_technicians_and_the_dashboard_to_its_four(tmp_path: Path) -> None:
    """The dashboard's account (its password is handed to every browser) cannot start or stop a
    run, analyse a file or reload a station; a station cannot command another station or publish
    as it; a technician sends any command. Each account's refused publishes are followed by one it
    may make: once that one is in, the refused ones would have arrived before it (one client's
    QoS 1 messages arrive in order)."""
    acl = ACL.read_text()
    acl += "\n" + acl[acl.index("user station-lab-7"):acl.index("# Technicians")].replace("lab-7", "lab-8")
    broker = MosquittoBroker(tmp_path / "broker", USERS, acl=acl)
    broker.start()
    station = Subscriber(broker.port, "station-lab-7", USERS["station-lab-7"], ["smearscope/lab-7/cmd/#"])
    observer = Subscriber(broker.port, "technician", USERS["technician"], ["smearscope/#"])
    clients: list[mqtt.Client] = []
    try:
        station.wait_ready()
        observer.wait_ready()
        sent: dict[str, list[tuple[str, bool]]] = {
            "dashboard": [*((f"smearscope/lab-7/cmd/{c}", False) for c in
                            ("start_run", "stop_run", "analyze_file", "reload", "status")),
                          ("smearscope/lab-7/report", False), ("smearscope/lab-7/status", False),
                          *((f"smearscope/lab-7/cmd/{c}", True) for c in
                            ("get_review", "get_runs", "type_cells", "verify_run"))],
            "station-lab-8": [("smearscope/lab-7/cmd/stop_run", False), ("smearscope/lab-7/report", False),
                              ("smearscope/lab-7/status", False), ("smearscope/lab-8/report", True)],
            "technician": [("smearscope/lab-7/report", False), ("smearscope/lab-7/status", False),
                           *((f"smearscope/lab-7/cmd/{c}", True) for c in
                             ("start_run", "stop_run", "analyze_file", "reload", "verify_run"))],
        }
        for user, topics in sent.items():
            client = _client(broker.port, user)
            clients.append(client)
            for topic, _ in topics:
                client.publish(topic, f'{{"from": "{user}"}}', qos=1).wait_for_publish(5)
        for user, topics in sent.items():
            last = topics[-1][0]
            assert observer.wait_for(lambda ms: any(m.topic == last and user.encode() in m.payload  # noqa: B023
                                                    for m in ms), 10), (user, last)
            got = {m.topic for m in observer.messages if f'"from": "{user}"'.encode() in m.payload}
            assert got == {t for t, allowed in topics if allowed}, user
        # the station's own subscription: the technician's commands (the last sent) in, the dashboard's four
        assert station.wait_for(lambda ms: any(m.topic.endswith("verify_run") and b"technician" in m.payload
                                               for m in ms), 10)
        by = {user: {m.topic.rsplit("/", 1)[1] for m in station.messages if f'"from": "{user}"'.encode() in m.payload}
              for user in sent}
        assert by == {"dashboard": {"get_review", "get_runs", "type_cells", "verify_run"}, "station-lab-8": set(),
                      "technician": {"start_run", "stop_run", "analyze_file", "reload", "verify_run"}}
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        station.close()
        observer.close()
        broker.stop()


def _example_conf(broker: MosquittoBroker, tls_material: TlsMaterial) -> str:
    """config/mosquitto.conf.example with its paths and ports put to this broker's (its ACL copied
    beside it)."""
    work = broker.workdir
    (work / "smearscope.acl").write_text(ACL.read_text())
    text = CONF.read_text()
    for example, here in {"listener 8883": f"listener {broker.tls_port} 127.0.0.1",
                          "listener 9443": f"listener {broker.ws_port} 127.0.0.1",
                          "/etc/mosquitto/passwd": str(work / "passwd"),
                          "/etc/mosquitto/smearscope.acl": str(work / "smearscope.acl"),
                          "/etc/mosquitto/certs/ca.crt": str(tls_material.ca_cert),
                          "/etc/mosquitto/certs/server.crt": str(tls_material.server_cert),
                          "/etc/mosquitto/certs/server.key": str(tls_material.server_key)}.items():
        assert example in text, example
        text = text.replace(example, here)
    return text


def test_the_example_broker_config_serves_stations_over_tls_and_websockets_and_announces_its_packet_limit(
    tmp_path: Path, credentials_dir: Path, tls_material: TlsMaterial,
) -> None:
    """config/mosquitto.conf.example, its paths and ports put to this test's: a station logs in over
    TLS with its account of the example ACL, learns the broker's packet limit from the CONNACK
    (1 MiB, below the 2 MB it was given), parks a larger report and delivers the one behind it; a
    station with transport = "websockets" delivers through the wss listener."""
    users = {"station-lab-7": MQTT_USERS["station"], "technician": "t"}
    broker = MosquittoBroker(tmp_path / "broker", users, tls=tls_material, websockets=True)
    # the whole mosquitto.conf: its persistence_location uncommented, as the file says
    text = _example_conf(broker, tls_material).replace("#persistence_location /var/lib/mosquitto/",
                                                       f"persistence_location {broker.workdir}/")
    root = "user root\n" if os.geteuid() == 0 else ""  # as tests/broker.py: tmp_path is private to this user
    broker.conf_path.write_text(f"{root}log_dest file {broker.log_path}\n{text}")
    broker.port, broker.tls_port = broker.tls_port or 0, None  # no plain listener: wait for the TLS one
    broker.start()
    technician = Subscriber(broker.port, "technician", "t", ["smearscope/lab-7/report"], ca_cert=tls_material.ca_cert)
    publishers: list[MqttPublisher] = []
    try:
        technician.wait_ready()
        tls = {"ca_file": str(tls_material.ca_cert)}
        for i, transport in enumerate(("tcp", "websockets")):
            config = MqttConfig.model_validate({
                "host": "127.0.0.1", "port": broker.port if transport == "tcp" else broker.ws_port,
                "transport": transport, "tls": tls, "username": "station-lab-7",
                "password_credential": "mqtt-password", "max_packet_size": 2_000_000,
                "outbox": {"path": str(tmp_path / f"outbox-{transport}.sqlite3")}})
            publisher = MqttPublisher(config, "lab-7", Outbox.from_config(config.outbox))
            publishers.append(publisher)
            publisher.start()
            assert publisher.wait_until_connected(10), (publisher.state, broker.log()[-2000:])
            assert publisher.state.max_packet_size == 1_048_576
            publisher.publish_report("report", f"too-big-{transport}", json.dumps({"x": "y" * 1_100_000}).encode(), "1")
            publisher.publish_report("report", f"after-{transport}", b"{}", "1")
            assert technician.wait_for(lambda ms: len(ms) == i + 1, 10), publisher.state  # noqa: B023
            assert json.loads(technician.messages[i].payload)["report_id"] == f"after-{transport}"
            assert wait_until(lambda: publisher.outbox.counts().messages == 1, 5)  # noqa: B023
            assert [m.report_id for m in publisher.outbox.pending()] == [f"too-big-{transport}"]
            assert publisher.state.parked == 1
    finally:
        for publisher in publishers:
            publisher.stop(drain_timeout=0)
            publisher.outbox.close()
        technician.close()
        broker.stop()


#: /etc/mosquitto/mosquitto.conf as Debian 12's and Ubuntu 22.04's mosquitto package installs it.
DEBIAN_MOSQUITTO_CONF = """# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""


def test_the_example_broker_config_copied_into_debians_conf_d_starts_and_keeps_sessions(
    tmp_path: Path, tls_material: TlsMaterial,
) -> None:
    """The example copied to /etc/mosquitto/conf.d/smearscope.conf beside Debian's packaged
    mosquitto.conf (which sets persistence_location itself; mosquitto refuses a second one): the
    broker starts, a station's account logs in over its TLS listener, and the sessions are saved
    where Debian's file says."""
    broker = MosquittoBroker(tmp_path / "broker", {"station-lab-7": MQTT_USERS["station"]}, tls=tls_material,
                             websockets=True)
    work = broker.workdir
    (work / "conf.d").mkdir()
    (work / "conf.d" / "smearscope.conf").write_text(_example_conf(broker, tls_material))
    (work / "lib").mkdir()
    main = DEBIAN_MOSQUITTO_CONF
    for debian, here in {"/run/mosquitto/mosquitto.pid": str(work / "mosquitto.pid"),
                         "/var/lib/mosquitto/": f"{work / 'lib'}/",
                         "/var/log/mosquitto/mosquitto.log": str(broker.log_path),
                         "/etc/mosquitto/conf.d": str(work / "conf.d")}.items():
        main = main.replace(debian, here)
    root = "user root\n" if os.geteuid() == 0 else ""  # as tests/broker.py: tmp_path is private to this user
    broker.conf_path.write_text(root + main)
    broker.port, broker.tls_port = broker.tls_port or 0, None  # no plain listener: wait for the TLS one
    broker.start()
    station = Subscriber(broker.port, "station-lab-7", MQTT_USERS["station"], ["smearscope/lab-7/cmd/#"],
                         ca_cert=tls_material.ca_cert)
    try:
        station.wait_ready()
    finally:
        station.close()
        broker.stop()
    assert (work / "lib" / "mosquitto.db").exists(), broker.log()[-2000:]


def test_a_retired_stations_retained_messages_are_cleared_with_its_own_account_not_a_technicians(
    tmp_path: Path,
) -> None:
    """docs/STATION.md, "Renaming or retiring a station": the broker keeps a station's retained
    status and run state after it is gone; under the example ACL the station's own account clears
    them (an empty retained message), a technician's cannot (its account writes only commands). A
    dashboard subscribing after the clearing gets neither. Each check ends with a message the
    account may send, which arrives after everything it sent before."""
    broker = MosquittoBroker(tmp_path / "broker", USERS, acl=ACL.read_text())
    broker.start()
    clients: list[mqtt.Client] = []
    subscribers: list[Subscriber] = []

    def retained_after(marker_from: mqtt.Client, marker: str) -> set[str]:
        """The retained topics a dashboard subscribing now is given (a marker then sent by
        `marker_from` arrives after them)."""
        dashboard = Subscriber(broker.port, "dashboard", USERS["dashboard"], ["smearscope/lab-7/#"])
        subscribers.append(dashboard)
        dashboard.wait_ready()
        marker_from.publish(marker, "{}", qos=1).wait_for_publish(5)
        assert dashboard.wait_for(lambda ms: any(m.topic == marker for m in ms), 10), marker
        return {m.topic for m in dashboard.messages if m.retain and m.payload}

    try:
        station = _client(broker.port, "station-lab-7")
        technician = _client(broker.port, "technician")
        clients += [station, technician]
        for topic, payload in (("smearscope/lab-7/status", "offline"), ("smearscope/lab-7/run", '{"run_id": "r"}')):
            station.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
        for topic in ("smearscope/lab-7/run", "smearscope/lab-7/status"):
            technician.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        technician.publish("smearscope/lab-7/cmd/status", "{}", qos=1).wait_for_publish(5)  # after the refused clears
        assert retained_after(station, "smearscope/lab-7/report") == {"smearscope/lab-7/status", "smearscope/lab-7/run"}
        for topic in ("smearscope/lab-7/run", "smearscope/lab-7/status"):  # the documented mosquitto_pub -r -n
            station.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        assert retained_after(station, "smearscope/lab-7/field") == set()
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        for subscriber in subscribers:
            subscriber.close()
        broker.stop()


def test_a_station_reads_its_own_telemetry_topic_and_no_other_stations(tmp_path: Path) -> None:
    """A station hears another station given its station id on its own telemetry topic
    (service.mqtt.twin_watch): the example ACL lets its account read that topic (a cloned station
    logs in with the same account) and not another station's."""
    acl = ACL.read_text()
    acl += "\n" + acl[acl.index("user station-lab-7"):acl.index("# Technicians")].replace("lab-7", "lab-8")
    broker = MosquittoBroker(tmp_path / "broker", USERS, acl=acl)
    broker.start()
    own = Subscriber(broker.port, "station-lab-7", USERS["station-lab-7"], ["smearscope/lab-7/telemetry"])
    other = Subscriber(broker.port, "station-lab-8", USERS["station-lab-8"], ["smearscope/lab-7/telemetry",
                                                                               "smearscope/lab-8/telemetry"])
    twin = _client(broker.port, "station-lab-7")
    try:
        own.wait_ready()
        other.wait_ready()
        twin.publish("smearscope/lab-7/telemetry", '{"instance_id": "twin"}', qos=1).wait_for_publish(5)
        twin.publish("smearscope/lab-8/telemetry", '{"marker": 1}', qos=1).wait_for_publish(5)  # refused: lab-7's account
        assert own.wait_for(lambda ms: any(m.topic == "smearscope/lab-7/telemetry" for m in ms), 10)
        station_8 = _client(broker.port, "station-lab-8")
        try:  # lab-8's own sample, after the twin's: lab-7's never reached it
            station_8.publish("smearscope/lab-8/telemetry", '{"from": "lab-8"}', qos=1).wait_for_publish(5)
            assert other.wait_for(lambda ms: any(b"lab-8" in m.payload for m in ms), 10)
        finally:
            station_8.loop_stop()
            station_8.disconnect()
        assert [m.payload for m in other.messages] == [b'{"from": "lab-8"}']
    finally:
        twin.loop_stop()
        twin.disconnect()
        own.close()
        other.close()
        broker.stop()


def test_a_station_reads_its_own_retained_run_state_and_no_other_stations(tmp_path: Path) -> None:
    """A station started on an older state compares the run state the broker keeps retained for
    it (service.mqtt.run_watch): the example ACL lets its account read that topic, not another
    station's."""
    acl = ACL.read_text()
    acl += "\n" + acl[acl.index("user station-lab-7"):acl.index("# Technicians")].replace("lab-7", "lab-8")
    broker = MosquittoBroker(tmp_path / "broker", USERS, acl=acl)
    broker.start()
    station_7 = _client(broker.port, "station-lab-7")
    station_8 = _client(broker.port, "station-lab-8")
    try:
        station_7.publish("smearscope/lab-7/run", '{"run_id": "r7"}', qos=1, retain=True).wait_for_publish(5)
        station_8.publish("smearscope/lab-8/run", '{"run_id": "r8"}', qos=1, retain=True).wait_for_publish(5)
        reader = Subscriber(broker.port, "station-lab-7", USERS["station-lab-7"],
                            ["smearscope/lab-8/run", "smearscope/lab-7/run"])
        try:
            reader.wait_ready()
            assert reader.wait_for(lambda ms: any(m.topic == "smearscope/lab-7/run" for m in ms), 10)
            assert [(m.topic, m.payload, m.retain) for m in reader.messages] == [
                ("smearscope/lab-7/run", b'{"run_id": "r7"}', True)]
        finally:
            reader.close()
    finally:
        for client in (station_7, station_8):
            client.loop_stop()
            client.disconnect()
        broker.stop()


def test_the_archive_account_reads_every_stations_reports_and_bundles_and_nothing_else(tmp_path: Path) -> None:
    """docs/ARCHIVE.md, "The broker it needs": the example ACL's `archive` account is given every
    station's `report` and `fhir` messages and no field, cells or command, and may send nothing (its
    refused report is followed by a station's, which a technician receives alone)."""
    broker = MosquittoBroker(tmp_path / "broker", {**USERS, "archive": "a"}, acl=ACL.read_text())
    broker.start()
    archive = Subscriber(broker.port, "archive", "a", ["smearscope/#"])
    technician = Subscriber(broker.port, "technician", USERS["technician"], ["smearscope/+/report"])
    clients: list[mqtt.Client] = []
    try:
        archive.wait_ready()
        technician.wait_ready()
        station = _client(broker.port, "station-lab-7")
        writer = _client(broker.port, "technician")
        clients += [station, writer]
        archiver = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        archiver.username_pw_set("archive", "a")
        archiver.connect("127.0.0.1", broker.port, 10)
        archiver.loop_start()
        clients.append(archiver)
        archiver.publish("smearscope/lab-7/report", "forged", qos=1).wait_for_publish(5)
        writer.publish("smearscope/lab-7/cmd/status", "{}", qos=1).wait_for_publish(5)
        for kind in ("field", "cells", "status", "fhir", "report"):
            station.publish(f"smearscope/lab-7/{kind}", kind, qos=1).wait_for_publish(5)
        assert archive.wait_for(lambda ms: any(m.topic.endswith("/report") for m in ms), 10)
        assert technician.wait_for(lambda ms: len(ms) >= 1, 10)
        assert [(m.topic, m.payload) for m in archive.messages] == [
            ("smearscope/lab-7/fhir", b"fhir"), ("smearscope/lab-7/report", b"report")]
        assert [m.payload for m in technician.messages] == [b"report"]
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        archive.close()
        technician.close()
        broker.stop()


def test_the_example_station_config_publishes_under_the_example_acl_renamed_to_its_station(
        tmp_path: Path, credentials_dir: Path) -> None:
    """A second station set up from the two examples: config/station.example.toml with its station
    id, the example ACL's station block renamed to that id (as the ACL says). The example config
    logged in as `ward3-scope1` while the ACL names a station's account `station-<id>`: the login
    worked and the ACL gave that account nothing, so no report reached anyone."""
    example = tomllib.loads((ROOT / "config" / "station.example.toml").read_text())
    station_id, section = example["station_id"], example["mqtt"]
    acl = ACL.read_text().replace("lab-7", station_id)
    broker = MosquittoBroker(tmp_path / "broker", {section["username"]: MQTT_USERS["station"], "technician": "t"},
                             acl=acl)
    broker.start()
    technician = Subscriber(broker.port, "technician", "t", [f"{section['topic_prefix']}/{station_id}/report"])
    keep = ("username", "password_credential", "topic_prefix", "qos")
    config = MqttConfig.model_validate({**{key: section[key] for key in keep}, "host": "127.0.0.1",
                                        "port": broker.port, "outbox": {"path": str(tmp_path / "outbox.sqlite3")}})
    publisher = MqttPublisher(config, station_id, Outbox.from_config(config.outbox))
    try:
        technician.wait_ready()
        publisher.start()
        assert publisher.wait_until_connected(10), (publisher.state, broker.log()[-2000:])
        publisher.publish_report("report", "first", b"{}", "1")
        assert technician.wait_for(lambda ms: len(ms) == 1, 10), (publisher.state, broker.log()[-2000:])
        assert json.loads(technician.messages[0].payload)["report_id"] == "first"
    finally:
        publisher.stop(drain_timeout=0)
        publisher.outbox.close()
        technician.close()
        broker.stop()
