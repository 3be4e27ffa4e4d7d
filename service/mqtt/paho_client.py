"""The paho client as the station uses it, and which of paho's own log lines matter how much.

paho the way its authors intend: callback API version 2, a retained Last Will on the status
topic, a bound on queued messages, reconnects with backoff. The publisher adds its callbacks and
connects (service.mqtt.publisher).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, LogLevel, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.mqtt.secrets import tls_context
from smearscope.service.mqtt.wall_clock import clock_reading

logger = logging.getLogger(__name__)

#: paho's network loop says this when it finds no socket: after our own disconnect, or after a
#: lost connection or failed reconnect, which on_disconnect / on_connect_fail report already.
PAHO_NO_SOCKET = "Client is not connected"
#: ... and these when the connection breaks under it (broker killed, network gone): the outage
#: itself, which on_disconnect reports as "connection lost"; a warning, with the socket's reason.
PAHO_SOCKET_LOST = ("failed to receive on socket", "timeout on socket")
#: Messages paho may hold beyond the outbox's max_inflight: status and command responses.
STATUS_SLACK = 32
#: MQTT 5 reason code "Packet too large".
PACKET_TOO_LARGE = 0x95


class StationClient(mqtt.Client):
    """paho's client, reading one more PUBACK: mosquitto answers a PUBLISH over its
    `message_size_limit` with PUBACK reason 0x95 (Packet too large), a code MQTT 5 allows only in
    CONNACK and DISCONNECT. paho takes that PUBACK for a protocol error and drops the connection, so
    the message went again first at every reconnect and every message behind it waited for ever; read
    so, it reaches on_publish as a rejection the publisher parks (service.mqtt.inflight)."""

    def _handle_pubackcomp(self, cmd):  # type: ignore[no-untyped-def]  # paho's private hook
        packet = self._in_packet["packet"]
        if (cmd != "PUBACK" or self._protocol != MQTTProtocolVersion.MQTTv5 or len(packet) < 3
                or packet[2] != PACKET_TOO_LARGE):
            return super()._handle_pubackcomp(cmd)
        (mid,) = struct.unpack("!H", bytes(packet[:2]))
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received PUBACK (Mid: %d, Packet too large)", mid)
        reason = ReasonCode(PacketTypes.DISCONNECT, identifier=PACKET_TOO_LARGE)  # its name in paho's table
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, Properties(PacketTypes.PUBACK))  # type: ignore[no-untyped-call]
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def renew_tls(self, context: ssl.SSLContext) -> None:
        """Use `context` from the next connection on (paho's tls_set_context takes one only once):
        renewed certificate files without a new client, whose queue and callbacks stay."""
        self._ssl_context = context
        self._tls_insecure = not context.check_hostname


def configured_client(config: MqttConfig, client_id: str, protocol: MQTTProtocolVersion,
                      password: str | None, status_topic: str | None, instance_id: str | None = None) -> mqtt.Client:
    """A paho client with credentials, TLS, the retained "offline" Last Will (on `status_topic`;
    None: no will, for a consumer such as the archive; under MQTT 5 with the user property
    `instance_id`, which process it is of: service.mqtt.take_over), bounds, backoff and callbacks that
    cannot end its network thread; no callbacks yet, not connected."""
    client = StationClient(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        clean_session=None if protocol == MQTTProtocolVersion.MQTTv5 else True,
        transport=config.transport,
    )
    if config.transport == "websockets":
        client.ws_set_options(path=config.websocket_path)
    if config.username is not None:
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        client.tls_set_context(tls_context(config.tls))  # as tls_set would; renewable (service.mqtt.secrets)
        client.tls_insecure_set(config.tls.insecure)
    if status_topic is not None:
        client.will_set(status_topic, "offline", qos=1, retain=True,
                        properties=instance_properties(PacketTypes.WILLMESSAGE, instance_id, protocol))
    # The drain loop bounds outbox traffic to max_inflight; the slack is for status and
    # command responses. Equal limits mean paho never parks a message in its "queued" state.
    client.max_inflight_messages_set(config.max_inflight + STATUS_SLACK)
    client.max_queued_messages_set(config.max_inflight + STATUS_SLACK)
    client.reconnect_delay_set(config.reconnect_min_delay_s, config.reconnect_max_delay_s)
    # An exception in a callback is logged by paho (its ERR line) and the network thread goes on:
    # raised, it would end that thread, and with it every publish and command, for good.
    client.suppress_exceptions = True
    return client


#: A status message's Message Expiry Interval (MQTT 5's longest, 136 years: never in practice).
STATUS_EXPIRY_S = 2**32 - 1


def instance_properties(packet_type: int, instance_id: str | None, protocol: MQTTProtocolVersion) -> Properties | None:
    """MQTT 5 properties naming the process (user property `instance_id`) for its status messages,
    with the longest Message Expiry Interval, which the broker counts down from their publication so
    a retained one tells its age (service.mqtt.take_over.status_age_s); None under 3.1.1 or without
    an instance id."""
    if instance_id is None or protocol != MQTTProtocolVersion.MQTTv5:
        return None
    properties = Properties(packet_type)  # type: ignore[no-untyped-call]
    properties.UserProperty = [("instance_id", instance_id)]
    properties.MessageExpiryInterval = STATUS_EXPIRY_S
    return properties


def subscribe_commands(client: mqtt.Client, command_filter: str, protocol: MQTTProtocolVersion) -> None:
    """Subscribe to the station's commands at QoS 1. Under MQTT 5 with Retain As Published, so a
    command published with the retain flag arrives with it whether live or stored, and is not run;
    MQTT 3.1.1 clears the flag on live delivery, so there only a stored one is told apart."""
    if protocol == MQTTProtocolVersion.MQTTv5:
        client.subscribe(command_filter, options=SubscribeOptions(qos=1, retainAsPublished=True))
    else:
        client.subscribe(command_filter, qos=1)


def paho_log_level(level: int, line: str, not_connected: bool) -> int:
    """The logging level for one of paho's log lines: paho's own, except these.

    Its loop finding no socket while we are not connected (a clean stop, a lost connection, a
    failed reconnect) is expected and already reported by our callbacks: DEBUG; so is a socket
    breaking before the CONNACK (the publisher says why, once: `closed_before_connack`). A socket
    breaking under a connection (the broker or network went away) is an outage, which the daemon
    rides out with its outbox: a WARNING, not an ERROR.
    """
    std_level = mqtt.LOGGING_LEVEL[LogLevel(level)]
    if line.startswith((PAHO_NO_SOCKET, *PAHO_SOCKET_LOST)) and not_connected:
        return logging.DEBUG
    if line.startswith(PAHO_SOCKET_LOST) and std_level > logging.WARNING:
        return logging.WARNING
    return std_level


def connect_fail_message(config: MqttConfig, exc: BaseException | None) -> str:
    """What the station says when paho could not open the connection (socket, DNS or TLS)."""
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else "network, DNS or TLS failure"
    if isinstance(exc, ssl.SSLError):
        reason = f"TLS failure: {reason}"
        if re.search(r"not yet valid|expired", str(exc)):  # judged against this station's wall clock
            reason += f"; {clock_reading()}"
    return (f"cannot reach broker {config.address} ({reason}){tls_hint(config, exc)}{network_hint(config, exc)}; "
            f"retrying with backoff up to {config.reconnect_max_delay_s} s, reports wait in the outbox")


def network_hint(config: MqttConfig, exc: BaseException | None) -> str:
    """What to check when no TCP connection could be made: the name, the listener, the path."""
    if isinstance(exc, socket.gaierror):
        return f": the name {config.host!r} does not resolve: check [mqtt] host and the station's DNS"
    if isinstance(exc, ConnectionRefusedError):
        return f": nothing listens on port {config.port} there: is the broker running, on this port?"
    if isinstance(exc, (TimeoutError, OSError)) and not isinstance(exc, ssl.SSLError) and re.search(
            r"timed out|unreachable", str(exc), re.IGNORECASE):
        return ": no answer: check the address, the network and any firewall between them"
    return ""


def tls_hint(config: MqttConfig, exc: BaseException | None) -> str:
    """What to do about the broker's certificate the station refused, or "" for another failure.
    The CA file is read again before each attempt after a failure (service.mqtt.secrets)."""
    if config.tls is None or not isinstance(exc, ssl.SSLCertVerificationError):
        return ""
    text = str(exc)
    if "mismatch" in text or "doesn't match" in text:
        return (f": the broker's certificate does not name {config.host!r}: set [mqtt] host to a name its "
                "subjectAltName holds, or have the certificate reissued for this name")
    if re.search(r"local issuer|self.signed|unknown ca", text, re.IGNORECASE):
        return (f": the broker's certificate is not signed by the CA in [mqtt.tls] ca_file {config.tls.ca_file} "
                "(a certificate from a new CA: put that CA's certificate there; the station reads it again before its "
                "next attempt)")
    return ""


#: CONNACK reason codes of a login the broker refuses (MQTT 3.1.1's 4 and 5 arrive as these).
LOGIN_REFUSED = (0x86, 0x87)


def refused_message(config: MqttConfig, reason_code: ReasonCode) -> str:
    """What the station says when the broker refused its CONNECT (bad password, not authorised):
    which broker, the reason, and for a refused login what to check."""
    said = (f"broker {config.address} refused the connection: {reason_code.getName()} "
            f"(reason code 0x{int(reason_code.value):02x})")
    return said + login_hint(config, int(reason_code.value))


def login_hint(config: MqttConfig, code: int) -> str:
    """What to do about a refused login, or "" for another refusal."""
    if code not in LOGIN_REFUSED:
        return ""
    if config.username is None:
        return "; the broker wants a login: set [mqtt] username and password_credential"
    credential = (f"the password in credential {config.password_credential!r}" if config.password_credential
                  else "no password (password_credential unset)")
    return (f"; user {config.username!r} with {credential} is not accepted: check them against the broker's "
            f"password_file and ACL (a changed password: {password_change_advice()}); retrying with backoff up "
            f"to {config.reconnect_max_delay_s} s, reports wait in the outbox")


def password_change_advice() -> str:
    """Where a changed password goes. The credential's file is read again before each attempt, but
    systemd copies LoadCredential= files into /run/credentials/ only when the unit starts."""
    if os.environ.get("CREDENTIALS_DIRECTORY", "").startswith("/run/credentials/"):
        return ("update the credential's file and restart the station: systemd copies it when the unit starts, "
                "the station reads that copy again before each attempt")
    return "update the credential's file; the station reads it again before its next attempt"


def client_cert_advice(alert: str) -> str:
    """What to do about a station certificate the broker refused with TLS alert `alert`."""
    install = ("install a new one and its key at [mqtt.tls] certfile and keyfile; the station reads them again "
               "before its next attempt")
    if "revoked" in alert.lower():
        return "it is revoked (the broker's crlfile lists it): " + install
    if "expired" in alert.lower():
        return "it has expired: " + install.replace("a new one", "a renewed one")
    return ("use one signed by the CA the broker trusts, not expired nor revoked; the station reads [mqtt.tls] "
            "certfile and keyfile again before its next attempt")


def refuses_client_cert(socket_error: str) -> bool:
    """Whether a TLS socket broken before the CONNACK is the broker's refusal of the client's certificate (or of
    its lack): TLS 1.3 says so in an alert after the handshake."""
    return re.search(r"certificate|unknown.ca", socket_error, re.IGNORECASE) is not None


def speaks_tls(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether the listener at host:port answers a TLS ClientHello in TLS (a handshake, or a TLS alert): the
    evidence that a plain connection it broke before the CONNACK went to a TLS listener, where a full or
    stopping broker breaks it the same way. Nothing is verified: only the protocol is asked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, context.wrap_socket(raw):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in str(exc).upper()  # the peer's TLS alert; a plain listener's bytes are no TLS record
    except OSError:
        return False


def closed_unanswered(socket_error: str | None, reason_code: ReasonCode) -> bool:
    """Whether a connection that ended before its CONNACK was closed on it: a socket error paho logged, or a
    socket closed with no error, which paho names "Unspecified error" (a full or stopping broker; a TLS
    listener given a plain CONNECT closes it either way)."""
    return socket_error is not None or reason_code.getName() == "Unspecified error"


class TlsProbe:
    """Whether a broker's port answers in TLS (`speaks_tls`), asked once per streak of connections closed
    before the CONNACK (the handshake holds paho's network thread up to 3 s) and asked again after the
    streak ends (a connection, a refusal, another failure)."""

    def __init__(self) -> None:
        self._verdict: bool | None = None

    def port_speaks_tls(self, config: MqttConfig) -> bool:
        if self._verdict is None:
            self._verdict = config.tls is None and speaks_tls(config.host, config.port)
        return self._verdict

    def streak_ended(self) -> None:
        self._verdict = None


def closed_before_connack(config: MqttConfig, socket_error: str, speaks_tls: bool = False) -> str:
    """What the station says when the broker closed the connection before answering CONNECT. Under
    TLS 1.3 a broker refuses a client certificate so, after the handshake: name the certificate. A TLS
    listener is named only where its port was seen to answer in TLS (`speaks_tls`): a full or stopping
    broker closes a plain connection the same way."""
    where = f"broker {config.address}"
    if config.tls is not None and refuses_client_cert(socket_error):
        cert = config.tls.certfile
        what = (f"refused the client certificate {cert} ({socket_error}): {client_cert_advice(socket_error)}"
                if cert is not None else
                f"asks for a client certificate ({socket_error}) and [mqtt.tls] names none (certfile, keyfile)")
        return f"{where} {what}; reports wait in the outbox; retrying"
    scheme = ("; its port answers in TLS: add [mqtt.tls] with the CA that signed the broker's certificate (ca_file)"
              if speaks_tls and config.tls is None else "")
    return f"{where} closed the connection before answering CONNECT ({socket_error}){scheme}; retrying"


def no_connack(config: MqttConfig, reason: str) -> str:
    """What the station says when a port took the connection and gave no CONNACK: no answer within the
    keepalive, or one that is not MQTT (a WebSockets listener answers CONNECT with HTTP)."""
    other = ('a WebSockets listener (a dashboard\'s port)? set [mqtt] transport = "websockets"'
             if config.transport == "tcp" else 'a plain MQTT listener? set [mqtt] transport = "tcp"')
    return (f"broker {config.address} took the connection but gave no MQTT answer to CONNECT ({reason}): is it "
            f"the broker's MQTT port? ({other}); retrying with backoff up to "
            f"{config.reconnect_max_delay_s} s, reports wait in the outbox")


def publish_waiting(client: Callable[[], mqtt.Client], topic: str, body: str,
                    properties: Properties | None, wait_s: float, stop: threading.Event) -> bool:
    """Publish at QoS 1, waiting while paho's queue is full (it refuses with MQTT_ERR_QUEUE_SIZE
    rather than queue); False, logged, when still refused after `wait_s` or at stop. A message
    published while the connection is down is kept by paho and sent when it is back."""
    deadline = time.monotonic() + wait_s
    while True:
        info = client().publish(topic, body, qos=1, properties=properties)
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return True
        if time.monotonic() >= deadline or stop.is_set():
            logger.error("message to %s not published: %s", topic, info.rc)
            return False
        time.sleep(0.02)


def status_age_s(properties: Properties | None) -> int | None:
    """Seconds since a retained status message of STATUS_EXPIRY_S was published, as the broker's
    countdown of its Message Expiry Interval tells it; None where the message carries none."""
    remaining = getattr(properties, "MessageExpiryInterval", None)
    return None if remaining is None else max(0, STATUS_EXPIRY_S - int(remaining))
