"""The outbox messages handed to paho and not yet acknowledged: the drain thread's bookkeeping.

The drain thread sends the next outbox messages while fewer than `window` are unacknowledged, and
settles paho's acknowledgements: an acknowledged message leaves the outbox, a rejected one stays
for a retry. Acknowledgements arrive on paho's thread as events (`post`) and are consumed only by
the drain thread, so a PUBACK that arrives before publish() has returned its mid can be neither
lost nor misattributed.

An acknowledged message whose row cannot be deleted (disk full) is remembered and never sent again
by this process (after a restart it is sent again: consumers dedupe by message id); the delete is
tried again every DELETE_RETRY_S, oldest first, in parts as large as the disk has room for (the
outbox checkpoints before it gives up on a part: the room the WAL took for the parts before). The
set is bounded by the outbox: each was in it when acknowledged. A message larger than the packet limit
(the broker's Maximum Packet Size, or the configured one) is parked: logged once, counted, left in
the outbox and skipped, so it never blocks the messages behind it; it is tried again after a
reconnect (the broker's limit may have changed). So is a message the broker refuses as too large
(PUBACK 0x95: mosquitto's `message_size_limit`, which no CONNACK announces). It stays counted as
parked while it is tried again, and is said again only when what the station knows of it changed
(refused by the broker rather than over the announced limit, its size, the connection's limit):
a broker restarted with the same limit refuses it at every reconnect, and one line says that.
So is a message `hold` keeps back (a run the broker shows further along: service.mqtt.run_watch),
until it no longer does.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from smearscope.service.mqtt.outbox import Outbox, OutboxMessage
from smearscope.service.mqtt.paho_client import PACKET_TOO_LARGE
from smearscope.service.mqtt.parked import present_seqs
from smearscope.service.mqtt.reserve import failure_cause, is_disk_full

logger = logging.getLogger(__name__)

#: Acknowledged messages deleted per transaction at most (a bound on SQL parameters too).
DELETE_PART = 500
#: After a delete that failed, the next try waits this long (s): not a failing write every tick.
DELETE_RETRY_S = 10.0


def _varint_size(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(message: OutboxMessage, properties: Properties | None) -> int:
    """Bytes of the PUBLISH packet paho will send for `message` (MQTT 5 when `properties`)."""
    remaining = 2 + len(message.topic.encode()) + (2 if message.qos else 0) + len(message.payload)
    if properties is not None:
        remaining += len(properties.pack())  # type: ignore[no-untyped-call]
    return 1 + _varint_size(remaining) + remaining


class InFlight:
    """mid -> outbox seq of the messages paho holds for us, and the window that bounds them."""

    def __init__(self, outbox: Outbox, window: int, user: str | None = None) -> None:
        self.outbox = outbox
        self.user = user  # the station's MQTT user name, for the broker's ACL (None: anonymous)
        #: Unacknowledged messages at most; lowered to the broker's Receive Maximum on connect.
        self.window = window
        # (client, mid, reason code, connection) from on_publish, or reason None for a message dropped
        # at reconnect; connection: `connection` when it was posted (the connection it came on).
        self._events: queue.SimpleQueue[tuple[mqtt.Client, int, ReasonCode | None, int]] = queue.SimpleQueue()
        #: Successful connections so far, counted on paho's thread (connected); events carry it.
        self.connection = 0
        self._seq_by_mid: dict[int, int] = {}
        self._topic_by_seq: dict[int, str] = {}
        #: (topic, reason code) of rejections said at WARNING; forgotten when that topic is acknowledged.
        self._rejections_said: set[tuple[str, int]] = set()
        self._seqs: set[int] = set()
        #: Acknowledged by the broker, not yet deleted from the outbox (a write failed).
        self._acked_undeleted: set[int] = set()
        self._delete_retry_at = 0.0
        self._delete_failing: str | None = None  # why the last delete failed, said once
        #: Largest PUBLISH packet the broker (or the configuration) accepts.
        self.max_packet_size: int | None = None
        #: seq -> packet size of messages too large to send (parked; see the module docstring); kept
        #: while one is tried again after a reconnect, forgotten once it is acknowledged or gone.
        self.parked: dict[int, int] = {}
        #: Parked messages this connection may try again (each once).
        self._retry: set[int] = set()
        #: seq -> what was said of a parked message (why, its size, the limit): said again only when it changes.
        self._parked_said: dict[int, tuple[str, int, int | None]] = {}
        #: Told (seq, topic, connection it was acknowledged on) of each acknowledged message
        #: (service.mqtt.echo_watch, service.mqtt.run_watch), on the drain thread: that may be after a reconnect.
        self.on_acked: Callable[[int, str, int], None] | None = None
        #: Messages not to send now (parked too): a run the broker shows further along (service.mqtt.run_watch).
        self.hold: Callable[[OutboxMessage], bool] | None = None

    def __len__(self) -> int:
        return len(self._seq_by_mid)

    def undelivered(self) -> tuple[int, int]:
        """(outbox messages the broker has yet to acknowledge, acknowledged ones still in the outbox:
        a full disk refused their delete); any thread. The outbox's messages are read first, then
        looked up among the acknowledged: one acknowledged in between is counted as such, one deleted
        in between (by the drain thread, which forgets it as kept after its delete, or by an expiry or
        an eviction) is not counted at all, never as kept (a count of the set did both: an
        unacknowledged message then went uncounted)."""
        kept = self._acked_undeleted
        if not kept or self._delete_failing is None:  # none kept, or being deleted now: not kept by a full disk
            return self.outbox.counts().messages, 0
        seqs = self.outbox.read(lambda conn: [r[0] for r in conn.execute("SELECT seq FROM outbox")])
        acked = sum(1 for seq in seqs if seq in kept)
        return len(seqs) - acked, acked

    def parked_now(self) -> tuple[dict[int, int], dict[int, tuple[str, int | None]]]:
        """(seq -> packet size of the parked messages, seq -> why and the packet limit of those parked as
        too large: "over" the connection's limit, or "refused" by the broker); any thread."""
        parked, said = dict(self.parked), dict(self._parked_said)
        return parked, {seq: (said[seq][0], said[seq][2]) for seq in parked if seq in said}

    def parked_present(self) -> int:
        """The parked messages still in the outbox (any thread): one deleted since it was parked (an
        expired field message, an eviction) is forgotten only at the next connection, and counted
        here it would stand for a message still waiting (the stop's wait took that one as parked)."""
        return len(present_seqs(self.outbox, list(self.parked)))

    def connected(self) -> int:
        """A new connection (paho's thread, in on_connect): its number, which the acknowledgements
        that come on it carry."""
        self.connection += 1
        return self.connection

    def post(self, client: mqtt.Client, mid: int, reason_code: ReasonCode | None) -> None:
        """An acknowledgement (or, with None, a message paho dropped); paho's thread, never blocks."""
        self._events.put((client, mid, reason_code, self.connection))

    def forget_all(self) -> None:
        """The client that held them is gone; the outbox re-sends them."""
        self._seq_by_mid.clear()
        self._seqs.clear()
        self._topic_by_seq.clear()

    def new_connection(self, max_packet_size: int | None) -> None:
        """A new connection: its packet limit; parked messages still in the outbox get another chance."""
        self.max_packet_size = max_packet_size
        self.forget_gone()
        self._retry = set(self.parked)

    def retry_parked(self) -> None:
        """Parked messages get another chance on this connection (held runs released on it)."""
        self._retry = set(self.parked)

    def forget_gone(self) -> None:
        """Parked messages no longer in the outbox (expired, evicted) are parked no more (the drain
        thread: at each connection, and after each expiry, so none is counted for long once gone)."""
        if self.parked:
            seqs = set(self.parked)
            for seq in seqs - present_seqs(self.outbox, seqs):  # expired or evicted meanwhile
                self._unpark(seq)

    def _unpark(self, seq: int) -> None:
        self.parked.pop(seq, None)
        self._parked_said.pop(seq, None)
        self._retry.discard(seq)

    def _say_parked(self, seq: int, key: tuple[str, int, int | None], message: str, *args: object) -> None:
        """Log a parked message at ERROR the first time, and again only when `key` changed; else DEBUG."""
        repeated = self._parked_said.get(seq) == key
        self._parked_said[seq] = key
        logger.log(logging.DEBUG if repeated else logging.ERROR, message, *args)

    def send(self, client: mqtt.Client, cursor: int,
             properties: Callable[[OutboxMessage], Properties | None], stop: threading.Event) -> int:
        """Hand paho the outbox messages after `cursor` while the window has room; the new cursor."""
        room = self.window - len(self._seq_by_mid)
        while room > 0 and not stop.is_set():
            batch = self.outbox.pending(limit=room, after_seq=cursor)
            if not batch:
                break
            sent: list[int] = []
            for message in batch:
                retry = message.seq in self._retry
                self._retry.discard(message.seq)
                if (message.seq in self._seqs or message.seq in self._acked_undeleted
                        or (message.seq in self.parked and not retry)):
                    cursor = message.seq  # sent after a failed-ack rewind, already delivered, or parked
                    continue
                if self.hold is not None and self.hold(message):
                    self.parked[message.seq] = publish_packet_size(message, None)
                    cursor = message.seq
                    continue
                props = properties(message)
                if self._too_large(message, props):
                    cursor = message.seq
                    continue
                info = client.publish(message.topic, message.payload, message.qos, message.retain,
                                      properties=props)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    # Not accepted by paho (queue full: command answers, status): retry this one on the
                    # next tick; a parked message keeps its one try of this connection, which was not made
                    if retry:
                        self._retry.add(message.seq)
                    logger.debug("paho refused outbox seq %d: %s", message.seq, info.rc)
                    room = 0
                    break
                # SUCCESS, or NO_CONN (connection just dropped): paho holds it until on_connect
                # drops it and the rewind re-sends it.
                cursor = message.seq
                self._seq_by_mid[info.mid] = message.seq
                self._topic_by_seq[message.seq] = message.topic
                self._seqs.add(message.seq)
                sent.append(message.seq)
                room -= 1
            try:
                self.outbox.mark_attempted(sent)
            except sqlite3.Error as exc:  # a diagnostic counter: never worth stopping the sends
                logger.debug("could not count attempts of %d messages: %s", len(sent), exc)
        return cursor

    def _too_large(self, message: OutboxMessage, props: Properties | None) -> bool:
        limit = self.max_packet_size
        if limit is None:
            return False
        size = publish_packet_size(message, props)
        if size <= limit:
            return False
        self.parked[message.seq] = size
        self._say_parked(message.seq, ("over", size, limit),
                         "outbox message seq %d (%s, report %s) is %d bytes as a packet, over the "
                         "limit of %d: parked in the outbox, later messages go on; it is tried "
                         "again after a reconnect (raise the broker's max_packet_size or lower "
                         "mqtt.max_packet_size so it is split)", message.seq, message.kind,
                         message.report_id, size, limit)
        return True

    def settle(self, client: mqtt.Client | None) -> tuple[int, int]:
        """Apply the acknowledgements received so far: acknowledged messages leave the outbox.

        Returns (delivered, rejected by the broker). Events of another client (one replaced by
        the protocol fallback) and of messages not from the outbox are ignored.
        """
        acked: list[int] = []
        rejected = 0
        while True:
            try:
                sender, mid, reason_code, connection = self._events.get_nowait()
            except queue.Empty:
                break
            if sender is not client:
                continue  # from a client replaced by the protocol fallback
            seq = self._seq_by_mid.pop(mid, None)
            if seq is None:
                continue  # status, command response or telemetry, not an outbox message
            self._seqs.discard(seq)
            topic = self._topic_by_seq.pop(seq, "?")
            if reason_code is None:
                continue  # dropped at reconnect; the rewind re-sends it
            if int(reason_code.value) == PACKET_TOO_LARGE:
                self._park_refused(seq, topic)
            elif reason_code.is_failure:
                rejected += 1
                self._say_rejected(seq, topic, reason_code)
            else:
                acked.append(seq)
                if self.on_acked is not None:
                    self.on_acked(seq, topic, connection)
                if self.parked:
                    self._unpark(seq)  # tried again after a reconnect, and taken this time
                if self._rejections_said:  # mostly empty: no set rebuilt per acknowledged message
                    self._rejections_said = {said for said in self._rejections_said if said[0] != topic}
        self._acked_undeleted.update(acked)
        if self._acked_undeleted and time.monotonic() >= self._delete_retry_at:
            self._delete_acked()
        return len(acked), rejected

    def _park_refused(self, seq: int, topic: str) -> None:
        """The broker refused the message as too large: park it, as one over the known limit. Its row is
        read for its size and report; an outbox that cannot be read leaves them unknown (0, "?") and the
        message parked all the same: raised here, the acknowledgements settled beside it were lost."""
        try:
            message = next(iter(self.outbox.pending(limit=1, after_seq=seq - 1)), None)
        except sqlite3.Error as exc:
            logger.debug("outbox message seq %d refused as too large: its row not read (%s)", seq, exc)
            message = None
        size = publish_packet_size(message, None) if message is not None and message.seq == seq else 0
        self.parked[seq] = size
        self._say_parked(seq, ("refused", size, self.max_packet_size),
                         "broker refused outbox message seq %d to %s (report %s, %d bytes as a packet) as too large "
                         "(Packet too large, 0x95: mosquitto's message_size_limit): parked in the outbox, later "
                         "messages go on; it is tried again after each reconnect, said again only if something "
                         "changes (raise the broker's message_size_limit, or set mqtt.max_packet_size below it so "
                         "cells are split)", seq, topic, message.report_id if message is not None else "?", size)

    def _say_rejected(self, seq: int, topic: str, reason_code: ReasonCode) -> None:
        """A WARNING for the first rejection of a topic with a reason; its repeats (each waiting
        message, each retry) at DEBUG until a message to that topic is acknowledged."""
        code = int(reason_code.value)
        first = (topic, code) not in self._rejections_said
        self._rejections_said.add((topic, code))
        hint = (f"; the broker's ACL must let user {self.user!r} write {topic}" if self.user is not None
                else f"; the broker's ACL must let anonymous clients write {topic}") if code == 0x87 else ""
        logger.log(logging.WARNING if first else logging.DEBUG,
                   "broker rejected outbox message seq %d to %s: %s (0x%02x); kept in the outbox for retry%s%s",
                   seq, topic, reason_code.getName(), code, hint,
                   " (further rejections to this topic logged at DEBUG)" if first else "")

    def _delete_acked(self) -> None:
        """Delete the acknowledged messages, oldest first; a part refused for lack of room is halved
        (down to one message), so a full disk deletes what its room allows."""
        waiting = sorted(self._acked_undeleted)
        part = DELETE_PART
        while waiting:
            chunk = waiting[:part]
            try:
                self.outbox.ack_many(chunk)
            except sqlite3.Error as exc:
                if is_disk_full(exc) and len(chunk) > 1:
                    part = len(chunk) // 2
                    continue
                self._delete_failed(exc)
                return
            self._acked_undeleted.difference_update(chunk)
            waiting = waiting[len(chunk):]
        if self._delete_failing is not None:
            logger.info("acknowledged messages deleted from the outbox again")
            self._delete_failing = None

    def _delete_failed(self, exc: sqlite3.Error) -> None:
        cause = failure_cause(exc)
        level = logging.WARNING if is_disk_full(exc) else logging.ERROR
        logger.log(logging.DEBUG if cause == self._delete_failing else level,
                   "cannot delete %d acknowledged messages from the outbox (%s); they are not sent again, "
                   "the delete is tried again every %.0f s", len(self._acked_undeleted), cause, DELETE_RETRY_S)
        self._delete_failing = cause
        self._delete_retry_at = time.monotonic() + DELETE_RETRY_S
