"""Train a classifier head (timm, from scratch) on canonical-scale crops, calibrate, export ONNX.

    python -m training.train_head --head wbc --minutes 30
    python -m training.train_head --head rbc --minutes 20

Seeded; a checkpoint is written after every epoch and `--resume` continues from it. After
training: temperature scaling on the validation split, held-out test metrics, ONNX export with
a manifest (export.manifest) into models/.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from smearscope.service.analysis.crops import RBC_CROP, WBC_CROP, CropSpec
from training import head_data as hd
from training.data import splits_record
from training.metrics import classification_report, fit_temperature

logger = logging.getLogger(__name__)

#: Half-width timm ResNets: resnet18/resnet10t layouts at half the channels, so that the ONNX files
#: stay a few MB and an RBC crop costs well under a millisecond on a CPU. Name -> (blocks per
#: stage, stem width); a head's default is in HEADS, `--arch` picks another.
ARCHS = {"resnet10t-half": ((1, 1, 1, 1), 16), "resnet18-half": ((2, 2, 2, 2), 24)}

HEADS = {
    "wbc": {"arch": "resnet18-half", "classes": hd.PBC_CLASSES,
            "crop": WBC_CROP, "sampling_power": 0.0, "stain_jitter": 0.15},
    "rbc": {"arch": "resnet10t-half", "classes": hd.RBC_CLASSES,
            "crop": RBC_CROP, "sampling_power": -0.5, "stain_jitter": 0.0},
}


def build_net(arch: str, num_classes: int) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    layers, stem = ARCHS[arch]
    return ResNet(block=BasicBlock, layers=layers, channels=(32, 64, 128, 256), stem_width=stem,
                  stem_type="deep_tiered", avg_down=True, num_classes=num_classes)


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class Deployable(nn.Module):
    """What ONNX gets: float32 RGB in [0, 1], NCHW -> logits. Normalisation is baked in."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", MEAN.clone())
        self.register_buffer("std", STD.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def to_tensor(bgr: np.ndarray) -> torch.Tensor:
    """N x S x S x 3 uint8 BGR -> N x 3 x S x S float RGB in [0, 1] (same as the engine's preprocessing)."""
    return torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2).float().div_(255.0)


# Haematoxylin / eosin / residual stain vectors in optical density (Ruifrok & Johnston, as in
# skimage.color.rgb_from_hed); rows are stains, columns R, G, B.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def hed_jitter(x: torch.Tensor, g: torch.Generator, sigma: float) -> torch.Tensor:
    """Stain augmentation (Tellez et al. 2018): scale and shift each stain's concentration per image.

    RGB -> optical density -> stain concentrations, c' = c * U(1-sigma, 1+sigma) + U(-sigma/3, sigma/3),
    then back. Mimics another lab's staining time and dye batch, which plain RGB gain cannot.
    """
    n = x.shape[0]
    od = -torch.log(x.clamp(1e-3, 1.0))  # N 3 H W
    conc = torch.einsum("nchw,cs->nshw", od, HED_FROM_RGB)
    alpha = 1.0 + sigma * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    beta = (sigma / 3.0) * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    od2 = torch.einsum("nshw,sc->nchw", conc * alpha + beta, RGB_FROM_HED)
    return torch.exp(-od2.clamp(min=0.0)).clamp(0, 1)


def augment(x: torch.Tensor, g: torch.Generator, stain_sigma: float = 0.0) -> torch.Tensor:
    """Flips, 90-degree rotations, optional HED stain jitter, per-image colour jitter (gain, offset, gamma)."""
    if stain_sigma > 0:
        x = hed_jitter(x, g, stain_sigma)
    if torch.rand(1, generator=g) < 0.5:
        x = x.flip(3)
    k = int(torch.randint(0, 4, (1,), generator=g))
    x = torch.rot90(x, k, (2, 3))
    n = x.shape[0]
    gain = 1.0 + 0.12 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    offset = 0.05 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    gamma = 1.0 + 0.25 * (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1)
    return (x.clamp(1e-4, 1).pow(gamma) * gain + offset).clamp(0, 1)


def training_device(name: str) -> torch.device:
    """`--device`: `auto` is CUDA where torch sees a GPU, else the CPU; `cuda` (or `cuda:N`) where
    torch sees none is refused plainly rather than failing at the first tensor moved."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu or auto")
    return device


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights on the CPU (a checkpoint that loads on any machine)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def predict_logits(model: nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = to_tensor(images[i : i + batch]).to(device).contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", choices=sorted(HEADS), required=True)
    ap.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget")
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, cuda:N")
    ap.add_argument("--out", type=Path, default=Path("build/heads"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", type=Path, help="start from this checkpoint's weights with a new schedule (fine-tune)")
    ap.add_argument("--second-lab-share", type=float, default=0.15,
                    help="fraction of each batch drawn from the second lab's crops (BCCD, WBC head)")
    ap.add_argument("--arch", choices=sorted(ARCHS), default=None,
                    help="trunk layout (default: the head's own, see HEADS)")
    ap.add_argument("--input-size", type=int, default=None,
                    help="head input side in pixels (RBC head; the physical crop extent stays the same)")
    args = ap.parse_args()
    device = training_device(args.device)  # before the data: a GPU asked for and missing stops at once
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = HEADS[args.head]
    arch = args.arch or spec["arch"]
    classes = spec["classes"]
    if args.head == "wbc" and args.input_size is not None:
        ap.error("--input-size applies to the RBC head only (the WBC adapters cut WBC_CROP)")
    crop = spec["crop"] if args.input_size is None else CropSpec(spec["crop"].extent_um, args.input_size)
    sets = hd.head_sets(args.head, crop)
    train, val, test = sets["train"], sets["val"], sets["test"]
    logger.info("%s head: train %d, val %d, test %d crops", args.head, len(train.labels), len(val.labels), len(test.labels))

    net = build_net(arch, len(classes))
    model = Deployable(net).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    counts = np.bincount(train.labels, minlength=len(classes)).astype(float)
    w = np.where(counts > 0, counts, 1.0) ** spec["sampling_power"]
    sample_p = w[train.labels]
    sample_p /= sample_p.sum()
    second = np.array([g_.startswith("bccd/") for g_ in train.groups], bool)
    if second.any() and args.second_lab_share > 0:
        sample_p = np.where(second, 0.0, sample_p)
        sample_p *= (1 - args.second_lab_share) / sample_p.sum()
        sample_p[second] = args.second_lab_share / second.sum()
        logger.info("second lab: %d crops, %.0f%% of each batch", second.sum(), 100 * args.second_lab_share)
    steps_per_epoch = max(1, len(train.labels) // args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / f"{args.head}_last.pt"
    start_epoch, history, elapsed = 0, [], 0.0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]
    elif args.init is not None:
        state = torch.load(args.init, weights_only=False, map_location=device)
        own = model.state_dict()
        # a head whose class list grew keeps its trunk; the new classifier layer starts fresh
        fresh = [k for k, v in state["model"].items() if k in own and own[k].shape != v.shape]
        model.load_state_dict({k: v for k, v in state["model"].items() if k not in fresh}, strict=not fresh)
        logger.info("fine-tuning from %s (trained %d epochs)%s", args.init, state["epoch"],
                    f"; re-initialised {fresh}" if fresh else "")
    # Estimate the epoch count from the budget after the first epoch; cosine over that count.
    budget_s = args.minutes * 60.0
    planned = args.max_epochs
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(2)
    best_f1, best_state = -1.0, None
    epoch = start_epoch
    while epoch < planned:
        t0 = time.time()
        model.train()
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / max(1, planned)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = rng.choice(len(train.labels), size=steps_per_epoch * args.batch, p=sample_p)
        losses = []
        for s in tqdm(range(steps_per_epoch), desc=f"{args.head} epoch {epoch + 1}/{planned}", mininterval=10):
            b = idx[s * args.batch : (s + 1) * args.batch]
            x = augment(to_tensor(train.images[b]), g, spec["stain_jitter"]).to(device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(train.labels[b]).to(device)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        elapsed += time.time() - t0
        val_logits = predict_logits(model, val.images)
        rep = classification_report(val.labels, val_logits.argmax(1), classes)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_acc": rep["accuracy"], "val_macro_f1": rep["macro_f1"], "lr": lr})
        logger.info("epoch %d loss %.3f val acc %.4f macro-F1 %.4f (%.0f s so far)", epoch + 1, np.mean(losses), rep["accuracy"], rep["macro_f1"], elapsed)
        if rep["macro_f1"] > best_f1:
            best_f1 = rep["macro_f1"]
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        epoch += 1
        if epoch == start_epoch + 1:
            per_epoch = elapsed / epoch
            planned = int(min(args.max_epochs, max(epoch + 1, budget_s // max(per_epoch, 1e-3))))
            logger.info("%.0f s per epoch: planning %d epochs in %.0f min", per_epoch, planned, args.minutes)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "history": history, "elapsed": elapsed, "planned": planned}, ckpt)
    if best_state is not None:
        model.load_state_dict(best_state)

    val_logits = predict_logits(model, val.images)
    temperature = fit_temperature(val_logits, val.labels)
    logits_of = lambda images: predict_logits(model, images)
    metrics = {**hd.held_out_metrics(args.head, sets, logits_of, temperature),
               "val_best_macro_f1": best_f1, "temperature": temperature, "epochs": epoch, "train_seconds": elapsed}
    data_desc = {"pbc": "PBC (Acevedo 2020), seeded stratified 80/10/10",
                 "bccd": "BCCD WBC crops (one labelled WBC per image, wbc_labels.csv) of its VOC train/val splits; "
                         "test held out; stain jitter (HED) in training"} if args.head == "wbc" else {
        "chula_rbc12": f"Chula RBC-12, split by image 80/10/10 (seeded), at {hd.CHULA_MICRONS_PER_PIXEL} um/px "
                       "(the analyzer's ruler, training.measure_scale)",
        "synthetic": "40 rendered fields (seeds 30000+) for training, 6 (40000+) for validation",
        "erythrocytesidb1": f"falciforme (sickle), circular (normal) and outras (other_poikilocyte) crops of train/ (85/15 train/val); "
                            f"test/ held out; scale {sets['idb1_mpp']:.4f} um/px"}
    logger.info("held-out test: %s", json.dumps({k: v for k, v in metrics["test"].items() if k in ("accuracy", "macro_f1", "ece")}))
    from smearscope.export.onnx_export import export_classifier

    export_classifier(
        model.cpu().eval(), name=f"{args.head}_head", classes=list(classes), crop=crop, arch=arch,
        temperature=temperature, metrics=metrics, training_data=data_desc | {"splits": splits_record()},
        split_hashes=hd.split_manifest(),
        out_dir=args.models, history=history,
    )


if __name__ == "__main__":
    main()
