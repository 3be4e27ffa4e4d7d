"""Leave-one-lab-out detector runs: each lab, by a detector trained without it and by ones trained with it.

    python -m training.lolo_seg [--runs build/lolo]

A run named `no_LAB` (LAB: bccd, txl, chula, pbc, rpi; `txl` is the three TXL-PBC sources) is a
detector fine-tuned from the same start, with the same recipe and time budget, on every lab but
LAB (`training.lab_mix --weights LAB=0 --name no_LAB`, which also keeps LAB out of the run's
validation). Its lab table on validation (`training.lab_table --models CANDIDATE --json
RUNS/lab_no_LAB.json`) gives LAB's figure *without* LAB; the other runs, which did see LAB at the
same budget, give it *with* LAB. An optional `RUNS/lab_start.json` is the start's own table (a
detector that saw none of the held-out labs). Headlines are `training.lab_table.headline`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from training.lab_table import headline
from training.labs import TXL_SOURCES

#: What a run's name leaves out: the detector labs of `training.labs.DETECTOR_LABS`.
GROUPS = {"txl": TXL_SOURCES, "bccd": ("bccd",), "chula": ("chula",), "pbc": ("pbc",), "rpi": ("rpi",)}


def left_out(run: str) -> tuple[str, ...]:
    """The labs run `no_LAB` was trained without."""
    if not run.startswith("no_") or run[3:] not in GROUPS:
        raise ValueError(f"{run}: a leave-one-lab-out run is named no_LAB, LAB one of {sorted(GROUPS)}")
    return GROUPS[run[3:]]


def held_out_rows(tables: dict[str, list[dict]], start: list[dict] | None = None) -> list[dict]:
    """Per lab and scale that some run left out: its headline without it, with it (mean and the
    runs' figures) and in the start's table; `tables`: run name -> lab_table rows."""
    out = []
    for run, rows in tables.items():
        for lab in left_out(run):
            for row in (r for r in rows if r["lab"] == lab):
                scale = row["scale"]
                others = {o: headline(r) for o, orows in tables.items() if o != run and lab not in left_out(o)
                          for r in orows if r["lab"] == lab and r["scale"] == scale}
                base = [headline(r) for r in start or [] if r["lab"] == lab and r["scale"] == scale]
                out.append({"lab": lab, "scale": scale, "n": row["n"], "held_out_by": run, "without": headline(row),
                            "with": statistics.mean(others.values()) if others else None, "with_runs": others,
                            "start": base[0] if base else None})
    return out


def format_rows(rows: list[dict]) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.3f}"
    lines = ["| lab | scale | n | trained without it | trained with it (mean; runs) | the start (saw none of them) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        runs = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["with_runs"].items()))
        lines.append(f"| {r['lab']} | {r['scale']} | {r['n']} | {fmt(r['without'])} ({r['held_out_by']}) | "
                     f"{fmt(r['with'])} ({runs or 'none'}) | {fmt(r['start'])} |")
    return "\n".join(lines)


def load(root: Path) -> tuple[dict[str, list[dict]], list[dict] | None]:
    tables = {p.stem[len("lab_"):]: json.loads(p.read_text()) for p in sorted(root.glob("lab_no_*.json"))}
    start = root / "lab_start.json"
    return tables, json.loads(start.read_text()) if start.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("build/lolo"))
    args = ap.parse_args()
    tables, start = load(args.runs)
    if not tables:
        raise SystemExit(f"no lab_no_*.json in {args.runs}: run training.lab_table --json for each candidate first")
    print(format_rows(held_out_rows(tables, start)))


if __name__ == "__main__":
    main()
