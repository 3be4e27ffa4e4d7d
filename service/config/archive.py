"""`smearscope archive`: typed settings of the report archive, built from its command line.

The archive subscribes to every station's reports and FHIR bundles and keeps them on disk
(service/archive). Its broker connection is an `MqttConfig` like the station's; the password is
never part of the model (a file or the systemd credential, read by the command line).
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field, field_validator

from smearscope.device.config_fields import ConfigPath
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.hl7.encode import hd

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
    hl7_sending_facility: str | None = Field(
        default=None,
        title="HL7 sending facility (MSH-4)",
        description="MSH-4 of each HL7 message, an HD: a namespace id (up to 20 characters) or "
        "namespace^universal id^type (table 0301: ISO, DNS, ...), as the lab's interface set it up; none: "
        "the station id of the report (docs/HL7.md).",
    )
    hl7_receiving_application: str | None = Field(
        default=None,
        title="HL7 receiving application (MSH-5)",
        description="MSH-5 of each HL7 message, an HD naming the lab system or interface engine that "
        "receives it; none: empty.",
    )
    hl7_receiving_facility: str | None = Field(
        default=None,
        title="HL7 receiving facility (MSH-6)",
        description="MSH-6 of each HL7 message, an HD naming the lab (facility) that receives it; none: empty.",
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

    @field_validator("hl7_sending_facility", "hl7_receiving_application", "hl7_receiving_facility")
    @classmethod
    def _is_an_hd(cls, value: str | None) -> str | None:
        """An HL7 HD with no delimiter but '^' between its components (service.hl7.encode.hd)."""
        if value is not None:
            hd(value)
        return value
