"""Inference runtimes behind one interface (ONNX Runtime, TensorRT) and batching to a profile.

Imports nothing from the other smearscope packages; its contract is the model manifest.
"""
