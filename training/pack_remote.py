"""Pack what `training/remote_seg.sh` needs on a GPU machine into `.gpu/` (git-ignored).

    python -m training.pack_remote --seg build/seg_pbc3 --init build/wise/end30/weights/a30.pt
    python -m training.pack_remote --seg build/seg_labs --mix mix --init build/recovered/seg.pt   # prep_labs + lab_mix

The GPU machine has PyTorch, torchvision, OpenCV and no network. This writes:
  .gpu/site.tgz     ultralytics, ultralytics_platform and thop from this environment (pure Python,
                    no __pycache__) and a polars stand-in (ultralytics reads results.csv back with
                    polars inside a try/except; the real wheel is 170 MB, too large to carry along)
  .gpu/seg.tgz      the prep_seg folder's images as JPEG (quality 93; --format .webp: WebP 90) and
                    its labels, train + val;
                    with --mix NAME also lab_mix's lists as seg/train.txt and seg/val.txt (entries
                    `./images/...`, which ultralytics resolves beside the list) and prep_labs'
                    valid_sizes.json keyed by the packed names (train_seg --look reads it)
  .gpu/start.pt     the fine-tune start (named as remote_seg.sh expects), weights in float16 as
                    ultralytics saves its own (it loads them back as float32)
  .gpu/yolo_config  ultralytics config dir with a TTF font (no font download)
Run from the repository root; add `/.gpu/` to `.git/info/exclude` once.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import cv2
from tqdm import tqdm

from training.env import CONFIG_DIR, offline_ultralytics

logger = logging.getLogger(__name__)

POLARS_STANDIN = '''"""Stand-in for polars on the GPU machine (see training/pack_remote.py)."""


def read_csv(*args, **kwargs):
    raise NotImplementedError("polars stand-in")
'''


def _skip_cache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name else info


#: Image formats the pack can write: the OpenCV quality flag and its default.
FORMATS = {".jpg": (cv2.IMWRITE_JPEG_QUALITY, 93), ".webp": (cv2.IMWRITE_WEBP_QUALITY, 90)}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack_site(out: Path) -> None:
    import thop
    import ultralytics
    import ultralytics_platform

    with tarfile.open(out, "w:gz") as tar:
        for mod in (ultralytics, ultralytics_platform, thop):
            src = Path(mod.__file__).parent
            tar.add(src, arcname=f"site/{src.name}", filter=_skip_cache)
        _add_bytes(tar, "site/polars/__init__.py", POLARS_STANDIN.encode())


def pack_seg(seg: Path, out: Path, quality: int | None = None, mix: str | None = None, ext: str = ".jpg") -> int:
    """Pack the folder's images (JPEG or WebP) and labels; with `mix`, lab_mix's lists too (pack_mix)."""
    flag, default_quality = FORMATS[ext]
    quality = default_quality if quality is None else quality
    n = 0
    with tarfile.open(out, "w:gz") as tar:
        if mix:
            logger.info("lists of mix %s: %s", mix, pack_mix(seg, mix, tar, ext))
        for split in ("train", "val"):
            images = sorted((seg / "images" / split).glob("*"))
            for f in tqdm(images, desc=f"pack {split}"):
                img = cv2.imread(str(f))
                if img is None:
                    raise SystemExit(f"{f}: not an image")
                _, buf = cv2.imencode(ext, img, [flag, quality])
                _add_bytes(tar, f"seg/images/{split}/{f.stem}{ext}", buf.tobytes())
                label = seg / "labels" / split / f"{f.stem}.txt"
                if label.exists():
                    tar.add(label, arcname=f"seg/labels/{split}/{label.name}")
                n += 1
    return n


def _entry(line: str, ext: str) -> str:
    f = Path(line.strip())
    return f"./images/{f.parent.name}/{f.stem}{ext}\n"


def pack_mix(seg: Path, name: str, tar: tarfile.TarFile, ext: str = ".jpg") -> dict[str, int]:
    """Add lab_mix's lists (train_NAME.txt; val_NAME.txt where a lab left validation, else every
    val tile) as seg/train.txt and seg/val.txt, and valid_sizes.json keyed by the packed names.

    Returns the entries per list. Every listed tile must be in the packed folder.
    """
    train = seg / f"train_{name}.txt"
    if not train.exists():
        raise SystemExit(f"{train}: run training.lab_mix --name {name} first")
    counts = {}
    for split, src in (("train", train), ("val", seg / f"val_{name}.txt")):
        if src.exists():
            lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
        else:  # validation as prepared
            lines = [str(f) for f in sorted((seg / "images" / split).glob("*"))]
        for ln in lines:
            f = Path(ln)
            if f.parent.name != split or not (seg / "images" / split / f.name).exists():
                raise SystemExit(f"{src}: {ln} is not a {split} tile of {seg}")
        _add_bytes(tar, f"seg/{split}.txt", "".join(_entry(ln, ext) for ln in lines).encode())
        counts[split] = len(lines)
    sizes_file = seg / "valid_sizes.json"
    if sizes_file.exists():
        sizes = json.loads(sizes_file.read_text())
        _add_bytes(tar, "seg/valid_sizes.json",
                   json.dumps({f"{Path(k).stem}{ext}": v for k, v in sizes.items()}).encode())
    return counts


def save_start_half(src: Path, out: Path) -> None:
    """The checkpoint with its model (and EMA) in float16, without optimizer state: half the bytes."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    for key in ("model", "ema"):
        if ckpt.get(key) is not None:
            ckpt[key] = ckpt[key].half()
    ckpt["optimizer"] = None
    torch.save(ckpt, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seg", type=Path, default=Path("build/seg_pbc3"), help="a prep_seg output folder")
    ap.add_argument("--init", type=Path, required=True, help="this project's checkpoint to fine-tune from")
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    ap.add_argument("--format", choices=sorted(FORMATS), default=".jpg",
                    help="image format in the pack (.webp: about half JPEG 93's bytes at a similar error)")
    ap.add_argument("--mix", default=None,
                    help="a training.lab_mix name (train_NAME.txt beside --seg): train from that list")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    offline_ultralytics()
    args.out.mkdir(parents=True, exist_ok=True)
    pack_site(args.out / "site.tgz")
    n = pack_seg(args.seg, args.out / "seg.tgz", mix=args.mix, ext=args.format)
    save_start_half(args.init, args.out / "start.pt")
    # ultralytics reads YOLO_CONFIG_DIR/Ultralytics; the font beside it is a spare (0.76 MB)
    shutil.copytree(CONFIG_DIR / "Ultralytics", args.out / "yolo_config" / "Ultralytics",
                    dirs_exist_ok=True)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    logger.info("packed %d images; %s holds %.1f MB (the device carries at most 64 MiB with the tree)",
                n, args.out, total / 1e6)


if __name__ == "__main__":
    main()
