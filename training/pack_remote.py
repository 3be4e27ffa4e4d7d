"""Pack what `training/remote_seg.sh` needs on a lent GPU machine into `.gpu/` (git-ignored).

    python -m training.pack_remote --seg build/seg_pbc3 --init build/wise/end30/weights/a30.pt

The GPU machine has PyTorch, torchvision, OpenCV and no network. This writes:
  .gpu/site.tgz     ultralytics, ultralytics_platform and thop from this environment (pure Python,
                    no __pycache__) and a polars stand-in (ultralytics reads results.csv back with
                    polars inside a try/except; the real wheel is 170 MB, over the carry limit)
  .gpu/seg.tgz      the prep_seg folder's images as JPEG (quality 93) and its labels, train + val
  .gpu/start.pt     the fine-tune start (named as remote_seg.sh expects)
  .gpu/yolo_config  ultralytics config dir with a TTF font (no font download)
Run from the repository root; add `/.gpu/` to `.git/info/exclude` once.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import tarfile
from pathlib import Path

import cv2
from tqdm import tqdm

from training.env import offline_ultralytics

logger = logging.getLogger(__name__)

POLARS_STANDIN = '''"""Stand-in for polars on the lent GPU machine (see training/pack_remote.py)."""


def read_csv(*args, **kwargs):
    raise NotImplementedError("polars stand-in")
'''


def _skip_cache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name else info


def pack_site(out: Path) -> None:
    import thop
    import ultralytics
    import ultralytics_platform

    with tarfile.open(out, "w:gz") as tar:
        for mod in (ultralytics, ultralytics_platform, thop):
            src = Path(mod.__file__).parent
            tar.add(src, arcname=f"site/{src.name}", filter=_skip_cache)
        data = POLARS_STANDIN.encode()
        info = tarfile.TarInfo("site/polars/__init__.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def pack_seg(seg: Path, out: Path, quality: int = 93) -> int:
    n = 0
    with tarfile.open(out, "w:gz") as tar:
        for split in ("train", "val"):
            images = sorted((seg / "images" / split).glob("*"))
            for f in tqdm(images, desc=f"pack {split}"):
                img = cv2.imread(str(f))
                if img is None:
                    raise SystemExit(f"{f}: not an image")
                _, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
                data = buf.tobytes()
                info = tarfile.TarInfo(f"seg/images/{split}/{f.stem}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                label = seg / "labels" / split / f"{f.stem}.txt"
                if label.exists():
                    tar.add(label, arcname=f"seg/labels/{split}/{label.name}")
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seg", type=Path, default=Path("build/seg_pbc3"), help="a prep_seg output folder")
    ap.add_argument("--init", type=Path, required=True, help="this project's checkpoint to fine-tune from")
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    offline_ultralytics(Path("build"))
    args.out.mkdir(parents=True, exist_ok=True)
    pack_site(args.out / "site.tgz")
    n = pack_seg(args.seg, args.out / "seg.tgz")
    shutil.copy(args.init, args.out / "start.pt")
    shutil.copytree(Path("build") / "yolo_config", args.out / "yolo_config", dirs_exist_ok=True)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    logger.info("packed %d images; %s holds %.1f MB (the device carries at most 64 MiB with the tree)",
                n, args.out, total / 1e6)


if __name__ == "__main__":
    main()
