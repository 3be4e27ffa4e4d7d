"""The publisher's connection as the broker sees it, as an immutable snapshot."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

ConnectionStatus = Literal["stopped", "connecting", "connected", "refused", "disconnected", "taken_over"]


@dataclass(frozen=True)
class PublisherState:
    """A snapshot of the connection as the broker sees it (never more optimistic than that)."""

    status: ConnectionStatus
    protocol: Literal["MQTTv5", "MQTTv311"]
    last_error: str | None = None
    last_reason_code: int | None = None
    connected_since: float | None = None
    connects: int = 0
    refusals: int = 0
    in_flight: int = 0
    delivered: int = 0
    failed_acks: int = 0
    #: Outbox messages too large for the connection's packet limit, left in the outbox.
    parked: int = 0
    #: The packet limit in force: the configured one, lowered by the broker's (MQTT 5 CONNACK).
    max_packet_size: int | None = None

    @property
    def connected(self) -> bool:
        return self.status == "connected"
