"""`[mqtt.outbox]`: where and how much the durable store-and-forward outbox may hold.

The settings only: the outbox itself is opened by the station (`Outbox.from_config`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from smearscope.device.config_fields import ConfigPath

logger = logging.getLogger(__name__)

#: What happens above a bound (see service.mqtt.outbox).
OverflowPolicy = Literal["drop_oldest_field_keep_reports"]


class OutboxConfig(BaseModel):
    """Where and how much the durable store-and-forward outbox may hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: ConfigPath = Field(
        default=Path("/var/lib/smearscope/outbox.sqlite3"),
        title="Outbox file",
        description="SQLite file (WAL mode) holding every message until the broker acknowledges it.",
    )
    max_messages: int = Field(
        default=50_000,
        ge=1,
        title="Message bound",
        description="Above this many stored messages the overflow policy evicts field messages.",
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        title="Byte bound",
        description="Above this many stored payload bytes the overflow policy evicts field messages. The "
        "file also holds the open and last 4 closed specimen runs' cells, outside this bound (docs/MQTT.md).",
    )
    overflow_policy: OverflowPolicy = Field(
        default="drop_oldest_field_keep_reports",
        title="Overflow policy",
        description=(
            "What happens above a bound: the oldest per-field messages are evicted; final specimen "
            "reports are never evicted (the bound is then exceeded and an error is logged)."
        ),
    )
