"""`smearscope archive`: run the report archive (service.archive), or find and show its reports."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import signal
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from smearscope.cli import ARCHIVE_DIR

if TYPE_CHECKING:
    import pydantic

    from smearscope.service.archive.query import ArchivedReport
    from smearscope.service.archive.rejections import RecordedRejection
    from smearscope.service.config.archive import ArchiveConfig
    from smearscope.service.hl7.header import Addressing

logger = logging.getLogger(__name__)

PORTS = {"mqtt": 1883, "mqtts": 8883}
#: The systemd credential (LoadCredential=) holding the archive's broker password.
CREDENTIAL = "archive-mqtt-password"


def _fail(text: str, code: int = 2) -> int:
    print(f"smearscope archive: {text}", file=sys.stderr)
    return code


def _directory(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "dir", None) or ARCHIVE_DIR)


def _broker(url: str) -> tuple[str, int, bool]:
    """(host, port, TLS) of mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in PORTS or not parts.hostname:
        raise ValueError(f"--broker {url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"--broker {url!r}: only a host and a port (the user: --username, --password-file)")
    return parts.hostname, parts.port or PORTS[parts.scheme], parts.scheme == "mqtts"


def _readable(option: str, path: Path | None) -> None:
    """ValueError naming `option` when its file cannot be read by this process's user: found before
    the archive opens its folder, not blamed on the folder (and not restarted by the unit)."""
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = f"uid {os.geteuid()}"
        raise ValueError(f"{option} {path} cannot be read by user {user}: {exc.strerror or exc}") from exc


def _config(args: argparse.Namespace) -> ArchiveConfig:
    from smearscope.service.config.archive import ArchiveConfig
    from smearscope.service.config.mqtt import MqttConfig, MqttTlsConfig

    host, port, tls = _broker(args.broker)
    if tls and args.ca_file is None:
        raise ValueError("mqtts:// needs --ca-file, the CA that signed the broker's certificate")
    if not tls and (args.ca_file or args.certfile or args.keyfile):
        raise ValueError("--ca-file, --certfile and --keyfile are for mqtts://")
    if (args.certfile is None) != (args.keyfile is None):  # else pydantic's line, naming no option
        raise ValueError("--certfile and --keyfile go together (the archive's client certificate and its key)")
    if args.password_file is not None and not args.username:
        raise ValueError("--password-file needs --username (the broker account it is the password of)")
    for option, path in (("--ca-file", args.ca_file), ("--certfile", args.certfile), ("--keyfile", args.keyfile)):
        _readable(option, path)
    tls_config = MqttTlsConfig(ca_file=args.ca_file, certfile=args.certfile, keyfile=args.keyfile) if tls else None
    mqtt = MqttConfig(host=host, port=port, client_id=args.client_id, username=args.username, tls=tls_config,
                      topic_prefix=args.topic_prefix)
    return ArchiveConfig(mqtt=mqtt, directory=_directory(args), **_hl7_settings(args))


#: The options that give the HL7 output's settings (service.config.archive.Hl7OutputConfig), by field.
HL7_OPTIONS = {"hl7_directory": "--hl7-dir", "hl7_mllp": "--hl7-mllp", "hl7_mllp_timeout_s": "--hl7-mllp-timeout",
               "hl7_mllp_error_hold_s": "--hl7-mllp-error-hold",
               "hl7_sending_facility": "--hl7-sending-facility",
               "hl7_receiving_application": "--hl7-receiving-application",
               "hl7_receiving_facility": "--hl7-receiving-facility", "hl7_processing_id": "--hl7-processing-id"}


def _hl7_settings(args: argparse.Namespace) -> dict[str, object]:
    """The HL7 output's settings as the options give them, each checked by the config alone."""
    settings = {field: getattr(args, option[2:].replace("-", "_"), None) for field, option in HL7_OPTIONS.items()}
    for field in ("hl7_mllp_timeout_s", "hl7_mllp_error_hold_s", "hl7_processing_id"):
        if settings[field] is None:  # not given: the config's default
            del settings[field]
    return settings


def _invalid(exc: pydantic.ValidationError) -> str:
    """A config error as one line, a setting an option gives said as that option (`--hl7-mllp: 'lis:0' is
    not HOST:PORT: ...`), as the option's own check would say it."""
    said = []
    for e in exc.errors():
        option = HL7_OPTIONS.get(str(e["loc"][0])) if len(e["loc"]) == 1 else None
        where = option or ".".join(map(str, e["loc"]))
        said.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(said)


def cmd_archive(args: argparse.Namespace) -> int:
    """The daemon: runs until SIGTERM or SIGINT."""
    import pydantic

    from smearscope.service.mqtt.credentials import CredentialError, password_file_or_credential

    if args.broker is None:
        return _fail("--broker is needed to run the archive (or: archive find, archive show)")
    try:
        config = _config(args)
        password = password_file_or_credential(args.password_file, CREDENTIAL) if args.username else None
    except pydantic.ValidationError as exc:
        return _fail(_invalid(exc))
    except (ValueError, OSError, CredentialError) as exc:
        return _fail(str(exc))
    if args.username and password is None:  # a login the broker can only refuse, retried for ever
        return _fail(f"--username {args.username} needs its password: --password-file FILE, or the systemd "
                     f"credential {CREDENTIAL} (LoadCredential=, as systemd/smearscope-archive.service gives it)")
    from smearscope.service.archive.daemon import ArchiveDaemon, BrokerSettingsError
    from smearscope.service.archive.hl7_out import Hl7FolderError
    from smearscope.service.archive.store import IndexVersionError

    # the reports are patient data: nothing for other users, as the unit's UMask=0027 (and `run`)
    os.umask(os.umask(0o027) | 0o027)
    try:
        daemon = ArchiveDaemon(config, password)
    except (BrokerSettingsError, IndexVersionError) as exc:  # a TLS file missing, a newer index: no restart mends
        return _fail(str(exc))
    except Hl7FolderError as exc:  # it may be made meanwhile: worth a restart
        return _fail(str(exc), 1)
    except (OSError, sqlite3.Error) as exc:  # the folder or its index cannot be opened: worth a restart
        return _fail(f"cannot open the archive at {config.directory}: {exc}", 1)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    daemon.run()
    return 0


def _line(r: ArchivedReport) -> str:
    when = datetime.fromtimestamp(r.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    state = "current" if r.superseded_by is None else f"superseded by {r.superseded_by}"
    n = len(r.copies) if r.copies is not None else 0
    copies = f", {n} cop{'y' if n == 1 else 'ies'} beside it" if n else ""
    return (f"{when}  {r.station}  run {r.run_id or '-'}  specimen {r.specimen_id or '-'}  "
            f"{'verified' if r.verified else 'preliminary'}  {r.report_id}  ({state}"
            f"{', FHIR' if r.fhir_path else ''}{copies})")


def _copy_lines(r: ArchivedReport) -> list[str]:
    """`find`'s lines under a report for the copies kept beside its file (`show --copy N` prints one)."""
    if r.copies is None:
        return [f"    copies not listed: {r.copies_error}"]
    return [f"    copy {c.number}  {datetime.fromtimestamp(c.written_at, timezone.utc):%Y-%m-%d %H:%M UTC}  "
            f"sha256 {c.digest}  {c.size} bytes  {c.path}" for c in r.copies]


def _delivery_lines(r: ArchivedReport) -> list[str]:
    """`find`'s lines under a report for its HL7 deliveries the index records (docs/HL7.md)."""
    return [f"    HL7 to {d.destination}  {datetime.fromtimestamp(d.delivered_at, timezone.utc):%Y-%m-%d %H:%M:%S UTC}  "
            f"by {d.sender}  MSH-10 {d.control_id}  MSH-11 {d.processing_id}" for d in r.hl7_deliveries] + [
        f"    HL7 NOT accepted by {j.destination}  "
        f"{datetime.fromtimestamp(j.rejected_at, timezone.utc):%Y-%m-%d %H:%M:%S UTC}  "
        f"by {j.sender}  MSH-10 {j.control_id}  MSH-11 {j.processing_id}  {_rejected_how(j)}"
        for j in r.hl7_rejections]


def _rejected_how(j: RecordedRejection) -> str:
    """What a rejection `find` lists was, the lab system's text escaped (mllp.shown): one line each."""
    from smearscope.service.hl7.mllp import NOT_ACK, TOO_BIG, shown

    how = (f"held: {j.lis_text}" if j.code == "held" else
           f"{j.code}: {shown(j.lis_text) or '(no text)'}" if j.code in (TOO_BIG, NOT_ACK) else
           f"answered {j.code!r}: {shown(j.lis_text) or '(no text)'}")
    return how + ("" if j.open else "  (delivered there since)")


def cmd_find(args: argparse.Namespace) -> int:
    from smearscope.service.archive.query import find, parse_since

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError:
        return _fail(f"--since {args.since!r} is not a date (YYYY-MM-DD) or an ISO time")
    from smearscope.service.archive.store import IndexVersionError

    try:
        found = find(_directory(args), specimen=args.specimen, run=args.run, station=args.station, since=since,
                     not_accepted=args.not_accepted)
    except IndexVersionError as exc:
        return _fail(str(exc))
    except (FileNotFoundError, sqlite3.Error) as exc:
        return _fail(str(exc), 1)
    for r in found:
        print(json.dumps(r.as_json()) if args.json else "\n".join([_line(r), *_copy_lines(r), *_delivery_lines(r)]))
    if not found and not args.json:
        print("smearscope archive: no archived report matches", file=sys.stderr)
    return 0 if found else 1


def cmd_show(args: argparse.Namespace) -> int:
    import pydantic

    from smearscope.service.archive.copies import copies_of
    from smearscope.service.archive.message import REPORT_ID
    from smearscope.service.archive.query import lookup
    from smearscope.service.archive.store import IndexVersionError
    from smearscope.service.config.archive import Hl7OutputConfig
    from smearscope.service.hl7.header import Addressing

    if not REPORT_ID.fullmatch(args.report_id):
        return _fail(f"{args.report_id!r} is not a report id")
    try:
        addressing = Hl7OutputConfig(**_hl7_settings(args)).addressing  # MSH-4/5/6/11 checked as the archive's
    except pydantic.ValidationError as exc:
        return _fail(_invalid(exc))
    if not args.hl7 and addressing != Addressing():
        return _fail("--hl7-sending-facility, --hl7-receiving-application, --hl7-receiving-facility and "
                     "--hl7-processing-id are for show --hl7 (the HL7 message's MSH-4, MSH-5, MSH-6, MSH-11)")
    directory = _directory(args)
    try:
        report, bundle = lookup(directory, args.report_id, copies=not args.fhir)
    except IndexVersionError as exc:
        return _fail(str(exc))
    except (FileNotFoundError, sqlite3.Error) as exc:
        return _fail(str(exc), 1)
    path = bundle if args.fhir else report.path if report is not None else None
    what = "FHIR bundle of report" if args.fhir else "report"
    if path is None:
        return _fail(f"no {what} {args.report_id} in the archive at {directory}", 1)
    if report is not None and not args.fhir:
        copies, listed = report.copies, report.copies_error
    else:
        try:
            copies, listed = copies_of(path, args.report_id, bundles=True), None
        except OSError as exc:
            copies, listed = None, f"{path.parent} cannot be listed ({exc.strerror or exc})"
    if args.copy is not None:
        if copies is None:
            return _fail(f"the copies of the {what} {args.report_id} are not known: {listed}", 1)
        if not 1 <= args.copy <= len(copies):
            have = f"1 to {len(copies)}" if copies else "none"
            return _fail(f"the {what} {args.report_id} has no copy {args.copy} beside it (copies: {have})", 1)
        chosen = copies[args.copy - 1]
        print(f"smearscope archive: copy {chosen.number} of {len(copies)} of the {what} {args.report_id}: "
              f"{chosen.path} (sha256 {chosen.digest}, {chosen.size} bytes)", file=sys.stderr)
        path = chosen.path
    try:
        data = path.read_bytes()
    except OSError as exc:  # unreadable (permission, an I/O error): copies received later may be beside it
        later = f"; copies received later: {', '.join(str(c.path) for c in copies)} (--copy N prints one)" \
            if copies and args.copy is None else ""
        return _fail(f"cannot read the {what} {args.report_id} at {path} ({exc.strerror or exc}){later}", 1)
    if args.copy is None and copies:
        n = len(copies)
        print(f"smearscope archive: {n} cop{'y' if n == 1 else 'ies'} of the {what} {args.report_id} kept beside "
              f"it (received again with other content, or while this file could not be read): smearscope archive "
              f"show {args.report_id} --copy N{'' if n == 1 else f' (N 1 to {n})'}{' --fhir' if args.fhir else ''} "
              "prints one", file=sys.stderr)
    elif args.copy is None and copies is None:
        print(f"smearscope archive: copies of the {what} {args.report_id} not looked for: {listed}", file=sys.stderr)
    if args.hl7:
        return _show_hl7(args.report_id, path, data, addressing, directory)
    sys.stdout.buffer.write(data + b"\n")
    return 0


def cmd_send_hl7(args: argparse.Namespace) -> int:
    """Send archived specimen reports as HL7 where the index records no delivery of them (docs/HL7.md)."""
    import pydantic

    from smearscope.service.archive.hl7_out import Hl7Output
    from smearscope.service.archive.query import parse_since
    from smearscope.service.archive.send_hl7 import not_archived, send_from_index
    from smearscope.service.archive.store import INDEX_NAME, IndexVersionError
    from smearscope.service.config.archive import Hl7OutputConfig

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError:
        return _fail(f"--since {args.since!r} is not a date (YYYY-MM-DD) or an ISO time")
    if args.hl7_dir is None and args.hl7_mllp is None:
        return _fail("send-hl7 needs --hl7-dir DIR and/or --hl7-mllp HOST:PORT: where to send the reports")
    try:
        config = Hl7OutputConfig(**_hl7_settings(args))  # checked as the running archive's
    except pydantic.ValidationError as exc:
        return _fail(_invalid(exc))
    directory = _directory(args)
    if not (directory / INDEX_NAME).is_file():  # before the HL7 folder is made: a mistyped --dir makes nothing
        return _fail(f"no archive at {directory} ({INDEX_NAME} not there)", 1)
    try:  # before anything is made or changed (the HL7 folder, the index's upgrade): a mistyped id changes nothing
        unknown = not_archived(directory, tuple(args.resend or ()))
    except IndexVersionError as exc:
        return _fail(str(exc))
    except (OSError, sqlite3.Error) as exc:
        return _fail(f"cannot read the archive index at {directory}: {exc}", 1)
    if unknown:
        return _fail(f"--resend: no archived specimen report {', '.join(unknown)} in {directory} (`archive find` "
                     "lists them): nothing sent, nothing changed", 1)
    # the messages are patient data: nothing for other users, as the archive's own files
    os.umask(os.umask(0o027) | 0o027)
    try:
        output = Hl7Output(config.hl7_directory, config.mllp_address, config.hl7_mllp_timeout_s, config.addressing,
                           sender="send-hl7")
        result = send_from_index(directory, output, since, again=args.again, progress=print,
                                 resend=tuple(args.resend or ()))
    except IndexVersionError as exc:
        return _fail(str(exc))
    except (OSError, sqlite3.Error) as exc:
        return _fail(str(exc), 1)
    print(f"smearscope archive: {result.delivered} delivered, {result.already} already delivered there (not sent "
          f"again{'' if args.again else '; --again sends them'}), {result.unreadable} unreadable, {result.rejected} "
          f"rejected by the lab system now, {result.not_accepted} not accepted there before (not sent: `archive find "
          "--not-accepted` lists them, --resend REPORT_ID sends one)"
          + (f", {result.in_flight} being delivered by another send-hl7 (left to it)" if result.in_flight else ""),
          file=sys.stderr)
    if result.stopped_by is not None:
        return _fail(f"stopped: cannot deliver {result.stopped_by}; what was delivered before is recorded, the same "
                     "command goes on from there", 1)
    return 1 if result.unreadable or result.rejected else 0


def _show_hl7(report_id: str, path: Path, envelope: bytes, addressing: Addressing, directory: Path) -> int:
    """The archived report's ORU^R01 with `addressing`'s MSH-4/5/6, one segment a line (the file
    `--hl7-dir` writes ends each with a carriage return, as HL7 has it), its ids whole where the index
    says its run was sent so (store.whole_ids_run)."""
    from smearscope.service.archive.hl7_out import UNREADABLE, oru_of, unreadable_reason
    from smearscope.service.archive.store import open_index, whole_ids_run

    try:
        db = open_index(directory, read_only=True)
        try:
            _, oru, _ = oru_of(envelope, addressing, lambda run: whole_ids_run(db, run))
        finally:
            db.close()
    except sqlite3.Error as exc:
        return _fail(f"cannot read the archive index at {directory}: {exc}", 1)
    except UNREADABLE as exc:
        return _fail(f"the report {report_id} at {path} cannot be read as a report of this smearscope "
                     f"({type(exc).__name__}: {unreadable_reason(exc)}): no HL7 message", 1)
    sys.stdout.write(oru.replace("\r", "\n"))
    return 0
