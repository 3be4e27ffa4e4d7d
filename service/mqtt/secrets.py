"""The broker password and TLS files, read at start and read again before a reconnect.

A clinic rotates them while stations run: a renewed client certificate (certbot-like tools write
the new one over the old), a broker moved to a new CA, a password changed on the broker. The
publisher reads them again before each connection attempt that follows a failure or a lost
connection (paho's on_pre_connect), and on SIGHUP; a change is used from that attempt on and said
once at INFO. Only the client's network thread hands a change to the client, just before an
attempt: paho reads the password twice while it builds a CONNECT. Files caught half-written (a
certificate whose key is not yet replaced) or unreadable are said once as a WARNING and the
previous ones stay in use, so a rotation never takes away a working connection's credentials before
the new ones are whole.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Mapping
from pathlib import Path

from smearscope.service.config.mqtt import MqttConfig, MqttTlsConfig
from smearscope.service.mqtt.credentials import CredentialError, read_password

logger = logging.getLogger(__name__)


def tls_context(tls: MqttTlsConfig) -> ssl.SSLContext:
    """A client TLS context from the configured files, as paho's tls_set makes it: the broker's
    certificate required and checked against `ca_file`, its name against the host (unless
    `insecure`), the client certificate when one is configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if tls.certfile is not None:
        context.load_cert_chain(str(tls.certfile), str(tls.keyfile) if tls.keyfile else None)
    context.load_verify_locations(str(tls.ca_file))
    context.check_hostname = not tls.insecure
    return context


def _tls_files(tls: MqttTlsConfig) -> tuple[Path, ...]:
    return tuple(p for p in (tls.ca_file, tls.certfile, tls.keyfile) if p is not None)


class SecretFiles:
    """The password and TLS context in use, and the files' contents they were made from."""

    def __init__(self, config: MqttConfig, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self._environ = environ
        self._lock = threading.Lock()  # paho's network thread and the daemon's (SIGHUP)
        self.password = read_password(config, environ)  # fails now, before any thread starts
        self._tls_read: tuple[bytes, ...] | None = None  # what the client's context was made from
        if config.tls is not None:
            try:
                self._tls_read = self._tls_bytes()
            except OSError:  # the client's tls_set_context says it when the publisher starts, as before
                pass
        self._problems: dict[str, str] = {}  # "password" / "tls" -> the problem said last, said once
        #: The TLS context of the files read last, once they changed after the start (None before).
        self.context: ssl.SSLContext | None = None

    def _tls_bytes(self) -> tuple[bytes, ...]:
        assert self.config.tls is not None
        return tuple(p.read_bytes() for p in _tls_files(self.config.tls))

    def renew(self) -> tuple[str | None, ssl.SSLContext | None]:
        """Read the files again: (the password if it changed, a TLS context if the TLS files changed
        and make a whole one), each None when unchanged or unusable (said once, the old kept)."""
        with self._lock:
            return self._renewed_password(), self._renewed_tls()

    def current(self) -> tuple[str | None, ssl.SSLContext | None]:
        """The password and the renewed TLS context (None: none since the start) read last."""
        with self._lock:
            return self.password, self.context

    def _renewed_password(self) -> str | None:
        if self.config.password_credential is None:
            return None
        try:
            password = read_password(self.config, self._environ)
        except CredentialError as exc:
            self._say_problem("password", f"{exc}; the password read before stays in use")
            return None
        self._problems.pop("password", None)
        if password == self.password:
            return None
        self.password = password
        logger.info("MQTT password in credential %r changed: used from this connection attempt on",
                    self.config.password_credential)
        return password

    def _renewed_tls(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        names = ", ".join(str(p) for p in _tls_files(tls))
        try:
            read = self._tls_bytes()
            context = None if read == self._tls_read else tls_context(tls)
        except (OSError, ssl.SSLError) as exc:  # unreadable, or caught mid-rotation (key and certificate apart)
            self._say_problem("tls", f"cannot use the [mqtt.tls] files ({names}) as they are now: {type(exc).__name__}: "
                              f"{exc}; the ones read before stay in use, read again before the next attempt")
            return None
        self._problems.pop("tls", None)
        if context is None:
            return None
        self._tls_read = read
        self.context = context
        logger.info("MQTT TLS files changed (%s): used from this connection attempt on", names)
        return context

    def _say_problem(self, kind: str, problem: str) -> None:
        logger.log(logging.DEBUG if self._problems.get(kind) == problem else logging.WARNING, "%s", problem)
        self._problems[kind] = problem
