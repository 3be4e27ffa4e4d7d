"""Pure parts of the training tools that run without torch: the IDB1 validation split, the crop a
head's manifest names (evaluation must cut what the analyzer cuts), crop sizes from the adapters,
and the WiSE-FT weight blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from realdata import DATA

from smearscope.service.analysis.crops import RBC_CROP, CropSpec
from training import head_data as hd
from training.evaluate import head_crop, idb1_set
from training.interpolate_seg import blend_state

ROOT = Path(__file__).resolve().parents[1]
needs_idb1 = pytest.mark.skipif(not (DATA / "erythrocytesidb1" / "train" / "circular").is_dir(),
                                reason=f"erythrocytesIDB1 not found under {DATA} (set SMEARSCOPE_DATA)")


@pytest.mark.parametrize("n", [1, 7, 200, 1013])
def test_idb1_val_split_is_seeded_disjoint_and_complete(n):
    tr, va = hd.idb1_train_val_split(n)
    tr2, va2 = hd.idb1_train_val_split(n)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(n))
    assert len(va) == n - int(0.85 * n)


def test_evaluation_cuts_the_crop_the_analyzer_cuts():
    from smearscope.engines.registry import create_engine
    from smearscope.service.analysis.classify import CropClassifier

    manifest = ROOT / "models" / "rbc_head.json"
    head = CropClassifier(create_engine("onnxruntime", manifest).load(), min_confidence=0.5)
    assert head_crop(manifest) == head.crop_spec


def test_adapters_cut_the_requested_input_size():
    big = CropSpec(RBC_CROP.extent_um, 56)
    a, b = hd.synthetic_rbc_crops(1, 30_000), hd.synthetic_rbc_crops(1, 30_000, big)
    assert a.images.shape[1:] == (40, 40, 3) and b.images.shape[1:] == (56, 56, 3)
    assert np.array_equal(a.labels, b.labels) and a.groups == b.groups and len(a.labels) > 20
    # same physical window: the 56 px crop shrunk to 40 px is the 40 px crop, up to resampling
    import cv2

    shrunk = np.stack([cv2.resize(x, (40, 40), interpolation=cv2.INTER_AREA) for x in b.images])
    assert np.abs(shrunk.astype(int) - a.images.astype(int)).mean() < 4.0


@needs_idb1
@pytest.mark.realdata
def test_idb1_val_set_comes_from_train_and_is_the_heads_validation_share():
    val, is_sickle = idb1_set("val", RBC_CROP)
    full, _ = hd.idb1_crops("train", hd.idb1_microns_per_pixel())
    assert len(val.labels) == len(full.labels) - int(0.85 * len(full.labels)) > 0
    assert all(g.startswith("idb1/train/") for g in val.groups)
    assert is_sickle.tolist() == [g.split("/")[2] == "falciforme" for g in val.groups]


def test_blend_state_interpolates_floats_and_keeps_the_tuned_counters():
    start = {"w": np.array([0.0, 10.0]), "n": np.array(3, np.int64)}
    tuned = {"w": np.array([1.0, 20.0]), "n": np.array(9, np.int64)}
    assert np.allclose(blend_state(start, tuned, 0.0)["w"], start["w"])
    assert np.allclose(blend_state(start, tuned, 1.0)["w"], tuned["w"])
    mid = blend_state(start, tuned, 0.3)
    assert np.allclose(mid["w"], [0.3, 13.0])
    assert mid["n"] == 9 and mid["n"].dtype == np.int64


@pytest.mark.parametrize("tuned", [{"w": np.zeros(3)}, {"w": np.zeros(2), "extra": np.zeros(1)}])
def test_blend_state_refuses_two_lineages(tuned):
    with pytest.raises(ValueError, match="one lineage"):
        blend_state({"w": np.zeros(2)}, tuned, 0.5)


def test_blend_state_refuses_alpha_outside_unit_interval():
    with pytest.raises(ValueError, match="alpha"):
        blend_state({"w": np.zeros(2)}, {"w": np.zeros(2)}, 1.5)


def test_confusion_table_rows_are_truth_and_drops_empty_classes():
    from training.evaluate import confusion_table
    from training.metrics import classification_report

    rep = classification_report(np.array([0, 0, 0, 2]), np.array([0, 2, 2, 2]), ["normal", "sickle", "target"])
    lines = confusion_table(rep).splitlines()
    assert lines[1].split() == ["norma", "targe"]  # sickle has no count either way
    assert lines[2].split() == ["normal", "1", "2"] and lines[3].split() == ["target", "0", "1"]


def test_normal_cell_diameters_take_boxes_holding_one_normal_point_away_from_the_edge():
    from training.measure_scale import normal_cell_diameters

    points = [(50, 50, "normal"), (150, 50, "spherocyte"), (250, 50, "normal"), (260, 55, "target"), (350, 50, "normal")]
    boxes = [(30, 30, 70, 74),  # one normal point: (40 + 44) / 2 = 42
             (130, 30, 170, 70),  # a spherocyte
             (230, 30, 280, 70),  # two points
             (330, 1, 370, 70),  # touches the top edge
             (400, 30, 440, 70)]  # no labelled point
    assert normal_cell_diameters(boxes, points, width=640, height=480) == [42.0]


def test_whole_boxes_drop_cells_cut_by_the_image_edge():
    from training.measure_scale import diameter, whole_boxes

    boxes = [(10, 10, 50, 54), (0, 10, 40, 50), (600, 10, 639, 50), (10, 440, 50, 479), (100, 100, 130, 140)]
    kept = whole_boxes(boxes, width=640, height=480)
    assert kept == [(10, 10, 50, 54), (100, 100, 130, 140)]
    assert [diameter(b) for b in kept] == [42.0, 35.0]


def test_head_views_choice_is_the_smallest_set_within_tolerance_of_the_best():
    from training.calibrate_head import choose

    one, two, four = ("identity",), ("identity", "hflip"), ("identity", "hflip", "vflip", "rot180")
    assert choose({one: 0.873, two: 0.890, four: 0.893}, 0.002) == four
    assert choose({one: 0.873, two: 0.892, four: 0.893}, 0.002) == two
    assert choose({one: 0.893, two: 0.892, four: 0.894}, 0.002) == one
    assert choose({one: 0.80, two: 0.85, ("identity", "vflip"): 0.851}, 0.0) == ("identity", "vflip")


def test_detection_confusion_pairs_by_iou_and_counts_misses_and_extras():
    from training.metrics import detection_confusion

    classes = ("rbc", "wbc", "platelet")
    item = {
        "truth": [("rbc", [0, 0, 10, 10]), ("rbc", [20, 0, 30, 10]), ("wbc", [50, 50, 80, 80]), ("platelet", [90, 90, 94, 94])],
        "pred": [("rbc", [1, 0, 11, 10], 0.9),     # the first red cell
                 ("rbc", [0, 2, 10, 12], 0.8),     # a second, looser box on it: the first pairs, this is an extra
                 ("platelet", [51, 50, 80, 80], 0.7),  # the white cell, typed platelet
                 ("wbc", [200, 200, 230, 230], 0.6)],  # nothing annotated there
    }
    out = detection_confusion([item], classes)
    m = np.array(out["matrix"])
    assert out["classes"] == ["rbc", "wbc", "platelet", "background"]
    assert m[0, 0] == 1 and m[1, 2] == 1          # paired: rbc-rbc, wbc typed platelet
    assert m[0, 3] == 1 and m[2, 3] == 1          # missed: the second red cell, the platelet
    assert m[3, 0] == 1 and m[3, 1] == 1          # extras: the duplicate red box, the far white cell
    assert m.sum() == 6
    assert out["per_class"]["rbc"] == {"precision": 0.5, "recall": 0.5, "n_pred": 2, "n_truth": 2}
    assert out["per_class"]["wbc"]["recall"] == 0.0 and out["per_class"]["platelet"]["precision"] == 0.0


def test_detection_confusion_pairs_the_best_overlap_not_the_best_score():
    from training.metrics import detection_confusion

    classes = ("rbc", "wbc", "platelet")
    truth = [("rbc", [0, 0, 10, 10])]
    # the confident box overlaps less (IoU 0.67) than the unsure one (IoU 1.0): the unsure one pairs
    item = {"truth": truth, "pred": [("wbc", [0, 2, 10, 12], 0.9), ("rbc", [0, 0, 10, 10], 0.2)]}
    m = np.array(detection_confusion([item], classes)["matrix"])
    assert m[0, 0] == 1 and m[3, 1] == 1 and m.sum() == 2
    # in the other order of overlaps the confident white box pairs: a red cell counted as white
    item = {"truth": truth, "pred": [("wbc", [0, 0, 10, 10], 0.9), ("rbc", [0, 2, 10, 12], 0.2)]}
    m = np.array(detection_confusion([item], classes)["matrix"])
    assert m[0, 1] == 1 and m[3, 0] == 1 and m.sum() == 2
    empty = detection_confusion([{"truth": [], "pred": []}, {"truth": truth, "pred": []}], classes)
    assert np.array(empty["matrix"])[0, 3] == 1 and empty["per_class"]["rbc"]["recall"] == 0.0


def test_txl_boxes_turn_yolo_labels_into_pixel_boxes(tmp_path, monkeypatch):
    from training.data import txl_boxes

    labels = tmp_path / "txl_pbc" / "TXL_PBC" / "labels" / "val"
    labels.mkdir(parents=True)
    # class cx cy w h, relative to the image; a malformed line is skipped
    (labels / "a.txt").write_text("1 0.5 0.5 0.1 0.2\n0 0.25 0.75 0.5 0.5\n2 0.5\n")
    monkeypatch.setenv("SMEARSCOPE_DATA", str(tmp_path))
    image = tmp_path / "txl_pbc" / "TXL_PBC" / "images" / "val" / "a.jpg"
    boxes = txl_boxes(image, "val", 200, 100)
    assert [b.kind for b in boxes] == ["rbc", "wbc"]
    assert np.allclose([[b.x0, b.y0, b.x1, b.y1] for b in boxes], [[90, 40, 110, 60], [0, 50, 100, 100]])
    assert txl_boxes(image.with_name("unlabelled.jpg"), "val", 200, 100) == []


def test_auroc_is_the_pairwise_probability_with_ties_counted_half():
    from training.metrics import auroc

    rng = np.random.default_rng(3)
    pos, neg = rng.integers(0, 12, 40).astype(float), rng.integers(0, 9, 55).astype(float)
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(pos, neg) == pytest.approx(pairs, abs=1e-12)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def _rbc_sets(n: int = 60) -> tuple[dict, np.ndarray]:
    from training.rbc_data import CLASSES

    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, n)
    labs = np.array(["chula"] * (n - 10) + ["idb1"] * 10)
    y[labs == "idb1"] = np.where(np.arange(10) < 5, CLASSES.index("sickle"), 0)
    return {"val_labels": y, "val_labs": labs}, y


def _onehot(pred: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[pred]


def test_rbc_selection_takes_the_worst_of_in_domain_looks_and_sickle():
    """training.train_rbc keeps the checkpoint with the best `worst`: with `looks_probs` the Chula
    macro-F1 under random lab looks joins it; without the spherocyte term the BCCD share is
    reported but left to the prior shift."""
    from training.rbc_data import CLASSES, figures

    k = len(CLASSES)
    sets, y = _rbc_sets()
    right = _onehot(y, k)
    wrong_half = y.copy()
    chula = np.nonzero(sets["val_labs"] == "chula")[0]
    wrong_half[chula[::2]] = (y[chula[::2]] + 1) % 4  # half the Chula cells typed wrong
    all_sphero = _onehot(np.full(30, CLASSES.index("spherocyte")), k)
    f = figures(right, sets, "val", all_sphero, _onehot(wrong_half, k), spherocyte_in_worst=False)
    assert f["chula_macro_f1"] == 1.0 and f["idb1_sickle_vs_not"] == 1.0 and f["bccd_spherocyte_share"] == 1.0
    assert f["chula_macro_f1_looks"] < 0.7
    assert f["worst"] == f["chula_macro_f1_looks"]  # the looks term, not the spherocyte share
    g = figures(right, sets, "val", all_sphero)
    assert g["worst"] == 0.0 and "chula_macro_f1_looks" not in g  # 1 - spherocyte share


def test_outlier_exposure_crops_swap_the_centre_with_another_class():
    """training.train_wbc --outlier-mix: each near outlier is its own crop outside the centre and
    another class's crop inside it (needs torch: the training extra)."""
    torch = pytest.importorskip("torch")
    from training.train_wbc import centre_swapped

    x = torch.arange(8, dtype=torch.float32)[:, None, None, None].expand(8, 3, 10, 10).contiguous()
    y = torch.tensor([0, 1] * 4)  # crop k holds the value k: even ones class 0, odd ones class 1
    g = torch.Generator().manual_seed(0)
    out = centre_swapped(x, y, g)
    assert out is not None and 1 <= len(out) <= 4
    for crop in out:
        outer, inner = int(crop[0, 0, 0]), int(crop[0, 5, 5])
        assert outer % 2 != inner % 2  # the centre came from a crop of the other class
        assert torch.all(crop[:, 4:6, 4:6] == inner) and torch.all(crop[:, :3, :] == outer)
    assert centre_swapped(x[::2], y[::2], g) is None  # one class: no outliers


def test_count_threshold_sweep_counts_the_kinds_set_aside_detections_from_each_threshold():
    """A platelet the run set aside at 0.4 is counted from 0.4 down (recall 0 -> 1), one at 0.3 from
    0.3 down (a false platelet: precision falls); the other kinds' counts never change."""
    from training.count_threshold import sweep
    from training.data import BoxAnnotation
    from training.lab_table import LabImage

    im = LabImage("bccd", Path("x.jpg"), 0.1, (BoxAnnotation("platelet", 10, 10, 20, 20),
                                               BoxAnnotation("rbc", 50, 50, 90, 90)))
    counted = [("rbc", [50, 50, 90, 90], 0.9)]
    below = [("platelet", [10, 10, 20, 20], 0.4), ("platelet", [200, 200, 210, 210], 0.3), ("rbc", [300, 300, 340, 340], 0.45)]
    rows = sweep({"bccd": [(im, {"counted": counted, "every": counted + below})]}, "platelet", [0.5, 0.4, 0.3])
    got = [(r["threshold"], r["labs"]["bccd"]["recall"], r["labs"]["bccd"]["precision"]) for r in rows]
    assert got[0][1] == 0.0 and got[1][1:] == (1.0, 1.0) and got[2][1:] == (1.0, 0.5)
    assert rows[1]["mean_f1"] == 1.0


def test_lab_table_counts_labelled_cells_and_warns_when_the_worst_lab_rests_on_few():
    """score_boxed reports how many cells of each kind are labelled; the table prints them, and a
    worst lab whose mAP50 averages a kind with fewer than THIN_KIND labelled cells says so."""
    from training.data import BoxAnnotation
    from training.lab_table import LabImage, format_table, score_boxed

    boxes = [BoxAnnotation("rbc", 40 * i, 0, 40 * i + 30, 30) for i in range(12)]
    boxes += [BoxAnnotation("wbc", 40 * i, 100, 40 * i + 30, 130) for i in range(12)]
    boxes += [BoxAnnotation("platelet", 40 * i, 200, 40 * i + 8, 208) for i in range(3)]
    im = LabImage("txl_575", Path("x.jpg"), 0.1, tuple(boxes))
    found = [(b.kind, [b.x0, b.y0, b.x1, b.y1], 0.9) for b in boxes[:-2]]  # two platelets missed
    row = score_boxed([im], [{"counted": found, "every": found}])
    assert row["labelled"] == {"rbc": 12, "wbc": 12, "platelet": 3}
    assert abs(row["recall"]["platelet"] - 1 / 3) < 1e-9
    good = {"lab": "bccd", "scale": "given", "n": 1, "counted_map50": 0.9, "recall": {}, "labelled": {"rbc": 50, "wbc": 20, "platelet": 30}}
    table = format_table([dict(row, lab="txl_575", scale="given", n=1), good])
    assert "| 12 / 12 / 3 |" in table
    assert "worst lab: txl_575" in table and "platelet: 3" in table
    # and which lab is worst on the kinds it holds enough of: here txl_575's red and white cells are
    # all found (AP 1.0), so the other lab (0.9) is
    assert "without kinds of fewer than 10 labelled cells, the worst lab: bccd (given scale) 0.900" in table
    # the warning belongs to the worst lab only: a thin kind elsewhere says nothing
    table = format_table([dict(good, labelled={"rbc": 50, "wbc": 20, "platelet": 4}),
                          dict(good, lab="rpi", counted_map50=0.5)])
    assert "few labelled cells" not in table



def test_lab_table_shows_what_each_lab_s_red_cells_are_typed():
    """Each lab row carries the share of its counted red cells typed each morphology (white cells
    and nucleated red cells left out), and the table prints target and spherocyte per lab."""
    from training.lab_table import format_table, rbc_label_shares

    outs = [{"labels": [("rbc", "target")] * 3 + [("rbc", "normal")] + [("wbc", "lymphocyte")] * 5},
            {"labels": [("rbc", "spherocyte"), ("nrbc", "nrbc")]}]
    shares = rbc_label_shares(outs)
    assert shares == {"normal": 0.2, "spherocyte": 0.2, "target": 0.6}
    assert rbc_label_shares([{"labels": [("wbc", "monocyte")]}]) == {}
    row = {"lab": "rpi", "scale": "given", "n": 2, "wbc_found": 0.9, "wbc_centre_hit": 0.9, "extra_wbc_per_field": 0.0,
           "wbc_counted_over_labelled": 1.0, "rbc_label_shares": shares}
    assert "  rpi (given): 0.200 / 0.600 / 0.200 / 0.000" in format_table([row])


def test_a_head_that_misreads_defocused_cells_has_that_as_its_worst_figure():
    """train_rbc --defocus: Chula macro-F1 of the defocused crops joins the worst figure (only Chula's cells)."""
    from training.rbc_data import with_defocus

    sets = {"val_labels": np.array([0, 1, 0, 1, 2]), "val_labs": np.array(["chula"] * 4 + ["idb1"])}
    right = np.eye(3)[[0, 1, 0, 1, 0]]  # the IDB1 cell wrong: not Chula's, not counted
    fig = with_defocus({"worst": 0.8}, right, sets, "val")
    assert fig["chula_macro_f1_defocus"] == 1.0 and fig["worst"] == 0.8
    all_target = np.eye(3)[[1, 1, 1, 1, 2]]
    fig = with_defocus({"worst": 0.8}, all_target, sets, "val")
    assert fig["chula_macro_f1_defocus"] == fig["worst"] < 0.5

def test_rbc_ensemble_is_the_mean_of_its_members_logits_and_refuses_other_classes(tmp_path):
    """training.ensemble_rbc: the exported head of several runs averages their logits (needs torch)."""
    torch = pytest.importorskip("torch")
    from training.ensemble_rbc import MeanLogits, load_head
    from training.rbc_data import CLASSES
    from training.train_head import Deployable, build_net

    runs = []
    for k in range(2):
        torch.manual_seed(k)
        net = Deployable(build_net("resnet10t-half", len(CLASSES))).eval()
        (tmp_path / f"r{k}").mkdir()
        torch.save({"model": net.state_dict(), "arch": "resnet10t-half", "classes": list(CLASSES)},
                   tmp_path / f"r{k}" / "best.pt")
        runs.append((tmp_path / f"r{k}", net))
    x = torch.rand(3, 3, 56, 56)
    head, arch, text = load_head([r for r, _ in runs])
    assert isinstance(head, MeanLogits) and arch == "resnet10t-half" and "2 timm" in text
    with torch.inference_mode():
        want = (runs[0][1](x) + runs[1][1](x)) / 2
        assert torch.allclose(head(x), want, atol=1e-5)
        assert not torch.allclose(head(x), runs[0][1](x), atol=1e-3)
    single, _, none = load_head([runs[0][0]])
    assert none is None and not isinstance(single, MeanLogits)
    torch.save({"model": runs[0][1].state_dict(), "arch": "resnet10t-half", "classes": list(CLASSES)[::-1]},
               tmp_path / "r0" / "best.pt")
    with pytest.raises(SystemExit, match="classes"):
        load_head([runs[0][0]])


def test_stored_size_is_a_half_size_decode_doubled_or_none(tmp_path):
    """training.data.stored_size, the size lab_table, station_adapt and prep_seg scale a stored
    image's YOLO boxes to: the full size, within a pixel on an odd side; None for a file that is
    no image. On rendered fields of even and odd sides and, where the datasets are, rpi and TXL fields."""
    import cv2

    from smearscope.device.synthetic import render_field
    from training.data import stored_size, txl_dir, txl_images
    from training.labs import rpi_dir, rpi_splits

    images = []
    for width, height, suffix in ((640, 480, ".png"), (101, 75, ".png"), (257, 193, ".jpg")):
        path = tmp_path / f"{width}x{height}{suffix}"
        cv2.imwrite(str(path), render_field(seed=1, width=width, height=height).frame.pixels)
        images.append(path)
    if rpi_dir().is_dir():
        images += [rpi_dir() / "images" / f"{stem}.jpg" for stem in rpi_splits()["val"][:2]]
    if txl_dir().is_dir():
        images += txl_images("val")[:2]
    for path in images:
        height, width = cv2.imread(str(path)).shape[:2]
        size = stored_size(path)
        assert size is not None and all(d % 2 == 0 and abs(d - full) <= full % 2
                                        for d, full in zip(size, (width, height))), (path, size)
    (tmp_path / "no-image.jpg").write_bytes(b"not an image")
    assert stored_size(tmp_path / "no-image.jpg") is None


def test_red_cells_typed_as_nucleated_count_only_confident_red_cell_sized_types():
    """train_wbc --red-negatives' figure: a red cell the recheck would re-count is one typed
    lymphocyte or erythroblast, confidently, and not refused by the open-set test."""
    from training.wbc_negatives import red_as_nucleated

    classes = hd.PBC_CLASSES
    ly, ne, er = classes.index("lymphocyte"), classes.index("neutrophil"), classes.index("erythroblast")
    logits = np.zeros((5, len(classes)))
    logits[0, ly] = 8.0  # confident lymphocyte: counted
    logits[1, ne] = 8.0  # confident neutrophil: a size the recheck refuses for a red cell
    logits[2, ly] = 0.5  # lymphocyte below the confidence
    logits[3, er] = 8.0  # confident erythroblast: counted unless refused
    logits[4, ly] = 8.0
    assert red_as_nucleated(logits, classes) == 0.6
    assert red_as_nucleated(logits, classes, typed=np.array([True, True, True, False, True])) == 0.4
    assert red_as_nucleated(logits, classes, temperature=20.0) == 0.0  # the temperature flattens them all
    assert red_as_nucleated(logits[:0], classes) == 0.0


def test_red_cell_negatives_rank_a_red_cell_without_pallor_dense_and_skip_white_cells_neighbours():
    """training.wbc_negatives on a rendered field: pale red cells read about the field's median, one
    stained through reads denser than the recheck's 1.8; a red box beside a white cell is left out."""
    import cv2

    from training.data import BoxAnnotation
    from training.wbc_negatives import _near, interior_ratios

    field = np.full((400, 600, 3), 232, np.uint8)
    boxes = []
    for k in range(10):
        cx, cy = 40 + 55 * k, 100
        cv2.circle(field, (cx, cy), 18, (175, 150, 205), -1)  # pale pink: haemoglobin absorbs little red
        boxes.append(BoxAnnotation("rbc", cx - 18, cy - 18, cx + 18, cy + 18))
    cv2.circle(field, (300, 280), 18, (150, 60, 90), -1)  # stained through: red light absorbed
    boxes.append(BoxAnnotation("rbc", 282, 262, 318, 298))
    ratios = interior_ratios(field, 0.2, boxes)
    assert np.allclose(ratios[:10], 1.0, atol=0.05), ratios
    assert ratios[10] > 1.8, ratios
    white = BoxAnnotation("wbc", 100, 100, 160, 160)
    assert _near(BoxAnnotation("rbc", 160, 150, 190, 180), white)  # centre 15 px off its edge: within half
    assert not _near(BoxAnnotation("rbc", 200, 150, 230, 180), white)
