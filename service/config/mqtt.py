"""`[mqtt]`: typed MQTT settings for the publisher, embedded by the station config root.

The broker password is never part of this model: it names a systemd credential
(`LoadCredential=`), read from `$CREDENTIALS_DIRECTORY` when the publisher is built
(service.mqtt.credentials). Validators are pure (no file or network access), so
`--validate-config` is side-effect free.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from smearscope.device.config_fields import ConfigPath
from smearscope.service.config.outbox import OutboxConfig

logger = logging.getLogger(__name__)

#: systemd/smearscope.service's TimeoutStopSec: after it, systemd kills the station with SIGKILL.
UNIT_TIMEOUT_STOP_S = 45
#: Left of it for the rest of a stop even when the workers join at once: the publisher's threads
#: joined and the retained "offline" (7 s), closing (5 s), 3 s spare. The stop itself holds to one
#: budget at run time (service/station/stopping.py), which shortens the drain after slow joins;
#: this bound refuses, early, a drain that budget could never give.
STOP_MARGIN_S = 15
MAX_STOP_DRAIN_S = UNIT_TIMEOUT_STOP_S - STOP_MARGIN_S


class MqttTlsConfig(BaseModel):
    """TLS to the broker; the CA file is required so the broker's certificate is always verified."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: ConfigPath = Field(
        title="CA certificate",
        description="PEM file of the certificate authority that signed the broker's certificate.",
    )
    certfile: ConfigPath | None = Field(
        default=None,
        title="Client certificate",
        description="PEM client certificate for mutual TLS; set together with keyfile.",
    )
    keyfile: ConfigPath | None = Field(
        default=None,
        title="Client key",
        description="PEM private key of the client certificate; set together with certfile.",
    )
    insecure: bool = Field(
        default=False,
        title="Skip host name check",
        description="Do not check that the broker certificate names the host. Testing only.",
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> MqttTlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("tls.certfile and tls.keyfile must be set together")
        return self


class MqttConfig(BaseModel):
    """Connection, security and delivery settings of the station's MQTT publisher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        default="localhost",
        min_length=1,
        title="Broker host",
        description="Broker host name or IP address, alone: no scheme (mqtt://), port (see port), path or spaces.",
    )
    port: int = Field(
        default=1883,
        ge=1,
        le=65535,
        title="Broker port",
        description="TCP port of the broker listener (usually 1883, or 8883 with TLS).",
    )
    transport: Literal["tcp", "websockets"] = Field(
        default="tcp",
        title="Transport",
        description=(
            "'tcp': MQTT on its own port (1883, 8883 with TLS); 'websockets': MQTT over WebSockets, to a "
            "listener such as mosquitto's 'protocol websockets' (with [mqtt.tls]: wss)."
        ),
    )
    websocket_path: str = Field(
        default="/mqtt",
        pattern=r"^/[^\s]*$",
        title="WebSocket path",
        description="HTTP path of the WebSockets endpoint, with transport = 'websockets' (mosquitto takes any).",
    )
    client_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        title="Client id",
        description="MQTT client id; defaults to 'smearscope-<station_id>'.",
    )
    keepalive: int = Field(
        default=30,
        ge=5,
        le=65535,
        title="Keepalive (s)",
        description="Seconds between pings; the broker sends the Last Will after 1.5x this silence.",
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto",
        title="Protocol version",
        description="'auto' tries MQTT 5 and falls back to 3.1.1 if the broker refuses version 5.",
    )
    tls: MqttTlsConfig | None = Field(
        default=None, title="TLS", description="TLS settings; absent means plain TCP."
    )
    username: str | None = Field(
        default=None, min_length=1, title="User name", description="Broker user name."
    )
    password_credential: str | None = Field(
        default=None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.@-]+$",
        title="Password credential",
        description=(
            "Name of the systemd credential (LoadCredential=<name>:<path>) holding the broker "
            "password; it is read from $CREDENTIALS_DIRECTORY/<name>, never from this file."
        ),
    )
    topic_prefix: str = Field(
        default="smearscope",
        pattern=r"^[^#+/]+$",
        title="Topic prefix",
        description="First topic level (no '/', '+' or '#'); topics are '<prefix>/<station_id>/...'.",
    )
    qos: Literal[1, 2] = Field(
        default=1,
        title="Report QoS",
        description="QoS of field and report messages; 0 is not allowed (no acknowledgement).",
    )
    max_inflight: int = Field(
        default=20,
        ge=1,
        le=1000,
        title="Max in flight",
        description="Outbox messages handed to the broker but not yet acknowledged, at most.",
    )
    max_packet_size: int = Field(
        default=262_144,
        ge=4096,
        le=268_435_455,
        title="Max packet size (bytes)",
        description=(
            "Largest PUBLISH packet the station sends; the broker's own Maximum Packet Size (MQTT 5 "
            "CONNACK) lowers it. Per-cell detail is split into messages under it; a message still "
            "larger is parked in the outbox (logged, counted), never blocking the others."
        ),
    )
    publish_cells: bool = Field(
        default=True,
        title="Publish per-cell detail",
        description=(
            "Publish each field's cells (box, class, size) as `cells` messages beside the compact "
            "field report; they are evicted from the outbox before reports, like field messages."
        ),
    )
    field_message_expiry_s: int | None = Field(
        default=None,
        ge=1,
        title="Field message expiry (s)",
        description=(
            "MQTT 5 MessageExpiryInterval for per-field messages (field and cells), counted from "
            "their creation; such messages, and run states, older than this are dropped from the "
            "outbox. Reports, FHIR bundles and the retained run state never expire on the broker."
        ),
    )
    reconnect_min_delay_s: int = Field(
        default=1, ge=1, title="Reconnect delay min (s)", description="First reconnect backoff."
    )
    reconnect_max_delay_s: int = Field(
        default=60, ge=1, title="Reconnect delay max (s)", description="Backoff ceiling."
    )
    telemetry_interval_s: float = Field(
        default=30.0,
        gt=0,
        title="Telemetry period (s)",
        description="How often the telemetry source is sampled and published (QoS 0, not stored); it is also "
        "sent at each connection to the broker.",
    )
    stop_drain_timeout_s: float = Field(
        default=10.0,
        ge=0,
        title="Drain on stop (s)",
        description=f"At shutdown, how long to keep sending the outbox before disconnecting; at most "
        f"{MAX_STOP_DRAIN_S} s, the most a stop inside the unit's TimeoutStopSec={UNIT_TIMEOUT_STOP_S} can give; "
        "a stop whose workers took long to finish drains for what its budget leaves, less than this.",
    )
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig,
        title="Outbox",
        description="Durable store-and-forward queue of field and report messages.",
    )

    @field_validator("stop_drain_timeout_s")
    @classmethod
    def _a_drain_the_unit_lets_finish(cls, seconds: float) -> float:
        # Past TimeoutStopSec systemd SIGKILLs the station mid-stop: the unit ends failed (Result:
        # timeout), without the retained "offline" (the broker's will says it later) or the summary.
        if seconds > MAX_STOP_DRAIN_S:
            raise ValueError(
                f"{seconds:g} s leaves less than {STOP_MARGIN_S} s of systemd's TimeoutStopSec={UNIT_TIMEOUT_STOP_S} "
                "(systemd/smearscope.service) for the rest of the stop, so systemd could kill the station "
                f"mid-stop (SIGKILL, the unit failed with Result: timeout); at most {MAX_STOP_DRAIN_S} (unsent "
                "messages stay in the outbox for the next start)")
        return seconds

    @field_validator("host")
    @classmethod
    def _a_host_not_a_url(cls, host: str) -> str:
        # A URL or "name:port" copied from the broker's docs resolves nowhere: the station would
        # retry "Name or service not known" for ever. An IPv6 address has two or more colons.
        odd = sorted({c for c in host if c.isspace() or c in "/@[]?#"})
        if "://" in host or odd or host.count(":") == 1:
            what = "a URL" if "://" in host else "a port" if host.count(":") == 1 and not odd else (
                "the characters " + " ".join(repr(c) for c in odd))
            raise ValueError(f"{host!r} holds {what}: host is a host name or IP address alone "
                             '(e.g. host = "broker.lab", port = 8883, [mqtt.tls] for TLS)')
        return host

    @property
    def address(self) -> str:
        """host:port as the log and the messages name the broker; an IPv6 address in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @model_validator(mode="after")
    def _cross_field_checks(self) -> MqttConfig:
        if self.password_credential is not None and self.username is None:
            raise ValueError("password_credential needs a username")
        if self.reconnect_min_delay_s > self.reconnect_max_delay_s:
            raise ValueError("reconnect_min_delay_s must not exceed reconnect_max_delay_s")
        return self
