"""A parked outbox message (too large for the last connection's packet limit) gets one try at the
next connection; paho refusing the publish because its queue is full (command answers, status and
telemetry share it with the drain) is no try: the message is handed to paho once there is room.

A real paho client (not connected: paho keeps a QoS 1 message it cannot send in its queue, which
`max_queued_messages` bounds) and a real outbox file; no broker is needed for paho's refusal."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from smearscope.service.mqtt.inflight import InFlight
from smearscope.service.mqtt.outbox import Outbox


def test_a_parked_messages_retry_is_not_used_up_by_pahos_full_queue(tmp_path: Path) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="queue-full", protocol=mqtt.MQTTv5)
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        seq = outbox.put("report", "smearscope/s/report", b"x" * 400, report_id="r1", schema_version="1.2")
        inflight = InFlight(outbox, window=8)
        stop = threading.Event()
        inflight.new_connection(max_packet_size=100)  # a connection whose limit the report is over
        assert inflight.send(client, 0, lambda m: None, stop) == seq
        assert list(inflight.parked) == [seq] and len(inflight) == 0

        inflight.new_connection(max_packet_size=None)  # the next connection: its one try
        client.max_queued_messages_set(1)
        status = client.publish("smearscope/s/status", b"online", qos=1)  # paho's queue now full
        assert status.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        refused = client.publish("smearscope/s/probe", b"", qos=1)
        assert refused.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE  # what the drain's publish meets
        assert inflight.send(client, 0, lambda m: None, stop) == 0  # refused: not past it
        assert len(inflight) == 0

        client.max_queued_messages_set(10)  # room again (the status acknowledged)
        assert inflight.send(client, 0, lambda m: None, stop) == seq
        assert len(inflight) == 1  # handed to paho: its try this connection
        assert len(inflight.parked) == 1  # still counted parked until acknowledged
