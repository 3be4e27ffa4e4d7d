"""bench.jetson_estimate: the FLOP counter on a graph of known cost, and the estimate on the
committed models and bench results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import jetson_estimate

onnx = pytest.importorskip("onnx", reason="onnx (test extra) not installed")

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def tiny_model(path: Path) -> None:
    """Conv 3->4 channels, 3x3, pad 1 on 8x8 (then flatten) and Gemm 256->10 (B transposed), with
    a symbolic batch: at batch 1, 4*8*8 outputs * 3*3*3 MACs + 10 outputs * 256 MACs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.random((4, 3, 3, 3), dtype=np.float32), "w"),
             numpy_helper.from_array(rng.random((10, 256), dtype=np.float32), "b"),
             numpy_helper.from_array(np.zeros(10, np.float32), "c")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["y"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "b", "c"], ["out"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_flop_count_of_a_known_graph(tmp_path):
    tiny_model(tmp_path / "tiny.onnx")
    flops = jetson_estimate.model_flops(tmp_path / "tiny.onnx", 8)
    assert flops["Conv"] == 2 * (4 * 8 * 8) * (3 * 3 * 3) == 13824
    assert flops["Gemm"] == 2 * 10 * 256 == 5120
    assert flops["total"] == 18944


def test_peak_and_scaling_assumptions():
    nano, nx = jetson_estimate.JETSONS
    assert nano.fp16_peak == pytest.approx(10.24e12)  # NVIDIA's 40 sparse INT8 TOPS / 4
    assert nx.fp16_peak / nano.fp16_peak == pytest.approx(918 / 625)
    lo, hi = nano.gpu_ms(1.024e12)  # 1.024 TFLOP at 30 % / 12 % of 10.24 TFLOPS
    assert (lo, hi) == (pytest.approx(1000 / 3), pytest.approx(1000 / 1.2))
    assert nx.cpu_ms(10.0) == (pytest.approx(15.0), pytest.approx(22.5))


@pytest.mark.skipif(not (MODELS / "seg.json").exists() or not list(
    (REPO / "bench" / "results").glob("bench_pipeline-*.txt")), reason="models or bench results missing")
def test_estimate_runs_on_the_committed_models(capsys):
    assert jetson_estimate.main(["--models", str(MODELS)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.endswith(("  CPU", "  GPU", "  either"))]
    assert len(rows) == 3 * 2 * 2  # fields x configurations x Jetsons
    assert {r[0] for r in rows} == set(jetson_estimate.FIELDS)
    # no time below zero (the CPU side is the sum of the stages that are not engines)
    assert not any(v.startswith("-") for r in rows for v in r), [r for r in rows if any(v.startswith("-") for v in r)]
    assert "GFLOP per tile" in out and "GFLOP per crop" in out
