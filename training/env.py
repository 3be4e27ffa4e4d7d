"""Offline set-up for ultralytics: no hub, no package installs, no font download; its settings
and a TTF font in a folder of ours (training's commands, and bench.sahi_baseline's worker)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Ultralytics' settings folder unless a command is told another: inside the build folder.
CONFIG_DIR = Path("build") / "yolo_config"


def offline_ultralytics(config_dir: Path = CONFIG_DIR) -> None:
    """Point ultralytics at `config_dir` (unless YOLO_CONFIG_DIR is set) and keep it offline; the
    font it would download (Arial.ttf) is a local TTF copied there."""
    cfg = config_dir.resolve()
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
