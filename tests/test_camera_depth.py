"""A camera's 16-bit samples are scaled from their real depth, one depth for the whole stream.

Machine-vision and many USB cameras give 10- or 12-bit samples low-aligned in 16-bit words (0..4095):
their top byte alone reads a field 16 times too dark, refused by the quality gate as underexposed. The
fields here are the project's rendered smears, turned into such streams and read through the camera
source (the capture factory is OpenCV's seam).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from smearscope.device import sources
from smearscope.device.camera_frames import DEPTH_CONFIRM_FRAMES
from smearscope.device.frame import Frame
from smearscope.device.quality import QualityGate
from smearscope.device.source_config import CameraSourceConfig
from smearscope.device.sources import CameraSource
from smearscope.device.synthetic import render_field

MPP = 0.2


def _fields(n: int) -> list[np.ndarray]:
    return [render_field(seed=40 + i, width=480, height=360, microns_per_pixel=MPP).frame.pixels for i in range(n)]


def _as_12bit(pixels: np.ndarray, dim: int = 1) -> np.ndarray:
    """An 8-bit field as a 12-bit camera gives it: 0..4095 in the low bits of 16-bit words."""
    return np.rint(pixels.astype(np.float64) * 4095.0 / 255.0 / dim).astype(np.uint16)


def _read(stream: list[np.ndarray], **settings: object) -> list[np.ndarray]:
    """The frames the camera source makes of a capture that gives `stream`, in order."""
    given = iter(stream)

    class _Capture:
        def read(self) -> tuple[bool, np.ndarray]:
            return True, next(given)

        def release(self) -> None:
            pass

    cfg = CameraSourceConfig(device=3, microns_per_pixel=MPP, **settings)  # type: ignore[arg-type]
    with CameraSource(cfg, lambda _cfg: _Capture()) as cam:
        return [next(cam).pixels for _ in stream]


@pytest.mark.parametrize("sample_bits", ["auto", 12])
def test_a_12_bit_camera_in_16_bit_words_gives_the_fields_brightness_and_passes_the_gate(
        sample_bits: object, caplog: pytest.LogCaptureFixture) -> None:
    fields = _fields(3)
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        frames = _read([_as_12bit(f) for f in fields], sample_bits=sample_bits)
    for field, frame in zip(fields, frames, strict=True):
        assert frame.dtype == np.uint8 and frame.shape == field.shape
        assert abs(float(frame.mean()) - float(field.mean())) < 1.0
        assert int(np.abs(frame.astype(int) - field.astype(int)).max()) <= 1
    gate = QualityGate()
    verdicts = [gate.check(Frame(pixels=p, frame_id=f"cam:{i}", source="cam", microns_per_pixel=MPP))
                for i, p in enumerate(frames)]
    assert all(v.accepted for v in verdicts), [(v.reason, v.metrics) for v in verdicts]
    said = [r.getMessage() for r in caplog.records if "16-bit samples read as" in r.getMessage()]
    top = int(_as_12bit(fields[0]).max())
    chosen = f"scope: 16-bit samples read as 12-bit (highest sample {top} in the first frame; [source] sample_bits sets the depth)"
    assert said == ([chosen] if sample_bits == "auto" else []), said


def test_a_full_range_16_bit_camera_gives_the_field_unchanged() -> None:
    fields = _fields(2)
    frames = _read([f.astype(np.uint16) * 257 for f in fields])
    for field, frame in zip(fields, frames, strict=True):
        assert np.array_equal(frame, field)


def test_a_dark_first_frame_neither_clips_the_bright_frames_after_it_nor_is_a_dark_frame_brightened_later(
        caplog: pytest.LogCaptureFixture) -> None:
    """The depth comes from the first frame and grows once DEPTH_CONFIRM_FRAMES frames in a row are
    over it: a frame is never stretched to its own maximum."""
    fields = _fields(5)
    stream = [_as_12bit(fields[0], dim=8), *(_as_12bit(f) for f in fields[1:4]), _as_12bit(fields[4], dim=8)]
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        dark_first, clipped_1, clipped_2, bright, dark_later = _read(stream)
    assert DEPTH_CONFIRM_FRAMES == 3
    # the first frame alone (top 511) reads as 10-bit; bright frames read clipped at 10 bits until the
    # third in a row grows the depth to 12, unclipped from then on
    for clipped, field in ((clipped_1, fields[1]), (clipped_2, fields[2])):
        assert (clipped == 255).mean() > (field == 255).mean() + 0.5
    assert int(np.abs(bright.astype(int) - fields[3].astype(int)).max()) <= 1
    assert (bright == 255).mean() == pytest.approx((fields[3] == 255).mean(), abs=1e-4)
    # ... and a dark frame after it stays as dark as it is: an eighth of the field
    assert float(dark_later.mean()) == pytest.approx(float(fields[4].mean()) / 8, abs=1.0)
    assert float(dark_first.mean()) == pytest.approx(float(fields[0].mean()) / 2, abs=1.0)
    said = [r.getMessage() for r in caplog.records if "read as" in r.getMessage()]
    assert len(said) == 2 and "read as 10-bit" in said[0] and "in 3 frames in a row" in said[1], said
    assert "now read as 12-bit" in said[1], said


def _corrupt(pixels_12bit: np.ndarray) -> np.ndarray:
    """A 12-bit frame from a transfer that lost a byte: its 16-bit words read byte-swapped (up to 0xFF0F)."""
    return pixels_12bit.byteswap()


def test_one_corrupt_frame_from_a_12_bit_camera_does_not_darken_the_frames_after_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """A single outlier (and outliers not DEPTH_CONFIRM_FRAMES in a row) leave the depth at 12 bits."""
    fields = _fields(7)
    twelve = [_as_12bit(f) for f in fields]
    assert int(_corrupt(twelve[2]).max()) > 4095
    stream = [twelve[0], twelve[1], _corrupt(twelve[2]), twelve[3], _corrupt(twelve[4]), _corrupt(twelve[5]),
              twelve[6]]
    with caplog.at_level(logging.DEBUG, logger="smearscope.device"):
        frames = _read(stream)
    for i in (0, 1, 3, 6):
        assert int(np.abs(frames[i].astype(int) - fields[i].astype(int)).max()) <= 1, i
        assert abs(float(frames[i].mean()) - float(fields[i].mean())) < 1.0, i
    # the corrupt frames themselves are read at 12 bits, clipped at white
    for i in (2, 4, 5):
        assert float(frames[i].mean()) > float(fields[i].mean()), i
    gate = QualityGate()
    assert gate.check(Frame(pixels=frames[6], frame_id="cam:6", source="cam", microns_per_pixel=MPP)).accepted
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert not [m for _, m in messages if "now read as" in m], messages
    over = [(level, m) for level, m in messages if "read clipped at 12-bit" in m]
    assert [level for level, _ in over] == [logging.INFO, logging.DEBUG, logging.DEBUG], over


def test_three_full_range_frames_in_a_row_after_12_bit_ones_adopt_16_bits(
        caplog: pytest.LogCaptureFixture) -> None:
    fields = _fields(6)
    stream = [_as_12bit(fields[0]), *(f.astype(np.uint16) * 257 for f in fields[1:])]
    with caplog.at_level(logging.INFO, logger="smearscope.device"):
        frames = _read(stream)
    assert int(np.abs(frames[0].astype(int) - fields[0].astype(int)).max()) <= 1
    # the first two full-range frames read clipped at 12 bits: nearly all white
    for i in (1, 2):
        assert (frames[i] == 255).mean() > 0.9, i
    # the third in a row adopts 16 bits: it and the frames after it are the fields unchanged
    for i in (3, 4, 5):
        assert np.array_equal(frames[i], fields[i]), i
    grown = [r.getMessage() for r in caplog.records if "now read as" in r.getMessage()]
    assert len(grown) == 1 and "now read as 16-bit" in grown[0] and "in 3 frames in a row" in grown[0], grown


def test_sample_bits_is_8_to_16_or_auto() -> None:
    assert CameraSourceConfig().sample_bits == "auto"
    assert CameraSourceConfig(sample_bits=10).sample_bits == 10
    for wrong in (7, 17, "12bit"):
        with pytest.raises(ValidationError):
            CameraSourceConfig(sample_bits=wrong)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_every_16_bit_value_becomes_its_nearest_8_bit_grey_at_each_depth(bits: int) -> None:
    """The one conversion of files and cameras (device.ingest.to_bgr8): v * 255 / (2**bits - 1)
    rounded, samples above the depth's range white; grey and 3-channel alike."""
    from smearscope.device.ingest import to_bgr8

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    nearest = np.clip(np.floor(values * 255.0 / ((1 << bits) - 1) + 0.5), 0, 255).astype(np.uint8)
    assert np.array_equal(to_bgr8(values, bits), np.dstack([nearest] * 3))
    assert np.array_equal(to_bgr8(np.dstack([values] * 3), bits), np.dstack([nearest] * 3))


#: The camera's node: a character device that opens (the source asks OpenCV to open only a node that
#: does), and OpenCV's V4L2 capture stands in for the camera behind it.
NODE = "/dev/null"


class _V4l2Y16:
    """OpenCV's V4L2 capture of a camera that negotiated 16-bit grey (FOURCC 'Y16 '), as OpenCV 4's
    cap_v4l.cpp behaves (no such camera here; cv2.VideoCapture is the seam): with CAP_PROP_CONVERT_RGB on,
    its default, each frame is converted to 8-bit BGR from every word's top byte; off, the frames are the
    16-bit words as the camera gave them."""

    def __init__(self, words: list[np.ndarray], fourcc: str = "Y16 ") -> None:
        self.words, self.fourcc, self.convert_rgb, self.sets = iter(words), fourcc, True, []

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return float(cv2.VideoWriter_fourcc(*self.fourcc)) if prop == cv2.CAP_PROP_FOURCC else 0.0

    def set(self, prop: int, value: float) -> bool:
        self.sets.append((prop, value))
        if prop == cv2.CAP_PROP_CONVERT_RGB:
            self.convert_rgb = bool(value)
        return True

    def read(self) -> tuple[bool, np.ndarray]:
        words = next(self.words)
        return True, cv2.cvtColor((words >> 8).astype(np.uint8), cv2.COLOR_GRAY2BGR) if self.convert_rgb else words

    def release(self) -> None:
        pass


def test_a_v4l2_camera_of_12_bit_samples_in_16_bit_grey_words_is_read_at_its_brightness(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """OpenCV reads a V4L2 'Y16 ' camera's top bytes unless asked for its samples: 0..4095 became 0..15,
    every field refused as underexposed, whatever sample_bits said. The source asks (CONVERT_RGB off) and
    scales the words from their depth: the monochrome camera's fields within one grey level."""
    fields = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in _fields(2)]
    opened: list[_V4l2Y16] = []

    def capture(*_args: object) -> _V4l2Y16:
        opened.append(_V4l2Y16([_as_12bit(f) for f in fields]))
        return opened[-1]

    monkeypatch.setattr(sources.cv2, "VideoCapture", capture)
    cfg = CameraSourceConfig(device=NODE, microns_per_pixel=MPP)
    with caplog.at_level(logging.INFO, logger="smearscope.device"), CameraSource(cfg) as cam:
        frames = [next(cam).pixels for _ in fields]
    assert (cv2.CAP_PROP_CONVERT_RGB, 0) in opened[0].sets
    for field, frame in zip(fields, frames, strict=True):
        assert int(np.abs(frame.astype(int) - field[:, :, None].astype(int)).max()) <= 1
    gate = QualityGate()
    assert all(gate.check(Frame(pixels=p, frame_id=f"cam:{i}", source="cam", microns_per_pixel=MPP)).accepted
               for i, p in enumerate(frames))
    assert any("gives 16-bit grey (V4L2 Y16): its samples are read as they are" in r.getMessage()
               for r in caplog.records)


def test_a_v4l2_camera_of_another_format_keeps_opencvs_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    captures: list[_V4l2Y16] = []

    def capture(*_args: object) -> _V4l2Y16:
        captures.append(_V4l2Y16([], fourcc="YUYV"))
        return captures[-1]

    monkeypatch.setattr(sources.cv2, "VideoCapture", capture)
    assert sources._open_capture(CameraSourceConfig(device=NODE, width=1280, height=960)) is captures[0]
    assert [p for p, _ in captures[0].sets] == [cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT]
