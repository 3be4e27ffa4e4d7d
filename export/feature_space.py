"""A classifier's penultimate features as a graph output, and its Mahalanobis space beside it.

    python -m smearscope.export.feature_space models/wbc_head.json

A WBC head exported with an in-graph Mahalanobis open-set score (`ood`: the squared distance of
the crop's penultimate features to the nearest trained class mean under one shared precision
matrix) already computes everything a station needs to type its own lab's cells by its own class
means (`smearscope adapt-wbc`, service.analysis.station_means): the features, the class means
and the precision. This adds the features as a graph output named `features` (an Identity on
the final Gemm's input: the logits and `ood` are untouched), reads the means and the precision
out of the graph's constants into a sidecar `<name>.features.npz`, checks on seeded random
inputs that the distances recomputed from the sidecar equal the graph's `ood`, and records both
in the manifest (`feature_space`, new sha256s). Runs on a committed model in place; idempotent.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from smearscope.engines.manifest import FeatureSpace, ModelManifest, TensorSpec, sha256_file

logger = logging.getLogger(__name__)

FEATURES_OUTPUT = "features"


class FeatureSpaceError(ValueError):
    """The graph does not have the shape this reads: a final Gemm and an in-graph Mahalanobis score."""


def mahalanobis(feats: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared distances (N x K) of features (N x D) to class means (K x D) under one precision (D x D)."""
    pf = feats @ precision
    return ((pf * feats).sum(1, keepdims=True) - 2.0 * pf @ means.T
            + np.einsum("kd,de,ke->k", means, precision, means)[None])


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed member timestamps: the same arrays give the same bytes (and sha256)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def _find(graph, onnx_helper) -> tuple[str, np.ndarray, np.ndarray]:
    """(features tensor name, class means K x D, precision D x D) of an exported open-set head."""
    inits = {i.name: onnx_helper.to_array(i) for i in graph.initializer}
    logits = graph.output[0].name
    gemm = next((n for n in graph.node if n.op_type == "Gemm" and logits in n.output), None)
    if gemm is None:
        raise FeatureSpaceError(f"no Gemm produces the first output {logits!r}")
    feats = gemm.input[0]
    dim = int(inits[gemm.input[1]].shape[1])
    precision_mm = [n for n in graph.node if n.op_type == "MatMul" and n.input[0] == feats
                    and inits.get(n.input[1], np.zeros(0)).shape == (dim, dim)]
    if len(precision_mm) != 1:
        raise FeatureSpaceError("no single MatMul of the features by a square constant (the precision)")
    precision = inits[precision_mm[0].input[1]]
    means_t = [inits[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and inits[n.input[1]].shape == (dim, len(inits[gemm.input[2]]))]
    if len(means_t) != 1:
        raise FeatureSpaceError("no single MatMul by a (features x classes) constant (the class means)")
    return feats, means_t[0].T.astype(np.float32), precision.astype(np.float32)


def add_feature_space(manifest_path: Path, check_batch: int = 16) -> ModelManifest:
    """Give the manifest's model a `features` output and write its sidecar; returns the new manifest."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    manifest_path = Path(manifest_path)
    m = ModelManifest.model_validate(json.loads(manifest_path.read_text()))
    onnx_path = m.model_path(manifest_path)
    model = onnx.load(str(onnx_path))
    g = model.graph
    ood = next((t.output for t in m.open_set if t.method == "mahalanobis"), None)
    if ood is None:
        raise FeatureSpaceError(f"{m.name}: no in-graph Mahalanobis open-set test to take the feature space from")
    feats, means, precision = _find(g, numpy_helper)
    if FEATURES_OUTPUT not in [o.name for o in g.output]:
        g.node.append(helper.make_node("Identity", [feats], [FEATURES_OUTPUT], name="features_out"))
        g.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, ["batch", means.shape[1]]))
        onnx.checker.check_model(model)
        onnx.save(model, str(onnx_path))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((check_batch, 3, m.input_size, m.input_size), dtype=np.float32)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    recomputed = mahalanobis(outs[FEATURES_OUTPUT].astype(np.float64), means.astype(np.float64),
                             precision.astype(np.float64)).min(1)
    err = float(np.abs(recomputed - outs[ood]).max() / max(1.0, float(np.abs(outs[ood]).max())))
    if err > 1e-3:
        raise FeatureSpaceError(f"{m.name}: distances from the sidecar differ from the graph's {ood!r} by {err:.2e} (relative)")
    side = manifest_path.parent / f"{m.name}.features.npz"
    write_npz(side, {"means": means, "precision": precision, "classes": np.array(m.classes)})
    outputs = [o for o in m.outputs if o.name != FEATURES_OUTPUT]
    outputs.append(TensorSpec(name=FEATURES_OUTPUT, shape=[-1, int(means.shape[1])], dtype="float32"))
    new = m.model_copy(update={
        "outputs": outputs, "sha256": sha256_file(onnx_path),
        "feature_space": FeatureSpace(output=FEATURES_OUTPUT, file=side.name, sha256=sha256_file(side),
                                      dim=int(means.shape[1]), check=f"graph {ood!r} recomputed from the sidecar on "
                                      f"{check_batch} seeded random inputs: max relative difference {err:.1e}")})
    manifest_path.write_text(json.dumps(new.model_dump(), indent=2) + "\n")
    logger.info("%s: features output (%d) and %s written; sha256 %s", m.name, means.shape[1], side.name, new.sha256[:12])
    return new


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", type=Path)
    add_feature_space(ap.parse_args().manifest)


if __name__ == "__main__":
    main()
