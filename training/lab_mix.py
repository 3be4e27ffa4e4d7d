"""Reweight the labs of a prepared detector set by listing tiles more or fewer times.

    python -m training.lab_mix --data build/seg_labsB --weights bccd=3,chula=0.5,rpi=1
    python -m training.lab_mix --data build/seg_labs --weights chula=0 --name no_chula   # leave one lab out
    python -m training.lab_mix --data build/seg_labs --weights txl=0 --name no_txl       # the three TXL-PBC sources

ultralytics samples every listed image once per epoch, so a lab's weight is how many times its
tiles are listed (fractions: a seeded subset). Writes `train_NAME.txt` and `data_NAME.yaml`
(NAME: `mix` unless `--name`) beside the set. Validation stays as prepared, except that a lab of
weight 0 leaves it too (`val_NAME.txt`): a leave-one-lab-out run must not pick its checkpoint on
the lab it is tested on.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from training.labs import TXL_SOURCES

#: File-name prefix of each lab's tiles (training.prep_labs).
PREFIX = {"bccd": "BloodImage", "chula": "chula_", "txl_575": "txl_575_", "txl_416": "txl_416_",
          "txl_360": "txl_360_", "pbc": "pbc_", "rpi": "rpi_", "synthetic": "synthetic_"}


def lab_of(name: str) -> str:
    for lab, prefix in PREFIX.items():
        if name.startswith(prefix):
            return lab
    raise ValueError(f"{name}: no lab prefix")


#: Names that stand for several labs: `txl=0` leaves out the three TXL-PBC sources.
GROUPS = {"txl": TXL_SOURCES}


def expand_groups(weights: dict[str, float]) -> dict[str, float]:
    """A group name's weight applies to each of its labs; a lab named on its own keeps its weight."""
    out = {member: w for lab, w in weights.items() if lab in GROUPS for member in GROUPS[lab]}
    out.update({lab: w for lab, w in weights.items() if lab not in GROUPS})
    return out


def mix(data: Path, weights: dict[str, float], seed: int = 0, name: str = "mix") -> dict[str, int]:
    """Tiles listed per lab in the training list (see the module docstring)."""
    weights = expand_groups(weights)
    unknown = set(weights) - set(PREFIX)
    if unknown:
        raise ValueError(f"unknown labs {sorted(unknown)}; labs are {sorted(PREFIX)} and groups {sorted(GROUPS)}")
    files = sorted((data / "images" / "train").glob("*.png"))
    rng = random.Random(seed)
    out, counts = [], {}
    for lab in PREFIX:
        mine = [f for f in files if lab_of(f.name) == lab]
        w = weights.get(lab, 1.0)
        listed = mine * int(w) + rng.sample(mine, round((w - int(w)) * len(mine)))
        out += listed
        counts[lab] = len(listed)
    (data / f"train_{name}.txt").write_text("".join(f"{f.resolve()}\n" for f in out))
    yaml = (data / "data.yaml").read_text().replace("train: images/train", f"train: train_{name}.txt")
    left_out = {lab for lab, w in weights.items() if w == 0}
    (data / f"val_{name}.txt").unlink(missing_ok=True)  # an earlier mix of this name may have left a lab out
    if left_out:
        val = [f for f in sorted((data / "images" / "val").glob("*.png")) if lab_of(f.name) not in left_out]
        (data / f"val_{name}.txt").write_text("".join(f"{f.resolve()}\n" for f in val))
        yaml = yaml.replace("val: images/val", f"val: val_{name}.txt")
    (data / f"data_{name}.yaml").write_text(yaml)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--weights", default="", help="lab=weight,... (default 1 each; 0 leaves the lab out)")
    ap.add_argument("--name", default="mix", help="writes train_NAME.txt, data_NAME.yaml (and val_NAME.txt)")
    args = ap.parse_args()
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(",") if kv)}
    print(json.dumps(mix(args.data, weights, name=args.name)))


if __name__ == "__main__":
    main()
