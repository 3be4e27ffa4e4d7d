"""Test helpers with real parts: a mosquitto broker per test, TLS material made with openssl, and a
paho subscriber that records messages with their MQTT 5 properties.

Every broker listens on 127.0.0.1 only, on a free port outside the kernel's ephemeral range
(`free_ports`), with `allow_anonymous false` and a password file made by `mosquitto_passwd`; it is stopped by its PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

logger = logging.getLogger(__name__)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

#: Broker accounts for tests: the station publisher and an observing subscriber.
MQTT_USERS = {"station": "station-secret", "observer": "observer-secret"}


def free_port() -> int:
    return free_ports(1)[0]


#: Where test ports are drawn from, less the kernel's ephemeral range (`ephemeral_ports`): above the
#: ports services commonly use, below the top of the port space.
TEST_PORTS = range(10000, 65536)


def ephemeral_ports() -> range:
    """The kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range): the source ports a
    connect() is given; Linux's default where the file cannot be read."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports outside the kernel's ephemeral range, each bound while chosen
    (all at once, so none repeats). Outside it, because a client retrying a stopped broker's port is
    never given that port as its own source port: given it, its connect() reaches itself (TCP
    simultaneous open), the connection holds the port, and the broker's restart there fails with
    'Address already in use'. Drawn at random, so parallel test workers rarely try the same one."""
    ephemeral = ephemeral_ports()
    candidates = [p for p in TEST_PORTS if p not in ephemeral]
    if len(candidates) < 100 * n:  # a kernel range that leaves no room: the kernel's own choice
        logger.warning("ephemeral range %d-%d leaves no test ports outside it", ephemeral.start, ephemeral.stop - 1)
        candidates = []
    rng = random.SystemRandom()
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            try:
                sock.bind(("127.0.0.1", rng.choice(candidates) if candidates else 0))
            except OSError:  # in use (or bound by the loop already): another draw
                socks.pop().close()
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing accepts on {host} port {port} after {timeout} s")


@dataclass(frozen=True)
class TlsMaterial:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_material(directory: Path, common_name: str = "smearscope-test-ca",
                      san: str = "IP:127.0.0.1,DNS:localhost") -> TlsMaterial:
    """A CA and a server certificate for `san` (127.0.0.1/localhost), signed by it (EC P-256, openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        f"/CN={common_name}",
    )
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "san.ext").write_text(f"subjectAltName={san}\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    return TlsMaterial(directory / "ca.crt", directory / "server.crt", directory / "server.key")


def make_client_cert(directory: Path, name: str, ca: TlsMaterial | None) -> tuple[Path, Path]:
    """A client certificate and key for mutual TLS: signed by `ca`, or self-signed when None."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key"]
    if ca is None:
        openssl("req", "-x509", *ec, "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}")
    else:
        openssl("req", *ec, "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.ca_cert), "-CAkey",
                str(ca.ca_cert.with_suffix(".key")), "-CAcreateserial", "-out", f"{name}.crt", "-days", "2")
    return directory / f"{name}.crt", directory / f"{name}.key"


def make_issued_client_certs(directory: Path, ca: TlsMaterial) -> tuple[dict[str, tuple[Path, Path]], Path]:
    """Client certificates issued by `ca` with `openssl ca`: "valid", "expired" (valid for a day in
    2020) and "revoked" (listed in the CRL); the certificates with their keys, and the CRL (PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("1000\n")
    (directory / "crlnumber").write_text("1000\n")
    (directory / "ca.cnf").write_text(
        f"[ca]\ndefault_ca = issuer\n[issuer]\ndir = {directory}\ndatabase = {directory}/index.txt\n"
        f"new_certs_dir = {directory}\nserial = {directory}/serial\ncrlnumber = {directory}/crlnumber\n"
        f"certificate = {ca.ca_cert}\nprivate_key = {ca.ca_cert.with_suffix('.key')}\ndefault_md = sha256\n"
        "default_crl_days = 2\npolicy = any_name\n[any_name]\ncommonName = supplied\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    dates = {"valid": ["-days", "2"], "expired": ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"],
             "revoked": ["-days", "2"]}
    for name, validity in dates.items():
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("ca", "-batch", "-config", "ca.cnf", "-in", f"{name}.csr", "-out", f"{name}.crt", *validity)
    openssl("ca", "-config", "ca.cnf", "-revoke", "revoked.crt")
    openssl("ca", "-config", "ca.cnf", "-gencrl", "-out", "crl.pem")
    return {name: (directory / f"{name}.crt", directory / f"{name}.key") for name in dates}, directory / "crl.pem"


class MosquittoBroker:
    """A real mosquitto on free loopback ports, configured in `workdir`."""

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        *,
        port: int | None = None,
        tls: TlsMaterial | None = None,
        persistence: bool = False,
        acl: str | None = None,
        extra: tuple[str, ...] = (),
        tls_extra: tuple[str, ...] = (),
        listener_extra: tuple[str, ...] = (),
        websockets: bool = False,
        bind: str = "127.0.0.1",
    ) -> None:
        self.workdir = workdir
        self.bind = bind  # the listeners' address: 127.0.0.1, or ::1 for IPv6
        self.acl = acl
        self.extra = extra  # further mosquitto.conf lines, e.g. "max_packet_size 65536"
        #: further lines of the TLS listener's own, e.g. "require_certificate true", "crlfile ..."
        self.tls_extra = tls_extra
        #: further lines of the plain listener's own, e.g. "max_connections 1"
        self.listener_extra = listener_extra
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.websockets = websockets
        #: Ports chosen here (none given) may be taken by another process before the broker binds
        #: them: the first start then retries on fresh ones.
        self._own_ports = port is None
        self._pick_ports(port)
        self.persistence = persistence
        self.log_path = workdir / "mosquitto.log"
        self.conf_path = workdir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._write_passwords(users)
        self._write_config()

    def _pick_ports(self, port: int | None) -> None:
        picked = free_ports(3)
        self.port = port or picked[0]
        self.tls_port = picked[1] if self.tls else None
        #: An MQTT-over-WebSockets listener (browsers), beside the TCP one (mosquitto 2.0.11 will
        #: not start with a websockets listener alone).
        self.ws_port = picked[2] if self.websockets else None

    def _write_passwords(self, users: dict[str, str]) -> None:
        create = True
        for user, password in users.items():
            subprocess.run(
                [MOSQUITTO_PASSWD, "-b", *(["-c"] if create else []), str(self.workdir / "passwd"), user, password],
                check=True,
                capture_output=True,
            )
            create = False

    def _write_config(self) -> None:
        passwd = self.workdir / "passwd"
        lines = [
            *(["user root"] if os.geteuid() == 0 else []),  # tmp_path is private to this user
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"log_dest file {self.log_path}",
            "log_type all",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            # Save after every change, so a SIGKILLed broker loses (almost) nothing.
            "autosave_on_changes true",
            "autosave_interval 1",
            *self.extra,
            f"listener {self.port} {self.bind}",
            *self.listener_extra,
        ]
        if self.acl is not None:  # mosquitto acl_file syntax
            (self.workdir / "acl").write_text(self.acl)
            lines.append(f"acl_file {self.workdir / 'acl'}")
        if self.tls is not None:
            lines += [
                f"listener {self.tls_port} {self.bind}",
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                *self.tls_extra,
            ]
        if self.ws_port is not None:
            lines += [f"listener {self.ws_port} {self.bind}", "protocol websockets"]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("broker already running")
        for attempt in range(3):
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                for port in (self.port, self.tls_port, self.ws_port):
                    if port is not None:
                        wait_for_port(port, timeout, self.proc, self.bind)
                self._started_once = True
                return
            except RuntimeError as exc:  # exited before listening: say why (its log)
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                in_use = "Address already in use" in log
                if not (in_use and self._own_ports and not self._started_once and attempt < 2):
                    raise RuntimeError(f"{exc}; mosquitto log:\n{log}") from exc
                logger.warning("broker port taken meanwhile, retrying on fresh ports")
                self._pick_ports(None)
                self._write_config()

    def kill(self) -> None:
        """Crash the broker: SIGKILL, nothing flushed."""
        self._signal_and_wait(signal.SIGKILL, 5.0)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is read or acknowledged (a hung broker)."""
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after 5 s."""
        if not self._signal_and_wait(signal.SIGTERM, 5.0):
            self._signal_and_wait(signal.SIGKILL, 5.0)

    def restart(self) -> None:
        """Start again on the same ports with the same config (and persistence file, if on)."""
        self.stop()
        self.start()

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> bool:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return True
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def subscribed(self, client_id: str, topic_filter: str) -> int:
        """How many times this broker took `client_id`'s subscription to `topic_filter`: its log's
        `<client id> <qos> <filter>` lines, each written before the SUBACK (the log outlives restarts)."""
        line = rf"^\d+: {re.escape(client_id)} \d+ {re.escape(topic_filter)}$"
        return len(re.findall(line, self.log(), re.MULTILINE))

    def saved(self, text: str) -> bool:
        """Whether the broker's persistence file (written whole, then renamed into place) holds
        `text`: a persistent subscriber's topic filter once its session is on disk, say."""
        database = self.workdir / "mosquitto.db"
        return database.exists() and text.encode() in database.read_bytes()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None
    user_properties: dict[str, str]
    message_expiry: int | None
    correlation_data: bytes | None
    received_at: float = field(default_factory=time.monotonic)


class Subscriber:
    """A paho MQTT 5 client that records every message it receives, properties included.

    `persistent=True` uses a fixed session (clean_start False, 300 s session expiry) so messages
    published while it is away (e.g. across a broker restart with persistence) are kept for it.
    """

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        topics: list[str],
        *,
        client_id: str = "",
        persistent: bool = False,
        ca_cert: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.topics = topics
        self.messages: list[Received] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        if ca_cert is not None:
            self.client.tls_set(ca_certs=str(ca_cert))
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            props.SessionExpiryInterval = 300
        self.client.connect_async(
            host, port, 5, clean_start=not persistent, properties=props
        )
        self.client.loop_start()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            logger.error("test subscriber refused: %s", reason_code)
            return
        self.connected.set()
        client.subscribe([(t, 1) for t in self.topics])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        received = Received(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            content_type=getattr(props, "ContentType", None),
            user_properties=dict(getattr(props, "UserProperty", []) or []),
            message_expiry=getattr(props, "MessageExpiryInterval", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )
        with self._changed:
            self.messages.append(received)
            self._changed.notify_all()

    def wait_ready(self, timeout: float = 5.0) -> None:
        if not self.subscribed.wait(timeout):
            raise TimeoutError("test subscriber did not connect and subscribe")

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def on_topic(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_state(m: Received) -> dict[str, Any]:
    """A run-topic message's run state (its `body` where the message is an envelope)."""
    state = json.loads(m.payload)
    return state.get("body", state) if isinstance(state.get("body"), dict) else state


def retained_run_state(port: int, base: str) -> dict[str, Any] | None:
    """The run state the broker keeps retained under `base` (e.g. "smearscope/<station>") now, as
    a fresh subscription gets it; None when nothing is retained."""
    fresh = Subscriber(port, "observer", MQTT_USERS["observer"], [f"{base}/run"])
    try:
        fresh.wait_ready()
        # the retained state, if any, comes before the SUBACK of a second subscription (mosquitto)
        fresh.subscribed.clear()
        fresh.client.subscribe(f"{base}/status", qos=1)
        assert fresh.subscribed.wait(5)
        retained = [m for m in fresh.on_topic(f"{base}/run") if m.retain and m.payload]
        return run_state(retained[-1]) if retained else None
    finally:
        fresh.close()


class Mqtt311OnlyProxy:
    """A TCP proxy in front of a broker that behaves like an MQTT 3.1.1-only broker: it answers an
    MQTT 5 CONNECT with the 3.1.1 CONNACK "unacceptable protocol version" and closes; other
    connections are piped through unchanged."""

    def __init__(self, upstream_port: int, tls: TlsMaterial | None = None,
                 refuse: threading.Event | None = None) -> None:
        """`tls`: the proxy's port is TLS with that server certificate (piped as plain TCP to the broker);
        `refuse`: an MQTT 5 CONNECT is answered only once it is set (`asked_v5` says it came)."""
        self.upstream_port = upstream_port
        self.refused_v5 = 0
        self.asked_v5 = threading.Event()
        self._refuse = refuse
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(str(tls.server_cert), str(tls.server_key))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self._tls is not None:
            try:
                conn = self._tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        with conn:
            head = conn.recv(64)  # fixed header + variable header start of CONNECT
            # Byte 0: CONNECT; remaining length (1 byte while small); then 0x00 0x04 "MQTT" level.
            level_at = head.find(b"MQTT") + 4
            if level_at >= 4 and level_at < len(head) and head[level_at] == 5:
                self.asked_v5.set()
                if self._refuse is not None:
                    self._refuse.wait(30)
                self.refused_v5 += 1
                conn.sendall(b"\x20\x02\x00\x01")
                return
            with socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
                up.sendall(head)
                done = threading.Event()

                def pipe(src: socket.socket, dst: socket.socket) -> None:
                    try:
                        while data := src.recv(65536):
                            dst.sendall(data)
                    except OSError:
                        pass
                    done.set()

                threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
                pipe(conn, up)
                done.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        self._server.close()


_PUBLISHER_CHILD = """
import json, sys, time
from smearscope.service.config import MqttConfig
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.mqtt.publisher import MqttPublisher
config = MqttConfig.model_validate_json(sys.argv[1])
station_id, reports = sys.argv[2], int(sys.argv[3])
publisher = MqttPublisher(config, station_id, Outbox.from_config(config.outbox))
publisher.start()
for i in range(reports):
    publisher.publish_report("report", f"child-{i}", json.dumps({"i": i}).encode(), "1")
print("stored", reports, flush=True)
last = None
while True:  # until killed
    state = publisher.state
    if (state.status, state.last_error) != last:
        last = (state.status, state.last_error)
        print("state", state.status, state.last_error, flush=True)
    time.sleep(0.05)
"""


class PublisherProcess:
    """An `MqttPublisher` in a child process (to be SIGKILLed): it stores `reports` reports, then
    prints "state <status> <last_error>" whenever its state changes."""

    def __init__(self, config_json: str, station_id: str, reports: int = 0) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER_CHILD, config_json, station_id, str(reports)],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"child printed no line starting with {prefix!r}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
