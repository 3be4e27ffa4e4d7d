"""The broker password, read from a systemd credential when the publisher is built.

The configuration names the credential (`mqtt.password_credential`); the secret itself lives in
`$CREDENTIALS_DIRECTORY/<name>` (systemd `LoadCredential=`), never in the config file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from smearscope.service.config.mqtt import MqttConfig

logger = logging.getLogger(__name__)


class CredentialError(RuntimeError):
    """A configured credential is not available (systemd LoadCredential= missing or unreadable)."""


def read_password(config: MqttConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The broker password from `$CREDENTIALS_DIRECTORY/<password_credential>`, or None.

    Raises CredentialError with the reason when a password is configured but not available.
    """
    if config.password_credential is None:
        return None
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise CredentialError(_no_credentials_directory(config.password_credential))
    path = Path(directory) / config.password_credential
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialError(
            f"cannot read MQTT password credential {config.password_credential!r} at {path}: "
            f"{exc.strerror or exc}"
        ) from exc
    password = password_text(data, f"MQTT password credential at {path}")
    if not password:
        raise CredentialError(f"MQTT password credential at {path} is empty")
    return password


#: The credential the shipped unit (systemd/smearscope.service) loads, and the file it loads it from.
UNIT_CREDENTIAL, UNIT_CREDENTIAL_FILE = "mqtt-password", "/etc/smearscope/mqtt-password"


def _no_credentials_directory(name: str) -> str:
    """What to do about a password credential asked for where systemd set no $CREDENTIALS_DIRECTORY (a shell)."""
    said = (f"MQTT password credential {name!r} is configured but $CREDENTIALS_DIRECTORY is not set: systemd "
            f"sets it from the unit's 'LoadCredential={name}:<path>'")
    run = "/opt/smearscope/venv/bin/smearscope run --config FILE"
    if name != UNIT_CREDENTIAL:  # the unit would fail the same way: it loads another name
        return (f"{said}, and the shipped unit loads only {UNIT_CREDENTIAL!r} (LoadCredential={UNIT_CREDENTIAL}:"
                f"{UNIT_CREDENTIAL_FILE}): add LoadCredential={name}:PATH in a drop-in (sudo systemctl edit "
                f"smearscope), or name {UNIT_CREDENTIAL!r} in [mqtt] password_credential. From a shell, as the unit "
                f"would: sudo systemd-run --pipe --wait -p User=smearscope -p LoadCredential={name}:PATH {run}")
    return (f"{said} (systemd/smearscope.service names {UNIT_CREDENTIAL_FILE}: start the station with `sudo systemctl "
            f"start smearscope`). From a shell, as the unit would: sudo systemd-run --pipe --wait -p User=smearscope "
            f"-p LoadCredential={name}:{UNIT_CREDENTIAL_FILE} {run}")


def password_text(data: bytes, what: str) -> str:
    """A password file's bytes as the password: UTF-8, without a byte order mark (Windows editors'
    "UTF-8 with BOM") or the trailing line ending. CredentialError naming `what` when not UTF-8."""
    try:
        return data.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise CredentialError(f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                              f"{exc.start}); save the password as UTF-8") from exc


def password_file_or_credential(path: Path | None, credential: str,
                                environ: Mapping[str, str] | None = None) -> str | None:
    """A command's broker password: from `path` (--password-file), else from the systemd credential
    `credential` when $CREDENTIALS_DIRECTORY holds it, else None. OSError when `path` is unreadable,
    CredentialError when it is not UTF-8."""
    env = os.environ if environ is None else environ
    given = path is not None
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / credential
        path = candidate if candidate.is_file() else None
    if path is None:
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:  # "[Errno 2] No such file or directory: 'pw'" named neither the option nor what it is
        what = f"--password-file {path}" if given else f"the systemd credential {credential} ({path})"
        raise OSError(f"cannot read {what}: {exc.strerror or exc}") from exc
    return password_text(raw, f"password file {path}")
