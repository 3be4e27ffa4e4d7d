"""`smearscope doctor`'s broker checks: TCP, TLS with the configured CA and client certificate
(a certificate the broker refuses: FAIL), and an MQTT login with the station's user and password,
as the station would send it (smearscope.cli.doctor runs them last)."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

#: smearscope.cli.doctor's (status, what, detail); not imported from it, which imports this module.
Check = tuple[str, str, str]
#: config/station.example.toml's [mqtt] host, a name that never resolves (RFC 2606's .example)
EXAMPLE_HOST = "broker.lab.example"


def broker_checks(mqtt, timeout: float = 3.0, config_path: Path | None = None,
                  station_id: str | None = None) -> list[Check]:
    from smearscope.service.mqtt.paho_client import network_hint, tls_hint

    where = mqtt.address
    try:
        sock = socket.create_connection((mqtt.host, mqtt.port), timeout=timeout)
    except OSError as exc:
        placeholder = (f" ({EXAMPLE_HOST} is config/station.example.toml's placeholder: the clinic broker's name "
                       "or address goes there)" if mqtt.host == EXAMPLE_HOST else "")
        return [("WARN", "broker", (f"{where} does not answer ({exc}){network_hint(mqtt, exc)}{placeholder}; the "
                 "station keeps reports in its outbox until it does"))]
    with sock:
        if mqtt.tls is None:
            return [("OK", "broker", f"{where} accepts TCP connections"),
                    *_login_checks(mqtt, timeout, config_path, station_id)]
        try:
            context = ssl.create_default_context(cafile=str(mqtt.tls.ca_file))
            context.check_hostname = not mqtt.tls.insecure
            if mqtt.tls.certfile is not None:  # as the station presents it (mutual TLS)
                context.load_cert_chain(str(mqtt.tls.certfile), str(mqtt.tls.keyfile))
            with context.wrap_socket(sock, server_hostname=mqtt.host) as tls:
                refused = _client_cert_refusal(tls, mqtt.tls, min(timeout, 1.0))
        except (ssl.SSLError, OSError, ValueError) as exc:
            plain = isinstance(exc, (ConnectionResetError, ssl.SSLEOFError)) or "WRONG_VERSION" in str(exc)
            hint = ("; the port is not a TLS listener (plain MQTT?): give the broker's TLS port (usually 8883), "
                    "or remove [mqtt.tls] for a plain one" if plain else tls_hint(mqtt, exc))
            return [("FAIL", "broker TLS", f"{where}: {type(exc).__name__}: {exc}{hint}")]
        if refused is not None:
            return [("FAIL", "broker TLS", f"{where} {refused}")]
    return [("OK", "broker", f"{where} accepts TLS connections with {mqtt.tls.ca_file}"),
            *_login_checks(mqtt, timeout, config_path, station_id)]


def _client_cert_refusal(tls: ssl.SSLSocket, config, wait: float) -> str | None:
    """Why the broker refused this client's certificate, or None. Under TLS 1.3 the server judges
    the client certificate after the client's handshake is done: its alert comes with the first read."""
    from smearscope.service.mqtt.paho_client import client_cert_advice
    tls.settimeout(wait)
    try:
        tls.recv(1)
    except ssl.SSLError as exc:
        if config.certfile is None:
            return (f"asks for a client certificate and none is configured ({exc.reason or exc}); set "
                    "[mqtt.tls] certfile and keyfile to one its CA signed")
        return (f"refuses the client certificate {config.certfile} ({exc.reason or exc}); the station could "
                f"never connect: {client_cert_advice(str(exc))}")
    except OSError:  # a timeout: the broker waits for CONNECT; a reset: for the login check to judge
        return None
    return None


def _login_unchecked(mqtt, config_path: Path | None) -> list[Check]:
    """The login needs the password; from a shell systemd has not provided it: say how to."""
    if mqtt.password_credential is None or os.environ.get("CREDENTIALS_DIRECTORY"):
        return []  # no password, or the broker password check says why it cannot be read
    from smearscope.service.mqtt.credentials import UNIT_CREDENTIAL, UNIT_CREDENTIAL_FILE

    name = mqtt.password_credential
    config = f" --config {config_path}" if config_path is not None else ""
    where = UNIT_CREDENTIAL_FILE if name == UNIT_CREDENTIAL else "PATH"  # the unit loads that name alone from there
    return [("WARN", "broker login", (f"not checked: the password credential {name!r} cannot be read here. "
             f"As the station would: sudo systemd-run --pipe --wait -p User=smearscope -p "
             f"LoadCredential={name}:{where} "
             f"/opt/smearscope/venv/bin/smearscope doctor{config}"))]


def _login_checks(mqtt, timeout: float, config_path: Path | None = None,
                  station_id: str | None = None) -> list[Check]:
    """An MQTT CONNECT with the station's user and password, as the station sends it (its client
    settings and protocol, falling back to 3.1.1 as it does; its own client id and no Last Will,
    so the station's status is not touched): a password the broker refuses is found here, not in
    the journal after the start."""
    from paho.mqtt.enums import MQTTProtocolVersion

    from smearscope.service.mqtt.credentials import CredentialError, read_password
    from smearscope.service.mqtt.paho_client import login_hint, no_connack

    try:
        password = read_password(mqtt)
    except CredentialError:
        return _login_unchecked(mqtt, config_path)
    who = f"user {mqtt.username!r}" if mqtt.username is not None else "anonymous"
    v5, v311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
    probe = f"{mqtt.topic_prefix}/{station_id}/{ACL_PROBE_LEAF}" if station_id is not None else None
    acl_code = None
    try:
        code, acl_code = _connack(mqtt, v311 if mqtt.protocol == "3.1.1" else v5, password, timeout, probe)
        if code is not None and int(code.value) == 0x84 and mqtt.protocol == "auto":  # as the station falls back
            code, acl_code = _connack(mqtt, v311, password, timeout)
    except (OSError, ValueError, ssl.SSLError) as exc:
        return [("WARN", "broker login", f"{who}: could not connect ({type(exc).__name__}: {exc})")]
    if code is None:
        if mqtt.tls is None and _speaks_tls(mqtt.host, mqtt.port, timeout):
            return [("FAIL", "broker login", (f"{who}: no answer to CONNECT: {mqtt.address} is a TLS listener; "
                     "add [mqtt.tls] with ca_file (the CA that signed the broker's certificate), or give its "
                     "plain port (usually 1883)"))]
        return [("WARN", "broker login", f"{who}: {no_connack(mqtt, f'none within {timeout:.0f} s').partition('; retry')[0]}")]
    if code.is_failure:
        return [("FAIL", "broker login", (f"{mqtt.address} refuses {who}: {code.getName()} (reason code "
                 f"0x{int(code.value):02x}){login_hint(mqtt, int(code.value)).partition('; retrying')[0]}; "
                 "the station would retry for ever"))]
    return [("OK", "broker login", f"{mqtt.address} accepts {who}"), *_acl_checks(mqtt, who, station_id, acl_code)]


#: Where doctor publishes its ACL probe, under the station's own topics: no station, dashboard or
#: archive subscribes to it (a command answer named after no command).
ACL_PROBE_LEAF = "cmd_response/doctor"


def _acl_checks(mqtt, who: str, station_id: str | None, code) -> list[Check]:
    """The broker's MQTT 5 PUBACK to an empty message on the station's own topics: an ACL without
    the station's block takes its login and refuses every report it sends (MQTT 3.1.1 says nothing)."""
    if station_id is None or code is None:
        return []
    station = f"{mqtt.topic_prefix}/{station_id}"
    probe = f"{station}/{ACL_PROBE_LEAF}"
    if int(code.value) == 0x87:
        return [("FAIL", "broker ACL", (f"{mqtt.address} takes the login of {who} but its ACL refuses what it "
                 f"publishes under {station}/ (Not authorized, 0x87 on {probe}): the station would keep every report "
                 f"in its outbox. Add the station's block to the broker's acl_file (config/mosquitto.acl.example's "
                 f"station-lab-7 block, lab-7 replaced by {station_id}) and reload mosquitto; a block that lists the "
                 f"station's topics one by one must grant write on {station}/cmd_response/# too (its answers to "
                 f"commands, where doctor probes)"))]
    if code.is_failure:
        return [("WARN", "broker ACL", (f"{mqtt.address} answered a message on {probe} with {code.getName()} "
                 f"(0x{int(code.value):02x})"))]
    return [("OK", "broker ACL", f"{who} may publish under {station}/")]


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether host:port completes a TLS handshake (its certificate not judged: only the protocol)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, context.wrap_socket(sock):
            return True
    except (OSError, ValueError):
        return False


def _connack(mqtt, protocol, password: str | None, timeout: float, probe: str | None = None):
    """The broker's CONNACK reason code to one CONNECT (None: no answer within `timeout`), and under
    MQTT 5 with `probe` its PUBACK reason code to an empty QoS 1 message there (None: none)."""
    import threading

    from paho.mqtt.enums import MQTTProtocolVersion

    from smearscope.service.mqtt.paho_client import configured_client

    client = configured_client(mqtt, f"smearscope-doctor-{os.getpid()}", protocol, password, "smearscope/doctor")
    client.will_clear()
    answered, codes, acked, acks = threading.Event(), [], threading.Event(), []
    client.on_connect = lambda c, userdata, flags, code, props: (codes.append(code), answered.set())
    client.on_publish = lambda c, userdata, mid, code, props: (acks.append(code), acked.set())
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=10)
        client.loop_start()
        answered.wait(timeout)
        if probe is not None and protocol == MQTTProtocolVersion.MQTTv5 and codes and not codes[0].is_failure:
            client.publish(probe, b"", qos=1)
            acked.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return (codes[0] if codes else None), (acks[0] if acks else None)


def client_id_checks(mqtt, station_id: str, unit: str) -> list[Check]:
    """The running station's own word on its client id, from its systemd STATUS= line (`systemctl
    show UNIT -p StatusText`): `broker taken_over: ...` while it leaves the broker to another client
    logged in with its client id (docs/MQTT.md "Client ids"), a FAIL; nothing where systemd cannot say
    or the station says nothing of it (a connection the broker keeps closing is no doctor's finding)."""
    import subprocess

    from smearscope.cli.doctor_memory import SYSTEMCTL_TIMEOUT_S

    try:
        proc = subprocess.run(["systemctl", "show", unit, "-p", "StatusText"], capture_output=True, text=True,
                              errors="replace", timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    text = next((line.partition("=")[2] for line in proc.stdout.splitlines() if line.startswith("StatusText=")), "")
    said = text.partition("broker taken_over: ")[2]
    if proc.returncode != 0 or not said:
        return []
    client_id = mqtt.client_id or f"smearscope-{station_id}"
    return [("FAIL", "broker client id", (f"the running station ({unit}) has left broker {mqtt.address} to another "
             f"client logged in as {client_id!r}, and says: {said}"))]
