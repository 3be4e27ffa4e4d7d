"""Another client logging in with this client's id: what the station's publisher
(service.mqtt.connection_events) and the archive (service.archive.daemon) do about it.

A broker closes a client id's older connection when a new one logs in with that id (MQTT 5 sends
the older one DISCONNECT 0x8E "Session taken over"; mosquitto 2.0 only closes the socket, which paho
reports as "Unspecified error"). Two clients that both reconnect at once throw each other off about
once a second for ever: each sees "connection lost", messages in flight go again, a persistent
session's queue is split between them. So a take-over is said once at ERROR: 0x8E; or a connection
closed within `SHORT_LIVED_S` of opening whose start found, retained on the station's status
topic, a status another process published (MQTT 5 user property `instance_id`: the client thrown
off at this connection's login); or, where no such witness can be had (MQTT 3.1.1, the archive),
three connections in a row closed within `SHORT_LIVED_S` of opening. Then this client pauses before it tries
again (`PAUSE_S`, doubled while each try is closed as quickly, up to `PAUSE_MAX_S`): the other
keeps the connection, and this one takes it back only once the other is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: MQTT 5 DISCONNECT reason code "Session taken over".
SESSION_TAKEN_OVER = 0x8E
#: A connection the broker closes within this long of its CONNACK counts as a short one.
SHORT_LIVED_S = 5.0
#: A retained status older than this at a connection's start (the age the broker tells by its
#: Message Expiry countdown) was not published at that login: a client gone before, not one
#: thrown off by it.
WITNESS_AGE_S = 2
#: Short connections in a row (no 0x8E) taken for a take-over.
SHORT_LIVED_SAID = 3
#: The pause before the first try after a take-over, and its ceiling (doubled at each try the
#: broker closes as quickly): the client holding the id loses its connection once a pause, not
#: once a second.
PAUSE_S, PAUSE_MAX_S = 60, 300


@dataclass(frozen=True)
class Loss:
    """What one lost connection tells: `taken_over` (a take-over now, in a spell of them), `said`
    (the first of its spell: say it at ERROR), `short` (short connections in a row), `pause_s` (the
    wait before the next try; None: the client's usual backoff)."""

    taken_over: bool
    said: bool
    short: int
    pause_s: int | None


class TakeOverWatch:
    """One client's connections as the broker closes them: `connected` and `lost` on paho's network
    thread, `held` on the client's own (a lock between them)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._connected_at: float | None = None
        self._witnessed = False  # this connection found another process's retained status
        self.short = 0  # connections in a row closed within SHORT_LIVED_S
        self.pause_s: int | None = None  # the pause now in force (a spell of take-overs), else None
        self.spells = 0  # take-overs said (one each spell)
        self.by_count = False  # this spell was told by short connections alone: a broker restarting looks the same

    @property
    def taken_over(self) -> bool:
        """Whether this client has stepped back: taken over, not yet holding a connection again."""
        return self.pause_s is not None

    def connected(self) -> None:
        """A CONNACK accepted the connection."""
        with self._lock:
            self._connected_at = self._clock()
            self._witnessed = False

    def witness(self) -> None:
        """This connection found, retained on the client's status topic, a message another process
        published since this one's last connection (MQTT 5 user property `instance_id`): a client
        connected under this id until this connection began."""
        with self._lock:
            self._witnessed = True

    def held(self) -> bool:
        """True once when a connection made after a take-over has lasted SHORT_LIVED_S: the other
        client is gone, and this one goes back to its usual backoff."""
        with self._lock:
            if (self.pause_s is None or self._connected_at is None
                    or self._clock() - self._connected_at < SHORT_LIVED_S):
                return False
            self.pause_s, self.short = None, 0
            return True

    def lost(self, reason_code: int | None, *, witnessing: bool = False) -> Loss:
        """A connection this client had is closed by the broker (not by its own stop): `reason_code`
        the DISCONNECT's (MQTT 5), or paho's own for a closed socket. `witnessing`: the client looks
        at its retained status (`witness`), so a short connection is a take-over only where that
        found another process; else only the third short one in a row (a broker restarted three
        times within seconds looks the same)."""
        with self._lock:
            return self._lost(reason_code, witnessing)

    def _lost(self, reason_code: int | None, witnessing: bool) -> Loss:
        lasted = self._clock() - self._connected_at if self._connected_at is not None else None
        self._connected_at = None
        short = lasted is not None and lasted < SHORT_LIVED_S
        self.short = self.short + 1 if short else 0
        if witnessing:
            evidence = short and self._witnessed
        else:
            evidence = short and (self.short >= SHORT_LIVED_SAID or self.pause_s is not None)
        if reason_code != SESSION_TAKEN_OVER and not evidence:
            self.pause_s = None  # it held the connection, or lost it otherwise: a spell later is news again
            return Loss(False, False, self.short, None)
        said = self.pause_s is None
        if said:
            self.by_count = reason_code != SESSION_TAKEN_OVER and not witnessing
        self.pause_s = PAUSE_S if said else min(self.pause_s * 2, PAUSE_MAX_S)  # type: ignore[operator]
        self.spells += said
        return Loss(True, said, self.short, self.pause_s)


def taken_over_message(address: str, client_id: str, loss: Loss, reason_code: int | None, who: str,
                       holders: str) -> str:
    """The ERROR a take-over is said with: the broker, the client id, how it was told, the likely
    other holders (`holders`) and the pause. Told by short connections alone (no 0x8E, no witness),
    a broker restarted again and again looks the same: the sentence names both."""
    if reason_code == SESSION_TAKEN_OVER:
        how = f"the broker closed this {who}'s connection with reason 0x{SESSION_TAKEN_OVER:02X} (Session taken over)"
    elif loss.short >= SHORT_LIVED_SAID:
        return (f"MQTT client id {client_id!r} taken over on broker {address}, or that broker restarting again and "
                f"again: the broker closed this {who}'s connection {loss.short} times in a row, each within "
                f"{SHORT_LIVED_S:g} s of connecting, as it does when another client logs in with the same client id "
                f"({holders}), and as a broker restarted that often does (the connections alone cannot tell them "
                f"apart). This {who} leaves the connection to any other client and tries again in {loss.pause_s} s, "
                f"then every {PAUSE_S} to {PAUSE_MAX_S} s while its connections are closed as quickly")
    else:
        how = (f"the broker closed this {who}'s connection within {SHORT_LIVED_S:g} s of connecting, and its "
               f"retained status at that connection was another process's")
    return (f"MQTT client id {client_id!r} taken over on broker {address}: {how}, as it does when another client "
            f"logs in with the same client id ({holders}). This {who} leaves the connection to the other and tries "
            f"again in {loss.pause_s} s, then every {PAUSE_S} to {PAUSE_MAX_S} s while the other holds it")


def held_again(by_count: bool) -> str:
    """Why a connection that lasts ends a spell, as the INFO says it: the other client is gone, or
    (a spell told by short connections alone) the broker has stopped restarting."""
    return "the other client is gone, or the broker has stopped restarting" if by_count else "the other client is gone"
