"""Which RBC heads to average: every subset of the given runs, scored on validation by train_rbc's worst figure.

    python -m training.ensemble_rbc build/rbc/rbc_ema build/rbc/rbc_s1 build/rbc/rbc_s2 [--views identity,hflip]

Each run's `best.pt` gives logits for the validation crops (as stored, through a random lab's look,
IDB1, and BCCD's annotated red cells) in each of `--views`; a subset's logits are the mean over its
members and views, scored by `rbc_data.figures` (the worst of Chula macro-F1, Chula macro-F1 under
random looks and IDB1 sickle-vs-not, as `train_rbc --select looks` keeps checkpoints). Nothing here
reads the test split: the chosen subset is exported with `training.export_head --head rbc --run A B
...`, whose manifest then carries the test figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.metrics import softmax
from training.rbc_data import CLASSES, CROP, build_sets, figures, looks_crops
from training.train_head import Deployable, build_net, predict_logits
from training.wbc_data import to_crops

logger = logging.getLogger(__name__)


class MeanLogits(nn.Module):
    """Several heads as one graph: the mean of their logits (same input, same classes)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def load_run(run: Path) -> tuple[Deployable, str]:
    state = torch.load(run / "best.pt", weights_only=False, map_location="cpu")
    if list(state["classes"]) != list(CLASSES):
        raise SystemExit(f"{run}: classes {state['classes']} are not the RBC head's {CLASSES}")
    model = Deployable(build_net(state["arch"], len(CLASSES)))
    model.load_state_dict(state["model"])
    return model.eval(), state["arch"]


def load_head(runs: list[Path]) -> tuple[nn.Module, str, str | None]:
    """One run's head, or the mean of several; (model, its arch or the members' joined by "+",
    architecture text or None)."""
    loaded = [load_run(r) for r in runs]
    if len(loaded) == 1:
        return loaded[0][0], loaded[0][1], None
    archs = sorted({a for _, a in loaded})
    text = (f"mean of the logits of {len(loaded)} timm {'/'.join(archs)} heads in one graph, each from scratch "
            f"or fine-tuned from an earlier head (runs: {', '.join(r.name for r in runs)})")
    return MeanLogits([m for m, _ in loaded]).eval(), "+".join(archs), text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--views", default="identity", help="test-time views averaged for every member")
    ap.add_argument("--max-members", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from smearscope.service.analysis.tta import view_crops

    sets = build_sets()
    crops = {"val": to_crops(sets["val_images"], CROP), "bccd": to_crops(sets["bccd_val_images"], CROP),
             "looks": looks_crops(sets["val_images"])}
    views = args.views.split(",")
    logits = {}
    for run in args.runs:
        model, _ = load_run(run)
        logits[run] = {k: np.mean([predict_logits(model, view_crops(c, v)) for v in views], axis=0)
                       for k, c in crops.items()}
        logger.info("%s: logits for %d views", run, len(views))
    rows = []
    for k in range(1, min(args.max_members, len(args.runs)) + 1):
        for subset in itertools.combinations(args.runs, k):
            mean = {key: np.mean([logits[r][key] for r in subset], axis=0) for key in crops}
            fig = figures(softmax(mean["val"]), sets, "val", softmax(mean["bccd"]), softmax(mean["looks"]),
                          spherocyte_in_worst=False)
            rows.append(([r.name for r in subset], fig))
    rows.sort(key=lambda r: -r[1]["worst"])
    print(f"validation, views {'+'.join(views)} (sorted by worst):")
    print(f"{'members':60s} {'worst':>6s} {'chula':>6s} {'looks':>6s} {'idb1':>6s} {'bccd sph':>8s}")
    for names, f in rows:
        print(f"{' + '.join(names):60s} {f['worst']:6.4f} {f['chula_macro_f1']:6.4f} {f['chula_macro_f1_looks']:6.4f} "
              f"{f['idb1_sickle_vs_not']:6.4f} {f['bccd_spherocyte_share']:8.4f}")
    print(json.dumps({"best": rows[0][0], "figures": rows[0][1]}))


if __name__ == "__main__":
    main()
