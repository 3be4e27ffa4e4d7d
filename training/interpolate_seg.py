"""Interpolate two detector checkpoints of one lineage (WiSE-FT: Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models").

A fine-tune on a new lab's look (PBC pseudo-labels) moves the weights away from what served the
first lab (BCCD). The weights on the line between the starting checkpoint and the fine-tuned one
often keep most of both: `alpha` 0 is the start, 1 the fine-tune. Both checkpoints must come from
the same architecture (one fine-tuned from the other); float tensors are blended, integer buffers
(e.g. batch-norm counters) are taken from the fine-tune.

    python -m training.interpolate_seg --start build/runs/seg_ft4/weights/last.pt \\
        --tuned build/runs/seg_pbc3/weights/last.pt --alpha 0.5 --out build/wise/seg_a50.pt
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from training.env import offline_ultralytics

logger = logging.getLogger(__name__)


def _module(ckpt):
    m = ckpt.get("ema") or ckpt["model"]
    return m.float()


def _is_float(t) -> bool:
    f = getattr(t, "is_floating_point", None)  # torch tensors; numpy arrays by dtype
    return bool(f()) if callable(f) else bool(np.issubdtype(np.asarray(t).dtype, np.floating))


def blend_state(start: Mapping, tuned: Mapping, alpha: float) -> dict:
    """(1 - alpha) * start + alpha * tuned for float tensors; integer buffers come from `tuned`.

    Works on torch state dicts and on mappings of numpy arrays alike. Raises ValueError unless both
    have the same keys and shapes (one lineage) and alpha lies in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if start.keys() != tuned.keys() or any(tuple(start[k].shape) != tuple(tuned[k].shape) for k in start):
        raise ValueError("the checkpoints differ in architecture; interpolation needs one lineage")
    return {k: (1 - alpha) * start[k] + alpha * tuned[k] if _is_float(tuned[k]) else tuned[k] for k in tuned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=Path, required=True)
    ap.add_argument("--tuned", type=Path, required=True)
    ap.add_argument("--alpha", type=float, required=True, help="0 = start, 1 = tuned")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    offline_ultralytics()
    import torch

    a = torch.load(args.start, map_location="cpu", weights_only=False)
    b = torch.load(args.tuned, map_location="cpu", weights_only=False)
    tuned = _module(b)
    try:
        blended = blend_state(_module(a).state_dict(), tuned.state_dict(), args.alpha)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model = copy.deepcopy(tuned)
    model.load_state_dict(blended)
    out = dict(b)
    out.update(model=model.half(), ema=None, optimizer=None, updates=None,
               interpolation={"start": str(args.start), "tuned": str(args.tuned), "alpha": args.alpha})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    logger.info("wrote %s (alpha %.2f between %s and %s)", args.out, args.alpha, args.start, args.tuned)


if __name__ == "__main__":
    main()
