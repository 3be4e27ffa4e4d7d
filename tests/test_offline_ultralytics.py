"""Ultralytics kept offline in a folder of ours (training.env.offline_ultralytics), the one set-up
the training commands and the benchmark's SAHI worker (bench.sahi_baseline) share: no hub, no
package installs, and the font it would download (Arial.ttf) a local TTF in its settings folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
TTF_MAGIC = (b"\x00\x01\x00\x00", b"true", b"OTTO")


def _without_yolo_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}


def _has_a_font() -> bool:
    import cv2

    return DEJAVU.exists() or any(Path(cv2.__file__).parent.rglob("*.ttf"))


def _assert_font_in(config: Path) -> None:
    for font in (config / "Ultralytics" / "Arial.ttf", config / "Arial.ttf"):
        assert font.read_bytes()[:4] in TTF_MAGIC, font
        if DEJAVU.exists():
            assert font.read_bytes() == DEJAVU.read_bytes(), font


def test_offline_ultralytics_sets_ultralytics_offline_with_its_settings_and_font_in_the_folder(tmp_path):
    if not _has_a_font():
        pytest.skip("no TTF font on this machine to stand in for Arial")
    config = tmp_path / "yolo config"
    code = ("import json, os, sys; from pathlib import Path; from training.env import offline_ultralytics; "
            "offline_ultralytics(Path(sys.argv[1])); "
            "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('YOLO_')}))")
    done = subprocess.run([sys.executable, "-c", code, str(config)], cwd=ROOT, env=_without_yolo_settings(),
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False",
                                       "YOLO_CONFIG_DIR": str(config.resolve())}
    _assert_font_in(config)


def test_the_sahi_worker_sets_ultralytics_offline_in_its_config_dir_before_loading_the_libraries(tmp_path):
    """The worker runs in the bench extra's interpreter; here, without sahi, it stops where it
    loads the libraries, after the set-up (which ultralytics reads when it is imported)."""
    if not _has_a_font():
        pytest.skip("no TTF font on this machine to stand in for Arial")
    config = tmp_path / "worker config"
    done = subprocess.run([sys.executable, "-m", "bench.sahi_baseline", "--models", str(tmp_path / "no-models"),
                           "--config-dir", str(config)], check=False, cwd=ROOT, env=_without_yolo_settings(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" in done.stderr, done.stderr  # no models: it never got ready
    assert '"ready"' not in done.stdout
    _assert_font_in(config)
