"""Batch to the engine's profile: split above max, pad up to min (or opt), strip the padding."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from smearscope.engines.base import Engine, PartCallback
from smearscope.engines.manifest import BatchProfile


def plan_batches(n: int, profile: BatchProfile, pad_to_opt: bool = False) -> list[tuple[int, int, int]]:
    """Chunks (start, stop, padded_size) covering n items within the profile.

    Full chunks of `max`; the remainder is padded to `min` (or to `opt` when `pad_to_opt` and the
    remainder is below it: TensorRT runs fastest at the profile's optimum).
    """
    plan = []
    start = 0
    while start < n:
        stop = min(n, start + profile.max)
        size = stop - start
        padded = max(size, profile.min)
        if pad_to_opt and size < profile.opt:
            padded = max(padded, profile.opt)
        plan.append((start, stop, padded))
        start = stop
    return plan


def iter_padded(batch: np.ndarray, profile: BatchProfile, pad_to_opt: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    for start, stop, padded in plan_batches(batch.shape[0], profile, pad_to_opt):
        chunk = batch[start:stop]
        if padded > chunk.shape[0]:
            pad = np.zeros((padded - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        yield start, stop, chunk


def run_batched(engine: Engine, batch: np.ndarray, on_part: PartCallback | None = None) -> dict[str, np.ndarray]:
    """Run any number of inputs through `engine`, honouring its batch profile.

    `on_part(lo, hi, outputs of inputs lo:hi)`: called on this thread for consecutive ranges
    covering the inputs, in order, as they are ready (`Engine.run_parts`; padding never shows).
    An engine that is not an `Engine` (a wrapper such as engines.coalesce's) hands over each
    chunk once it has run."""
    if batch.shape[0] == 0:
        return {name: np.zeros((0, *[max(d, 0) for d in spec.shape[1:]]), np.float32)
                for name, spec in zip(engine.output_names, engine.manifest.outputs)}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in engine.output_names}
    for start, stop, chunk in iter_padded(batch, engine.manifest.batch, pad_to_opt=engine.pads_to_opt):
        if on_part is None:
            out = engine.run(chunk)
        else:
            out = _run_chunk(engine, chunk, start, stop, on_part)
        for name, collected in parts.items():
            collected.append(out[name][: stop - start])
    # One chunk (a field's few tiles or crops): its outputs as they are, not copied once more.
    return {name: v[0] if len(v) == 1 else np.concatenate(v) for name, v in parts.items()}


def _run_chunk(engine: Engine, chunk: np.ndarray, start: int, stop: int, on_part: PartCallback) -> dict[str, np.ndarray]:
    """One padded chunk, its real rows handed to `on_part` in the batch's numbering."""

    def part(lo: int, hi: int, outs: dict[str, np.ndarray]) -> None:
        hi_real = min(hi, stop - start)
        if hi_real > lo:
            on_part(start + lo, start + hi_real, {k: v[: hi_real - lo] for k, v in outs.items()})

    if isinstance(engine, Engine):
        return engine.run_parts(chunk, part)
    out = engine.run(chunk)
    part(0, len(chunk), out)
    return out
