"""A second station publishing under this station's id (a cloned config, another `client_id`):
the station reads its own telemetry topic and says, once per other process, when a sample there
carries another instance id than its own (service.mqtt.publisher's `instance`)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class TwinWatch:
    """The samples heard on the station's own telemetry topic, and the other processes among them."""

    def __init__(self, station_id: str, topic: str, own: Mapping[str, str]) -> None:
        self.station_id = station_id
        self.topic = topic
        self.own = dict(own)
        self._lock = threading.Lock()
        self.heard = 0  # samples read back, this process's own among them
        self.others: dict[str, str] = {}  # instance id -> host, of the other processes heard

    def sample(self, payload: bytes) -> None:
        """One message on the telemetry topic: an ERROR the first time another process's is heard."""
        try:
            values = json.loads(payload)
        except ValueError:
            return
        instance = values.get("instance_id") if isinstance(values, dict) else None
        with self._lock:
            self.heard += 1
            if not isinstance(instance, str) or instance == self.own["instance_id"] or instance in self.others:
                return
            host = str(values.get("host", "host not said"))
            self.others[instance] = host
        logger.error(
            "another station publishes as %s: telemetry from host %s (instance %s) on %s, this station is host %s "
            "(instance %s); their reports, runs, retained status and command answers are mixed on the broker "
            "and the dashboards: give each station its own station_id", self.station_id, host, instance, self.topic,
            self.own["host"], self.own["instance_id"])
