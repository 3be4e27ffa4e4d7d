"""Turn a committed head ONNX back into trainable timm weights (warm start for fine-tuning).

The exported graph folds each batch norm into the convolution before it. The convolutions of
the rebuilt network (`training.train_head.build_net`), taken in the order a forward pass runs
them, line up one to one with the graph's Conv nodes in graph order; each gets the folded weight,
and its batch norm carries the folded bias with statistics measured on real crops (so training
with batch statistics starts from the same function, see `training.recover_seg`). The result is
checked against ONNX Runtime before it is returned.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.train_head import Deployable, build_net

logger = logging.getLogger(__name__)


def _conv_order(model: nn.Module, size: int) -> list[nn.Conv2d]:
    order: list[nn.Conv2d] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return order


def _bn_after(model: nn.Module) -> dict[int, nn.BatchNorm2d]:
    """Each convolution's batch norm (timm ResNet: conv1/bn1, conv2/bn2, downsample.1/.2, stem)."""
    mods = list(model.named_modules())
    out = {}
    for i, (_name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            for _n2, m2 in mods[i + 1:]:
                if isinstance(m2, nn.BatchNorm2d):
                    out[id(m)] = m2
                    break
                if isinstance(m2, nn.Conv2d):
                    break
    return out


def recover_head(onnx_path: Path, arch: str, calibration: np.ndarray | None = None) -> Deployable:
    """The head of `onnx_path` as a trainable `Deployable` (timm ResNet), checked for parity."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from training.train_head import to_tensor

    manifest = json.loads(onnx_path.with_suffix(".json").read_text())
    size = manifest["input_size"]
    g = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    convs = [(inits[n.input[1]], inits[n.input[2]] if len(n.input) > 2 else None) for n in g.node if n.op_type == "Conv"]
    model = Deployable(build_net(arch, len(manifest["classes"])))
    order = _conv_order(model, size)
    if len(order) != len(convs):
        raise ValueError(f"{len(order)} convolutions in {arch}, {len(convs)} in {onnx_path.name}")
    bns = _bn_after(model)
    with torch.no_grad():
        for conv, (w, b) in zip(order, convs):
            if tuple(conv.weight.shape) != w.shape:
                raise ValueError(f"shape {tuple(conv.weight.shape)} against {w.shape}")
            conv.weight.copy_(torch.from_numpy(w.copy()))
            bn = bns[id(conv)]
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b.copy()) if b is not None else torch.zeros_like(bn.bias))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        fc = model.net.get_classifier()
        # the classifier's own names: `net.fc.*`, or `inner.net.fc.*` in a white-cell head's open-set graph
        for part in ("weight", "bias"):
            (name,) = [n for n in inits if n == f"net.fc.{part}" or n.endswith(f".net.fc.{part}")]
            getattr(fc, part).copy_(torch.from_numpy(inits[name].copy()))
    model.eval()
    if calibration is not None and len(calibration):
        _calibrate(model, to_tensor(calibration))
    x = np.random.default_rng(0).random((4, 3, size, size), dtype=np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - ref).max())
    if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise ValueError(f"recovered head differs from the ONNX by {diff}")
    logger.info("recovered %s (max logit difference %.1e)", onnx_path.name, diff)
    return model


def _calibrate(model: Deployable, x: torch.Tensor) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats: dict[int, list] = {id(m): [] for m in bns}
    hooks = [m.register_forward_hook(lambda mod, i, o: stats[id(mod)].append(i[0].detach())) for m in bns]
    with torch.no_grad():
        for i in range(0, len(x), 128):
            model(x[i:i + 128])
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m in bns:
            a = torch.cat(stats[id(m)]).transpose(0, 1).reshape(m.num_features, -1).double()
            mean, var = a.mean(1).float(), a.var(1, unbiased=False).clamp(min=1e-6).float()
            b = m.bias.clone()
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.weight.copy_(torch.sqrt(var + m.eps))
            m.bias.copy_(mean + b)
