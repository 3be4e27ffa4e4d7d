"""`smearscope archive`: typed settings of the report archive, built from its command line.

The archive subscribes to every station's reports and FHIR bundles and keeps them on disk
(service/archive). Its broker connection is an `MqttConfig` like the station's; the password is
never part of the model (a file or the systemd credential, read by the command line).
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

from smearscope.device.config_fields import ConfigPath
from smearscope.service.config.mqtt import MqttConfig

logger = logging.getLogger(__name__)

#: 30 days: an archive machine switched off over a long holiday still finds its session.
DEFAULT_SESSION_EXPIRY_S = 30 * 24 * 3600


class ArchiveConfig(BaseModel):
    """Where the archive connects, as whom, and where it keeps the reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mqtt: MqttConfig = Field(
        title="Broker connection",
        description="Host, port, TLS, user and topic prefix of the broker the stations publish to; "
        "client_id is the archive's fixed client id (its session is kept under it).",
    )
    directory: ConfigPath = Field(
        title="Archive folder",
        description="Folder of the archive: one folder per station, one per month under it, the "
        "index (index.sqlite) at the top.",
    )
    hl7_directory: ConfigPath | None = Field(
        default=None,
        title="HL7 output folder",
        description="Folder an interface engine reads: each specimen report the archive stores is also "
        "written there as an HL7 v2.5.1 ORU^R01 message, <report_id>.hl7, whole (temporary file, fsync, "
        "rename) before it is acknowledged; none: no HL7 output (docs/HL7.md).",
    )
    hl7_mllp: str | None = Field(
        default=None, pattern=r"^\S+:[0-9]{1,5}$",
        title="HL7 MLLP receiver",
        description="HOST:PORT of a lab system's MLLP listener: each specimen report the archive stores is "
        "also sent there as an HL7 v2.5.1 ORU^R01 message and acknowledged to the broker only once the "
        "receiver answers AA or CA; until then it is held and sent again every retry_s (docs/HL7.md).",
    )
    hl7_mllp_timeout_s: float = Field(
        default=10.0, gt=0, le=300,
        title="MLLP ACK timeout (s)",
        description="Seconds to connect to the MLLP receiver and to wait for its ACK before the report is "
        "held and sent again.",
    )
    session_expiry_s: int = Field(
        default=DEFAULT_SESSION_EXPIRY_S, ge=60, le=0xFFFFFFFF,
        title="Session expiry (s)",
        description="MQTT 5 Session Expiry Interval: how long the broker keeps the archive's session "
        "and queues its reports while the archive is away.",
    )
    receive_maximum: int = Field(
        default=20, ge=1, le=1000,
        title="Receive maximum",
        description="Reports the broker may send before the archive has acknowledged earlier ones "
        "(MQTT 5 Receive Maximum); with as many QoS 0 messages (the rest dropped), the most held in "
        "memory while the disk is full.",
    )
    max_message_bytes: int = Field(
        default=4 * 2**20, ge=1024,
        title="Largest message (bytes)",
        description="A report or bundle larger than this is refused (logged, not stored).",
    )
    retry_s: float = Field(
        default=5.0, gt=0, le=3600,
        title="Storage retry (s)",
        description="Seconds between tries to store a report the disk refused; it stays "
        "unacknowledged meanwhile, so the broker keeps it.",
    )
