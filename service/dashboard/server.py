"""`smearscope dashboard`: serve the static dashboard and tell it where the broker is.

The page (static/) is served as files; `/config.json` gives it the broker's WebSocket URL
(`ws://` or `wss://`), the topic prefix and, when configured, the dashboard's broker account.
The browser connects to the broker itself: this server never touches MQTT. Whoever can load the
page can read that account's password from /config.json, so give the dashboard an account that
may only read `<prefix>/#` and publish `<prefix>/+/cmd/get_review`, `<prefix>/+/cmd/get_runs`,
`<prefix>/+/cmd/type_cells` and `<prefix>/+/cmd/verify_run` (technicians typing white cells and
signing runs), and bind the server to the lab network (docs/MQTT.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import mimetypes
import socket
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_CSP = ("default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'")
#: Each connection (one request: HTTP/1.0) is closed this long after it opened, whatever it sent:
#: a client sending its headers a byte at a time (slowloris), or reading the answer as slowly,
#: holds a thread no longer. The page's largest file (MQTT.js, 342 kB) needs 0.1 MB/s.
REQUEST_DEADLINE_S = 30.0
#: A read or write of a connection that makes no progress this long ends it.
IDLE_TIMEOUT_S = 10.0
#: Connections served at once (a thread each). One more is answered 503 at once and closed, not
#: queued: a flood of connections costs no more threads than this, and a browser retries the page.
MAX_CONNECTIONS = 64
_BUSY_BODY = b"dashboard busy: too many connections\r\n"
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Retry-After: 5\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n"
         b"Content-Security-Policy: " + _CSP.encode() + b"\r\nX-Content-Type-Options: nosniff\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass(frozen=True)
class DashboardSettings:
    broker_url: str
    topic_prefix: str = "smearscope"
    username: str | None = None
    password: str | None = None
    #: Names the page may be reached by, beside IP addresses, localhost and this machine's own names.
    host_names: tuple[str, ...] = ()
    #: The page offers each online station's run form (start_run for a specimen id, stop_run): a
    #: dashboard at the microscope. Off, the page cannot start or stop a run whatever its ACL.
    run_control: bool = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.broker_url)
        if "@" in parts.netloc or (not parts.netloc and "@" in self.broker_url):
            # Printed at start and logged: a password in the URL would be shown to whoever reads them.
            raise ValueError("--broker: a user name or password in the URL is refused (it would be printed "
                             "and logged); give --username and --password-file instead")
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"--broker {self.broker_url!r}: expected ws://HOST:PORT[/PATH] or wss://...")
        if not self.topic_prefix or any(c in self.topic_prefix for c in "/+#"):
            raise ValueError(f"--topic-prefix {self.topic_prefix!r}: one topic level, no '/', '+' or '#'")

    def page_config(self) -> dict[str, object]:
        return {"broker": self.broker_url, "topicPrefix": self.topic_prefix,
                "username": self.username, "password": self.password, "runControl": self.run_control}


def _known_host(host: str, names: frozenset[str]) -> bool:
    """Whether a request's Host header names this server: an IP address (any: a DNS rebinding
    attack sends its own domain name), or one of `names`. The port is not judged."""
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":")[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name.rstrip(".") in names


def _host_names(extra: tuple[str, ...]) -> frozenset[str]:
    own = {"localhost", socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower().rstrip(".") for n in (*own, *extra) if n)


def _handler(settings: DashboardSettings, deadline_s: float, idle_s: float) -> type[BaseHTTPRequestHandler]:
    config_body = json.dumps(settings.page_config()).encode()
    names = _host_names(settings.host_names)

    class Handler(BaseHTTPRequestHandler):
        server_version = "smearscope-dashboard"
        timeout = idle_s  # StreamRequestHandler sets it on the socket

        def setup(self) -> None:
            super().setup()
            self._past_deadline = False
            self._deadline = threading.Timer(deadline_s, self._cut_off)
            self._deadline.daemon = True
            self._deadline.start()

        def _cut_off(self) -> None:
            """Past the deadline: end the connection (a blocked read sees its end, a write fails)."""
            self._past_deadline = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def parse_request(self) -> bool:
            """False (nothing answered) for a request whose headers were cut off at the deadline."""
            if super().parse_request() and not self._past_deadline:
                return True
            if self._past_deadline:
                logger.info("dashboard: connection from %s ended at its %.0f s deadline", self.client_address[0],
                            deadline_s)
                self.close_connection = True
            return False

        def finish(self) -> None:
            self._deadline.cancel()
            with contextlib.suppress(OSError):  # the client gone, or cut off: nothing more to send
                super().finish()

        def end_headers(self) -> None:
            """Every answer carries the page's policy, also http.server's own error pages (400, 431, 501):
            nothing kept in a browser's or proxy's cache (config.json holds the broker password; the
            page shows patients' results), and no Referer naming this server sent anywhere."""
            self.send_header("Content-Security-Policy", _CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Referrer-Policy", "no-referrer")
            super().end_headers()

        def do_GET(self) -> None:
            self._send(*self._answer())

        def do_HEAD(self) -> None:
            """As GET without the body: the same status and headers (Content-Length of GET's body)."""
            self._send(*self._answer(), with_body=False)

        def _answer(self) -> tuple[HTTPStatus, str, bytes]:
            host = self.headers.get("Host")
            if host is not None and not _known_host(host, names):
                # A page of another site whose name was pointed at this server (DNS rebinding) would
                # read the broker password in /config.json as same-origin.
                logger.warning("dashboard: refused a request from %s for host %r (not one of its names: --host)",
                               self.client_address[0], host[:100])
                return (HTTPStatus.MISDIRECTED_REQUEST, "text/plain; charset=utf-8",
                        b"this dashboard is not served under that name (smearscope dashboard --host NAME)\n")
            path = urlsplit(self.path).path
            if path == "/config.json":
                return HTTPStatus.OK, "application/json", config_body
            relative = unquote(path).lstrip("/")
            if not relative or relative.endswith("/"):
                relative += "index.html"
            try:  # a NUL (%00) or a name too long for the file system names no file of the page
                target = (STATIC / relative).resolve()
                found = STATIC in target.parents and target.is_file()
            except (ValueError, OSError):
                found = False
            if not found:
                return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n"
            kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind == "application/javascript":
                kind += "; charset=utf-8"
            return HTTPStatus.OK, kind, target.read_bytes()

        def _send(self, status: HTTPStatus, kind: str, body: bytes, with_body: bool = True) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            logger.debug("%s %s", self.address_string(), fmt % args)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        bound: tuple[Any, ...] = address
        if ":" in address[0]:  # --bind ::1 or :: (every address, IPv4 too where the host maps it)
            self.address_family = socket.AF_INET6
            # fe80::1%eth0: a link-local address binds with its interface's index, which only
            # getaddrinfo reads from the zone (bind itself says EINVAL)
            bound = socket.getaddrinfo(address[0], address[1], socket.AF_INET6, socket.SOCK_STREAM)[0][4]
        super().__init__(bound, handler)  # type: ignore[arg-type]
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._busy_said = False

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        """A thread for the connection while fewer than max_connections are open; else 503 at once."""
        if not self._slots.acquire(blocking=False):
            if not self._busy_said:  # one line per busy spell, not one per connection of a flood
                self._busy_said = True
                logger.warning("dashboard: %d connections open; refusing more with 503 (from %s)",
                               self._max_connections, client_address[0])
            with contextlib.suppress(OSError):
                request.settimeout(1.0)  # never hold the accepting thread on a client that does not read
                request.sendall(_BUSY)
                request.recv(65536, socket.MSG_DONTWAIT)  # what the client sent: closing on it unread resets
            self.shutdown_request(request)
            return
        self._busy_said = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        """A request that failed costs one log line, not a traceback on stderr per hostile request."""
        logger.warning("dashboard: request from %s failed: %r", client_address[0], sys.exc_info()[1],
                       exc_info=logger.isEnabledFor(logging.DEBUG))


class DashboardServer:
    """The HTTP server of the dashboard, on `bind:port` (port 0: a free one)."""

    def __init__(self, settings: DashboardSettings, port: int = 8080, bind: str = "127.0.0.1",
                 deadline_s: float = REQUEST_DEADLINE_S, idle_s: float = IDLE_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.settings = settings
        self.httpd = _Server((bind, port), _handler(settings, deadline_s, idle_s), max_connections)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def serve_forever(self) -> None:
        logger.info("dashboard on http://%s:%d/ (broker %s)", self.httpd.server_address[0], self.port,
                    self.settings.broker_url)
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> None:
        """Serve on a background thread (tests)."""
        self._thread = threading.Thread(target=self.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
