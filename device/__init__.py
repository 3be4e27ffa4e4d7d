"""Capture side of smearscope: frame sources, frame quality, telemetry, the synthetic microscope.

Imports nothing from the other smearscope packages; the only thing it hands out is a frozen `Frame`.
"""
