"""The outbox messages handed to paho and not yet acknowledged: the drain thread's bookkeeping.

The drain thread sends the next outbox messages while fewer than `window` are unacknowledged, and
settles paho's acknowledgements: an acknowledged message leaves the outbox, a rejected one stays
for a retry. Acknowledgements arrive on paho's thread as events (`post`) and are consumed only by
the drain thread, so a PUBACK that arrives before publish() has returned its mid can be neither
lost nor misattributed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from smearscope.service.mqtt.outbox import Outbox, OutboxMessage

logger = logging.getLogger(__name__)


class InFlight:
    """mid -> outbox seq of the messages paho holds for us, and the window that bounds them."""

    def __init__(self, outbox: Outbox, window: int) -> None:
        self.outbox = outbox
        #: Unacknowledged messages at most; lowered to the broker's Receive Maximum on connect.
        self.window = window
        # (client, mid, reason code) from on_publish, or reason None for a message dropped at
        # reconnect.
        self._events: queue.SimpleQueue[tuple[mqtt.Client, int, ReasonCode | None]] = queue.SimpleQueue()
        self._seq_by_mid: dict[int, int] = {}
        self._seqs: set[int] = set()

    def __len__(self) -> int:
        return len(self._seq_by_mid)

    def post(self, client: mqtt.Client, mid: int, reason_code: ReasonCode | None) -> None:
        """An acknowledgement (or, with None, a message paho dropped); any thread, never blocks."""
        self._events.put((client, mid, reason_code))

    def forget_all(self) -> None:
        """The client that held them is gone; the outbox re-sends them."""
        self._seq_by_mid.clear()
        self._seqs.clear()

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
                if message.seq in self._seqs:  # sent after a failed-ack rewind
                    cursor = message.seq
                    continue
                info = client.publish(message.topic, message.payload, message.qos, message.retain,
                                      properties=properties(message))
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    # Not accepted by paho (queue full): retry this one on the next tick.
                    logger.debug("paho refused outbox seq %d: %s", message.seq, info.rc)
                    room = 0
                    break
                # SUCCESS, or NO_CONN (connection just dropped): paho holds it until on_connect
                # drops it and the rewind re-sends it.
                cursor = message.seq
                self._seq_by_mid[info.mid] = message.seq
                self._seqs.add(message.seq)
                sent.append(message.seq)
                room -= 1
            self.outbox.mark_attempted(sent)
        return cursor

    def settle(self, client: mqtt.Client | None) -> tuple[int, int]:
        """Apply the acknowledgements received so far: acknowledged messages leave the outbox.

        Returns (delivered, rejected by the broker). Events of another client (one replaced by
        the protocol fallback) and of messages not from the outbox are ignored.
        """
        acked: list[int] = []
        rejected = 0
        while True:
            try:
                sender, mid, reason_code = self._events.get_nowait()
            except queue.Empty:
                break
            if sender is not client:
                continue  # from a client replaced by the protocol fallback
            seq = self._seq_by_mid.pop(mid, None)
            if seq is None:
                continue  # status, command response or telemetry, not an outbox message
            self._seqs.discard(seq)
            if reason_code is None:
                continue  # dropped at reconnect; the rewind re-sends it
            if reason_code.is_failure:
                rejected += 1
                logger.warning("broker rejected outbox message seq %d: %s (0x%02x); kept for retry",
                               seq, reason_code.getName(), int(reason_code.value))
            else:
                acked.append(seq)
        if acked:
            self.outbox.ack_many(acked)
        return len(acked), rejected
