"""What the MQTT publisher does when paho reports on the connection: a CONNACK accepted or refused,
a connection that could not be made, one lost. A part of `MqttPublisher` (service.mqtt.publisher),
which hands these methods to its paho client; they run on paho's network thread.

An accepted CONNACK sets the in-flight window and packet limit the broker allows, hands paho's
unacknowledged messages back to the outbox (re-sent in order by the drain loop), publishes the
retained "online" and subscribes to the commands. A refusal is logged with its reason code (once while
it repeats) and kept in the publisher's state; a refused MQTT 5 falls back to 3.1.1 when the protocol
is "auto". Each failure is said once while it repeats, and at most once per `RESAY_S` (service.mqtt.failure_news) while failures
alternate (a refusal, then no CONNACK at all, ...), until a connection is made.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.mqtt import paho_client
from smearscope.service.mqtt.echo_watch import EchoWatch
from smearscope.service.mqtt.failure_news import FailureNews
from smearscope.service.mqtt.inflight import InFlight
from smearscope.service.mqtt.run_watch import RunStateWatch
from smearscope.service.mqtt.state import PublisherState
from smearscope.service.mqtt.take_over import (
    SHORT_LIVED_S,
    WITNESS_AGE_S,
    TakeOverWatch,
    held_again,
    taken_over_message,
)
from smearscope.service.mqtt.twin_watch import TwinWatch

#: The publisher's logger: what its connection says is said, and filtered, as it was before these
#: callbacks had a module of their own.
logger = logging.getLogger("smearscope.service.mqtt.publisher")

_UNSUPPORTED_PROTOCOL_VERSION = 0x84
#: QoS>0 slots kept free of outbox traffic for the status message and command responses.
_RESERVED_SLOTS = 4
#: Who else logs in with a station's client id, as its take-over ERROR names them.
_HOLDERS = ("a second station with this station_id: a cloned config or SD card; or the board this station "
            "replaced, still running")


class ConnectionEvents:
    """paho's connection callbacks of `MqttPublisher`: its connection state kept true to the broker's."""

    config: MqttConfig
    client_id: str
    status_topic: str
    command_filter: str
    telemetry_topic: str
    instance: dict[str, str]
    twins: TwinWatch
    run_watch: RunStateWatch
    echo: EchoWatch
    _response_prefix: str
    _protocol: MQTTProtocolVersion
    _state_lock: threading.Lock
    #: The owner says why no broker answered before the first connection (the station daemon's one
    #: notice, with the outbox path), so it is not said here too; it sets this False once said.
    owner_says_first_failure: bool = False
    _state: PublisherState
    _epoch: int
    _packet_limit: int
    _fallback_requested: bool
    _take_over: TakeOverWatch
    _stopping: bool
    _socket_error: str | None
    _connack_refused: bool
    _failure_news: FailureNews
    #: whether the broker's port answers in TLS, asked once while connections close before the CONNACK
    _tls_probe: paho_client.TlsProbe
    _wake: threading.Event
    _telemetry_now: threading.Event
    _inflight: InFlight
    _client: mqtt.Client | None
    _set_state: Callable[..., None]
    _new_client: Callable[[], mqtt.Client]

    def _protocol_name(self) -> Literal["MQTTv5", "MQTTv311"]:
        return "MQTTv5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "MQTTv311"

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._on_refused(reason_code)
            return
        # MQTT 5: the broker says how many unacknowledged QoS>0 messages it accepts (mosquitto:
        # 20); paho does not enforce it, so the drain loop does, leaving room for status traffic.
        receive_maximum = getattr(properties, "ReceiveMaximum", None) or 65535
        self._inflight.window = max(1, min(self.config.max_inflight, receive_maximum - _RESERVED_SLOTS))
        # MQTT 5: a packet over the broker's Maximum Packet Size makes it drop the connection, so
        # such a message would block every later one; the drain loop parks it instead.
        broker_limit = getattr(properties, "MaximumPacketSize", None)
        limit = min(self.config.max_packet_size, broker_limit or self.config.max_packet_size)
        # Unacked messages of the previous connection are re-sent from the outbox, in order, by
        # the drain loop; paho would otherwise re-send them itself, ahead of or behind new ones.
        # The drop events are queued before the epoch changes, so the drain loop sees them first.
        for m in client.drop_out_messages():
            if m.topic.startswith(self._response_prefix):  # a command answer given while down: in no outbox
                client.publish(m.topic, m.payload, qos=m.qos, properties=m.properties)
            else:
                self._inflight.post(client, m.mid, None)
        # before the drain loop can see the connection: a run state of its backlog sent ahead of
        # this subscription would come back as the retained one, hiding the broker's (run_watch)
        v311, connection = self._protocol == MQTTProtocolVersion.MQTTv311, self._inflight.connected()
        if self.run_watch.listening:
            self.run_watch.subscribing(client.subscribe(self.run_watch.topic, qos=0)[1], v311, connection)
        # its own messages back; acknowledgements of the connection before are not waited on
        self.echo.connected(client, v311, connection)
        self._take_over.connected()
        self._failure_news.ended()  # the next outage is news
        with self._state_lock:
            self._epoch += 1
            self._packet_limit = limit
            self._state = replace(self._state, status="connected", max_packet_size=limit, last_error=None,
                                  last_reason_code=0, connects=self._state.connects + 1,
                                  connected_since=time.time())  # for people; the take-over watch times it (monotonic)
        logger.info("MQTT connected to %s (%s, session present: %s)", self.config.address,
                    self._protocol_name(), flags.session_present)
        if self._protocol == MQTTProtocolVersion.MQTTv5:  # before its "online": who published the retained one
            client.subscribe(self.status_topic, qos=0)  # (_own_topic_heard)
        client.publish(self.status_topic, "online", qos=1, retain=True, properties=self._status_properties())
        paho_client.subscribe_commands(client, self.command_filter, self._protocol)
        client.subscribe(self.telemetry_topic, qos=0)  # another station under this id: service.mqtt.twin_watch
        self._wake.set()
        self._telemetry_now.set()

    def _on_refused(self, reason_code: ReasonCode) -> None:
        code = int(reason_code.value)
        if (code == _UNSUPPORTED_PROTOCOL_VERSION and self.config.protocol == "auto"
                and self._protocol == MQTTProtocolVersion.MQTTv5):
            logger.warning("broker refused MQTT 5 (%s); falling back to MQTT 3.1.1", reason_code)
            self._fallback_requested = True
            self._wake.set()
            return
        message = paho_client.refused_message(self.config, reason_code)
        with self._state_lock:
            repeated = self._state.status == "refused" and self._state.last_reason_code == code
        # Logged before the state says "refused", so whoever sees that state finds the reason in
        # the journal already (paho calls back on its one network thread: no second refusal can
        # come between). Same refusal again (paho retries with backoff): keep the journal readable.
        logger.log(logging.ERROR if self._news(message, repeated) else logging.DEBUG, "%s", message)
        self._connack_refused = True  # this attempt's end is said: _on_disconnect adds nothing
        with self._state_lock:
            self._state = replace(
                self._state,
                status="refused",
                last_error=message,
                last_reason_code=code,
                connected_since=None,
                refusals=self._state.refusals + 1,
            )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` (ssl.SSLError is one): the reason is there.
        self._say_disconnected(paho_client.connect_fail_message(self.config, sys.exc_info()[1]))

    def _say_disconnected(self, message: str) -> None:
        """No connection, and why: logged once while the reason stays the same, then the state; at
        DEBUG before the first connection while `owner_says_first_failure` (its owner says it)."""
        with self._state_lock:
            repeated = self._state.last_error == message
            owner_says = self.owner_says_first_failure and self._state.connects == 0
        news = self._news(message, repeated) and not owner_says
        logger.log(logging.WARNING if news else logging.DEBUG, "%s", message)  # before the state
        with self._state_lock:
            self._state = replace(self._state, status="disconnected", last_error=message, last_reason_code=None)

    def _news(self, message: str, repeated: bool) -> bool:
        """Whether a failure is said (not DEBUG): not the one said last, nor said within RESAY_S
        (service.mqtt.failure_news, the archive's rule too)."""
        return self._failure_news.news(message, repeated)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        socket_error, self._socket_error = self._socket_error, None
        # this attempt's CONNACK was a refusal, said by _on_refused; the state alone cannot tell,
        # it still says "refused" when a later attempt got no CONNACK at all
        refused, self._connack_refused = self._connack_refused, False
        if self._stopping:
            return
        with self._state_lock:
            was_connected = self._state.status == "connected"
            if was_connected:
                self._state = replace(self._state, status="disconnected", connected_since=None,
                                      last_error=f"connection lost: {reason_code.getName()}")
        closed = paho_client.closed_unanswered(socket_error, reason_code)
        if was_connected or refused or not closed:
            self._tls_probe.streak_ended()  # the next close is asked about again
        if not was_connected and closed and not refused and not self._fallback_requested:
            # no callback says why; a TLS listener given a plain CONNECT closes it too (a reset, or no error)
            self._say_disconnected(paho_client.closed_before_connack(
                self.config, socket_error or "closed, no error given", speaks_tls=self._tls_probe.port_speaks_tls(self.config)))
        elif not was_connected and not refused and reason_code.is_failure and not self._fallback_requested:
            # no CONNACK within the keepalive, or an answer that is no MQTT (a WebSockets listener's HTTP)
            self._say_disconnected(paho_client.no_connack(self.config, reason_code.getName()))
        elif was_connected:
            self._connection_lost(client, reason_code)

    def _connection_lost(self, client: mqtt.Client, reason_code: ReasonCode) -> None:
        """A connection the broker closed: an outage, or another client logging in with this client id
        (service.mqtt.take_over): said once at ERROR, and this station waits before it tries again."""
        was_taken_over = self._take_over.taken_over
        loss = self._take_over.lost(int(reason_code.value), witnessing=self._protocol == MQTTProtocolVersion.MQTTv5)
        if not loss.taken_over:
            if was_taken_over:  # it held the connection again: the usual backoff
                client.reconnect_delay_set(self.config.reconnect_min_delay_s, self.config.reconnect_max_delay_s)
            logger.warning("MQTT connection lost to broker %s (%s); reconnecting with backoff up to %d s",
                           self.config.address, reason_code, self.config.reconnect_max_delay_s)
            return
        assert loss.pause_s is not None
        client.reconnect_delay_set(loss.pause_s, loss.pause_s)  # paho waits so long before its next try
        message = taken_over_message(self.config.address, self.client_id, loss, int(reason_code.value), "station",
                                     _HOLDERS) + "; reports wait in the outbox. Give each station its own station_id"
        if loss.said:
            logger.error("%s", message)
        else:
            logger.debug("MQTT client id %r still taken over: trying again in %d s", self.client_id, loss.pause_s)
        with self._state_lock:
            self._state = replace(self._state, status="taken_over", last_error=message)

    def _status_properties(self) -> Properties | None:
        """A status message's MQTT 5 properties: this process's `instance_id` (None under 3.1.1)."""
        return paho_client.instance_properties(PacketTypes.PUBLISH, self.instance["instance_id"], self._protocol)

    def _own_topic_heard(self, message: mqtt.MQTTMessage) -> None:
        """A message on the station's telemetry topic (its own samples, and another station's under its
        station id: service.mqtt.twin_watch) or status topic: the retained status its subscription
        found at a reconnection (MQTT 5). Another process's (its `instance_id`), published at this
        connection's login (WITNESS_AGE_S old at most, where the broker tells its age), is a client
        that was connected under this station's client id until this connection began (service.mqtt.take_over). At the first connection it is the previous
        process's, a station restarted: not counted."""
        if message.topic == self.telemetry_topic:
            self.twins.sample(bytes(message.payload))
            return
        properties = getattr(message, "properties", None)
        said = dict(getattr(properties, "UserProperty", None) or []).get("instance_id")
        with self._state_lock:
            connects = self._state.connects
        age = paho_client.status_age_s(properties)  # a holder gone during a pause left one older
        if (message.retain and said is not None and said != self.instance["instance_id"] and connects > 1
                and (age is None or age <= WITNESS_AGE_S)):
            self._take_over.witness()

    def _check_take_over_ended(self) -> None:
        """The drain loop's, while connected: a connection made after a take-over that lasts is the
        station's again (the other client is gone); said at INFO, the usual backoff back."""
        client = self._client
        if client is None or not self._take_over.held():
            return
        client.reconnect_delay_set(self.config.reconnect_min_delay_s, self.config.reconnect_max_delay_s)
        logger.info("MQTT client id %r is this station's again on broker %s: its connection has lasted %g s, %s",
                    self.client_id, self.config.address, SHORT_LIVED_S, held_again(self._take_over.by_count))

    def _fall_back_to_311(self) -> None:
        """Asked for by a refused MQTT 5 CONNACK (protocol "auto"); run by the drain loop: the MQTT 5
        client stopped, a 3.1.1 one made in its place."""
        self._fallback_requested = False
        old = self._client
        self._protocol = MQTTProtocolVersion.MQTTv311
        self._set_state(protocol="MQTTv311")
        if old is not None:
            old.disconnect()
            old.loop_stop()
        self._inflight.forget_all()  # the old client's queue died with it; the outbox re-sends
        with self._state_lock:
            self._epoch += 1
        try:
            self._client = self._new_client()
        except Exception:  # e.g. TLS files caught mid-renewal: asked again, so the next tick tries again
            self._fallback_requested = True
            raise
