"""`adapt-wbc`: the WBC head adapted to a new station from white cells its technician typed.

The technician marks white cells on a few of the station's own fields and types them (a CSV:
`image,x,y,type`, one cell per row, x/y in the image's pixels anywhere inside the cell; type one of
the WBC head's classes). The command analyses those fields as the station does, finds the white
cell under each mark, takes the head's features of it, and writes the station's class means
(service.analysis.station_means) where a class has at least --min-cells typed cells. It refuses
to write means that type the station's own cells worse (leave one out) than the head does, and
(adapt_guard) typed cells the head contradicts as a consistent typing mistake would, unless a lab
manager accepts it (--accept-disagreement, signed --by).

`--station`: the cells come from the station itself instead: those its technicians typed in the
dashboard's review gallery (`cmd/type_cells`), stored with their features in the station's
typed-cells file (service.station.typed_cells); nothing is analysed again.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np

from smearscope.cli.adapt_fit import bad_min_cells, fit_and_write
from smearscope.cli.calibrate import MODELS_WITH_CONFIG, models_with_config

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("image", "x", "y", "type")


class LabelsError(ValueError):
    pass


@dataclass(frozen=True)
class TypedPoint:
    image: Path
    x: float
    y: float
    type: str
    line: int
    #: The scale the row's field was analysed at when the template was made (None: not recorded, or estimated).
    scale: float | None = None


def read_labels(path: Path, classes: list[str]) -> list[TypedPoint]:
    """The technician's typed points; an image path is relative to the CSV's folder unless absolute.
    LabelsError names the first bad line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not a column
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(v.strip() for v in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"{path}: {exc}") from exc
    missing = [c for c in LABEL_COLUMNS if c not in header]
    if missing:
        raise LabelsError(f"{path}: columns {', '.join(missing)} missing (needs a header {','.join(LABEL_COLUMNS)})")
    if not rows:
        raise LabelsError(f"{path}: no cells (a header {','.join(LABEL_COLUMNS)} and one row per cell)")
    col = {c: header.index(c) for c in LABEL_COLUMNS}
    out = []
    for line, row in rows:
        if len(row) < len(header):
            raise LabelsError(f"{path}:{line}: {len(row)} values, the header has {len(header)}")
        kind = row[col["type"]].strip().lower()
        if not kind:  # a template row the technician left untyped (unsure, or not a white cell)
            continue
        if kind not in classes:
            raise LabelsError(f"{path}:{line}: type {row[col['type']]!r} is not one of the WBC head's classes "
                              f"({', '.join(classes)})")
        try:
            x, y = float(row[col["x"]]), float(row[col["y"]])
        except ValueError as exc:
            raise LabelsError(f"{path}:{line}: x and y must be numbers") from exc
        if not (np.isfinite(x) and np.isfinite(y)):
            raise LabelsError(f"{path}:{line}: x and y must be finite")
        name = row[col["image"]].strip()
        if not name:
            raise LabelsError(f"{path}:{line}: no image")
        if "\\" in name and not Path(name).is_absolute():  # a relative name written on Windows
            name = PureWindowsPath(name).as_posix()
        image = Path(name)
        scale = None
        if "microns_per_pixel" in header and row[header.index("microns_per_pixel")].strip():
            try:
                scale = float(row[header.index("microns_per_pixel")])
            except ValueError as exc:
                raise LabelsError(f"{path}:{line}: microns_per_pixel must be a number") from exc
        out.append(TypedPoint(image if image.is_absolute() else path.parent / image, x, y, kind, line, scale))
    if not out:
        raise LabelsError(f"{path}: no row has a type (fill the type column of the cells you are sure of)")
    return out


def _csv_name(name: str) -> str:
    """A field's name for the template's image column: as it is where --labels can read it back
    (valid UTF-8, no control character or line separator), else `shown` (\\xNN, \\uNNNN)."""
    from smearscope.device.ingest import shown

    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a name's bytes that are not UTF-8 (surrogate-escaped)
        return shown(name)
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name):
        return shown(name)
    return name


def cell_at(cells, x: float, y: float, factor: float, shape, typed_only: bool = True) -> int | None:
    """Index of the white cell (one the WBC head typed, its features kept; with `typed_only` off,
    any counted cell) whose box holds (x, y) in input pixels, the nearest centre where several do;
    None when none does."""
    from smearscope.service.analysis.pipeline import input_bbox

    h, w = shape[:2]
    best, best_d = None, np.inf
    for i, c in enumerate(cells):
        if typed_only and c.head_features is None:
            continue
        x0, y0, x1, y1 = input_bbox(c.detection.box, factor, w, h)
        if x0 <= x <= x1 and y0 <= y <= y1:
            d = ((x0 + x1) / 2 - x) ** 2 + ((y0 + y1) / 2 - y) ** 2
            if d < best_d:
                best, best_d = i, d
    return best


def cmd_adapt_wbc(args: argparse.Namespace) -> int:
    from smearscope.device.frame import Frame
    from smearscope.engines.base import EngineError
    from smearscope.service.ingest import IngestError, load_image, shown

    def error(code: str, message: str, **extra) -> int:
        print(json.dumps({"error": {"code": code, "message": message}, **extra}))
        return 2

    if models_with_config(args):  # the config's models would be used, not the ones named
        return error("bad_arguments", MODELS_WITH_CONFIG)
    from smearscope.cli.adapt_guard import acceptance_error

    if (problem := acceptance_error(getattr(args, "accept_disagreement", None), getattr(args, "by", None))):
        return error("bad_arguments", problem)  # before any field is analysed
    if args.template is not None:
        return _write_template(args, error)
    if args.station:
        return _fit_from_station(args, error)
    if args.labels is None or args.out is None or args.images:
        return error("bad_arguments", "fit with --labels TYPED.csv --out STATION_WBC.json; or write a CSV to type with "
                     "FIELDS... --template TYPED.csv")
    if args.min_cells < 2:
        return bad_min_cells(args, error)
    opened = _analyzer_or_error(args, error)
    if isinstance(opened, int):
        return opened
    analyzer, mpp, space = opened
    try:
        head = analyzer.wbc_head
        manifest = head.engine.manifest
        try:
            points = read_labels(args.labels, list(manifest.classes))
        except LabelsError as exc:
            return error("bad_labels", str(exc))
        from smearscope.cli.analyze_io import Input, InputError, OutputGuard

        try:  # the means file never replaces the typed cells or a field they were typed on
            OutputGuard([Input(p.image) for p in points], [args.labels]).check(args.out, "--out")
        except InputError as exc:
            return error(exc.code, exc.message)
        made_at = {p.scale for p in points if p.scale is not None}
        if made_at and (mpp is None or any(abs(v - mpp) > 0.01 * v for v in made_at)):
            scales = ", ".join(f"{v:g}" for v in sorted(made_at))
            return error("scale_mismatch", f"the template's fields were analysed at {scales} um/px, this fit "
                         f"at {'an estimated scale' if mpp is None else f'{mpp} um/px'}: the features differ; give "
                         "the same --microns-per-pixel (or the config's)")
        by_image: dict[Path, list[TypedPoint]] = {}
        for p in points:
            by_image.setdefault(p.image, []).append(p)
        feats, view_feats, types, head_types, energies, unmatched, unreadable = [], [], [], [], [], [], []
        duplicates: list[str] = []  # a second mark on a cell already marked: counted once
        confident: list[bool] = []  # the head's own class passed its open-set tests (not sent to review)
        methods = [t.method for t in head.open_sets]
        model_thresholds = {t.method: t.threshold for t in head.open_sets}
        for image, marks in by_image.items():
            try:
                img = load_image(str(image))
                res = analyzer.analyze(Frame(img.pixels, image.name, str(image), microns_per_pixel=mpp))
            except IngestError as exc:
                logger.warning("%s: %s: %s", shown(image), exc.code.value, exc.message)
                unreadable.append(str(image))
                continue
            except EngineError as exc:
                return error("engine_failed", f"{image}: {exc}")
            taken: set[int] = set()
            for p in marks:
                i = cell_at(res.cells, p.x, p.y, res.input_to_canonical, img.pixels.shape)
                if i is not None and i in taken:
                    duplicates.append(f"{p.image.name}:{p.line}")
                    continue
                if i is None or len(res.cells[i].open_set_scores) != len(methods):
                    unmatched.append(f"{p.image.name}:{p.line}")
                    continue
                taken.add(i)
                hf = res.cells[i].head_features
                feats.append(hf.features)
                view_feats.append(np.array(hf.view_features, np.float64))
                types.append(p.type)
                head_types.append(hf.closed_set_label)
                confident.append(all(v <= model_thresholds[m] for m, v in zip(methods, res.cells[i].open_set_scores)))
                if "energy" in methods:
                    energies.append(res.cells[i].open_set_scores[methods.index("energy")])
    finally:
        analyzer.close()
    n_typed = len(types)
    fitted = (f"{time.strftime('%Y-%m-%d')}: {n_typed} typed white cells in {len(by_image) - len(unreadable)} fields "
              f"({args.labels.name}), at least {args.min_cells} per class for a station mean")
    return fit_and_write(args, error, space, manifest, head.views, model_thresholds,
                         np.array(feats, np.float64).reshape(n_typed, space.means.shape[1]), view_feats, types,
                         head_types, np.array(energies) if "energy" in methods else None, fitted, confident,
                         {"typed": len(points), "matched": n_typed, "unmatched": unmatched[:50],
                          "unmatched_count": len(unmatched), "duplicates": duplicates[:50],
                          "duplicate_count": len(duplicates), "unreadable": unreadable}, mpp)


def _fit_from_station(args: argparse.Namespace, error) -> int:
    """adapt-wbc --station: the cells the station's technicians typed in the review gallery."""
    from smearscope.engines.manifest import ManifestError, load_manifest
    from smearscope.service.analysis.pipeline import MODEL_FILES
    from smearscope.service.analysis.station_means import StationMeansError, load_feature_space
    from smearscope.service.analysis.tta import check_views
    from smearscope.service.config import ConfigError, load_config
    from smearscope.service.station.typed_cells import (
        TypedCellsError,
        TypedCellStore,
        typed_cells_path,
    )

    if args.config is None or args.out is None or args.labels is not None or args.images:
        return error("bad_arguments", "fit from the station's typed cells with --station --config STATION.toml "
                     "--out STATION_WBC.json")
    if args.min_cells < 2:
        return bad_min_cells(args, error)
    try:
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        return error("bad_config", str(exc))
    a = config.analysis
    try:
        manifest = load_manifest(a.models_dir / MODEL_FILES["wbc_head"])
        space = load_feature_space(manifest, a.models_dir)
    except StationMeansError as exc:
        return error(exc.code, exc.message)
    except (ManifestError, OSError) as exc:
        return error("engine_unavailable", f"{type(exc).__name__}: {exc}")
    views = check_views(manifest.tta if a.wbc_head_views is None else a.wbc_head_views)
    path = typed_cells_path(config)
    try:
        store = TypedCellStore(path, read_only=True)
        try:
            typed = store.load(manifest.sha256, views, config.microns_per_pixel)
        finally:
            store.close()
    except TypedCellsError as exc:
        return error(exc.code, exc.message)
    if not typed.types and not (typed.other_head or typed.other_views or typed.other_scale):
        return error("no_typed_cells", (
            f"{path}: no white cell has been typed on this station yet. Type them on the dashboard: with "
            "[review] white_cells = \"all\" every white cell of a run is in its review gallery, with a type to pick "
            f"under its crop (docs/STATION.md); once a class has {args.min_cells} typed, run smearscope adapt-wbc "
            f"{shlex.join(['--station', '--config', str(args.config), '--out', str(args.out)])} again"), typed=0, runs=typed.runs,
            typed_cells=str(path))
    # the model's own open-set tests, as the fit from --labels takes them (earlier station
    # thresholds or means are not what the new means are widened from)
    thresholds = {t.method: t.threshold for t in manifest.open_set}
    missing = [i for i, s in enumerate(typed.open_set_scores) if set(s) != set(thresholds)]
    if missing:
        return error("typed_cells_invalid", f"{path}: {len(missing)} typed cells were scored by other open-set tests "
                     f"than this head's ({', '.join(sorted(thresholds))})")
    energies = (np.array([s["energy"] for s in typed.open_set_scores]) if "energy" in thresholds else None)
    fitted = (f"{time.strftime('%Y-%m-%d')}: {len(typed.types)} white cells typed in the station's review gallery "
              f"({typed.runs} runs), at least {args.min_cells} per class for a station mean")
    return fit_and_write(args, error, space, manifest, views, thresholds, typed.features, typed.view_features,
                         typed.types, typed.head_types, energies, fitted,
                         [all(s[m] <= v for m, v in thresholds.items()) for s in typed.open_set_scores],
                         {"typed": len(typed.types), "runs": typed.runs, "typed_cells": str(path),
                          "other_head": typed.other_head, "other_views": typed.other_views,
                          "other_scale": typed.other_scale}, config.microns_per_pixel)


def _analyzer_or_error(args: argparse.Namespace, error):
    """`_adapting_analyzer`, or the exit status of the error it reports."""
    from smearscope.cli.analyze_io import models_option_problem
    from smearscope.engines.base import EngineError
    from smearscope.engines.manifest import ManifestError
    from smearscope.service.analysis.station_means import StationMeansError
    from smearscope.service.config import ConfigError
    from smearscope.service.station.startup import StartupError

    if args.config is None and (missing := models_option_problem(args.models)) is not None:
        return error("engine_unavailable", missing)
    try:
        return _adapting_analyzer(args)
    except StationMeansError as exc:
        return error(exc.code, exc.message)
    except (ConfigError, StartupError) as exc:
        return error("bad_config", str(exc))
    except (EngineError, ManifestError, OSError) as exc:
        return error("engine_unavailable", f"{type(exc).__name__}: {exc}")


def _adapting_analyzer(args: argparse.Namespace):
    """The station's analyzer keeping white cells' features, without any earlier station means;
    the scale to give; the WBC head's feature space (checked before anything loads, so a head
    without a features output says so: no_feature_space)."""
    from smearscope.engines.manifest import load_manifest
    from smearscope.service.analysis.pipeline import MODEL_FILES, Analyzer, AnalyzerOptions
    from smearscope.service.analysis.station_means import load_feature_space

    config = None
    models_dir, mpp = args.models, args.microns_per_pixel
    if args.config is not None:
        from smearscope.service.config import load_config

        config = load_config(args.config)
        models_dir = config.analysis.models_dir
        mpp = mpp if mpp is not None else config.microns_per_pixel
    space = load_feature_space(load_manifest(models_dir / MODEL_FILES["wbc_head"]), models_dir)
    if config is None:
        return Analyzer.from_models_dir(models_dir, options=AnalyzerOptions(keep_wbc_features=True), warmup=False), \
            mpp, space
    from smearscope.service.station.startup import build_analyzer

    # features do not depend on earlier means or thresholds; sections fitted for an earlier head
    # or earlier means must not stop a refit
    config = config.model_copy(update={"analysis": config.analysis.model_copy(
        update={"wbc_station_means": None, "wbc_open_set": None})})
    return build_analyzer(config, keep_wbc_features=True), mpp, space


def _typed_rows(path: Path) -> int:
    """How many rows of an existing CSV have a type filled in (0: no file, an empty one, or a
    template with none typed; -1: a file that cannot be read as one, so cannot be judged safe)."""
    try:
        if not path.exists() or path.stat().st_size == 0:
            return 0
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if "type" not in header:
                return -1
            col = header.index("type")
            return sum(1 for row in reader if len(row) > col and row[col].strip())
    except (OSError, UnicodeDecodeError, csv.Error):
        return -1


TEMPLATE_COLUMNS = ("image", "x", "y", "type", "cell", "suggested", "confidence", "overlay", "microns_per_pixel")


def _write_template(args: argparse.Namespace, error) -> int:
    """The white cells the station finds on FIELDS, one CSV row each with `type` left empty for the
    technician, numbered as drawn on an overlay per field (--overlays)."""
    import os
    import shlex

    import cv2

    from smearscope.cli.analyze_io import (
        InputError,
        OutputGuard,
        expand_inputs,
        list_files,
        no_images_message,
        shown,
    )
    from smearscope.device.frame import Frame
    from smearscope.engines.base import EngineError
    from smearscope.service.analysis.overlay import draw_numbered
    from smearscope.service.analysis.wording import counted
    from smearscope.service.ingest import IngestError, load_image

    if not args.images:
        return error("no_images", "--template needs the fields to find white cells on (files, folders, @LIST)")
    if args.labels is not None or args.out is not None:
        return error("bad_arguments", "--template writes a CSV to type; fit it afterwards with --labels and --out")
    try:
        images, _ = expand_inputs(args.images)
    except InputError as exc:
        return error(exc.code, exc.message)
    if not images:  # an empty CSV "of 0 white cells" would be written, for nothing to type
        return error("no_images", no_images_message(args.images))
    seen: set[Path] = set()  # a field named twice (a folder and one of its files) is listed once
    images = [i for i in images if i.error is not None or not (i.path.resolve() in seen or seen.add(i.path.resolve()))]
    try:  # where the results go, before anything is analysed: never over an input or typed cells
        guard = OutputGuard(images, list_files(args.images))
        guard.check(args.template, "--template")
        guard.check_directory(args.template.parent, "--template")
        if args.overlays is not None:
            args.overlays.mkdir(parents=True, exist_ok=True)
    except InputError as exc:
        return error(exc.code, exc.message)
    except OSError as exc:
        return error("cannot_write", f"{exc}")
    typed = _typed_rows(args.template)
    if typed:
        held = f"already holds {counted(typed, 'typed cell')}" if typed > 0 else "is not an untyped template (another file?)"
        return error("would_overwrite_types", f"{args.template} {held}; fit typed cells with --labels "
                     f"{args.template}, or write the new template to another file")
    opened = _analyzer_or_error(args, error)
    if isinstance(opened, int):
        return opened
    analyzer, mpp, _ = opened
    try:  # opened (and an untyped old template replaced) only once the analyzer runs
        out_csv = open(args.template, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        analyzer.close()
        return error("cannot_write", f"{exc}")
    with out_csv:
        from smearscope.service.analysis.pipeline import input_bbox

        writer = csv.writer(out_csv)
        writer.writerow(TEMPLATE_COLUMNS)
        n_rows, skipped, written = 0, [], []
        base = args.template.resolve().parent
        try:
            for item in images:
                if item.error is not None:
                    skipped.append(shown(item.path))
                    continue
                try:
                    img = load_image(str(item.path))
                    res = analyzer.analyze(Frame(img.pixels, shown(item.path.name), shown(item.path),
                                                 microns_per_pixel=mpp))
                except IngestError as exc:
                    logger.warning("%s: %s: %s", shown(item.path), exc.code.value, exc.message)
                    skipped.append(shown(item.path))
                    continue
                except EngineError as exc:
                    return error("engine_failed", f"{shown(item.path)}: {exc}")
                path = item.path.resolve()
                # relative to the CSV, '/'-separated: the name as it is, read back by --labels (a bidi or
                # zero-width character, the ZWNJ of a Persian name, kept); one that is not valid UTF-8 or
                # holds a control character or line separator stays unreadable, shown as \xNN
                name = _csv_name(Path(os.path.relpath(path, base)).as_posix() if path.is_relative_to(base) else path.as_posix())
                # one overlay per field, numbered in input order: two fields of one name never share it
                overlay = f"{len(written) + len(skipped) + 1:04d}-{shown(path.stem)}.cells.png" if args.overlays else ""
                h, w = img.pixels.shape[:2]
                numbered = []
                for c in res.cells:
                    if c.head_features is None:
                        continue
                    x0, y0, x1, y1 = input_bbox(c.detection.box, res.input_to_canonical, w, h)
                    numbered.append(c)
                    writer.writerow([name, round((x0 + x1) / 2, 1), round((y0 + y1) / 2, 1), "", len(numbered),
                                     c.head_features.closed_set_label, round(c.label_score or 0.0, 3), overlay,
                                     "" if mpp is None else mpp])
                n_rows += len(numbered)
                if args.overlays is not None:
                    target = args.overlays / overlay
                    if not cv2.imwrite(str(target), draw_numbered(img.pixels, numbered, res.input_to_canonical)):
                        return error("cannot_write", f"{shown(target)}: not written")
                    written.append(shown(target))
        except OSError as exc:
            return error("cannot_write", f"{args.template}: {exc}")
        finally:
            analyzer.close()
    summary = {"template": str(args.template), "white_cells": n_rows, "fields": len(images) - len(skipped),
               "skipped": skipped, "overlays": len(written)}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{counted(n_rows, 'white cell')} in {counted(summary['fields'], 'field')} written to {args.template}"
          + (f"; numbered on the overlays in {args.overlays}" if written else ""))
    print("fill the type column of the cells you are sure of (suggested: the head's guess; leave a row empty "
          "to skip it), then:")
    same = [*(["--config", str(args.config)] if args.config else []),
            *(["--models", str(args.models)] if args.config is None and args.models != _default_models() else []),
            *(["--microns-per-pixel", str(args.microns_per_pixel)] if args.microns_per_pixel is not None else [])]
    print(shlex.join(["smearscope", "adapt-wbc", "--labels", str(args.template), "--out", "station_wbc.json", *same]))
    return 0


def _default_models() -> Path:
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    return DEFAULT_MODELS_DIR
