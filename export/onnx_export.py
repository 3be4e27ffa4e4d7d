"""Weights -> ONNX (named tensors, dynamic batch axis, pinned opset) -> manifest.

Every export is checked: ONNX Runtime's output on random inputs must match PyTorch's within
tolerance, or the export fails.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from smearscope.engines.manifest import (
    CANONICAL_UM_PER_PX,
    BatchProfile,
    CropInfo,
    ModelManifest,
    OpenSet,
    Preprocessing,
    TensorSpec,
    sha256_file,
)

logger = logging.getLogger(__name__)
OPSET = 17


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


PARITY_RTOL = 1e-5


def parity_gap(outs: list[np.ndarray], refs: list[np.ndarray], atol: float, rtol: float = PARITY_RTOL) -> float:
    """Max abs difference of two runs' outputs; raises when an element differs by more than
    atol + rtol * |reference| (numpy.allclose's rule). The relative part is float32 rounding of
    large outputs: a squared Mahalanobis distance of 3.6e5 (an `ood` output on random input)
    carries about 0.3 of it, which an absolute bound alone refused."""
    if len(outs) != len(refs):
        raise RuntimeError(f"ONNX gives {len(outs)} outputs, PyTorch {len(refs)}")
    diff = 0.0
    for o, r in zip(outs, refs):
        if np.shape(o) != np.shape(r):  # broadcasting would compare other elements
            raise RuntimeError(f"ONNX output of shape {np.shape(o)} where PyTorch gives {np.shape(r)}")
        # NaN never matches (its gap compares as no excess), an infinity only itself
        if (np.isnan(o) | np.isnan(r) | ((np.isinf(o) | np.isinf(r)) & (o != r))).any():
            raise RuntimeError("ONNX or PyTorch output holds NaN, or an infinity the other does not")
        finite = np.isfinite(r)
        with np.errstate(invalid="ignore"):
            gap = np.where(finite, np.abs(o - r), 0.0)
        excess = gap - (atol + rtol * np.abs(np.where(finite, r, 0.0)))
        if excess.size and excess.max() > 0:
            i = np.unravel_index(int(excess.argmax()), excess.shape)
            raise RuntimeError(f"ONNX output differs from PyTorch by {float(gap[i]):.2e} at {float(r[i]):.4g} "
                               f"(> {atol} + {rtol} x |reference|)")
        diff = max(diff, float(gap.max(initial=0.0)))
    return diff


def check_parity(model, onnx_path: Path, shape: tuple[int, ...], atol: float = 1e-3) -> float:
    """Max abs difference between PyTorch and ONNX Runtime outputs on seeded random input."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x))
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    return parity_gap(outs, [r.numpy() for r in refs], atol)


def write_manifest(manifest: ModelManifest, out_dir: Path) -> Path:
    path = out_dir / f"{manifest.name}.json"
    path.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    logger.info("wrote %s (sha256 %s)", path, manifest.sha256[:12])
    return path


def export_classifier(model, *, name: str, classes: list[str], crop, arch: str, temperature: float,
                      metrics: dict[str, Any], training_data: dict[str, Any], split_hashes: dict[str, str],
                      out_dir: Path, history: list | None = None, open_set: OpenSet | None = None,
                      preprocessing: Preprocessing | None = None, tta: list[str] | None = None,
                      architecture: str | None = None) -> Path:
    """Export a head; with `open_set` the model returns (logits, score) and the score is the second
    output, named by `open_set.output`."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{name}.onnx"
    s = crop.input_size
    dummy = torch.zeros(2, 3, s, s)
    names = ["logits"] + ([open_set.output] if open_set is not None else [])
    torch.onnx.export(model, (dummy,), str(onnx_path), input_names=["images"], output_names=names,
                      dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                      opset_version=OPSET, dynamo=False)
    diff = check_parity(model, onnx_path, (4, 3, s, s), atol=1e-3 if open_set is None else 1e-2)
    outputs = [TensorSpec(name="logits", shape=[-1, len(classes)])]
    if open_set is not None:
        outputs.append(TensorSpec(name=open_set.output, shape=[-1]))
    manifest = ModelManifest(
        name=name, task="classification", file=onnx_path.name, sha256=sha256_file(onnx_path), opset=OPSET,
        inputs=[TensorSpec(name="images", shape=[-1, 3, s, s])], outputs=outputs,
        batch=BatchProfile(min=1, opt=32, max=128), input_size=s, canonical_um_per_px=CANONICAL_UM_PER_PX,
        preprocessing=preprocessing or Preprocessing(),
        classes=list(classes), crop=CropInfo(extent_um=crop.extent_um, input_size=s), temperature=temperature,
        open_set=open_set, tta=tta or ["identity"],
        architecture=architecture or f"timm {arch}, from scratch", training_data=training_data, split_hashes=split_hashes,
        metrics={**metrics, "onnx_parity_max_abs_diff": diff, **({"history": history} if history else {})},
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), producer=_versions(),
    )
    return write_manifest(manifest, out_dir)


def export_yolo_seg(weights: Path, *, name: str, imgsz: int, classes: list[str], metrics: dict[str, Any],
                    training_data: dict[str, Any], split_hashes: dict[str, str], out_dir: Path,
                    preprocessing: Preprocessing | None = None, architecture: str | None = None) -> Path:
    """Ultralytics YOLO-seg .pt -> ONNX with a dynamic batch axis (raw head output, NMS done by us)."""
    import torch
    from ultralytics import YOLO

    out_dir.mkdir(parents=True, exist_ok=True)
    yolo = YOLO(str(weights))
    exported = Path(yolo.export(format="onnx", imgsz=imgsz, dynamic=True, simplify=True, opset=OPSET, batch=1, device="cpu"))
    onnx_path = out_dir / f"{name}.onnx"
    exported.replace(onnx_path)
    net = yolo.model.eval().float()

    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probe = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, imgsz, imgsz), np.float32)})
    # Spatial axes are exported dynamic, but the analyzer always feeds imgsz tiles: pin them.
    ins = [TensorSpec(name=sess.get_inputs()[0].name, shape=[-1, 3, imgsz, imgsz])]
    outs = [TensorSpec(name=o.name, shape=[-1, *p.shape[1:]]) for o, p in zip(sess.get_outputs(), probe)]
    wanted = [tuple(p.shape[1:]) for p in probe]

    class Raw(torch.nn.Module):
        """The PyTorch model's tensors that correspond to the ONNX outputs, found by shape."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            flat, stack = [], [self.m(x)]
            while stack:
                y = stack.pop(0)
                if isinstance(y, torch.Tensor):
                    flat.append(y)
                elif isinstance(y, (list, tuple)):
                    stack.extend(y)
                elif isinstance(y, dict):
                    stack.extend(y.values())
            return tuple(next(t for t in flat if tuple(t.shape[1:]) == w) for w in wanted)

    diff = check_parity(Raw(net), onnx_path, (2, 3, imgsz, imgsz), atol=1e-2)
    manifest = ModelManifest(
        name=name, task="segmentation", file=onnx_path.name, sha256=sha256_file(onnx_path), opset=OPSET,
        inputs=ins, outputs=outs, batch=BatchProfile(min=1, opt=4, max=16), input_size=imgsz,
        canonical_um_per_px=CANONICAL_UM_PER_PX, classes=classes, preprocessing=preprocessing or Preprocessing(),
        architecture=architecture or "ultralytics yolo11n-seg (yaml), from scratch",
        training_data=training_data, split_hashes=split_hashes,
        metrics={**metrics, "onnx_parity_max_abs_diff": diff},
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), producer=_versions(),
    )
    return write_manifest(manifest, out_dir)
