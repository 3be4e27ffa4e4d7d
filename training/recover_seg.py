"""Turn a committed detector ONNX back into trainable ultralytics weights (warm start).

The exported graph holds every convolution with its batch norm folded in (weight W, bias b).
The same network built from `yolo11n-seg.yaml` gets W as its convolution weight and a batch norm
that adds b and does nothing else (weight 1, bias b, running mean 0, running variance 1 - eps),
so the two compute the same function; training then updates the batch norms as usual. The
result is checked against ONNX Runtime on random tiles before it is saved.

    python -m training.recover_seg --onnx models/seg.onnx --out build/recovered/seg.pt
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from training.env import offline_ultralytics

logger = logging.getLogger(__name__)


def _calibrate_batch_norms(model, images: list[Path], size: int) -> None:
    """Give every batch norm the statistics of its input on real tiles, keeping the function.

    With running mean 0 and variance 1 the recovered network is exact in eval mode, but training
    normalizes by batch statistics, which would rescale every layer at the first step. Measured
    per-channel mean m and variance v of each batch norm's input (in eval mode, the exact
    network) give running stats (m, v), weight sqrt(v + eps) and bias m + b: the same function in
    eval mode, and nearly the same with batch statistics.
    """
    import cv2
    import torch

    from smearscope.service.analysis.illumination import correct_illumination

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    sums = {id(m): [0.0, 0.0, 0] for m in bns}

    def hook(mod, inp, _out):
        x = inp[0].detach().double()
        acc = sums[id(mod)]
        acc[0] = acc[0] + x.sum(dim=(0, 2, 3))
        acc[1] = acc[1] + (x * x).sum(dim=(0, 2, 3))
        acc[2] += x.numel() // x.shape[1]

    handles = [m.register_forward_hook(hook) for m in bns]
    batch = []
    for p in images:
        im = cv2.imread(str(p))
        if im is None:
            continue
        im = correct_illumination(cv2.resize(im, (size, size)) if im.shape[:2] != (size, size) else im).pixels
        batch.append(torch.from_numpy(im[..., ::-1].copy()).permute(2, 0, 1).float() / 255.0)
    with torch.no_grad():
        for i in range(0, len(batch), 16):
            model(torch.stack(batch[i:i + 16]))
    for h in handles:
        h.remove()
    with torch.no_grad():
        for m in bns:
            s1, s2, n = sums[id(m)]
            mean = (s1 / n).float()
            var = (s2 / n - (s1 / n) ** 2).clamp(min=1e-6).float()
            b = m.bias.detach().clone()
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.weight.copy_(torch.sqrt(var + m.eps))
            m.bias.copy_(mean + b)
    logger.info("batch norms calibrated on %d tiles", len(batch))


def recover(onnx_path: Path, out: Path, yaml: str = "yolo11n-seg.yaml",
            calibration_images: list[Path] | None = None) -> float:
    """Write an ultralytics checkpoint equal to `onnx_path`; returns the largest output difference."""
    offline_ultralytics()
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper
    from ultralytics.nn.tasks import SegmentationModel

    manifest = json.loads(onnx_path.with_suffix(".json").read_text())
    classes = manifest["classes"]
    graph = onnx.load(str(onnx_path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.startswith("model.")}
    model = SegmentationModel(yaml, nc=len(classes), verbose=False)
    model.names = dict(enumerate(classes))
    sd = model.state_dict()
    new = {}
    used = set()
    for key in sd:
        if key.endswith(".conv.weight") and key in weights and key[: -len("conv.weight")] + "bn.weight" in sd:
            new[key] = torch.from_numpy(weights[key].copy())
            used.add(key)
            prefix = key[: -len(".conv.weight")]
            bias = weights.get(prefix + ".conv.bias")
            bn = prefix + ".bn"
            if bias is None:
                raise ValueError(f"{key}: no folded bias")
            used.add(prefix + ".conv.bias")
            eps = dict(model.named_modules())[bn].eps
            new[bn + ".weight"] = torch.ones_like(sd[bn + ".weight"])
            new[bn + ".bias"] = torch.from_numpy(bias.copy())
            new[bn + ".running_mean"] = torch.zeros_like(sd[bn + ".running_mean"])
            new[bn + ".running_var"] = torch.full_like(sd[bn + ".running_var"], 1.0 - eps)
        elif key in weights:  # plain convolutions of the heads (own bias), the DFL
            new[key] = torch.from_numpy(weights[key].copy())
            used.add(key)
    missing = [k for k in sd if k not in new and not k.endswith("num_batches_tracked")]
    unused = sorted(set(weights) - used)
    if missing or unused:
        raise ValueError(f"weights do not line up: missing {missing[:5]}, unused {unused[:5]}")
    model.load_state_dict({**sd, **new})
    model.eval()
    if calibration_images:
        _calibrate_batch_norms(model, calibration_images, manifest["input_size"])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    size = manifest["input_size"]
    x = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})
    with torch.no_grad():
        got = model(torch.from_numpy(x))
    pred, proto = got[0][0], got[0][1]  # eval mode: ((detections, prototypes), training outputs)
    diff = max(float(np.abs(pred.numpy() - ref[0]).max()), float(np.abs(proto.numpy() - ref[1]).max()))
    if diff > 1e-2:
        raise ValueError(f"recovered network differs from the ONNX by {diff}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.args = {"task": "segment", "imgsz": size}
    torch.save({"model": model, "epoch": -1, "optimizer": None, "train_args": {"task": "segment"},
                "date": None, "version": "recovered", "source_onnx_sha256": manifest["sha256"]}, out)
    logger.info("recovered %s -> %s (max output difference %.2e)", onnx_path, out, diff)
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=Path("models/seg.onnx"))
    ap.add_argument("--out", type=Path, default=Path("build/recovered/seg.pt"))
    ap.add_argument("--calibrate", type=Path, default=None,
                    help="folder of training tiles to set the batch norms' statistics from (see _calibrate_batch_norms)")
    ap.add_argument("--calibrate-n", type=int, default=160)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    images = None
    if args.calibrate is not None:
        import random

        images = sorted(args.calibrate.glob("*.png"))
        random.Random(0).shuffle(images)
        images = images[: args.calibrate_n]
    recover(args.onnx, args.out, calibration_images=images)


if __name__ == "__main__":
    main()
