"""What travels on the wire besides the report: the JSON envelope and the MQTT 5 properties.

The envelope (docs/MQTT.md) carries the same metadata as the MQTT 5 user properties, so MQTT 3.1.1
consumers lose nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smearscope.service.mqtt.outbox import MessageKind, OutboxMessage
from smearscope.service.mqtt.wall_clock import RELEASED

logger = logging.getLogger(__name__)

ENVELOPE_VERSION = 1


def build_envelope(
    kind: MessageKind,
    station_id: str,
    report_id: str,
    message_id: str,
    schema_version: str,
    created_at: float,
    body: bytes,
) -> bytes:
    """Wrap a JSON body in the envelope (docs/MQTT.md) without re-encoding the body."""
    json.loads(body)  # a malformed body is the producer's bug: fail here, not at the consumer
    header = json.dumps(
        {
            "envelope_version": ENVELOPE_VERSION,
            "kind": kind,
            "station_id": station_id,
            "report_id": report_id,
            "message_id": message_id,
            "schema_version": schema_version,
            "created_at": datetime.fromtimestamp(created_at, timezone.utc).isoformat(),
        },
        separators=(",", ":"),
    ).encode()
    return header[:-1] + b',"body":' + body + b"}"


def message_properties(message: OutboxMessage, field_expiry_s: int | None) -> Properties:
    """MQTT 5 PUBLISH properties of an outbox message; a field message's expiry counts from its
    creation, so one that waited in the outbox has less of it left. A retained message (the live
    run state) never carries it: the broker would stop retaining it once expired, and the run state
    it keeps is what tells a station restored from an older backup (service.mqtt.run_watch)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = message.content_type
    props.PayloadFormatIndicator = 1
    props.UserProperty = [
        ("schema_version", message.schema_version),
        ("report_id", message.report_id),
        ("message_id", message.message_id),
        ("kind", message.kind),
    ]
    if field_expiry_s and message.kind != "report" and not message.retain:
        # never more than the whole lifetime: one stored before the wall clock was set back seems
        # to come from the future
        age = time.time() - message.created_at
        if message.created_at < RELEASED <= time.time():  # stamped on a wrong clock: its age is not known
            age = 0.0
        props.MessageExpiryInterval = max(1, min(field_expiry_s, int(field_expiry_s - age)))
    return props


def response_properties(correlation: bytes | None) -> Properties:
    """MQTT 5 PUBLISH properties of a command response (the request's correlation data back)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/json"
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def response_body(response: Mapping[str, Any]) -> str:
    """A command's answer as JSON; one that cannot be serialised becomes a command_failed answer."""
    try:
        return json.dumps(dict(response), default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        return json.dumps({"ok": False, "error": "command_failed", "message": f"response not serialisable: {exc}"})
