"""`smearscope archive`: subscribe to every station's reports and FHIR bundles and keep them.

A fixed client id with a persistent MQTT 5 session (clean_start false, a long Session Expiry), both
filters at QoS 1, and manual acknowledgement: paho's network thread only queues what arrives; the
storer (the caller's thread) stores each message durably (service.archive.store) and only then
acknowledges it. A message the disk refuses (full, read-only), or a symbolic link in the archive
folder leading out of it, stays unacknowledged and is tried again every `retry_s`, the messages
behind it waiting; the broker keeps all of them meanwhile, and sends them again if the archive dies. A message that can never be stored (not a report, a hostile
id) is said in one log line and acknowledged, so it cannot block the ones behind it. A watcher thread of its own
starts paho's network thread again should it end, whatever the storer is doing (an MLLP exchange holds it up to
`hl7_mllp_timeout_s`).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from smearscope.service.archive.hl7_out import Hl7Output
from smearscope.service.archive.message import (
    BundleMessage,
    Refused,
    ReportMessage,
    read_bundle,
    read_report,
    station_of,
)
from smearscope.service.archive.store import ArchiveStore, OutsideArchive, Stored
from smearscope.service.config.archive import ArchiveConfig
from smearscope.service.hl7 import mllp
from smearscope.service.mqtt.failure_news import RESAY_S, FailureNews, said_length
from smearscope.service.mqtt.network_thread import NetworkThreadWatch
from smearscope.service.mqtt.paho_client import (
    LOGIN_REFUSED,
    PAHO_SOCKET_LOST,
    TlsProbe,
    closed_unanswered,
    configured_client,
    paho_log_level,
    refuses_client_cert,
)
from smearscope.service.mqtt.take_over import (
    SHORT_LIVED_S,
    TakeOverWatch,
    held_again,
    taken_over_message,
)

logger = logging.getLogger(__name__)

#: The topic levels the archive subscribes to under `<prefix>/+/`.
REPORT_LEAF, FHIR_LEAF = "report", "fhir"
#: Who else logs in with the archive's client id, as its take-over ERROR names them.
_HOLDERS = "another `smearscope archive` on this broker, or an earlier one still running"
#: The watcher's tick (s): how often it checks paho's network thread and a take-over's end; and how long the storer
#: waits for a message before it looks whether the archive is stopping.
TICK_S = 0.5
#: How long run()'s end waits for the watcher to end (one tick is its longest wait).
WATCH_JOIN_S = 5.0


@dataclass(frozen=True)
class Incoming:
    """A message as paho handed it over, not yet acknowledged."""

    topic: str
    payload: bytes
    mid: int
    qos: int


class BrokerSettingsError(ValueError):
    """The broker connection cannot be set up as given (a CA, certificate or key file missing or
    not one): a mistake in the settings, which a restart does not mend."""


class ArchiveDaemon:
    """The archive's MQTT session and its storer; `run()` blocks until `stop()`."""

    def __init__(self, config: ArchiveConfig, password: str | None) -> None:
        self.config = config
        self.prefix = config.mqtt.topic_prefix
        self.client_id = config.mqtt.client_id or "smearscope-archive"
        try:  # the TLS files are read here: before the folder, so a mistake there is said as one
            client = configured_client(config.mqtt, self.client_id, MQTTProtocolVersion.MQTTv5, password, None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            tls = config.mqtt.tls
            files = "" if tls is None else ", ".join(f"{flag} {path}" for flag, path in (
                ("--ca-file", tls.ca_file), ("--certfile", tls.certfile), ("--keyfile", tls.keyfile)) if path)
            raise BrokerSettingsError(f"cannot set up the broker connection with {files or 'these settings'}: "
                                      f"{exc}") from exc
        self._stop = threading.Event()
        self._watch_stop = threading.Event()  # set as run() ends: the watcher ends before paho's thread is stopped
        hl7 = None
        if config.hl7_directory is not None or config.hl7_mllp is not None:
            hl7 = Hl7Output(config.hl7_directory, config.mllp_address, config.hl7_mllp_timeout_s, config.addressing,
                            stop=self._stop, error_hold_s=config.hl7_mllp_error_hold_s)
        self.store = ArchiveStore(config.directory, hl7)
        if hl7 is not None:
            hl7.use_index(self.store)
            hl7.remove_leftovers()
        self.hl7 = hl7
        self._incoming: queue.Queue[Incoming] = queue.Queue()
        self._connected = False
        #: another archive under this client id: said once, and this one leaves the session to it
        self._take_over = TakeOverWatch()
        #: paho's network thread (reads, acknowledges, reconnects), started again should it end unasked
        self._network = NetworkThreadWatch("the archive reconnects and the broker sends it what its session kept")
        #: the broker out of reach: said once per outage, again at most every RESAY_S (the station's rule)
        self._failure_news = FailureNews()
        self._refused_last = False  # the last failure a refusal (the broker reachable), not out of reach
        self._connack_refused = False  # this attempt's CONNACK a refusal (said by _on_connect)
        self._socket_error: str | None = None  # why this attempt's socket broke before a CONNACK (paho's log)
        self._tls_probe = TlsProbe()  # whether the port answers in TLS, asked once while connections break
        self._had_reports = self.store.report_count() > 0
        self.counts = {"stored": 0, "duplicates": 0, "refused": 0, "dropped": 0, "retried": 0}
        self._dropping = False  # QoS 0 messages being dropped for want of room (said once per spell)
        client.manual_ack_set(True)  # PUBACK only once the report is on disk (ack())
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_log = self._on_log
        self.client = client

    # ------------------------------------------------------------------ paho's thread

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, line: str) -> None:
        if not self._connected and line.startswith(PAHO_SOCKET_LOST):  # said by _on_disconnect
            self._socket_error = line.partition(": ")[2] or line
        logger.log(paho_log_level(level, line, not self._connected), "paho: %s", line)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            code = int(reason_code.value)
            hint = (f"; the broker does not accept user {self.config.mqtt.username!r} with this password: check "
                    "--username and --password-file (or the credential archive-mqtt-password)"
                    if code in LOGIN_REFUSED else "; the archive needs an MQTT 5 broker" if code == 0x84 else "")
            refusal = (f"broker {self.config.mqtt.address} refused the archive's connection: {reason_code.getName()} "
                       f"(reason code 0x{code:02x}){hint}; retrying with backoff up to "
                       f"{self.config.mqtt.reconnect_max_delay_s} s")
            self._refused_last = self._connack_refused = True
            # once while it repeats, again at most every RESAY_S (as the broker out of reach): not every retry
            logger.log(logging.ERROR if self._failure_news.news(refusal) else logging.DEBUG, "%s", refusal)
            return
        self._connected = True
        self._take_over.connected()
        if (outage := self._failure_news.ended()) is not None:
            logger.info("broker %s %s after %s", self.config.mqtt.address, "accepts the archive's connection again"
                        if self._refused_last else "reachable again", said_length(outage))
        self._refused_last = False
        present = bool(flags.session_present)
        logger.info("connected to broker %s as %s (session %s)", self.config.mqtt.address, self.client_id,
                    "resumed" if present else "new")
        if not present and self._had_reports:
            logger.warning("the broker had no session for %s: reports published while the archive was away "
                           "were not kept for it (a broker without persistence, restarted; or the session "
                           "expired); see docs/ARCHIVE.md", self.client_id)
        client.subscribe([(topic, 1) for topic in self._topics])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list, properties: Any) -> None:
        """The broker's answer to the subscriptions: until it, a report published is not sent to the
        archive (nor kept for it in a new session). A refused one is an ACL without read there."""
        refused = [f"{t} ({rc.getName()})" for t, rc in zip(self._topics, reason_codes) if rc.is_failure]
        if refused:
            logger.error("broker %s refused the archive's subscription to %s: give user %r read access there "
                         "(docs/ARCHIVE.md); those reports are not archived", self.config.mqtt.address,
                         " and ".join(refused), self.config.mqtt.username)
        else:
            logger.info("subscribed to %s", " and ".join(self._topics))

    @property
    def _topics(self) -> list[str]:
        """What the archive subscribes to, in the order of the broker's answer's reason codes."""
        return [f"{self.prefix}/+/{leaf}" for leaf in (REPORT_LEAF, FHIR_LEAF)]

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        exc = sys.exc_info()[1]  # paho calls this inside its except clause
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "network, DNS or TLS failure"
        hint = ""
        if isinstance(exc, ssl.SSLCertVerificationError) and self.config.mqtt.tls is not None:
            hint = (f": the broker's certificate is not signed by the CA in --ca-file {self.config.mqtt.tls.ca_file}, "
                    f"or does not name {self.config.mqtt.host!r}")
        self._say_unreachable(f"cannot reach broker {self.config.mqtt.address} ({reason}){hint}; retrying with "
                              f"backoff up to {self.config.mqtt.reconnect_max_delay_s} s")

    def _say_unreachable(self, failure: str) -> None:
        """A connection attempt that failed before any CONNACK: said at WARNING once per outage, then
        at most every RESAY_S with its length, so an offline lab's journal stays readable."""
        self._refused_last = False
        if not self._failure_news.news(failure):
            logger.debug("%s", failure)
            return
        outage = self._failure_news.outage_s()
        logger.warning("%s%s", failure, f" (out of reach for {said_length(outage)}; said again at most every "
                       f"{RESAY_S / 60:.0f} min)" if outage >= 1 else "")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        was, self._connected = self._connected, False
        socket_error, self._socket_error = self._socket_error, None
        refused, self._connack_refused = self._connack_refused, False
        if self._stop.is_set():
            return
        if not was:
            # A port that took the connection and broke it, or answered CONNECT with no MQTT (a TLS
            # listener given as mqtt://, a WebSockets one): no other callback says why.
            broken = closed_unanswered(socket_error, reason_code)
            if not refused and (broken or reason_code.is_failure):
                reason = socket_error or ("closed, no error given" if broken else reason_code.getName())
                tls = broken and self._tls_probe.port_speaks_tls(self.config.mqtt)
                self._say_unreachable(no_mqtt_answer(self.config, reason, broken, tls))
            if refused or not broken:
                self._tls_probe.streak_ended()
            return
        self._tls_probe.streak_ended()
        was_taken_over = self._take_over.taken_over
        loss = self._take_over.lost(int(reason_code.value))
        if not loss.taken_over:
            if was_taken_over:  # it held the session again: the usual backoff
                client.reconnect_delay_set(self.config.mqtt.reconnect_min_delay_s, self.config.mqtt.reconnect_max_delay_s)
            logger.warning("connection to broker %s lost (%s); reconnecting, the broker keeps the session",
                           self.config.mqtt.address, reason_code)
            return
        assert loss.pause_s is not None
        client.reconnect_delay_set(loss.pause_s, loss.pause_s)  # paho waits so long before its next try
        if loss.said:
            logger.error("%s; the broker keeps the session, and the reports queued in it, for the archive that holds "
                         "it. Give each archive on a broker its own client id (--client-id)",
                         taken_over_message(self.config.mqtt.address, self.client_id, loss, int(reason_code.value),
                                            "archive", _HOLDERS))
        else:
            logger.debug("client id %r still taken over: trying again in %d s", self.client_id, loss.pause_s)

    def _check_take_over_ended(self) -> None:
        """The watcher's, every TICK_S: a connection made after a take-over that lasts holds the session
        again (the other archive is gone); said at INFO, the usual backoff back."""
        if self._connected and self._take_over.held():
            self.client.reconnect_delay_set(self.config.mqtt.reconnect_min_delay_s,
                                            self.config.mqtt.reconnect_max_delay_s)
            logger.info("client id %r is this archive's again on broker %s: its connection has lasted %g s, %s",
                        self.client_id, self.config.mqtt.address, SHORT_LIVED_S, held_again(self._take_over.by_count))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # The Receive Maximum bounds what waits here at QoS 1; a QoS 0 message (no station publishes
        # its reports so, and the broker never sends one again) is not bounded by it: past that
        # many waiting, one is dropped, so a flood while the disk is full cannot fill the memory.
        if message.qos == 0 and self._incoming.qsize() >= self.config.receive_maximum:
            self.counts["dropped"] += 1
            if not self._dropping:
                self._dropping = True
                logger.warning("dropped a QoS 0 message on %r: %d messages wait to be stored (a QoS 0 message "
                               "is not kept for the archive; stations publish their reports at QoS 1)",
                               message.topic[:200], self.config.receive_maximum)
            return
        if message.qos == 0:
            self._dropping = False
        self._incoming.put(Incoming(message.topic, message.payload, message.mid, message.qos))

    # ------------------------------------------------------------------ the storer

    def run(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.config.receive_maximum
        mqtt_config = self.config.mqtt
        self.client.connect_async(mqtt_config.host, mqtt_config.port, mqtt_config.keepalive,
                                  clean_start=False, properties=props)
        self.client.loop_start()
        watcher: threading.Thread | None = None
        try:  # from here on paho's thread runs: a failing start-up (the index unreadable) stops it too
            self._start_up_said()
            # the only one that starts paho's thread again: an MLLP exchange holding the storer does not hold it
            watcher = threading.Thread(target=self._watch, name="archive-network-watch", daemon=True)
            watcher.start()
            while not self._stop.is_set():
                try:
                    item = self._incoming.get(timeout=TICK_S)
                except queue.Empty:
                    continue
                self.handle(item)
        finally:
            self._watch_stop.set()
            if watcher is not None:  # before loop_stop: nothing starts paho's thread again once it is stopped
                watcher.join(WATCH_JOIN_S)
                if watcher.is_alive():
                    logger.warning("the archive's network watcher did not end within %g s", WATCH_JOIN_S)
            self.client.disconnect()
            self.client.loop_stop()
            self.store.close()
            logger.info("archive stopped: %d stored, %d duplicates, %d refused, %d QoS 0 dropped, %d tries "
                        "to store again this run", self.counts["stored"], self.counts["duplicates"],
                        self.counts["refused"], self.counts["dropped"], self.counts["retried"])

    def _start_up_said(self) -> None:
        """run()'s start-up lines: where reports go, the reports a lab system has not accepted (read from the index)
        and the HL7 addressing."""
        logger.info("archiving %s/+/report and %s/+/fhir into %s", self.prefix, self.prefix, self.store.directory)
        if self.hl7 is not None and self.hl7.directory is not None:
            logger.info("writing each specimen report stored from now on as HL7 v2.5.1 ORU^R01 into %s",
                        self.hl7.directory)
        if self.hl7 is not None and self.hl7.mllp_address is not None:
            logger.info("sending each specimen report stored from now on as HL7 v2.5.1 ORU^R01 over MLLP to %s, "
                        "acknowledged to the broker only once the receiver acknowledges it",
                        mllp.address_text(self.hl7.mllp_address))
        not_accepted = self.store.not_accepted_count() if self.hl7 is not None else 0
        if not_accepted:
            logger.warning("%d archived report%s not accepted by the lab system (rejected, or held behind one): "
                           "`smearscope archive find --not-accepted` lists them, `smearscope archive send-hl7 "
                           "--resend REPORT_ID` sends one", not_accepted, " is" if not_accepted == 1 else "s are")
        if self.hl7 is not None and self.hl7.addressing is not None:
            a = self.hl7.addressing
            logger.info("HL7 MSH-4 %s, MSH-5 %s, MSH-6 %s, MSH-11 %s", a.sending_facility or "(the report's station id)",
                        a.receiving_application or "(empty)", a.receiving_facility or "(empty)", a.processing_id)
            if a.processing_id != "P":
                logger.warning("HL7 messages are sent with MSH-11 %s (%s), not as production: recorded so; the "
                               "archive sends only the reports it stores from then on, so once the interface is "
                               "validated `smearscope archive send-hl7` without --hl7-processing-id sends these as P",
                               a.processing_id, {"T": "training", "D": "debugging"}[a.processing_id])

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        """The watcher thread: `_tick` every TICK_S until run() ends, whether the storer waits for a message, holds
        one the disk or the lab system refuses, or waits for the lab system's ACK. A failing tick is said at ERROR
        once per reason (repeats at DEBUG) and tried again at the next."""
        said: str | None = None
        while not self._watch_stop.wait(TICK_S):
            try:
                self._tick()
            except Exception as exc:  # said; the watcher must outlive one failed tick
                reason = f"{type(exc).__name__}: {exc}"
                if reason != said:
                    logger.error("the archive's network watcher failed (%s): tried again every %g s", reason, TICK_S,
                                 exc_info=exc)
                    said = reason
                else:
                    logger.debug("the archive's network watcher failed again (%s)", reason)
            else:
                said = None

    def _tick(self) -> None:
        """The watcher's checks: a take-over that ended, and paho's network thread (started again should it have
        ended, so the archive reconnects and keeps its session alive through a hold or a silent lab system, as
        the station's drain loop does)."""
        self._check_take_over_ended()
        self._network.ensure_running(self.client, self._stop.is_set())

    def handle(self, item: Incoming) -> None:
        """Store one message and acknowledge it; left unacknowledged only when stopping while the
        disk refuses it (the broker sends it again)."""
        try:
            record = self._read(item)
        except Refused as exc:
            self._refuse(item, str(exc))
            return
        try:
            stored = self._store(record)
        except OutsideArchive as exc:  # the message checks should make this impossible
            self._refuse(item, f"would be written outside the archive: {exc}")
            return
        if stored is None:
            return
        if stored.new:
            self.counts["stored"] += 1
            self._had_reports = True  # a session the broker loses from now on loses reports: said
            logger.info("stored %s %s from %s: %s", _what(record), record.report_id, record.station, stored.path)
        else:
            self.counts["duplicates"] += 1
            logger.info("%s %s from %s was archived already (a repeated delivery): not stored again",
                        _what(record), record.report_id, record.station)
        self.client.ack(item.mid, item.qos)

    def _read(self, item: Incoming) -> ReportMessage | BundleMessage:
        if len(item.payload) > self.config.max_message_bytes:
            raise Refused(f"{len(item.payload)} bytes, over the archive's limit of {self.config.max_message_bytes}")
        leaf = item.topic.rsplit("/", 1)[-1]
        if leaf == REPORT_LEAF:
            return read_report(station_of(item.topic, self.prefix, REPORT_LEAF), item.payload)
        if leaf == FHIR_LEAF:
            return read_bundle(station_of(item.topic, self.prefix, FHIR_LEAF), item.payload)
        raise Refused("not a report or FHIR topic")

    def _refuse(self, item: Incoming, reason: str) -> None:
        self.counts["refused"] += 1
        logger.error("refused a message on %r (%d bytes): %s; acknowledged, not stored", item.topic[:200],
                     len(item.payload), reason)
        self.client.ack(item.mid, item.qos)

    def _store(self, record: ReportMessage | BundleMessage) -> Stored | None:
        """Store `record`, trying again while the disk (or a link in the archive, LinkOutOfArchive)
        refuses it; None when stopped meanwhile. The ERROR is said once per hold, and again only if the
        reason changes. OutsideArchive (a name the checks let through) is not tried again."""
        failing_since: float | None = None
        said: tuple[str, int | None, str | None] | None = None
        while True:
            try:
                stored = (self.store.put_report(record) if isinstance(record, ReportMessage)
                          else self.store.put_bundle(record))
            except (OSError, sqlite3.Error) as exc:
                if self._stop.is_set():  # stopped while an MLLP receiver kept the ACK waiting
                    logger.warning("stopping with %s %s unstored and unacknowledged: the broker sends it "
                                   "again at the next start", _what(record), record.report_id)
                    return None
                # the kind of refusal: a changed one is said again (an MLLP receiver's `kind`: unreachable, AE)
                reason = (type(exc).__name__, getattr(exc, "errno", None), getattr(exc, "kind", None))
                if failing_since is None:
                    failing_since = time.monotonic()
                else:
                    self.counts["retried"] += 1
                if reason != said:
                    logger.error("cannot store %s %s from %s (%s: %s): NOT acknowledged, so the broker keeps "
                                 "it and the reports behind it; trying again every %g s", _what(record),
                                 record.report_id, record.station, type(exc).__name__, exc, self.config.retry_s)
                    said = reason
                if self._stop.wait(self.config.retry_s):
                    logger.warning("stopping with %s %s unstored and unacknowledged: the broker sends it "
                                   "again at the next start", _what(record), record.report_id)
                    return None
                continue
            if failing_since is not None:
                logger.warning("storing again: %s %s stored after %.0f s of refusals", _what(record),
                               record.report_id, time.monotonic() - failing_since)
            return stored


def no_mqtt_answer(config: ArchiveConfig, reason: str, socket_broken: bool, port_speaks_tls: bool) -> str:
    """What the archive says when the broker's port took the connection but gave no CONNACK. A socket broken
    before it (`socket_broken`) is said as such, the scheme named only where the port is seen to speak TLS
    (`port_speaks_tls`, paho_client.speaks_tls asked once per streak; a full or stopping broker breaks it too); under TLS, a broker that refuses the client certificate (or
    its lack) breaks the connection so."""
    mqtt_config = config.mqtt
    tls = mqtt_config.tls
    retrying = f"retrying with backoff up to {mqtt_config.reconnect_max_delay_s} s"
    if socket_broken and tls is not None and refuses_client_cert(reason):  # a TLS 1.3 broker refuses so
        what = (f"refused the client certificate {tls.certfile} ({reason}): use one signed by the CA the broker "
                "trusts, not expired nor revoked (--certfile, --keyfile)" if tls.certfile is not None else
                f"asks for a client certificate ({reason}): give one signed by the CA the broker trusts, "
                "--certfile and --keyfile")
        return f"broker {mqtt_config.address} {what}; {retrying}"
    if socket_broken:
        scheme = ("; its port answers in TLS: use mqtts://HOST:PORT with --ca-file"
                  if tls is None and port_speaks_tls else "")
        return f"broker {mqtt_config.address} closed the connection before answering CONNECT ({reason}){scheme}; {retrying}"
    return (f"broker {mqtt_config.address} took the connection but gave no MQTT answer to CONNECT ({reason}): is "
            f"--broker the broker's MQTT port? (a WebSockets listener, a dashboard's port, does not serve the "
            f"archive); {retrying}")


def _what(record: ReportMessage | BundleMessage) -> str:
    return "FHIR bundle of report" if isinstance(record, BundleMessage) else "report"
