"""`smearscope doctor` (what a station lacks, check by check) and `smearscope install-models`
(the models the wheel carries, copied where the configuration points, hashes checked).

Doctor's checks: the configuration (and the files it names), the models in `analysis.models_dir`
(each manifest and the sha256 of its ONNX file), the WBC head's open-set thresholds (the
station's own, `[analysis.wbc_open_set]`, fitted for this head and never looser than the model's;
or the model's), the inference backend the configuration chooses
(ONNX Runtime and its providers; TensorRT, its version and a CUDA binding), with TensorRT the engine
file of each model (smearscope.cli.doctor_engines), a watched folder
(writable: among the configuration's files), a camera's device node (exists, opens for
reading and is a V4L2 video capture node: smearscope.cli.doctor_camera; nothing is captured, the
station may hold the camera; GStreamer pipelines and URLs are not checked), the outbox (its folder writable, free space, not held by another process), the review
directory and the typed-cells file (writable), the station's predicted peak memory against the memory limit
its systemd unit runs under (smearscope.cli.doctor_memory, `service/station/memory_bound.py`), the folders
the configuration writes against the unit file's ReadWritePaths= (smearscope.cli.doctor_unit_paths), the MQTT broker (TCP, TLS with the configured CA and client certificate (refused by the broker: FAIL),
and a login with the station's user and password; the password credential where systemd provides
one, else a warning saying how to run doctor with it; while the station runs, the messages it holds
back from the broker, read from its telemetry: smearscope.cli.doctor_parked), the white cells technicians typed on the
dashboard (per type, for `adapt-wbc --station`). Each line says OK, INFO, WARN or FAIL and, when
not OK, what is missing. Exit 0 when no check FAILs; EXIT_STATION_RECOVERS (3) when the only FAILs
are ones the running station gets past by itself (RECOVERED_BY_THE_STATION: a camera not there, or
there and not answering: it waits for it and opens it when it comes; a broker that does not answer is
a WARN, the outbox keeps the reports), so an installer may enable the unit; 1 for any other FAIL.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smearscope.cli.doctor_outbox import OutboxLook

logger = logging.getLogger(__name__)

#: Below this much free space under the outbox, doctor warns (the station pauses when it is 0).
LOW_DISK_BYTES = 256 * 1024 * 1024

Check = tuple[str, str, str]  # (OK | WARN | FAIL, what, detail)

#: The checks whose FAIL the running station recovers from by itself (`what` of the line).
RECOVERED_BY_THE_STATION = frozenset({"camera"})
#: Doctor's exit status when every FAIL is one of RECOVERED_BY_THE_STATION.
EXIT_STATION_RECOVERS = 3


def _config_checks(path: Path | None) -> tuple[list[Check], object | None]:
    from smearscope.service.config import ConfigError, load_config
    from smearscope.service.station.embedded import embedded_config
    from smearscope.service.station.preflight import file_problems

    try:  # SMEARSCOPE__ environment overrides apply to the embedded station too
        config = embedded_config() if path is None else load_config(path)
    except ConfigError as exc:
        where = str(path or "embedded station")
        # a problem of the file itself (unreadable, not TOML) is located at the file: named once
        return [("FAIL", "config", f"{where}: {msg}" if loc == where else f"{where}: {loc}: {msg}")
                for loc, msg in exc.errors], None
    what = "no --config: the embedded simulated station" if path is None else f"{path} (station {config.station_id})"
    checks: list[Check] = [("OK", "config", what)]
    if path is not None:
        from smearscope.service.config.paths import relative_path_warnings

        checks += [("WARN", "relative path", f"{where}: {why}") for where, why in relative_path_warnings(config, Path.cwd())]
    problems = file_problems(config)
    checks += [("FAIL", "config files", f"{loc}: {msg}") for loc, msg in problems]
    source = config.source
    if source.kind == "folder" and not any(loc == "source.path" for loc, _ in problems):
        checks.append(("OK", "watched folder", f"{source.path} (a directory the station can write: done/, rejected/)"))
    return checks, config


def model_checks(models_dir: Path) -> list[Check]:
    """Each manifest the analyzer loads, and its model file's sha256."""
    from smearscope.engines.manifest import ManifestError, load_manifest
    from smearscope.service.analysis.pipeline import MODEL_FILES

    checks: list[Check] = []
    install = f"smearscope install-models {models_dir}"
    for role, name in MODEL_FILES.items():
        if not (models_dir / name).is_file():  # not installed: not an "invalid manifest: [Errno 2]"
            where = "the folder does not exist" if not models_dir.is_dir() else "not installed there"
            checks.append(("FAIL", f"model {role}", (f"{models_dir / name}: no such file, {where} (install "
                           f"them: {install})")))
            continue
        try:
            manifest = load_manifest(models_dir / name, verify_hash=True)
        except (ManifestError, OSError, ValueError) as exc:
            checks.append(("FAIL", f"model {role}", f"{exc} (install them again: {install})"))
            continue
        checks.append(("OK", f"model {role}", f"{models_dir / manifest.file}, sha256 {manifest.sha256[:12]}"))
        if manifest.feature_space is not None:
            from smearscope.service.analysis.station_means import (
                StationMeansError,
                load_feature_space,
            )

            try:
                load_feature_space(manifest, models_dir)
                checks.append(("OK", f"features {role}", f"{models_dir / manifest.feature_space.file}"))
            except StationMeansError as exc:
                checks.append(("FAIL", f"features {role}", (f"{exc.message} (install them: smearscope "
                               f"install-models {models_dir})")))
    return checks


def station_means_checks(analysis, microns_per_pixel: float | None = None) -> list[Check]:
    """The station's own white-cell class means (smearscope adapt-wbc), when the config names a file;
    WARN when they were fitted at another scale than the station's (`microns_per_pixel`)."""
    if analysis.wbc_station_means is None:
        return [("OK", "station means", ("none: white cells typed by the head as trained (a new lab: smearscope "
                 "adapt-wbc)"))]
    from smearscope.service.analysis.station_means import StationMeansError, means_scale_problem
    from smearscope.service.station.startup import wbc_head_and_means

    try:
        loaded = wbc_head_and_means(analysis)
    except StationMeansError as exc:
        return [("FAIL", "station means", f"{exc.code}: {exc.message}")]
    if loaded is None:
        return []  # the model check above says why
    sm = loaded[1]
    cells = ", ".join(f"{c} {n}" for c, n in sm.cells.items())
    scale = means_scale_problem(sm, microns_per_pixel)
    return [("WARN" if scale else "OK", "station means", (
        f"{analysis.wbc_station_means}: {cells}; leave-one-out {sm.loo_accuracy:.1%} (head {sm.head_accuracy:.1%}); "
        f"{sm.fitted or 'fitted: not recorded'}{f'; {scale}' if scale else ''}"))]


def typed_cells_checks(config) -> list[Check]:
    """The white cells technicians typed on the dashboard (cmd/type_cells), for adapt-wbc --station."""
    review = config.review
    if not (review.enabled and review.typing):
        return [("OK", "typed cells", "typing off ([review] typing): technicians cannot type white cells")]
    from smearscope.cli.adapt_fit import LEFT_OUT
    from smearscope.engines.manifest import ManifestError, load_manifest
    from smearscope.service.analysis.pipeline import MODEL_FILES
    from smearscope.service.analysis.station_means import MIN_CELLS
    from smearscope.service.analysis.tta import check_views
    from smearscope.service.station.typed_cells import (
        TypedCellsError,
        TypedCellStore,
        typed_cells_path,
    )

    try:
        head = load_manifest(config.analysis.models_dir / MODEL_FILES["wbc_head"], verify_hash=False)
    except (ManifestError, OSError, ValueError):
        return []  # the model check above says why
    if head.feature_space is None:
        return [("WARN", "typed cells", ("[review] typing is on but the WBC head has no features output: "
                 "python -m smearscope.export.feature_space, or smearscope install-models"))]
    path = typed_cells_path(config)
    try:
        store = TypedCellStore(path, read_only=True)
    except TypedCellsError as exc:
        if exc.code == "no_typed_cells":
            return [("OK", "typed cells", (f"none yet ({path}); with [review] white_cells = \"all\" technicians "
                     "type every white cell on the dashboard"))]
        return [("FAIL", "typed cells", f"{exc.code}: {exc.message}")]
    a = config.analysis
    try:  # the cells adapt-wbc --station would fit: this head, in the views and at the scale it runs
        typed = store.load(head.sha256, check_views(head.tta if a.wbc_head_views is None else a.wbc_head_views),
                           config.microns_per_pixel)
    except (TypedCellsError, sqlite3.Error) as exc:
        return [("FAIL", "typed cells", f"typed_cells_unavailable: {path}: {exc}")]
    finally:
        store.close()
    counts = {t: typed.types.count(t) for t in sorted(set(typed.types))}
    ready = sorted(c for c, n in counts.items() if n >= MIN_CELLS)
    left_out = "; ".join(f"{n} {why}" for key, why in LEFT_OUT.items() if (n := getattr(typed, key)))
    text = ", ".join(f"{c} {n}" for c, n in counts.items()) or ("none a fit can use" if left_out
                                                                else "none for this WBC head")
    hint = (f"; {', '.join(ready)} ready for a station mean: smearscope adapt-wbc --station" if ready
            else f"; a class needs {MIN_CELLS} for a station mean")
    return [("WARN" if left_out else "OK", "typed cells",
             f"{path}: {text}{hint}{f'; left out of a fit: {left_out}' if left_out else ''}")]


def open_set_checks(analysis) -> list[Check]:
    """The WBC head's open-set thresholds as the station would run them (`startup.open_set_verdict`)."""
    from smearscope.service.station.startup import open_set_verdict

    verdict = open_set_verdict(analysis)
    return [] if verdict is None else [("OK" if verdict[0] else "FAIL", "open set", verdict[1])]


def review_file_checks(config) -> list[Check]:
    """The review directory (overlays, gallery) and the typed-cells file are writable: the station
    does not stop without them, it loses what it would keep there."""
    review = config.review
    if not review.enabled:
        return []
    from smearscope.service.station.preflight import outbox_parent_problem
    from smearscope.service.station.state_access import state_access_problems
    from smearscope.service.station.typed_cells import review_directory, typed_cells_path

    outbox = Path(config.mqtt.outbox.path)
    # beside an outbox whose folder cannot be created: the config files check names it once
    said = outbox_parent_problem(outbox) is not None
    directory = review_directory(config)
    checks: list[Check] = []
    owned = dict(state_access_problems(config))  # a state restored as another user: the chown that fixes it
    if not (said and directory.is_relative_to(outbox.parent)):
        problem = owned.get("review.directory") or _unwritable(directory, directory / "gallery.sqlite")
        checks.append(("FAIL", "review dir", f"{problem}: overlays and the review gallery would be lost")
                      if problem else ("OK", "review dir", f"{directory} (writable)"))
    path = typed_cells_path(config)
    if review.typing and not (said and path.is_relative_to(outbox.parent)):
        problem = owned.get("review.typed_cells_path") or _unwritable(path.parent, path)
        checks.append(("FAIL", "typed cells file", f"{problem}: typed white cells would not be kept")
                      if problem else ("OK", "typed cells file", f"{path} (its folder writable)"))
    return checks


def _backend_checks(backend: str) -> list[Check]:
    checks: list[Check] = []
    try:
        ort = importlib.import_module("onnxruntime")
        checks.append(("OK", "onnxruntime", (f"{ort.__version__}, providers "
                       f"{', '.join(ort.get_available_providers())}")))
    except ImportError as exc:
        checks.append(("FAIL" if backend == "onnxruntime" else "WARN", "onnxruntime", str(exc)))
    level = "FAIL" if backend == "tensorrt" else "WARN"
    try:
        trt = importlib.import_module("tensorrt")
        version = str(getattr(trt, "__version__", "?"))
        ok = int(version.split(".")[0]) >= 10 if version[:1].isdigit() else False
        checks.append(("OK" if ok else level, "tensorrt", version + ("" if ok else ": TensorRT 10 needed")))
    except ImportError:
        checks.append((level, "tensorrt", "not installed (JetPack 6.1+ provides TensorRT 10)"))
    bindings = []
    for module in ("pycuda.driver", "cuda"):
        try:
            importlib.import_module(module)
            bindings.append(module.split(".")[0])
        except ImportError:
            pass
    checks.append(("OK" if bindings else level, "CUDA binding", ", ".join(bindings) or "neither pycuda nor cuda-python"))
    if backend == "onnxruntime":  # TensorRT is optional then: its absence is nothing to act on
        missing = ("not installed", "neither pycuda")
        checks = [("INFO", name, f"{d}: not used with engine_backend onnxruntime")
                  if name in ("tensorrt", "CUDA binding") and d.startswith(missing)
                  else (s if s != "FAIL" or name == "onnxruntime" else "WARN", name, d) for s, name, d in checks]
    return checks


def _credential_checks(mqtt) -> list[Check]:
    """The broker password's systemd credential. Only systemd sets $CREDENTIALS_DIRECTORY (the
    unit's LoadCredential=): run from a shell, doctor can only warn."""
    from smearscope.service.mqtt.credentials import CredentialError, read_password

    if mqtt.password_credential is None:
        return []
    if not os.environ.get("CREDENTIALS_DIRECTORY"):
        return [("WARN", "broker password", (f"credential {mqtt.password_credential!r} not checked: "
                 "$CREDENTIALS_DIRECTORY is not set (systemd sets it from the unit's LoadCredential=; "
                 "`smearscope run` outside systemd refuses this config)"))]
    try:
        read_password(mqtt)
    except CredentialError as exc:
        return [("FAIL", "broker password", str(exc))]
    return [("OK", "broker password", f"credential {mqtt.password_credential!r} readable")]


def _unwritable(folder: Path, file: Path | None = None) -> str | None:
    """Why this user cannot create `folder` (or a folder in it) and write a file there, or `file`
    in it when that exists; None when it can. Nothing is left behind."""
    from smearscope.service.station.preflight import nearest_existing

    existing = nearest_existing(folder)
    try:  # what the station will do: create the folder (here a scratch one, removed) and a file in it
        if existing is None:
            raise OSError("no existing parent")
        with tempfile.TemporaryDirectory(dir=existing) as scratch, tempfile.TemporaryFile(dir=scratch):
            pass
    except OSError as exc:
        return f"{folder} cannot be created or written by this user ({exc})"
    if file is not None and file.exists() and not os.access(file, os.R_OK | os.W_OK):
        return f"{file} cannot be read and written by this user"
    return None


def _outbox_checks(path: Path, look: OutboxLook, review_free_mb: float | None = None) -> list[Check]:
    """Its folder, the free space under it, and what `look` (doctor's one open of the file) found."""
    from smearscope.service.station.preflight import nearest_existing, outbox_parent_problem

    if outbox_parent_problem(path) is not None:
        return []  # the config files check names it
    folder = path.parent
    if (problem := _unwritable(folder)) is not None and not look.read_only:
        return [("FAIL", "outbox", problem)]
    # a file this user can only read (another user than the station's, a read-only mount): said, and read
    checks: list[Check] = [] if problem is None else [("FAIL", "outbox", problem)]
    existing = nearest_existing(folder)
    assert existing is not None  # _unwritable found it
    free = shutil.disk_usage(existing).free
    detail = f"{free / 1e6:.0f} MB free under {existing}"
    if free < LOW_DISK_BYTES:
        overlays = ("" if review_free_mb is None else
                    f"; overlays give way below [review] min_free_disk_mb = {review_free_mb:g}")
        detail += (f", under the {LOW_DISK_BYTES / 1e6:.0f} MB doctor asks for: when the outbox cannot "
                   f"grow the station pauses its analysis{overlays}. Free space on that file system "
                   f"(du -xh -d 2 {existing} | sort -h; journalctl --vacuum-size=100M), or move "
                   "mqtt.outbox.path to a larger disk")
    checks.append(("WARN" if free < LOW_DISK_BYTES else "OK", "outbox disk", detail))
    if not look.exists:
        checks.append(("OK", "outbox", f"{path}: not created yet (the first start creates it)"))
    elif look.held:
        checks.append(("OK", "outbox", f"{path}: held by a running station"))
    elif look.error is not None:
        if not isinstance(look.error, (sqlite3.Error, OSError, RuntimeError)):
            raise look.error
        checks.append(("FAIL", "outbox", f"{path}: {look.error}"))
    elif look.messages is not None:
        counted = f"{look.messages} messages waiting ({look.reports} final: specimen reports, FHIR bundles)"
        if not look.read_only:
            checks.append(("OK", "outbox", f"{path}: {counted}"))
        elif not look.unseen_wal:
            checks.append(("OK", "outbox", f"{path}: {counted}; {look.read_only}, nothing changed"))
        else:  # the station's last writes are in its -wal, which SQLite reads only where it may write beside it
            checks.append(("WARN", "outbox", (
                f"{path}: {counted} in the file itself; {look.read_only}, so its {path.name}-wal "
                f"({look.unseen_wal / 1024:.0f} kB: the station's last writes, not yet folded into the file) "
                "was not read and the counts and held runs may miss them; nothing changed. Run doctor as the file's owner "
                f"({_owner(path)}) to count them")))
    return checks


def _owner(path: Path) -> str:
    """The name of the user owning `path`."""
    from smearscope.service.station.state_access import user_name

    return user_name(path.stat().st_uid)


#: The check names' column: the longest name ("model segmentation") fits, so each detail starts in one column.
WHAT_WIDTH = 18


def _say(check: Check) -> None:
    status, what, detail = check
    print(f"{status:<4}  {what:<{WHAT_WIDTH}} {detail}", flush=True)


def cmd_doctor(args: argparse.Namespace) -> int:
    from smearscope.cli.doctor_broker import broker_checks, client_id_checks
    from smearscope.cli.doctor_camera import camera_checks
    from smearscope.cli.doctor_engines import engine_checks
    from smearscope.cli.doctor_memory import memory_checks
    from smearscope.cli.doctor_outbox import held_run_checks, look_at_outbox
    from smearscope.cli.doctor_parked import parked_checks
    from smearscope.cli.doctor_unit_paths import unit_path_checks
    from smearscope.service.mqtt.wall_clock import clock_before_release, clock_reading
    from smearscope.service.station.scale_record import drift_checks, scale_checks

    # each line as it is found: a check that waits (the running station's next telemetry) says so first
    checks: list[Check] = [("WARN", "clock", wrong) if (wrong := clock_before_release()) else ("OK", "clock", clock_reading())]
    _say(checks[0])
    found, config = _config_checks(args.config)
    for check in found:
        _say(check)
    checks += found
    if config is not None:
        analysis, mqtt = config.analysis, config.mqtt  # type: ignore[attr-defined]
        review = config.review  # type: ignore[attr-defined]
        review_free = review.min_free_disk_mb if review.enabled else None
        outbox = functools.cache(functools.partial(look_at_outbox, Path(mqtt.outbox.path)))  # opened once
        waiting = (lambda text: print(f"{'':<4}  {'parked':<{WHAT_WIDTH}} {text}", flush=True))
        steps: list[Callable[[], list[Check]]] = [
            lambda: model_checks(analysis.models_dir), lambda: open_set_checks(analysis),
            lambda: station_means_checks(analysis, config.microns_per_pixel), lambda: typed_cells_checks(config),
            lambda: _backend_checks(analysis.engine_backend), lambda: engine_checks(analysis),
            lambda: camera_checks(config.source), lambda: scale_checks(config),  # type: ignore[attr-defined]
            lambda: drift_checks(config, held=outbox().held),  # type: ignore[arg-type]
            lambda: memory_checks(config, args.unit),
            # the embedded station (no --config) is no unit's: its folders are not compared
            lambda: unit_path_checks(config, args.unit, args.unit_file) if args.config is not None else [],
            lambda: _outbox_checks(mqtt.outbox.path, outbox(), review_free),
            lambda: held_run_checks(outbox(), f"{mqtt.topic_prefix}/{config.station_id}/run",  # type: ignore[attr-defined]
                                    mqtt.protocol),
            lambda: review_file_checks(config),
            lambda: _credential_checks(mqtt), lambda: broker_checks(mqtt, config_path=args.config,
                                                                station_id=config.station_id),  # type: ignore[attr-defined]
            lambda: client_id_checks(mqtt, config.station_id, args.unit),  # type: ignore[attr-defined]
            lambda: parked_checks(config, waiting if args.wait else None, station_runs=outbox().held)]
        for step in steps:
            try:
                found = step()
            except (ImportError, OSError, RuntimeError, ValueError) as exc:  # a finding, not a crash
                found = [("FAIL", "doctor", f"{type(exc).__name__}: {exc}")]
            for check in found:
                _say(check)
            checks += found
    failed = [what for s, what, _ in checks if s == "FAIL"]
    recovers = bool(failed) and set(failed) <= RECOVERED_BY_THE_STATION
    warned = sum(s == "WARN" for s, _, _ in checks)
    print(f"{len(checks)} checks: {len(failed)} failed"
          f"{' (only ones the running station recovers from: ' + ', '.join(failed) + ')' if recovers else ''}, "
          f"{warned} warning{'' if warned == 1 else 's'}")
    return EXIT_STATION_RECOVERS if recovers else 1 if failed else 0


def cmd_install_models(args: argparse.Namespace) -> int:
    """Copy the models the package carries to DEST (atomically per file), then check every hash."""
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    source, dest = DEFAULT_MODELS_DIR, args.dest
    files = sorted(p for p in source.glob("*") if p.suffix in (".onnx", ".json", ".npz"))
    if not files:
        print(f"smearscope install-models: no models in {source}")
        return 1
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for path in files:
            with tempfile.NamedTemporaryFile(dir=dest, prefix=f".{path.name}.", delete=False) as tmp, \
                    open(path, "rb") as fh:
                shutil.copyfileobj(fh, tmp)
            os.replace(tmp.name, dest / path.name)
            os.chmod(dest / path.name, 0o644)
    except OSError as exc:
        # mkdir of a path that is a file says "File exists", which reads as the models being there
        why = "it is a file, not a folder" if dest.exists() and not dest.is_dir() else exc.strerror or exc
        print(f"smearscope install-models: cannot write the models to {dest}: {why}")
        return 1
    checks = model_checks(dest)
    for status, what, detail in checks:
        print(f"{status:<4}  {what:<{WHAT_WIDTH}} {detail}")
    return 1 if any(s == "FAIL" for s, _, _ in checks) else 0
