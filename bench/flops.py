"""Multiply-accumulates of the committed models per input, from their ONNX graphs.

    .venv/bin/python -m bench.flops [--models models]

Counts Conv, ConvTranspose, MatMul and Gemm (2 FLOPs per multiply-accumulate) with the shapes ONNX
shape inference gives at batch 1; the other operators (activations, resizes, concatenations)
move memory more than they compute and are left out. Needs onnx (the test extra).
bench.jetson_estimate and docs/RESULTS.md's "Jetson on paper" start from these figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _shape(info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else 1 for d in info.type.tensor_type.shape.dim]


def model_flops(path: Path, input_size: int) -> dict[str, float]:
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    for inp in model.graph.input:  # batch 1, the manifest's input size
        dims = inp.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if not d.HasField("dim_value"):
                d.dim_value = 1 if k == 0 else input_size
    model = shape_inference.infer_shapes(model)
    g = model.graph
    shapes = {v.name: _shape(v) for v in [*g.value_info, *g.input, *g.output]}
    shapes.update({t.name: list(numpy_helper.to_array(t).shape) for t in g.initializer})
    by_op: dict[str, float] = {}
    for node in g.node:
        macs = 0.0
        if node.op_type in ("Conv", "ConvTranspose"):
            w = shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if w and out:
                # Conv weight (Cout, Cin/groups, k...): each output value costs Cin/groups * k... MACs
                macs = float(np.prod(out)) * float(np.prod(w[1:]))
                if node.op_type == "ConvTranspose":
                    macs = float(np.prod(shapes.get(node.input[0], [0]))) * float(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and out:
                k = a[-2] if node.op_type == "Gemm" and any(
                    at.name == "transA" and at.i for at in node.attribute) else a[-1]
                macs = float(np.prod(out)) * k
        if macs:
            by_op[node.op_type] = by_op.get(node.op_type, 0.0) + 2.0 * macs
    by_op["total"] = sum(by_op.values())
    return by_op


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    args = ap.parse_args()
    print(f"{'model':<10}{'input':>12}{'GFLOP per input':>18}")
    out = {}
    for name in ("seg", "rbc_head", "wbc_head"):
        manifest = json.loads((args.models / f"{name}.json").read_text())
        f = model_flops(args.models / manifest["file"], manifest["input_size"])
        out[name] = f["total"]
        size = manifest["input_size"]
        print(f"{name:<10}{f'{size}x{size}':>12}{f['total'] / 1e9:>18.3f}")
    print(json.dumps({k: round(v / 1e9, 4) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
