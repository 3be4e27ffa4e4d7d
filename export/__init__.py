"""Trained weights -> ONNX -> TensorRT engines, each with a manifest. The daemon never imports it."""
