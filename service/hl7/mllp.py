"""Sending an HL7 message over MLLP (HL7's Minimal Lower Layer Protocol) and waiting for its ACK.

One TCP connection per message: the message framed as `<VT> message <FS><CR>`, then the receiver's
ACK read up to its `<FS><CR>`, never more than MAX_ACK_BYTES of it. Only an ACK whose MSA-2 is this
message's control id (hex: compared without case or the spaces an engine pads it with) and whose MSA-1 is AA or CA (accepted) delivers it; anything else raises
`NotAcknowledged`, an OSError, so the archive holds the report as it holds one a full disk refuses,
and tries again. Its `kind` says which: no answer at all (no connection, no whole answer within the
timeout, the connection closed with nothing said) is the lab system unreachable, held for as long
as it lasts; an answer that is an error of this exchange (AE/CE, an answer over 1 MiB, one that is
no ACK of this message) counts toward the archive's error hold (ERRORS). AR or CR (the receiver
refuses this very message: sending it again unchanged cannot help) raises `Rejected`, a
NotAcknowledged the archive records as final for that message and goes on from (docs/HL7.md).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import select
import socket
import threading
import time
import unicodedata
from collections.abc import Callable

from smearscope.device.ingest.errors import escaped_char
from smearscope.service.hl7 import lookup
from smearscope.service.hl7.encode import FIELD, SEGMENT_END

logger = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
ACCEPTED = ("AA", "CA")
#: An ACK larger than this is not one (a receiver that streams something else): no more is read.
MAX_ACK_BYTES = 1 << 20
#: The kind of an answer over MAX_ACK_BYTES, and of one that is no ACK of this message (no MSA, another
#: message's control id, closed before its end): the exchange's error, as AE/CE are.
TOO_BIG, NOT_ACK = "answer over 1 MiB", "not an ACK"
#: The kinds of an answer that is an error of this exchange: given up on after the archive's error hold.
ERRORS = ("AE", "CE", TOO_BIG, NOT_ACK)
#: The most of an answer that is no ACK kept with its error (what the receiver said): its first line alone,
#: so a receiver that echoes the message back puts no patient data in the journal (its MSH, not PID or OBX).
MAX_ANSWER_TEXT = 120
#: How often a send waiting for an ACK looks whether the archive is stopping (s).
STOP_POLL_S = 0.25


class NotAcknowledged(OSError):
    """The receiver did not acknowledge the message (the text says how; `kind` names the way, so a
    hold is said again when it changes: `unreachable`, `no-ack`, or the ACK's code)."""

    def __init__(self, text: str, kind: str = "no-ack", lis_text: str = "") -> None:
        super().__init__(text)
        self.kind = kind
        self.lis_text = lis_text  # what the receiver said of it (MSA-3, ERR), as it said it


#: MSA-1 of a receiver refusing the message itself (application reject, commit reject): final for it.
REJECTED = ("AR", "CR")
#: The most of a receiver's text (MSA-3 and its ERR segments) kept with a rejection.
MAX_LIS_TEXT = 2000


class Rejected(NotAcknowledged):
    """The receiver answered AR or CR: it refuses this message for good (`kind` the code, `lis_text` its
    MSA-3 and ERR text); the archive records it and goes on with the next report."""


#: Categories shown escaped in a lab system's text: device.ingest's (control, format, line and
#: paragraph separators) and surrogates, private use and unassigned characters.
_LAB_UNSEEN = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"))
_NOT_ASCII = re.compile(r"[^\x20-\x7e]")


def shown(text: str) -> str:
    """Text from the lab system as it may appear in a log line: control characters (C0, DEL, C1),
    format characters (bidi embeddings, overrides, isolates and marks, zero-width ones), the line
    and paragraph separators, surrogates, private-use and unassigned characters as \\xNN or \\uNNNN
    (device.ingest.errors.escaped_char), so an answer can neither start a forged line in the journal
    nor reorder the words around it."""
    return _NOT_ASCII.sub(
        lambda found: escaped_char(found) if unicodedata.category(found.group()) in _LAB_UNSEEN else found.group(), text)


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT, an IPv6 address in brackets ([fd00::5]:2575); ValueError saying
    what is wrong otherwise (the archive's config validates --hl7-mllp with it, so its daemon never
    meets one it cannot use)."""
    host, sep, port = text.rpartition(":")
    why = None
    if not sep:
        why = "no :PORT"
    elif not (port.isascii() and port.isdigit()):
        why = f"the port {port!r} is not a number" if port else "no port after the ':'"
    elif len(port) > 5 or not 0 < int(port) < 65536:
        why = f"the port {port[:12]}{'...' if len(port) > 12 else ''} is not one of 1 to 65535"
    elif host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            why = f"{host} is not an IPv6 address in brackets"
        host = host[1:-1]
    elif not host:
        why = "no host before the ':'"
    elif any(c in host for c in "[]:") or any(c.isspace() or not c.isprintable() for c in host):
        why = f"the host {host!r} is no host name or address (an IPv6 address goes in brackets: [fd00::5]:2575)"
    else:
        try:  # what the resolver is given: an empty label (a double dot) or one over 63 characters is no name
            host.encode("idna")
        except UnicodeError as exc:
            why = f"the host {host!r} is no host name ({exc})"
    if why is not None:
        raise ValueError(f"{text!r} is not HOST:PORT: {why}")
    return host, int(port)


def address_text(address: tuple[str, int]) -> str:
    """HOST:PORT as given: an IPv6 address in brackets ([fd00::5]:2575), as parse_address takes it."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _answer_start(data: bytes) -> str:
    """What a receiver's answer that is no ACK said, as kept and logged: its first line (segment), at most
    MAX_ANSWER_TEXT characters."""
    text = data.lstrip(START).decode("utf-8", errors="replace")
    return re.split(r"[\r\n]", text, maxsplit=1)[0][:MAX_ANSWER_TEXT]


def _frame(answer: bytearray, pos: int, look: int) -> tuple[bytes | None, int]:
    """(The first MLLP frame of `answer` after `pos` that says something, where `answer` goes on from then)
    looking for its end block from `look` on (what came before was looked through). Bytes before the
    start block (an engine's keep-alive) and a frame with nothing in it (an empty keep-alive frame) are
    passed over; a line end after the end block is never reached (the first frame said is the ACK).
    (None, ...) while no such frame has ended."""
    while (end := answer.find(END, look)) >= 0:
        start = answer.rfind(START, pos, end)
        body = bytes(answer[start + 1 if start >= 0 else pos:end])
        if body.strip(b"\x00\r\n\t "):
            return body, pos
        pos = look = end + len(END)
    return None, pos


#: An answer's MSH and its separators: MSH-1 (the field separator) and the first of MSH-2 (the component one).
_MSH = re.compile(r"(?:^|[\r\n])\ufeff?MSH([^\w\s])([^\w\s])?")


def _ack_of(data: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, the receiver's text) of an ACK: the text MSA-3, then each ERR segment's user message
    (ERR-8), else its error code's text (ERR-3.2), else ERR-3's code, joined by '; '. Read with the ACK's own
    separators (MSH-1, the first of MSH-2: an engine need not use ours). NotAcknowledged when there is no MSA."""
    text = data.decode("utf-8", errors="replace")
    header = _MSH.search(text)
    field, component = (header[1], header[2] or "^") if header else (FIELD, "^")
    msa: list[str] | None = None
    said: list[str] = []
    for seg in text.replace("\n", SEGMENT_END).split(SEGMENT_END):
        fields = seg.split(field) + [""] * 9
        if seg.startswith("MSA" + field) and msa is None:
            msa = fields
            said += [fields[3]] if fields[3] else []
        elif seg.startswith("ERR" + field):
            code = fields[3].split(component) + ["", ""]
            said += [next((part for part in (fields[8], code[1], code[0]) if part), "")]
    if msa is None:
        start = _answer_start(data)
        raise NotAcknowledged(f"the answer has no MSA segment, {NOT_ACK}: {start!r}", NOT_ACK, start)
    return msa[1], msa[2], "; ".join(part for part in said if part)[:MAX_LIS_TEXT]


def _connect(host: str, port: int, left: Callable[[], float], timeout_s: float) -> socket.socket:
    """A connection to `host`:`port` (each address it resolves to, in turn), its waits (the name
    lookup's too, service.hl7.lookup) cut in slices of `left()` (which raises when the deadline passed
    or the archive stops): neither a resolver that does not answer nor a listener whose SYNs go
    unanswered can hold the exchange past its deadline, or a stopping archive."""
    error: OSError = OSError(f"{host} resolves to no address")
    for family, kind, proto, _, addr in lookup.addresses(host, port, left, timeout_s):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            code = sock.connect_ex(addr)
            while code == errno.EINPROGRESS:
                if select.select([], [sock], [], left())[1]:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            return sock
        except NotAcknowledged:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
            if isinstance(exc, TimeoutError):
                break
    raise error


def send(address: tuple[str, int], message: str, control_id: str, timeout_s: float,
         stop: threading.Event | None = None) -> str:
    """Send `message` and return the ACK's MSA-1 (AA or CA); NotAcknowledged (an OSError) otherwise.

    `timeout_s` bounds the whole exchange (looking the host up, connecting, sending, the ACK), not each
    read: a receiver that answers a byte at a time, or a resolver that does not answer, cannot hold the
    sender longer. `stop` set meanwhile ends the wait
    within STOP_POLL_S (NotAcknowledged, `stopped`), so the archive stops while a receiver is silent."""
    host, port = address
    where = address_text(address)
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        if stop is not None and stop.is_set():
            raise NotAcknowledged(f"stopped while waiting for {where}'s ACK", "stopped")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no whole ACK within {timeout_s:g} s")
        return min(remaining, STOP_POLL_S) if stop is not None else remaining

    try:
        with _connect(host, port, left, timeout_s) as conn:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            conn.sendall(START + message.encode("utf-8") + END)
            answer, body, pos = bytearray(), None, 0
            while body is None:
                conn.settimeout(left())
                try:  # never more than the bound in all: an answer that fills it without its end is no ACK
                    chunk = conn.recv(min(65536, MAX_ACK_BYTES - len(answer)))
                except TimeoutError:
                    continue  # a slice of the deadline passed: left() says whether it is over
                if not chunk:  # closed: a frame ended by <FS> alone, or <FS><LF>, was whole all the same
                    if (ended := bytes(answer).rstrip(b"\r\n")).endswith(END[:1]):
                        body, pos = _frame(bytearray(ended + END[1:]), pos, pos)
                    break
                look = max(pos, len(answer) - len(END) + 1)
                answer += chunk
                body, pos = _frame(answer, pos, look)
                if body is None and len(answer) >= MAX_ACK_BYTES:
                    raise NotAcknowledged(f"{where} answered more than {MAX_ACK_BYTES} bytes without ending the "
                                          f"answer (<FS><CR>): {TOO_BIG}, no ACK", TOO_BIG, _answer_start(answer))
    except NotAcknowledged:
        raise
    except OSError as exc:  # refused, unreachable, timed out (socket.timeout is an OSError)
        raise NotAcknowledged(f"no ACK from {where} ({type(exc).__name__}: {exc})", "unreachable") from exc
    if body is None and not answer.strip(START + END + b"\x00\n"):
        raise NotAcknowledged(f"{where} closed the connection without an answer")
    if body is None:  # an answer, cut short or not MLLP at all: what it said is no ACK
        raise NotAcknowledged(f"{where} closed the connection without a whole ACK ({len(answer)} bytes): {NOT_ACK}",
                              NOT_ACK, _answer_start(answer))
    code, acked, why = _ack_of(body)
    if acked.strip().casefold() != control_id.casefold():  # an engine that upper-cases or pads the echoed id
        raise NotAcknowledged(f"{where} acknowledged message {acked[:40]!r}, not this one ({control_id}): "
                              f"{NOT_ACK} of it", NOT_ACK, f"MSA-2 {acked[:40]}")
    if code not in ACCEPTED:
        # MSA-3 is the lab system's free text: shown escaped, as this text reaches the journal
        refused = Rejected if code in REJECTED else NotAcknowledged
        raise refused(f"{where} answered {code[:4]!r}, not accepted (AA or CA)"
                      f"{': ' + shown(why[:200]) if why else ''}", code[:4], why)
    return code
