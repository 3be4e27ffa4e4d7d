"""Offline set-up for ultralytics: no hub, no font download, config inside the build dir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def offline_ultralytics(build_dir: Path) -> None:
    cfg = (build_dir / "yolo_config").resolve()
    (cfg / "Ultralytics").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg))
    font = cfg / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        for cand in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
            if Path(cand).exists():
                shutil.copy(cand, font)
                shutil.copy(cand, cfg / "Arial.ttf")
                break
        else:
            import cv2  # any TTF shipped in a wheel will do

            for p in Path(cv2.__file__).parent.rglob("*.ttf"):
                shutil.copy(p, font)
                shutil.copy(p, cfg / "Arial.ttf")
                break
