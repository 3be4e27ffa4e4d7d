"""Lab systems (LIS) for the MLLP sender's tests: a real TCP listener on a free port that records
each framed message and answers as a test tells it (tests/test_hl7_mllp_hostile.py and others; the
`lis` fixture of tests/conftest.py makes them)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from smearscope.service.hl7 import mllp

CONTROL_ID = "R0123456789abcdef"
MESSAGE = f"MSH|^~\\&|smearscope|lab-7|||20261130091500||ORU^R01^ORU_R01|{CONTROL_ID}|P|2.5.1\rPID|1||S-1\r"


def ack(code: str = "AA", control_id: str = CONTROL_ID) -> bytes:
    return (f"MSH|^~\\&|LIS|LAB|smearscope|lab-7|20261130091500||ACK^R01^ACK|A1|P|2.5.1\r"
            f"MSA|{code}|{control_id}|why not\r").encode()


Behaviour = Callable[[socket.socket, bytes], None]


class RawLis:
    """A TCP listener on `host` that reads each framed message, records it, then does `behaviour`
    with the connection (answer, stay silent, close...)."""

    def __init__(self, behaviour: Behaviour, host: str = "127.0.0.1") -> None:
        self.behaviour = behaviour
        self.received: list[bytes] = []
        self.connected = threading.Event()
        self.done = threading.Event()  # set at teardown: silent behaviours return
        self.server = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self.connected.set()
                data = b""
                while not data.endswith(mllp.END):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.received.append(data)
                try:
                    self.behaviour(conn, data)
                except OSError:
                    pass

    def close(self) -> None:
        self.done.set()
        self.server.close()


def framed(data: bytes) -> bytes:
    return mllp.START + data + mllp.END


def silent(lis: RawLis) -> Behaviour:
    """Keeps the connection open, answering nothing, until the test ends."""
    def behaviour(conn: socket.socket, _: bytes) -> None:
        lis.done.wait(60)
    return behaviour


def accept(conn: socket.socket, data: bytes) -> None:
    """Accepts the message: AA naming its MSH-10."""
    conn.sendall(framed(ack("AA", data.split(b"\r", 1)[0].split(b"|")[9].decode())))


def msh10(data: bytes) -> str:
    """The control id (MSH-10) of the framed message a listener received."""
    return data.split(b"\r", 1)[0].split(b"|")[9].decode()


def in_pieces(*pieces: bytes, a_byte_each: bool = False) -> Behaviour:
    """Sends `pieces` one by one (each its own send, Nagle off: TCP segments the sender reads apart; with
    `a_byte_each`, every byte alone), then closes; `{id}` in a piece is the received message's control id."""
    def behaviour(conn: socket.socket, data: bytes) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = [piece.replace(b"{id}", msh10(data).encode()) for piece in pieces]
        for piece in [bytes([b]) for b in b"".join(sent)] if a_byte_each else sent:
            conn.sendall(piece)
    return behaviour
