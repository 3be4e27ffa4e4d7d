"""`adapt-wbc`'s fit, from typed cells' features whichever way they were typed (a CSV of marks on
fields, or the station's typed-cells file): the station means written and what to put in the
config printed, or the reason nothing was written."""

from __future__ import annotations

import argparse
import json

import numpy as np

#: Typed cells the station's file holds that a fit from it leaves out (TypedCells' counts), and why.
LEFT_OUT = {"other_head": "typed under another WBC head", "other_views": "typed with the head in other views",
            "other_scale": "typed at another scale than the config's (before a recalibration, or estimated)"}


def bad_min_cells(args: argparse.Namespace, error) -> int:
    return error("bad_min_cells", f"--min-cells {args.min_cells}: at least 2 (a class' only cell cannot be left "
                 "out of its own mean)")


def fit_and_write(args, error, space, manifest, views, model_thresholds: dict[str, float], feats: np.ndarray,
                   view_feats: list, types: list[str], head_types: list[str], energies: np.ndarray | None,
                   fitted: str, confident: list[bool], counts: dict, microns_per_pixel: float | None = None) -> int:
    """Fit the station means from typed cells' features (analysed at `microns_per_pixel`, None:
    estimated), write them to --out, print what to put in the config (or --json); the exit status.
    `confident`: per cell, whether the head's own class passed its open-set tests (adapt_guard)."""
    import dataclasses

    from smearscope.service.analysis.station_means import fit_station_means

    n_typed = len(types)
    refused = _contradicted(args, error, manifest.classes, types, head_types, confident)
    if isinstance(refused, int):
        return refused
    table, accepted = refused
    accepted_by = args.by.strip() if accepted else None  # --by: checked with --accept-disagreement
    if accepted:
        fitted += (f"; typed cells the head contradicts accepted by a lab manager, {accepted_by} "
                   "(--accept-disagreement): " + "; ".join(d.text() for d in accepted))
    fit = fit_station_means(space, feats, types, head_types, manifest.sha256, args.min_cells, fitted,
                            model_thresholds, energies, views=views, view_feats=view_feats)
    typed_per_class = {c: types.count(c) for c in sorted(set(types))}
    # the classes typed too few times for a station mean keep the head's, and cells left out: said
    # (a refusal keeps every mean of the head, but only these for want of cells)
    short = {c: n for c, n in typed_per_class.items() if n < args.min_cells}
    left_out = "; ".join(f"{n} {why}" for key, why in LEFT_OUT.items() if (n := counts.get(key)))
    summary = {**counts, "cells_per_class": fit.cells, "kept_heads_mean": short,
               "leave_one_out_accuracy": None if np.isnan(fit.loo_accuracy) else round(fit.loo_accuracy, 4),
               "head_accuracy": None if np.isnan(fit.head_accuracy) else round(fit.head_accuracy, 4),
               "model_sha256": manifest.sha256, "confusion": table,
               "accepted_disagreements": [d.key for d in accepted], "accepted_by": accepted_by}
    if fit.means is None:
        per_class = ", ".join(f"{c} {n}" for c, n in typed_per_class.items()) or "none"
        station = "other_scale" in counts  # --station: no marks, cells the file holds left out
        reason = {"too_few_cells": f"no class has {args.min_cells} typed white cells "
                                   f"{'usable for this fit' if station else 'matched to a detected white cell'} "
                                   f"({per_class}{f'; left out: {left_out}' if left_out else ''}): type more"
                                   f"{'' if station else ', or check the marks fall inside the cells'}",
                  "head_better": f"station means type these cells right {fit.loo_accuracy:.1%} of the time (each left "
                                 f"out), the head as trained {fit.head_accuracy:.1%}: keep the head (leave "
                                 "wbc_station_means unset), or type more cells"}[fit.reason or ""]
        return error(fit.reason or "", reason, **summary)
    means = dataclasses.replace(fit.means, microns_per_pixel=microns_per_pixel)
    try:
        args.out.write_text(json.dumps(means.to_json(manifest.classes), indent=1) + "\n")
    except OSError as exc:
        return error("cannot_write", f"{args.out}: {exc}", **summary)
    summary["open_set_section_stale"] = stale = _open_set_section_stale(args)
    if args.json:
        print(json.dumps({"written": str(args.out), "temperature": round(fit.means.temperature, 3),
                          "open_set_thresholds": fit.means.thresholds, "model_open_set_thresholds": model_thresholds,
                          "typed_cells_quantiles": {m: round(v, 4) for m, v in fit.quantiles.items()},
                          **summary}))
        return 0
    print(f"# {fitted}")
    print(f"# typed cells used: {n_typed}; per class {fit.cells}")
    if short:
        print(f"# fewer than {args.min_cells} typed, keeping the head's mean: "
              + ", ".join(f"{c} {n}" for c, n in short.items()))
    if left_out:
        print(f"# left out: {left_out}")
    for count_key, list_key, what in (  # the labels' marks not used, and why
            ("unmatched_count", "unmatched", "marks found no white cell (check they fall inside the cells)"),
            ("duplicate_count", "duplicates", "marks fell on a cell marked before (counted once)")):
        if counts.get(count_key):
            more = ", ..." if counts[count_key] > 5 else ""
            print(f"# {counts[count_key]} {what}: {', '.join(counts[list_key][:5])}{more}")
    if counts.get("unreadable"):
        print(f"# {len(counts['unreadable'])} images could not be read: {', '.join(counts['unreadable'][:5])}")
    for d in accepted:
        print(f"# accepted by {accepted_by} (--accept-disagreement {d.key}): {d.text()}")
    print(f"# leave-one-out: station means {fit.loo_accuracy:.1%}, head as trained {fit.head_accuracy:.1%}")
    for m, v in fit.means.thresholds.items():
        if v > model_thresholds[m]:
            print(f"# open-set test {m}: {v:.3f} with the typed cells (the model's {model_thresholds[m]:.3f})")
    print("# put in the station config:")
    print("[analysis]")
    print(f'wbc_station_means = "{args.out.resolve()}"')
    if stale:
        print("# and refit [analysis.wbc_open_set] with these means in the config (smearscope calibrate-atypical), or "
              "remove it: it was fitted with other means, and the station refuses to start with it")
    return 0


def _open_set_section_stale(args) -> bool:
    """Whether the config (--config) holds an `[analysis.wbc_open_set]` section fitted with other
    station means than the file just written (or none): start-up refuses it with these means."""
    if getattr(args, "config", None) is None:
        return False
    from smearscope.engines.manifest import sha256_file
    from smearscope.service.config import ConfigError, load_config

    try:
        section = load_config(args.config).analysis.wbc_open_set
        return section is not None and section.station_means_sha256 != sha256_file(args.out)
    except (ConfigError, OSError):
        return False  # the fit read the same config; nothing more to say here


def _contradicted(args, error, classes, types: list[str], head_types: list[str], confident: list[bool]):
    """The typed cells' confusion against the head's confident calls and the disagreements a lab
    manager accepted; or the exit status of the refusal (a consistent mistake not accepted, or a
    malformed --accept-disagreement), the table printed to stderr."""
    import sys

    from smearscope.cli.adapt_guard import confusion, disagreements, parse_accepted, table_text

    accepted_keys, bad = parse_accepted(getattr(args, "accept_disagreement", None), list(classes))
    if bad:
        return error("bad_arguments", bad)
    table = confusion(types, head_types, confident)
    found = disagreements(table, judged=args.min_cells)
    left = [d for d in found if d.key not in accepted_keys]
    if not left:
        return table, found
    head_line = ("typed cells (rows, the technician's types) against the head's calls (columns; "
                 "(review): the head was unsure)")
    print("\n".join([head_line, *table_text(table)]), file=sys.stderr)
    flags = " ".join(f"--accept-disagreement {d.key}" for d in left)
    return error("typing_contradicts_head",
                 "the head, passing its own open-set tests, contradicts the typing as a consistent mistake would: "
                 + "; ".join(f"{d.text()}{' (and the other way: swapped)' if d.kind == 'swapped' else ''}"
                             for d in left)
                 + ". Check those cells' types (two classes swapped, or one class typed as another); if a lab "
                 f"manager has verified them, fit again with {flags}",
                 disagreements=[{"typed": d.typed, "head": d.head, "cells": d.cells, "of": d.of, "kind": d.kind}
                                for d in left], confusion=table)
