"""The bound on a telemetry sample: the connection's packet limit (`mqtt.max_packet_size`, lowered to
the broker's Maximum Packet Size when its MQTT 5 CONNACK announces one). A PUBLISH packet over it
makes the broker close the connection (reason 0x95): sent at each sample (and at each connection)
it would drop the station's connection again and again, the reports' queue with it. Such a sample
is not sent: said once at WARNING with its size and the limit, at DEBUG while samples stay too
large, and at INFO once one fits again."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def telemetry_packet_size(topic: str, payload: bytes) -> int:
    """Bytes of the QoS 0 PUBLISH packet paho sends for a sample (MQTT 5's empty property length
    counted, one byte more than 3.1.1)."""
    remaining = 2 + len(topic.encode()) + len(payload) + 1
    size, n = 1, remaining
    while n >= 128:
        n //= 128
        size += 1
    return 1 + size + remaining


class TelemetryBound:
    """Whether a sample fits the connection's packet limit; says a sample that does not, once."""

    def __init__(self) -> None:
        self._over = False

    def fits(self, topic: str, payload: bytes, limit: int | None) -> bool:
        size = telemetry_packet_size(topic, payload)
        if limit is None or size <= limit:
            if self._over:
                logger.info("telemetry samples fit the packet limit again (%d bytes, limit %s): sent", size, limit)
            self._over = False
            return True
        if not self._over:
            logger.warning("telemetry sample of %d bytes as a packet is over the connection's packet limit of "
                           "%d bytes (the broker's max_packet_size, or the station's mqtt.max_packet_size if "
                           "lower): not sent, as the broker would close the connection; the reports' queue "
                           "goes on. Raise the broker's max_packet_size (the sample grows with the parked "
                           "messages and held runs it names)", size, limit)
        else:
            logger.debug("telemetry sample of %d bytes still over the packet limit of %d: not sent", size, limit)
        self._over = True
        return False
