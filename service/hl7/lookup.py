"""Looking an MLLP receiver's host up within the exchange's deadline.

`socket.getaddrinfo` takes no timeout: a DNS server that does not answer holds it for the
resolver's own timeouts and retries (resolv.conf), however short the exchange's. So the lookup
runs in a daemon thread, and the sender waits for it in slices of its deadline (which end, too,
when the archive stops). A lookup given up on runs on until the resolver answers; a later exchange
with the same host and port waits for that one rather than starting another, so a resolver that
never answers costs one thread per receiver, not one per try.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

Address = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple]  # as getaddrinfo gives them


class _Lookup:
    """One getaddrinfo call in a daemon thread; `done` is set once it answered (addresses or error)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.done = threading.Event()
        self.addresses: list[Address] = []
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name=f"lookup {host}", daemon=True)

    def _run(self) -> None:
        try:
            self.addresses = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:  # socket.gaierror: no such name, no answer the resolver accepts
            self.error = exc
        except ValueError as exc:  # a name IDNA cannot encode (UnicodeError: an empty label, one too long)
            self.error = OSError(f"{self.host!r} cannot be looked up ({type(exc).__name__}: {exc})")
        finally:
            with _LOCK:
                if _PENDING.get((self.host, self.port)) is self:
                    del _PENDING[(self.host, self.port)]
            self.done.set()


_LOCK = threading.Lock()
#: The lookups not answered yet, by (host, port): a later exchange waits for the one running.
_PENDING: dict[tuple[str, int], _Lookup] = {}


def addresses(host: str, port: int, left: Callable[[], float], timeout_s: float) -> list[Address]:
    """The addresses `host`:`port` resolves to; the wait cut in slices of `left()` (which raises when
    the archive stops, or TimeoutError when the exchange's deadline passed: said here as the lookup
    that timed out, `timeout_s` the exchange's). OSError when the resolver answered with an error."""
    with _LOCK:
        lookup = _PENDING.get((host, port))
        if lookup is None:
            lookup = _PENDING[(host, port)] = _Lookup(host, port)
            lookup.thread.start()
    try:
        while not lookup.done.wait(left()):
            pass
    except TimeoutError:
        raise TimeoutError(f"looking {host} up timed out: the resolver did not answer within the exchange's "
                           f"{timeout_s:g} s") from None
    if lookup.error is not None:
        raise lookup.error
    return lookup.addresses
