"""The broker ACL shipped as config/mosquitto.acl.example, loaded by a real mosquitto: each account
may send what docs/MQTT.md says and nothing more (a refused publish is dropped by the broker)."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as mqtt
from broker import MosquittoBroker, Subscriber
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parents[1]
ACL = ROOT / "config" / "mosquitto.acl.example"
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
