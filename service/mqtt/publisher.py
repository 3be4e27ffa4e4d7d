"""The station's MQTT publisher: the only module that talks MQTT.

Field and report messages go through the durable `Outbox`: `publish_report()` only writes the
outbox and wakes the drain thread, which hands messages to paho in order with at most
`max_inflight` unacknowledged, and deletes each from the outbox on its PUBACK (PUBCOMP at QoS 2).
After a reconnect (or a restart of the process) the unacknowledged ones are re-sent from the
outbox, oldest first: paho's own copies are dropped in `on_connect` so the order holds and the
client does not send them twice. Delivery is at-least-once; consumers dedupe by `message_id`
(reports: `report_id`); see docs/MQTT.md.

Availability: retained "online" on `<prefix>/<station>/status` in `on_connect`, retained "offline"
as the Last Will and at clean stop. A connection counts as up only after a successful CONNACK;
a refused one (bad password, not authorised) is logged with its reason code and exposed in `state`.
paho's connection callbacks are service.mqtt.connection_events (`ConnectionEvents`, a part of
`MqttPublisher`).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.mqtt import paho_client
from smearscope.service.mqtt.command_worker import CommandHandler, CommandWorker
from smearscope.service.mqtt.connection_events import ConnectionEvents
from smearscope.service.mqtt.drain_errors import DrainErrors
from smearscope.service.mqtt.echo_watch import EchoWatch
from smearscope.service.mqtt.envelope import (
    build_envelope,
    message_properties,
    response_body,
    response_properties,
)
from smearscope.service.mqtt.failure_news import FailureNews
from smearscope.service.mqtt.inflight import InFlight
from smearscope.service.mqtt.network_thread import NetworkThreadWatch
from smearscope.service.mqtt.outbox import MessageKind, NewMessage, Outbox, StateWriter
from smearscope.service.mqtt.paho_client import configured_client, paho_log_level, publish_waiting
from smearscope.service.mqtt.parked import ParkedReader
from smearscope.service.mqtt.renamed import say_stored_under_other_ids
from smearscope.service.mqtt.run_watch import RunStateWatch
from smearscope.service.mqtt.secrets import SecretFiles
from smearscope.service.mqtt.state import PublisherState
from smearscope.service.mqtt.take_over import TakeOverWatch
from smearscope.service.mqtt.telemetry_bound import TelemetryBound
from smearscope.service.mqtt.twin_watch import TwinWatch

logger = logging.getLogger(__name__)

TelemetrySource = Callable[[], Mapping[str, Any]]

_STATION_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_DRAIN_TICK_S = 0.5
_FAILED_ACK_RETRY_S = 30.0
#: How long a command response waits for room in paho's queue before it is given up (logged).
_RESPONSE_WAIT_S = 10.0


class MqttPublisher(ConnectionEvents):
    """Publishes a station's status, field/report messages (via the outbox), telemetry and
    command responses; receives commands on `<prefix>/<station>/cmd/<name>` and hands them to
    a `CommandWorker` (service.mqtt.command_worker), whose answers it publishes."""

    #: What `stop` takes at most after its drain: its threads' joins (5 s in all) and the retained
    #: "offline" (2 s); the daemon's stop budget keeps this much for it (station.stopping).
    STOP_JOIN_S, STOP_OFFLINE_S = 5.0, 2.0
    STOP_AFTER_DRAIN_S = STOP_JOIN_S + STOP_OFFLINE_S

    def __init__(
        self,
        config: MqttConfig,
        station_id: str,
        outbox: Outbox,
        *,
        on_command: CommandHandler | None = None,
        telemetry_source: TelemetrySource | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if not _STATION_ID.match(station_id):
            raise ValueError(f"station_id {station_id!r} must match {_STATION_ID.pattern}")
        self.config = config
        self.station_id = station_id
        self.outbox = outbox
        self.telemetry_source = telemetry_source
        self._secrets = SecretFiles(config, environ)  # the password read now: fails before any thread starts
        self.client_id = config.client_id or f"smearscope-{station_id}"
        # which process sends the samples: two stations given one station_id (a cloned config) send
        # under two instance ids in turn, which a dashboard says (docs/MQTT.md, "Telemetry")
        self.instance = {"instance_id": uuid.uuid4().hex[:12], "host": socket.gethostname()}
        base = f"{config.topic_prefix}/{station_id}"
        self.status_topic = f"{base}/status"
        self.field_topic = f"{base}/field"
        self.report_topic = f"{base}/report"
        self.cells_topic = f"{base}/cells"
        self.telemetry_topic = f"{base}/telemetry"
        self.twins = TwinWatch(station_id, self.telemetry_topic, self.instance)
        self.run_watch = RunStateWatch(station_id, f"{base}/run",  # a state older than the broker's
                                       wake=lambda: self._wake.set(), store=outbox, user=config.username)
        self.command_filter = f"{base}/cmd/#"
        self._command_prefix = f"{base}/cmd/"
        self._response_prefix = f"{base}/cmd_response/"

        self._protocol = MQTTProtocolVersion.MQTTv311 if config.protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5
        self._state_lock = threading.Lock()
        self._state = PublisherState(status="stopped", protocol=self._protocol_name())
        self._client: mqtt.Client | None = None
        self._epoch = 0  # successful connections so far; the drain loop rewinds on change
        self._packet_limit = config.max_packet_size  # this connection's; set in on_connect
        self._fallback_requested = False
        self._take_over = TakeOverWatch()  # another client logging in with this client id
        self._stopping = False
        self._socket_error: str | None = None  # paho's, while no CONNACK yet (paho thread only)
        self._connack_refused = False  # this attempt's CONNACK refused (paho thread only)
        self._client_password: str | None = None  # the password and renewed TLS context the client has
        self._client_context: ssl.SSLContext | None = None
        self._failure_news = FailureNews()  # which failures are said (service.mqtt.failure_news)
        self._tls_probe = paho_client.TlsProbe()  # a TLS listener given plain MQTT, asked once per streak
        self._wake = threading.Event()
        self._telemetry_bound = TelemetryBound()
        self._telemetry_now = threading.Event()  # a (re)connection: the station's state at once, not a period later
        self._stop_workers = threading.Event()
        #: Outbox messages handed to paho and not yet acknowledged (the drain thread's).
        self._inflight = InFlight(outbox, config.max_inflight, config.username)
        #: MQTT 3.1.1: its own messages come back, or the broker dropped what it acknowledged.
        self.echo = EchoWatch((self.field_topic, self.report_topic, self.cells_topic), config.username, config.address)
        self._inflight.on_acked = self._acked
        self._inflight.hold = self.run_watch.holds  # a run the broker shows further along: parked
        self._parked_summary = ParkedReader(outbox)
        self._drain_errors = DrainErrors(outbox.path)
        self._commands = CommandWorker(on_command, self._respond, self._stop_workers, tick_s=_DRAIN_TICK_S)
        self._network = NetworkThreadWatch()  # paho's network thread, started again should it end unasked
        self._paho_logger = logger.getChild("paho")  # filterable apart from ours
        self._threads: list[threading.Thread] = []
        #: Called on the drain thread after each reconnect (not the first connect), before the
        #: outbox's messages are sent again: e.g. retained state the broker may have lost (a crash
        #: without persistence) or restored older than the last sent (from its last save).
        self.on_reconnected: Callable[[], None] | None = None

    # ----------------------------------------------------------------- public API

    @property
    def state(self) -> PublisherState:
        with self._state_lock:
            return replace(self._state, in_flight=len(self._inflight),
                           parked=len(self._inflight.parked))

    def parked(self, max_age_s: float = 0.0) -> dict[str, Any]:
        """The outbox messages parked now, counted, the oldest named (service.mqtt.parked); any thread.
        With `max_age_s`, the last summary while the parked set is unchanged and it is younger than that."""
        parked, too_large = self._inflight.parked_now()  # an unreadable outbox: counts from memory
        return self._parked_summary(parked, too_large, time.time(), max_age_s=max_age_s)

    def command_response_topic(self, name: str) -> str:
        return self._response_prefix + name

    def start(self) -> None:
        """Connect in the background (never blocks on the network) and start the workers."""
        if self._client is not None:
            raise RuntimeError("publisher already started")
        self._stopping = False
        self._stop_workers.clear()
        self._set_state(status="connecting", protocol=self._protocol_name())
        say_stored_under_other_ids(self.outbox, f"{self.config.topic_prefix}/{self.station_id}")
        self._client = self._new_client()
        self._threads = [threading.Thread(target=self._drain_loop, name="mqtt-drain", daemon=True)]
        if self.telemetry_source is not None:
            self._threads.append(
                threading.Thread(target=self._telemetry_loop, name="mqtt-telemetry", daemon=True)
            )
        self._commands.start()  # before the drain loop, which replaces a dead command thread
        for thread in self._threads:
            thread.start()

    def publish_report(self, kind: MessageKind, report_id: str, payload: bytes, schema_version: str) -> int:
        """A field/report/cells message (JSON body) into the outbox, the sender woken; its outbox
        sequence number. Never touches the network."""
        return self.publish_many([(kind, report_id, payload, schema_version)])[0]

    def publish_many(self, items: list[tuple[MessageKind, str, bytes, str]],
                     also: StateWriter | None = None, extra: Sequence[NewMessage] = ()) -> list[int]:
        """Store several messages ((kind, report_id, JSON body, schema version) each) in one
        outbox transaction, with `also` (the caller's own tables) in the same one; `extra`:
        messages stored as they are, after those (a FHIR Bundle, the live run state)."""
        topics = {"report": self.report_topic, "field": self.field_topic, "cells": self.cells_topic}
        messages = []
        for kind, report_id, payload, schema_version in items:
            if kind not in topics:
                raise ValueError(f"kind must be one of {sorted(topics)}, not {kind!r}")
            message_id = uuid.uuid4().hex
            created_at = time.time()
            envelope = build_envelope(kind, self.station_id, report_id, message_id, schema_version,
                                      created_at, payload)
            # the outbox stamps its row itself, under its lock: a step of the wall clock between this
            # stamp and the row's store would otherwise leave the row on the clock before the step
            messages.append(NewMessage(kind, topics[kind], envelope, report_id, schema_version,
                                       qos=self.config.qos, message_id=message_id))
        for m in extra:  # this process's own run states, should one come back retained (run_watch)
            if m.topic == self.run_watch.topic:
                self.run_watch.stored(m.payload)
        seqs = self.outbox.put_many([*messages, *extra], also)
        self._wake.set()
        return seqs

    def publish_telemetry(self, values: Mapping[str, Any]) -> bool:
        """Publish telemetry at QoS 0 if connected; it is not stored, so False means dropped. It
        carries `interval_s`, so a dashboard knows when the next sample is overdue, and this process's
        `instance_id` and `host`, so it knows two stations that publish under one station id, and
        `parked`: the outbox messages held back (service.mqtt.parked), reports that have not arrived, and
        `held_runs`: the runs held (service.mqtt.run_watch), null until the start has decided."""
        client = self._client
        if client is None or not self.state.connected:
            return False
        payload = json.dumps({**values, "interval_s": self.config.telemetry_interval_s, "parked": self.parked(),
                              "held_runs": self.run_watch.held_published(), **self.instance}).encode()
        if not self._telemetry_bound.fits(self.telemetry_topic, payload, self._packet_limit):
            return False  # over the connection's packet limit: the broker would close it (telemetry_bound)
        info = client.publish(self.telemetry_topic, payload, qos=0)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def wait_until_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.state.connected:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_until_drained(self, timeout: float) -> bool:
        """True once the broker has acknowledged every outbox message it can be sent, within `timeout`
        seconds (the outbox then holds none, or only what a full disk keeps it from deleting:
        InFlight.undelivered, and the parked messages: too large, or held back, which no wait sends)."""
        deadline = time.monotonic() + timeout
        while self._inflight.undelivered()[0] > self._inflight.parked_present():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, drain_timeout: float | None = None) -> None:
        """Drain (bounded), publish retained "offline", disconnect and join the workers. What is not
        acknowledged stays in the outbox for the next start."""
        client = self._client
        if client is None:
            return
        timeout = self.config.stop_drain_timeout_s if drain_timeout is None else drain_timeout
        try:  # the stop goes on with an outbox it cannot read: what is in it stays for the next start
            drained = self.state.connected and self.wait_until_drained(timeout)
            waiting, kept = self._inflight.undelivered()  # kept: delivered, in the outbox still (a full disk refused their delete)
            parked = min(waiting, self._inflight.parked_present()) if self.state.connected else 0
            waiting = 0 if drained else waiting - parked
        except sqlite3.Error as exc:
            waiting = kept = parked = 0
            logger.warning("stopping without waiting for the broker or counting the outbox's messages: the outbox %s "
                           "cannot be read (%s: %s); what it holds is sent on next start", self.outbox.path,
                           type(exc).__name__, exc)
        where = "" if self.state.connected else " (not connected to the broker)"
        for n, what in ((waiting, f"messages still in the outbox{where}; they are sent on next start"),
                        (parked, ("parked messages in the outbox (too large for the broker, or held back); they are "
                         "tried again at the next start")),
                        (kept, ("delivered messages a full disk kept in the outbox; they are sent again on next start "
                               "(consumers drop repeats by message_id)"))):
            if n > 0:
                logger.warning("stopping with %d %s", n, what)
        self._stop_workers.set()
        self._wake.set()
        self._telemetry_now.set()
        self._commands.wake_to_stop()
        deadline = time.monotonic() + self.STOP_JOIN_S  # one bound for all, so the stop's budget holds
        for thread in [*self._threads, *self._commands.threads()]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.error("MQTT worker %s did not stop within %g s", thread.name, self.STOP_JOIN_S)
        self._stopping = True
        client = self._client  # the drain thread may have replaced it (protocol fallback)
        assert client is not None
        if self.state.connected:
            info = client.publish(self.status_topic, "offline", qos=1, retain=True, properties=self._status_properties())
            try:
                info.wait_for_publish(timeout=self.STOP_OFFLINE_S)
            except (RuntimeError, ValueError) as exc:
                logger.warning("could not publish retained offline status: %s", exc)
        client.disconnect()
        client.loop_stop()
        self._client = None
        self._set_state(status="stopped", connected_since=None)
        logger.info("MQTT publisher stopped")

    # ----------------------------------------------------------------- paho client

    def _new_client(self) -> mqtt.Client:
        cfg = self.config
        # made from the files as they are now: what the secrets read last is in it (_on_pre_connect)
        self._client_password, self._client_context = self._secrets.current()
        client = configured_client(cfg, self.client_id, self._protocol, self._client_password, self.status_topic,
                                   self.instance["instance_id"])
        client.on_log = self._on_log
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            client.connect_async(cfg.host, cfg.port, cfg.keepalive, clean_start=True)
        else:
            client.connect_async(cfg.host, cfg.port, cfg.keepalive)
        client.loop_start()
        logger.info("MQTT connecting to %s as %s (%s%s)", cfg.address, self.client_id, self._protocol_name(),
                    ", TLS" if cfg.tls else "")
        return client

    def renew_secrets(self) -> None:
        """Read the password and TLS files again (service.mqtt.secrets): on SIGHUP, the daemon's thread.
        The client takes a change before its next connection attempt, on its own thread (_on_pre_connect)."""
        self._secrets.renew()

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        # paho's network thread, before each attempt; the first one uses what the constructor read.
        # The client is changed here only: paho reads the password twice while it builds a CONNECT
        # (its length, then its bytes), and two threads setting it could leave the older one.
        with self._state_lock:
            after_failure = self._state.status in ("refused", "disconnected", "taken_over")
        if after_failure:
            self._secrets.renew()
        password, context = self._secrets.current()
        if password != self._client_password:
            client.username_pw_set(self.config.username, password)
            self._client_password = password
        if context is not None and context is not self._client_context and isinstance(client, paho_client.StationClient):
            client.renew_tls(context)
            self._client_context = context

    def _set_state(self, **changes: Any) -> None:
        with self._state_lock:
            self._state = replace(self._state, **changes)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        """paho's log lines on `<this module>.paho`, at the level `paho_log_level` gives them."""
        # Read without the lock: paho may call this with its own locks held.
        not_connected = self._stopping or not self._state.connected
        if not_connected and buf.startswith(paho_client.PAHO_SOCKET_LOST):  # said in _on_disconnect
            self._socket_error = buf.partition(": ")[2] or buf
        self._paho_logger.log(paho_log_level(level, buf, not_connected), "%s", buf)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        # Runs with paho's message lock held: never take our locks or call paho here.
        self._inflight.post(client, mid, reason_code)
        self._wake.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        self.run_watch.on_subscribe(client, userdata, mid, reason_codes, properties)
        self.echo.on_subscribe(client, mid, reason_codes)

    def _acked(self, seq: int, topic: str, connection: int) -> None:
        """An outbox message the broker acknowledged (the drain thread): under 3.1.1 it comes back."""
        self.echo.acked(seq, topic, connection)
        self.run_watch.acked(seq, topic, connection)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.echo.heard(message.topic):  # its own message back (MQTT 3.1.1): service.mqtt.echo_watch
            return
        if message.topic in (self.telemetry_topic, self.status_topic):  # another process under its id?
            self._own_topic_heard(message)
            return
        if message.topic == self.run_watch.topic:  # the broker's retained run state, once
            if self.run_watch.heard(bytes(message.payload), bool(message.retain)):
                client.unsubscribe(self.run_watch.topic)
            return
        if not message.topic.startswith(self._command_prefix):
            return
        name = message.topic[len(self._command_prefix) :]
        props = getattr(message, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        payload, retained = bytes(message.payload), bool(message.retain)
        if not self._commands.submit(name, payload, correlation, retained=retained):
            # Answered "busy" by the command thread: publishing here could not wait for room.
            self._commands.refuse(name, correlation)

    # ----------------------------------------------------------------- workers

    def _drain_loop(self) -> None:
        """Hand outbox messages to paho in order, at most max_inflight unacknowledged."""
        cursor = 0  # highest seq handed over in this connection epoch
        epoch_seen = 0
        rewind_at: float | None = None
        next_expiry = 0.0
        releases_seen = 0  # the run watch's releases the parked messages were tried again for
        parked_seen: tuple[int, object] = (0, None)  # a change (or the hold decided) is sent in a sample at once
        while not self._stop_workers.is_set():
            self._wake.wait(_DRAIN_TICK_S)
            self._wake.clear()
            try:
                if self._fallback_requested:
                    self._fall_back_to_311()
                with self._state_lock:  # before the acks: see _on_connect
                    epoch, connected = self._epoch, self._state.connected
                self._commands.ensure_running()
                self._network.ensure_running(self._client, self._stopping)  # paho's thread: reads acks, reconnects
                # The first rejection sets the retry time; later ones must not postpone it.
                if self._process_acks() and rewind_at is None:
                    rewind_at = time.monotonic() + _FAILED_ACK_RETRY_S
                if epoch != epoch_seen:
                    self._inflight.new_connection(self._packet_limit)
                    if epoch_seen:
                        self._reconnected_hook()
                if epoch != epoch_seen or (rewind_at is not None and time.monotonic() >= rewind_at):
                    # New connection or retry due: start over from the oldest unacked message.
                    epoch_seen, cursor, rewind_at = epoch, 0, None
                if time.monotonic() >= next_expiry:  # every 10 s, offline too: expired fields, free pages to the disk
                    next_expiry = time.monotonic() + 10.0  # first: a failure below must not stop the sending
                    if self.config.field_message_expiry_s:
                        self.outbox.expire_fields(time.time() - self.config.field_message_expiry_s)
                    self._inflight.forget_gone()  # parked ones expired or evicted: no longer counted
                    self.outbox.give_back_space()
                if connected:
                    self._check_take_over_ended()
                if not connected or not self.run_watch.may_send():  # first: the broker's retained run state
                    continue
                if self.run_watch.releases != releases_seen:  # held runs released (3.1.1: after their parking)
                    releases_seen, cursor = self.run_watch.releases, 0
                    self._inflight.retry_parked()
                cursor = self._send_batch(cursor)
                self.echo.check()
                self.run_watch.check()  # MQTT 3.1.1: its own run state back, or the ACL keeps the topic from it
                if (len(self._inflight.parked), self.run_watch.held_published()) != parked_seen:
                    parked_seen = (len(self._inflight.parked), self.run_watch.held_published())
                    self._telemetry_now.set()
            except Exception as exc:  # noqa: BLE001 - said by DrainErrors (ERROR once, traceback at DEBUG)
                # A broken outbox or client must not kill the thread silently; retry next tick.
                self._drain_errors.failed(exc)
                time.sleep(_DRAIN_TICK_S)
            else:  # not after `continue` (not connected): a pass that did not reach the outbox
                self._drain_errors.passed()

    def _reconnected_hook(self) -> None:
        try:
            if self.on_reconnected is not None:
                self.on_reconnected()
        except Exception:  # whatever it failed to send, the outbox's messages go on
            logger.exception("MQTT on-reconnect hook failed")

    def _send_batch(self, cursor: int) -> int:
        client = self._client
        assert client is not None
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        expiry = self.config.field_message_expiry_s
        return self._inflight.send(client, cursor, lambda m: message_properties(m, expiry) if v5 else None,
                                   self._stop_workers)

    def _process_acks(self) -> bool:
        """Delete acknowledged messages from the outbox; True if the broker rejected any."""
        delivered, rejected = self._inflight.settle(self._client)
        if delivered or rejected:
            with self._state_lock:
                self._state = replace(self._state, delivered=self._state.delivered + delivered,
                                      failed_acks=self._state.failed_acks + rejected)
        return rejected > 0

    def _respond(self, name: str, response: Mapping[str, Any], correlation: bytes | None) -> None:
        client = self._client
        if client is None:
            return
        props = response_properties(correlation) if self._protocol == MQTTProtocolVersion.MQTTv5 else None
        body = response_body(response)
        # paho refuses a message when its queue is full (a burst of commands): wait for room
        # rather than lose the answer; give up (logged) only after a while or at stop.
        publish_waiting(lambda: self._client or client, self.command_response_topic(name), body,
                        props, _RESPONSE_WAIT_S, self._stop_workers)

    def _telemetry_loop(self) -> None:
        assert self.telemetry_source is not None
        while True:
            self._telemetry_now.wait(self.config.telemetry_interval_s)
            self._telemetry_now.clear()  # before stop is looked at: a stop() in between is never wiped
            if self._stop_workers.is_set():
                return
            try:
                self.publish_telemetry(self.telemetry_source())
            except Exception:
                logger.exception("telemetry source failed")
