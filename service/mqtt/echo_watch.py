"""Under MQTT 3.1.1 mosquitto acknowledges a PUBLISH its ACL denies (or one over its
`message_size_limit`) and drops it: the station would count a report delivered that nobody got.
Under 3.1.1 the station therefore subscribes, at each connection, to its own outbox topics
(`field`, `report`, `cells`) and waits for the first message it sends to each to come back: the
broker delivers a message it took to every subscriber, this station too. A topic whose message
the broker acknowledged and did not deliver back within ECHO_BOUND_S is said at ERROR, naming the
ACL lines to add: write, and read, since mosquitto 2.0.11 grants a 3.1.1 subscription its ACL does
not let the station read and then delivers nothing, so the two causes look alike. Once one comes
back the topic is left (unsubscribed): the check costs one echoed message per topic and
connection. A broker that refuses the subscription (SUBACK 0x80) leaves the station unable to
tell, said once. MQTT 5 needs none of this: the broker refuses a denied message (PUBACK 0x87) and
the station keeps it (service.mqtt.inflight)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

#: How long after its acknowledgement a message must have come back (s): the broker delivers it
#: to the subscribers before or just after it acknowledges it, on this same connection.
ECHO_BOUND_S = 10.0


class AckedEcho:
    """The first message acknowledged on connection number `connection` that must come back within
    ECHO_BOUND_S of its PUBACK (one per topic and connection; service.mqtt.run_watch's own run state
    too). An acknowledgement the drain thread settles after a reconnect is of the connection before:
    its echo came, or did not, on that one, so it starts no wait on this one."""

    __slots__ = ("at", "connection", "seq")

    def __init__(self, connection: int) -> None:
        self.connection = connection
        self.seq: int | None = None
        self.at: float | None = None  # monotonic time of the PUBACK

    def acked(self, seq: int, connection: int) -> bool:
        """Outbox message `seq` acknowledged on connection number `connection`: True when that starts the wait."""
        if connection != self.connection or self.at is not None:
            return False
        self.seq, self.at = seq, time.monotonic()
        return True

    def overdue(self) -> bool:
        """Acknowledged, and not back within ECHO_BOUND_S (read now: a test may shorten it)."""
        return self.at is not None and time.monotonic() - self.at > ECHO_BOUND_S


class EchoWatch:
    """The station's own messages coming back to it, one per topic and connection, under MQTT 3.1.1."""

    def __init__(self, topics: Sequence[str], user: str | None, address: str) -> None:
        self.topics = tuple(topics)
        self.user = user  # the station's MQTT user name, for the ACL line (None: anonymous)
        self.address = address
        self._lock = threading.Lock()
        self._client: Any = None
        self._connection = 0  # this connection's number (InFlight.connected)
        self._sub_mid: int | None = None
        #: topic -> "subscribing", "waiting" (granted, nothing back yet) or "back" (left);
        #: a topic the broker refused to subscribe to is not in it.
        self._state: dict[str, str] = {}
        self._acked: dict[str, AckedEcho] = {}  # topic -> its first message acknowledged on this connection
        self._said_dropped: set[str] = set()
        self._said_unreadable = False

    def connected(self, client: Any, v311: bool, connection: int) -> None:
        """A new connection, number `connection` (paho's thread, in on_connect, before any outbox
        message is sent on it)."""
        with self._lock:
            self._client, self._state, self._acked, self._sub_mid = client, {}, {}, None
            self._connection = connection
            if not v311:
                return
            self._state = dict.fromkeys(self.topics, "subscribing")
            _, mid = client.subscribe([(topic, 1) for topic in self.topics])
            self._sub_mid = mid

    def on_subscribe(self, client: Any, mid: int, reason_codes: Sequence[Any]) -> None:
        """The broker's SUBACK (paho's thread): which own topics this station may read back."""
        with self._lock:
            if client is not self._client or mid != self._sub_mid:
                return
            refused = [t for t, code in zip(self.topics, reason_codes, strict=False) if code.is_failure]
            for topic in self.topics:
                if topic in refused:
                    self._state.pop(topic, None)
                elif self._state.get(topic) == "subscribing":
                    self._state[topic] = "waiting"
        if refused and not self._said_unreadable:
            self._said_unreadable = True
            logger.warning(
                "MQTT 3.1.1: broker %s refuses this station's subscription to its own %s, so the station cannot "
                "check that the broker passes on what it acknowledges there (under 3.1.1 mosquitto acknowledges and "
                "drops a message its ACL denies): add %s to the broker's acl_file, or let the station speak MQTT 5",
                self.address, ", ".join(refused), self._lines(("read",), refused))

    def heard(self, topic: str) -> bool:
        """A message on `topic` (paho's thread): True when it was one this watch waits for (handled)."""
        with self._lock:
            if topic not in self._state or self._client is None:
                return False
            if self._state[topic] == "back":
                return True  # one more echo in flight when the topic was left
            self._state[topic] = "back"
            self._acked.pop(topic, None)
            client = self._client
            again = topic in self._said_dropped
            self._said_dropped.discard(topic)
        client.unsubscribe(topic)
        if again:
            logger.info("MQTT 3.1.1: messages to %s come back from broker %s again: it passes them on", topic,
                        self.address)
        return True

    def acked(self, seq: int, topic: str, connection: int) -> None:
        """The broker acknowledged outbox message `seq` to `topic` on connection number `connection`
        (the drain thread, which may settle it after a reconnect: then its echo came, or did not, on
        the connection before, and this one's check does not wait for it)."""
        with self._lock:
            if self._state.get(topic) == "waiting" and topic not in self._acked:
                wait = AckedEcho(self._connection)
                if wait.acked(seq, connection):
                    self._acked[topic] = wait

    def check(self) -> None:
        """Say at ERROR a topic whose acknowledged message did not come back in time (the drain thread)."""
        with self._lock:
            late = [(topic, wait.seq) for topic, wait in self._acked.items()
                    if wait.overdue() and topic not in self._said_dropped]
            self._said_dropped.update(topic for topic, _ in late)
        for topic, seq in late:
            logger.error(
                "MQTT 3.1.1: broker %s acknowledged outbox message seq %d to %s and it did not come back to this "
                "station's own subscription within %.0f s: under 3.1.1 mosquitto acknowledges and drops a message its "
                "ACL denies (or one over its message_size_limit), so the messages sent there count as delivered and "
                "nobody gets them, unless the ACL denies only this station reading them back. Give it both: %s in "
                "the broker's acl_file (config/mosquitto.acl.example), and reload it; or let the station speak "
                "MQTT 5 (protocol = \"auto\"), where the broker refuses such a message and the station keeps it",
                self.address, seq, topic, ECHO_BOUND_S, self._lines(("write", "read"), [topic]))

    def _lines(self, rights: tuple[str, ...], topics: Sequence[str]) -> str:
        where = f"under 'user {self.user}'" if self.user is not None else "for anonymous clients (before any 'user' line)"
        return " and ".join(f"'topic {right} {t}'" for t in topics for right in rights) + " " + where
