"""`smearscope` command line: analyze, demo, run, validate-config, doctor, install-models, schema,
calibrate-scale, calibrate-atypical, adapt-wbc, dashboard, archive, build-engines.

Each command lives in its own module, imported when chosen; nothing below the CLI imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from smearscope.device.config_fields import (
    SCALE_RANGE_UM,  # the scales a command accepts, as a config does
)
from smearscope.service.journal_log import setup_logging
from smearscope.service.station.signed_name import MAX_SIGNED_NAME

logger = logging.getLogger("smearscope")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # as the config's log_level
#: Sysexits EX_IOERR: an output (stdout, a file) could not be written.
EXIT_OUTPUT = 74
#: Where `smearscope archive` keeps reports unless --dir says (systemd/smearscope-archive.service).
ARCHIVE_DIR = "/var/lib/smearscope-archive"


def _number(kind, low, high, what: str):
    """An argparse type: a finite `kind` in [low, high] (None: unbounded), else a usage error."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return v
    parse.__name__ = what  # argparse names the type in its messages
    return parse


_scale = _number(float, *SCALE_RANGE_UM, "scale in um/px")
_port = _number(int, 1, 65535, "TCP port")
_count = _number(int, 1, None, "positive whole number")
_seed = _number(int, 0, 2**32 - 1, "seed (0 to 2**32-1)")


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error of a command given `--json` is also one JSON error
    line on stdout (the output contract of `analyze --json`), before argparse's own text."""

    json_errors = False

    def error(self, message: str):  # type: ignore[override]
        if _Parser.json_errors:
            print(json.dumps({"error": {"code": "bad_arguments", "message": message}}), flush=True)
        super().error(message)


class _CommandParser(_Parser):
    """A command's parser: it takes `--log-level` too, after the command's name (`smearscope analyze
    F --log-level DEBUG`, where people put it, was "unrecognized arguments"); given in both places,
    the later one counts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--log-level", default=argparse.SUPPRESS, type=_log_level,
                          help="as `smearscope --log-level` before the command")


def _station_analysis_args(p: argparse.ArgumentParser) -> None:
    """--config / --models / --microns-per-pixel: the analyzer a station calibration command runs."""
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    p.add_argument("--config", type=Path, default=None,
                   help="the station's TOML: its models and analysis settings (default: the packaged models)")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR,
                   help="models folder when no --config (with --config, its analysis.models_dir; both: refused)")
    p.add_argument("--microns-per-pixel", type=_scale, default=None,
                   help=f"the fields' scale, {SCALE_RANGE_UM[0]} to {SCALE_RANGE_UM[1]} (default: the config's, "
                   "else estimated per field)")


def _lazy(module: str, function: str):
    """The command `module.function`, imported only when that command runs."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"smearscope.cli.{module}"), function)(args)

    run.__name__ = function
    return run


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("smearscope")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    from smearscope.cli.descriptions import describe
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    ap = _Parser(prog="smearscope", description="Point-of-care blood-smear analyzer")
    ap.add_argument("--version", action="version", version=f"smearscope {_version()}")
    ap.add_argument("--log-level", default=None, type=_log_level,
                    help="log threshold (DEBUG, INFO, WARNING, ERROR); default WARNING, for `run` the "
                    "config's log_level and for the `archive` daemon INFO (its connections and each report "
                    "stored), which an explicit --log-level overrides")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    a = sub.add_parser("analyze", help="analyze images and print one report per image",
                       description="Analyze images (files, directories of them, or @LIST: a text file listing "
                       "one path per line) with the models loaded once. Each image gives its report on stdout, a "
                       "few lines to read (with --json one JSON line), or its error as one JSON line "
                       "(also said on stderr without --json); a rejected image never stops the batch "
                       "(exit status 2 if any was rejected).")
    a.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (JPEG, PNG, TIFF), folders of them, or @LIST files naming one per line")
    a.add_argument("--microns-per-pixel", type=float, default=None,
                   help=f"the images' scale in um/px, {SCALE_RANGE_UM[0]} to {SCALE_RANGE_UM[1]} (smearscope "
                   "calibrate-scale measures it); estimated from the red cells when omitted")
    a.add_argument("--specimen", action="store_true",
                   help="the images are fields of one specimen, in capture order: without --microns-per-pixel, "
                   "a field whose own scale estimate is far from the one the earlier fields agree on is analysed "
                   "at theirs (scale method 'specimen', as a station's specimen run does)")
    a.add_argument("--check-calibration", type=_number(int, 0, None, "whole number, 0 or more"), default=3,
                   metavar="N", help="with --microns-per-pixel: the first N images analysed are also analysed as "
                   "if uncalibrated, and flagged calibration_suspect where their red cells point to a scale 1.8 "
                   "times or more off the given one (a changed objective or camera setting; default 3, 0: never)")
    a.add_argument("--json", action="store_true",
                   help="print one JSON line per image on stdout: its report or its error")
    a.add_argument("--overlay", type=Path, help="write the input with outlines and labels to this PNG "
                   "(a folder, an @LIST or several inputs: to STEM.overlay.png in this directory)")
    a.add_argument("--fhir", type=Path, default=None, metavar="OUT.json",
                   help="also write each report as a FHIR R4 Bundle to this file (a folder, an @LIST or "
                   "several inputs: to STEM.fhir.json in this directory); see docs/FHIR.md")
    a.add_argument("--detections", type=Path, default=None,
                   help="also write JSON lines, one per image: every detection down to --detections-floor, "
                   "the counted cells marked, with scores (for mAP against annotations and for review)")
    a.add_argument("--detections-floor", type=float, default=None,
                   help="lowest calibrated detector confidence written by --detections (default 0.001: "
                   "every detection above the detector's raw floor, as mAP evaluations rank them)")
    a.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR,
                   help="folder of the models and their manifests (default: the packaged models)")
    a.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="inference engine (default onnxruntime; tensorrt: engines from build-engines)")
    a.add_argument("--stain", default="auto", choices=["auto", "macenko", "vahadane", "none"],
                   help="auto: as each model was trained (manifest); macenko/vahadane/none: force for all models")
    a.set_defaults(func=_lazy("analyze", "cmd_analyze"))

    d = sub.add_parser("demo", help="analyze fields from the built-in synthetic microscope")
    d.add_argument("--fields", type=_count, default=3, help="fields to render and analyze (default 3)")
    d.add_argument("--seed", type=_seed, default=1, help="the first field's seed; the same seed renders the same "
                   "fields (default 1)")
    d.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR,
                   help="folder of the models and their manifests (default: the packaged models)")
    d.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="inference engine (default onnxruntime; tensorrt: engines from build-engines)")
    d.set_defaults(func=_lazy("demo", "cmd_demo"))

    s = sub.add_parser("schema", help="print (or --write) the report JSON Schema")
    s.add_argument("--write", action="store_true",
                   help="rewrite schemas/report.schema.json in the source tree instead of printing")
    s.set_defaults(func=_lazy("artifacts", "cmd_schema"))

    v = sub.add_parser("validate-config", help="check a station config file and exit")
    v.add_argument("config", type=Path, help="the station TOML (e.g. /etc/smearscope/station.toml)")
    v.set_defaults(func=_lazy("station", "cmd_validate_config"))

    r = sub.add_parser("run", help="run the station daemon")
    r.add_argument("--config", type=Path, default=None, help="station TOML (default: the embedded simulated station)")
    r.add_argument("--max-fields", type=_count, default=None, help="stop after this many analysed fields")
    r.set_defaults(func=_lazy("station", "cmd_run"))

    c = sub.add_parser("calibrate-scale", help="measure um/px from a stage micrometer image")
    c.add_argument("image", type=Path, help="image of a stage micrometer through the station's objective and camera")
    c.add_argument("--division-um", type=_number(float, 0.5, 1000.0, "spacing in um"), default=10.0,
                   help="the micrometer's line spacing, 0.5 to 1000 um (default 10 um)")
    c.add_argument("--json", action="store_true", help="one JSON line instead of text")
    c.set_defaults(func=_lazy("calibrate", "cmd_calibrate_scale"))

    ca = sub.add_parser("calibrate-atypical", help="fit the WBC head's open-set thresholds on this station's normal specimens",
                        description="Analyze fields of specimens known to be normal and print the station config "
                        "section [analysis.wbc_open_set]: the WBC head's open-set thresholds tightened to the "
                        "lowest quantile of this station's own white cells that sends at most --budget of them to "
                        "review (never looser than the model's). A new cell type such as a blast is then caught "
                        "more often wherever the station's normal cells lie well inside the model's limits. "
                        "Exit status 2 with an error code when there are too few white cells or nothing to tighten.")
    ca.add_argument("images", nargs="+", metavar="IMAGE", help="fields of normal specimens (files, folders, @LIST)")
    _station_analysis_args(ca)
    ca.add_argument("--budget", type=float, default=0.05,
                    help="largest share of these normal white cells sent to review (default 0.05)")
    ca.add_argument("--min-cells", type=_count, default=200, help="fewest white cells to fit on (default 200)")
    ca.add_argument("--json", action="store_true", help="one JSON line instead of the TOML section")
    ca.set_defaults(func=_lazy("calibrate", "cmd_calibrate_atypical"))

    aw = sub.add_parser("adapt-wbc", help="fit this station's white-cell class means from cells its technician typed",
                        description="Analyze the station's own fields, find the white cell under each typed mark "
                        "(--labels CSV: image,x,y,type; type one of the WBC head's classes) and write the station's "
                        "class means in the WBC head's feature space (--out) for [analysis] wbc_station_means: "
                        "white cells are then typed by the nearest of them. A class needs --min-cells typed cells "
                        "(the others keep the head's means). Refused (exit 2, code head_better) when the means "
                        "type the typed cells worse, each left out, than the head as trained; too_few_cells when "
                        "no class has enough; typing_contradicts_head when the head confidently calls 40 % or "
                        "more of a typed class one other class, or two classes each other (--accept-disagreement).")
    aw.add_argument("images", nargs="*", metavar="FIELD",
                    help="with --template: the station's fields to find white cells on (files, folders, @LIST)")
    aw.add_argument("--template", type=Path, default=None,
                    help="write a CSV of the white cells found on FIELDS to type (type column empty, the head's "
                         "guess beside it, numbered as on --overlays) instead of fitting")
    aw.add_argument("--overlays", type=Path, default=None, help="with --template: a folder for numbered overlays")
    aw.add_argument("--labels", type=Path, default=None,
                    help="CSV with header image,x,y,type (image relative to the CSV's folder; x, y in its pixels; "
                         "rows with an empty type are skipped)")
    aw.add_argument("--station", action="store_true",
                    help="fit from the white cells the station's technicians typed in the dashboard's review "
                         "gallery (the typed-cells file of --config) instead of --labels")
    aw.add_argument("--out", type=Path, default=None, help="station means file to write (JSON)")
    _station_analysis_args(aw)
    aw.add_argument("--min-cells", type=int, default=10,
                    help="typed cells a class needs for a station mean (default 10; with 3 the leave-one-out check is noise)")
    aw.add_argument("--accept-disagreement", action="append", default=None, metavar="TYPED->HEAD",
                    help="write the means although the head confidently calls most cells typed TYPED the class "
                         "HEAD (refused by default as a consistent typing mistake: typing_contradicts_head); "
                         "for a lab manager who verified those types, named with --by; repeat for each pair; "
                         "recorded in the file")
    aw.add_argument("--by", default=None, metavar="NAME",
                    help="with --accept-disagreement (required with it): who accepted it, name or initials as they "
                         f"sign (1 to {MAX_SIGNED_NAME} characters, no control, bidi or other invisible character); "
                         "recorded in the file's fitted line")
    aw.add_argument("--json", action="store_true", help="one JSON line instead of the TOML lines")
    aw.set_defaults(func=_lazy("adapt", "cmd_adapt_wbc"))

    db = sub.add_parser("dashboard", help="serve the clinic dashboard (MQTT over WebSockets in the browser)",
                        description="Serve the static dashboard page; the browser connects to the broker's "
                        "WebSockets listener itself (docs/MQTT.md). Without --password-file and with "
                        "--username, the page asks for the password.")
    db.add_argument("--broker", required=True, help="broker WebSocket URL, ws://HOST:9001 or wss://HOST:PORT "
                    "(no user or password in it: --username, --password-file)")
    db.add_argument("--port", type=_port, default=8080, help="HTTP port (default 8080)")
    db.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    db.add_argument("--host", action="append", default=[], metavar="NAME",
                    help="a DNS name browsers reach the page by (repeatable); IP addresses, localhost and this "
                    "machine's own names are always answered, other names refused (421)")
    db.add_argument("--topic-prefix", default="smearscope", help="the stations' mqtt.topic_prefix (default smearscope)")
    db.add_argument("--username", default=None, help="the dashboard's own broker account (its ACL: docs/MQTT.md)")
    db.add_argument("--password-file", type=Path, default=None,
                    help="file holding that account's password (default: the systemd credential "
                    "dashboard-mqtt-password when present)")
    db.add_argument("--run-control", action="store_true",
                    help="offer each online station's run form on the page: start a run for a specimen id, stop "
                    "it (start_run, stop_run; the account's ACL must allow both: docs/MQTT.md). Off: the page "
                    "only reviews and signs")
    db.set_defaults(func=_lazy("dashboard", "cmd_dashboard"))
    _archive_parser(sub)
    h = sub.add_parser("doctor", help="check a station: config, models, backend, outbox, broker")
    h.add_argument("--config", type=Path, default=None, help="station TOML (default: the embedded station)")
    h.add_argument("--no-wait", dest="wait", action="store_false",
                   help="beside a running station, do not wait for its next telemetry sample (up to "
                   "telemetry_interval_s + 5 s, 65 s at most) for the messages it holds back: say where to see them")
    h.add_argument("--unit", default="smearscope.service",
                   help="the station's systemd unit, whose MemoryMax and MemoryHigh the predicted peak memory is "
                   "compared with (systemctl show; default: smearscope.service, as install-jetson.sh installs it)")
    h.add_argument("--unit-file", type=Path, default=None, metavar="FILE",
                   help="the station's unit file (and its drop-ins FILE.d/*.conf), whose ReadWritePaths= the folders "
                   "the config writes are compared with (default: /etc/systemd/system/UNIT, else the repository's "
                   "systemd/UNIT)")
    h.set_defaults(func=_lazy("doctor", "cmd_doctor"))

    m = sub.add_parser("install-models", help="copy the packaged models to a folder, hashes checked")
    m.add_argument("dest", type=Path, help="the folder analysis.models_dir names (e.g. /var/lib/smearscope/models)")
    m.set_defaults(func=_lazy("doctor", "cmd_install_models"))

    b = sub.add_parser("build-engines", help="build TensorRT engines for the models (Jetson only)")
    b.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR,
                   help="folder of the ONNX models and manifests (default: the packaged models)")
    b.add_argument("--cache", type=Path, default=None,
                   help="engine folder (default: MODELS/engines, where the tensorrt backend looks)")
    b.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"],
                   help="default fp16; int8 needs --calibration (or a saved calibration cache)")
    b.add_argument("--calibration", type=Path, default=None, help="folder of canonical tiles/crops for INT8")
    b.add_argument("--lanes", type=int, default=2, choices=range(1, 9), metavar="1-8",
                   help="the station's analysis.tensorrt_lanes (default 2): one optimisation profile "
                   "per lane, since TensorRT contexts running at once may not share one")
    b.add_argument("--cuda-api", default="auto", choices=["auto", "pycuda", "cuda-python"],
                   help="CUDA binding that reads the GPU's compute capability (part of each engine's name) "
                   "and holds the INT8 calibrator's buffer (auto: pycuda, else cuda-python)")
    b.set_defaults(func=_lazy("artifacts", "cmd_build_engines"))
    describe(ap)  # each subcommand's --help paragraph (smearscope.cli.descriptions)
    return ap


def _archive_parser(sub) -> None:
    """`archive` (the daemon), `archive find`, `archive show`."""
    ar = sub.add_parser("archive", allow_abbrev=False, help="keep every station's reports on disk and find them by specimen",
                        description="Without a subcommand: subscribe to every station's reports and FHIR "
                        "bundles (persistent session, QoS 1) and store each one durably under --dir, "
                        "acknowledged only once on disk (docs/ARCHIVE.md). `archive find` and `archive show` "
                        "read that folder.")
    ar.add_argument("--broker", default=None, help="the broker, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS: "
                    "--ca-file); no user or password in it")
    ar.add_argument("--topic-prefix", default="smearscope", help="the stations' mqtt.topic_prefix (default smearscope)")
    ar.add_argument("--client-id", default="smearscope-archive",
                    help="the archive's fixed MQTT client id; the broker keeps its session under it (default "
                    "smearscope-archive; one per archive on a broker)")
    ar.add_argument("--username", default=None, help="the archive's own broker account (its ACL: docs/ARCHIVE.md)")
    ar.add_argument("--password-file", type=Path, default=None,
                    help="file holding that account's password (default: the systemd credential "
                    "archive-mqtt-password when present)")
    ar.add_argument("--ca-file", type=Path, default=None, help="with mqtts://: the CA certificate (PEM) that "
                    "signed the broker's certificate")
    ar.add_argument("--certfile", type=Path, default=None, help="with mqtts://: a client certificate (PEM), "
                    "with --keyfile, for a broker that asks for one")
    ar.add_argument("--keyfile", type=Path, default=None, help="the client certificate's key (PEM)")
    ar.add_argument("--dir", type=Path, default=None, help=f"the archive folder (default {ARCHIVE_DIR})")
    _hl7_options(ar, None)
    ar.add_argument("--hl7-mllp-error-hold", type=float, default=None, metavar="SECONDS",
                    help="seconds a report the MLLP listener answers AE, CE or no ACK of it (over 1 MiB, not an ACK) is "
                    "held and sent again before it is recorded as not accepted and the archive goes on, 0 to 86400 (default 600; an AR or CR is "
                    "final at once; archive send-hl7 --resend sends it later)")
    ar.set_defaults(func=_lazy("archive", "cmd_archive"))
    asub = ar.add_subparsers(dest="archive_command", parser_class=_CommandParser, metavar="{find,show,send-hl7}",
                             help="find: list archived reports; show: print one; send-hl7: send archived "
                             "reports to the lab system (none: run the archive)")
    af = asub.add_parser("find", help="list archived reports, the latest per run first")
    af.add_argument("--specimen", default=None, help="the lab's specimen id the run was started for (or the "
                    "short form HL7's ORC-2 carries)")
    af.add_argument("--run", default=None, help="a run id (or the short form HL7's ORC-3 carries before ^smearscope)")
    af.add_argument("--station", default=None, help="a station id")
    af.add_argument("--since", default=None, help="reports made on or after this date (YYYY-MM-DD, UTC) or "
                    "ISO time")
    af.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=f"the archive folder (default {ARCHIVE_DIR})")
    af.add_argument("--json", action="store_true", help="one JSON line per report")
    af.add_argument("--not-accepted", action="store_true", help="only the reports a lab system did not accept "
                    "(rejected, or held behind their original) and no later delivery there closed")
    af.set_defaults(func=_lazy("archive", "cmd_find"))
    ash = asub.add_parser("show", help="print one archived report as received (or its FHIR bundle)")
    ash.add_argument("report_id", metavar="REPORT_ID", help="the report's id (as `archive find` lists it)")
    ash.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=f"the archive folder (default {ARCHIVE_DIR})")
    shown = ash.add_mutually_exclusive_group()
    shown.add_argument("--fhir", action="store_true", help="print the report's FHIR bundle instead")
    shown.add_argument("--hl7", action="store_true", help="print the report's HL7 v2.5.1 ORU^R01 message instead, "
                       "one segment a line (docs/HL7.md)")
    ash.add_argument("--copy", type=int, default=None, metavar="N",
                     help="print copy N of those kept beside the report (received again with other content, or "
                     "while its file could not be read; `archive find` numbers them); with --fhir its bundle's")
    _hl7_addressing(ash, argparse.SUPPRESS, " (with --hl7: print the message as the archive sends it)")
    ash.set_defaults(func=_lazy("archive", "cmd_show"))
    snd = asub.add_parser("send-hl7", help="send archived specimen reports as HL7 ORU^R01 where the index records "
                          "no delivery of them (docs/HL7.md)")
    which = snd.add_mutually_exclusive_group(required=True)
    which.add_argument("--since", default=None, help="reports made on or after this date (YYYY-MM-DD, UTC) or "
                       "ISO time")
    which.add_argument("--all", action="store_true", help="every archived specimen report")
    which.add_argument("--resend", action="append", default=None, metavar="REPORT_ID",
                       help="this report (repeatable), though the index records it as not accepted there (an AR, "
                       "an AE given up on; `archive find --not-accepted` lists them), then the reports held behind it")
    snd.add_argument("--again", action="store_true", help="deliver also the reports the index records as "
                     "delivered there (the lab system receives them a second time, with the same MSH-10)")
    snd.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=f"the archive folder (default {ARCHIVE_DIR})")
    _hl7_options(snd, argparse.SUPPRESS)
    snd.set_defaults(func=_lazy("archive", "cmd_send_hl7"))


def _hl7_options(parser: argparse.ArgumentParser, default: object) -> None:
    """The HL7 output's options, on the archive and on `archive send-hl7` (there: SUPPRESS, so either place
    gives them)."""
    parser.add_argument("--hl7-dir", type=Path, default=default,
                        help="also write each specimen report stored as an HL7 v2.5.1 ORU^R01 message, "
                        "<report_id>.hl7, into this folder (an interface engine's input; docs/HL7.md)")
    parser.add_argument("--hl7-mllp", default=default, metavar="HOST:PORT",
                        help="also send each specimen report stored as an HL7 v2.5.1 ORU^R01 message over MLLP "
                        "to this listener; a report is acknowledged to the broker only once it answers AA or "
                        "CA, else held and sent again (docs/HL7.md)")
    parser.add_argument("--hl7-mllp-timeout", type=float, default=default, metavar="SECONDS",
                        help="seconds one MLLP exchange may take, looking the host up, connecting, sending and "
                        "the ACK together, above 0 and at most 300, before the report is held and sent again "
                        "(default 10)")
    _hl7_addressing(parser, default, "")


def _hl7_addressing(parser: argparse.ArgumentParser, default: object, why: str) -> None:
    """MSH-4, MSH-5, MSH-6, MSH-11: on the archive, `archive send-hl7` and `archive show` (`why` ends their help)."""
    parser.add_argument("--hl7-sending-facility", default=default, metavar="HD",
                        help="MSH-4 of the HL7 messages: a namespace id, or namespace^universal id^type "
                        f"(table 0301, e.g. ISO); default: the report's station id{why}")
    parser.add_argument("--hl7-receiving-application", default=default, metavar="HD",
                        help=f"MSH-5 of the HL7 messages: the lab system or engine receiving them (default: empty){why}")
    parser.add_argument("--hl7-receiving-facility", default=default, metavar="HD",
                        help=f"MSH-6 of the HL7 messages: the lab receiving them (default: empty){why}")
    parser.add_argument("--hl7-processing-id", default=default, choices=("P", "T", "D"),
                        help="MSH-11 of the HL7 messages (table 0103): P production, T training (test messages "
                        "while the lab validates the interface), D debugging; a report delivered with T or D "
                        f"still goes to a destination with P (default: P){why}")


def _quiet_opencv(level: str, command: str) -> None:
    """OpenCV's own log lines on stderr (libtiff's complaints about a broken TIFF) beside the
    command's own error line for that input, which names it with its code: shown with --log-level
    DEBUG only. The station (`run`) keeps them: they may say why a camera that is there, a GStreamer
    pipeline or a URL does not open (a V4L2 node the station knows will not open is not handed to OpenCV)."""
    if command != "run" and level.upper() != "DEBUG":
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    _Parser.json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    # the archive daemon started by hand says it connected and what it stores, as its unit logs it
    level = args.log_level or ("INFO" if getattr(args.func, "__name__", "") == "cmd_archive" else "WARNING")
    setup_logging(level)
    _quiet_opencv(level, args.command)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, not as a traceback at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `smearscope analyze ... | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # stdout or a file the command writes could not be written
        import os

        logger.debug("%s failed", args.command, exc_info=True)
        print(f"smearscope {args.command}: {exc}", file=sys.stderr)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except OSError:
            pass
        return EXIT_OUTPUT
