"""`smearscope archive`: typed settings of the report archive, built from its command line.

The archive subscribes to every station's reports and FHIR bundles and keeps them on disk
(service/archive). Its broker connection is an `MqttConfig` like the station's; the password is
never part of the model (a file or the systemd credential, read by the command line).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from smearscope.device.config_fields import ConfigPath
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.hl7.encode import hd
from smearscope.service.hl7.header import Addressing
from smearscope.service.hl7.mllp import parse_address

logger = logging.getLogger(__name__)

#: 30 days: an archive machine switched off over a long holiday still finds its session.
DEFAULT_SESSION_EXPIRY_S = 30 * 24 * 3600


class Hl7OutputConfig(BaseModel):
    """Where the archive's HL7 messages go and how they are addressed (docs/HL7.md): the running
    archive's settings (ArchiveConfig has them) and `archive send-hl7`'s."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hl7_directory: ConfigPath | None = Field(
        default=None,
        title="HL7 output folder",
        description="Folder an interface engine reads: each specimen report the archive stores is also "
        "written there as an HL7 v2.5.1 ORU^R01 message, <report_id>.hl7, whole (temporary file, fsync, "
        "rename) before it is acknowledged; none: no HL7 output (docs/HL7.md).",
    )
    hl7_mllp: str | None = Field(
        default=None,
        title="HL7 MLLP receiver",
        description="HOST:PORT of a lab system's MLLP listener (an IPv6 address in brackets, the port 1 to "
        "65535; service.hl7.mllp.parse_address, as the archive connects): each specimen report the archive stores is "
        "also sent there as an HL7 v2.5.1 ORU^R01 message and acknowledged to the broker only once the "
        "receiver answers AA or CA; until then it is held and sent again every retry_s (docs/HL7.md).",
    )
    hl7_mllp_timeout_s: float = Field(
        default=10.0, gt=0, le=300, allow_inf_nan=False,
        title="MLLP ACK timeout (s)",
        description="Seconds one MLLP exchange may take (looking the host up, connecting, sending, the ACK) "
        "before the report is held and sent again; above 0, at most 300.",
    )
    hl7_mllp_error_hold_s: float = Field(
        default=600.0, ge=0, le=86400, allow_inf_nan=False,
        title="MLLP error hold (s)",
        description="Seconds a report the lab system answers AE or CE (an application or commit error: "
        "transient), or with no ACK of it (an answer over 1 MiB, not an ACK), is held and sent again every retry_s, the reports behind it waiting, before it is recorded as "
        "not accepted and the archive goes on (`archive send-hl7 --resend` sends it later); counted from each such "
        "answer to the next, not while the lab system cannot be reached (an answer after an outage counts from the last try that found none), and over restarts (kept in the index); 0: an AE is final at once, as an AR or CR always is. At most 86400 (docs/HL7.md).",
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
    hl7_processing_id: Literal["P", "T", "D"] = Field(
        default="P",
        title="HL7 processing id (MSH-11)",
        description="MSH-11 of each HL7 message (table 0103): P production, T training (test messages while "
        "a lab validates the interface), D debugging. A delivery is recorded with it: a report delivered "
        "with T or D is not taken as delivered to that destination in production (docs/HL7.md).",
    )

    @field_validator("hl7_sending_facility", "hl7_receiving_application", "hl7_receiving_facility")
    @classmethod
    def _is_an_hd(cls, value: str | None) -> str | None:
        """An HL7 HD with no delimiter but '^' between its components (service.hl7.encode.hd)."""
        if value is not None:
            hd(value)
        return value

    @field_validator("hl7_mllp")
    @classmethod
    def _is_host_port(cls, value: str | None) -> str | None:
        """HOST:PORT as the archive connects to it (service.hl7.mllp.parse_address): a port of 0 or
        99999, or no host, is refused here, not by the daemon."""
        if value is not None:
            parse_address(value)
        return value

    @property
    def mllp_address(self) -> tuple[str, int] | None:
        """(host, port) of `hl7_mllp`, None without one."""
        return parse_address(self.hl7_mllp) if self.hl7_mllp is not None else None

    @property
    def addressing(self) -> Addressing:
        """MSH-4, MSH-5, MSH-6 and MSH-11 of the messages."""
        return Addressing(self.hl7_sending_facility, self.hl7_receiving_application, self.hl7_receiving_facility,
                          self.hl7_processing_id)


class ArchiveConfig(Hl7OutputConfig):
    """Where the archive connects, as whom, and where it keeps the reports (and its HL7 output)."""

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
