"""The files a station's configuration names, checked before it starts (and by validate-config).

The config models stay pure (they never open files); this is the one place that looks at the
files they name and would otherwise fail deep inside a library at start-up: the TLS CA, client
certificate and key are loaded here as the TLS layer will load them; a folder source's folder and
a replay's recording must exist. Each problem is
(`field.path`, reason), like a config error, so both exit 78 (restarting cannot fix a file).
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
from pathlib import Path

from smearscope.service.config import StationConfig

logger = logging.getLogger(__name__)


def _unreadable(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def _source_problems(source) -> list[tuple[str, str]]:
    """The folder a folder source watches must be a directory this user can write
    (device.folder_source.folder_problem); a replay's recording must exist, and a video be one the
    replay source opens (the sources say so again when they open)."""
    from smearscope.device.folder_source import folder_problem
    from smearscope.device.source_config import FolderSourceConfig, ReplaySourceConfig

    path = getattr(source, "path", None)
    if isinstance(source, FolderSourceConfig) and not path.is_dir():
        return [("source.path", f"watched folder {path} is not a directory (create it, or fix the path)")]
    if isinstance(source, FolderSourceConfig) and (problem := folder_problem(source)) is not None:
        return [("source.state_file" if problem.startswith("state_file") else "source.path", problem)]
    if isinstance(source, ReplaySourceConfig) and not (path.is_dir() or path.is_file()):
        return [("source.path", f"recording {path} does not exist")]
    if isinstance(source, ReplaySourceConfig) and path.is_file():  # a video: opened and judged as at start
        from smearscope.device.ingest import IngestError, IngestLimits
        from smearscope.device.video_file import open_video

        try:
            open_video(path, IngestLimits()).release()
        except IngestError as exc:
            return [("source.path", f"recording refused: {exc}")]
    return []


def disk_full(exc: BaseException) -> bool:
    """The error says the disk is full (OSError ENOSPC, SQLite's 'database or disk is full'): a state
    that passes, unlike a wrong path, so the station exits to be started again, not as misconfigured."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "disk is full" in str(exc)


#: OS errors that say the configured path is wrong (exit 78); others (an I/O error on a share, a
#: full disk) may pass, so the station exits 1 and systemd starts it again.
_PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.ENXIO,
                          errno.ELOOP, errno.EROFS, errno.ENAMETOOLONG})


_SQLITE_IOERR = 10  # SQLite's primary result code for I/O errors (extended codes carry it in their low byte)


def config_field(exc: BaseException, field: str) -> str | None:
    """The config field a start-up error is blamed on, or None when it is no configuration problem
    (a full disk, an I/O error: an OSError of another kind than a wrong path, SQLite's I/O errors)."""
    if disk_full(exc) or (isinstance(exc, OSError) and exc.errno is not None and exc.errno not in _PATH_ERRNOS):
        return None
    if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF == _SQLITE_IOERR:
        return None
    return field


def source_field(source, exc: BaseException) -> str:
    """The source's field an error opening it names: its state_file, its path, or its kind."""
    state = getattr(source, "state_file", None)
    if state is not None and isinstance(exc, OSError) and exc.filename is not None and Path(exc.filename) == state:
        return "source.state_file"
    return "source.path" if hasattr(source, "path") else "source.kind"


def nearest_existing(folder: Path) -> Path | None:
    """`folder`, or its closest ancestor that exists (where creating it would start)."""
    return next((p for p in (folder, *folder.parents) if p.exists()), None)


def outbox_parent_problem(path: Path) -> str | None:
    """Why the outbox's folder cannot be created: a file where a folder on its path must be."""
    existing = nearest_existing(path.parent)
    if existing is not None and not existing.is_dir():
        return f"{path.parent} cannot be created: {existing} is a file, not a directory"
    return None


def file_problems(config: StationConfig) -> list[tuple[str, str]]:
    """What is wrong with the files the configuration names; empty when they are usable."""
    from smearscope.service.station.state_access import BLOCKING, state_access_problems

    # first: a state restored as root makes the other checks of its folders fail less clearly
    problems = [(f, why) for f, why in state_access_problems(config) if f in BLOCKING]
    problems += _source_problems(config.source)
    if (reason := outbox_parent_problem(config.mqtt.outbox.path)) is not None:
        problems.append(("mqtt.outbox.path", reason))
    tls = config.mqtt.tls
    if tls is not None:
        reason = _unreadable(tls.ca_file)
        if reason is not None and not os.path.exists(tls.ca_file):
            reason += (": put the certificate of the CA that signed the broker's certificate there (PEM; e.g. "
                       f"sudo install -m 0644 clinic-ca.crt {tls.ca_file}), or name its path in [mqtt.tls] ca_file")
        if reason is None:
            try:
                ssl.create_default_context(cafile=str(tls.ca_file))
            except (ssl.SSLError, ValueError) as exc:
                reason = f"{tls.ca_file} holds no usable CA certificate (PEM): {exc}"
        if reason is not None:
            problems.append(("mqtt.tls.ca_file", reason))
        if tls.certfile is not None and tls.keyfile is not None:
            bad = [(f"mqtt.tls.{n}", r) for n, p in (("certfile", tls.certfile), ("keyfile", tls.keyfile))
                   if (r := _unreadable(p)) is not None]
            if not bad:
                try:
                    ssl.create_default_context().load_cert_chain(str(tls.certfile), str(tls.keyfile))
                except (ssl.SSLError, ValueError) as exc:
                    reason = (f"{tls.certfile} and {tls.keyfile} are not a usable certificate and "
                              f"key (PEM): {exc}")
                    bad = [("mqtt.tls.certfile", reason)]
            problems += bad
    review = config.review.directory
    if review is not None and os.path.exists(review) and not os.path.isdir(review):  # neither raises
        problems.append(("review.directory", f"{review} is a file, not a folder: overlays and the gallery go there"))
    return problems
