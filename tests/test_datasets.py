"""The synthetic COCO generator, the COCO dataset built on its output, and the errors for bad
input paths and files."""
import argparse
import gzip
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco import ConvertCocoAnnotations
from datasets.coco_eval import CocoEvaluator, installed_backends
from datasets.synthetic import CATEGORIES, _rasterize, _shape_polygons, make_synthetic_coco
from util.box_ops import box_cxcywh_to_xyxy
from util.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The generator's default output (200 train and 50 val images of 128 px)."""
    out = tmp_path_factory.mktemp("shapes")
    return out, make_synthetic_coco(out)


def args_for(coco_path, input_scale=1.0):
    return argparse.Namespace(dataset_file="coco", coco_path=None if coco_path is None
                              else str(coco_path), input_scale=input_scale, train_augmentation=True)


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- generator

def test_generator_is_deterministic(tmp_path):
    make_synthetic_coco(tmp_path / "a", num_train=6, num_val=3, seed=3)
    make_synthetic_coco(tmp_path / "b", num_train=6, num_val=3, seed=3)
    make_synthetic_coco(tmp_path / "c", num_train=6, num_val=3, seed=4)
    make_synthetic_coco(tmp_path / "d", num_train=2, num_val=3, seed=3)
    a, b, c, d = (tree_bytes(tmp_path / k) for k in "abcd")
    assert a == b
    assert len(a) == 2 + 6 + 3
    for name in a:
        if name.endswith(".png"):
            assert a[name] != c[name], f"{name} did not change with the seed"
    # an image depends on its index only: fewer images leave the first ones unchanged
    assert all(d[k] == a[k] for k in d if k.startswith(("train2017/", "val2017/")))


def test_layout_and_json(default_data):
    out, summary = default_data
    for split, count in (("train", 200), ("val", 50)):
        coco = COCO(str(out / "annotations" / f"instances_{split}2017.json"))
        assert len(coco.getImgIds()) == count == summary[split]["images"]
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(out / f"{split}2017" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (128, 128)
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 7 and h >= 7
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
            # the polygon outlines the shape, whose pixels span the box (to a pixel)
            assert np.allclose(poly.min(0), [x, y], atol=1) and np.allclose(
                poly.max(0), [x + w, y + h], atol=1)


def test_categories_are_non_contiguous(default_data):
    out, summary = default_data
    data = json.loads((out / "annotations" / "instances_train2017.json").read_text())
    ids = [c["id"] for c in data["categories"]]
    assert ids == [1, 2, 4, 5, 7, 9] and summary["num_classes"] == max(ids) + 1 == 10
    used = {a["category_id"] for a in data["annotations"]}
    assert used == set(ids)  # every class appears, and nothing else


def test_size_ranges_objects_and_occlusion(default_data):
    out, summary = default_data
    for split in ("train", "val"):
        counts = summary[split]
        assert counts["small"] > 0 and counts["medium"] > 0 and counts["large"] > 0
        data = json.loads((out / "annotations" / f"instances_{split}2017.json").read_text())
        per_image = np.bincount([a["image_id"] for a in data["annotations"]],
                                minlength=len(data["images"]) + 1)[1:]
        assert per_image.min() == 1 and per_image.max() == 6
        visible = np.array([a["visible_fraction"] for a in data["annotations"]])
        assert visible.min() >= 0.3 and (visible < 1).mean() > 0.2


@pytest.mark.parametrize("cat_id,name", CATEGORIES)
def test_every_shape_fills_its_box(cat_id, name):
    mask, polygon = _rasterize(*_shape_polygons(name, np.random.default_rng(cat_id)), 30, 20)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 19, 0, 29)
    centre_filled = mask[8:12, 13:17].any()
    assert centre_filled == (name not in ("ring", "frame"))  # outlines have a hole


def test_size_weights_pick_the_area_ranges(tmp_path):
    summary = make_synthetic_coco(tmp_path / "a", num_train=30, num_val=1, size_weights=(0, 1, 0))
    assert summary["train"]["objects"] == summary["train"]["medium"] > 30
    summary = make_synthetic_coco(tmp_path / "b", num_train=30, num_val=1, size_weights=(1, 0, 3))
    assert summary["train"]["medium"] == 0 and summary["train"]["small"] > 0 and summary["train"]["large"] > 0


def test_clutter_zero_leaves_a_flat_background(tmp_path):
    make_synthetic_coco(tmp_path, num_train=4, num_val=1, clutter=0)
    coco = COCO(str(tmp_path / "annotations" / "instances_train2017.json"))
    for img in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(tmp_path / "train2017" / img["file_name"]))
        background = np.ones(pixels.shape[:2], dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            x, y, w, h = (int(v) for v in ann["bbox"])
            background[y:y + h, x:x + w] = False
        # one colour (the base colour, rounded) wherever no object's box reaches
        assert len(np.unique(pixels[background], axis=0)) == 1


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="one of"):
        make_synthetic_coco(tmp_path, num_train=1, num_val=1, num_classes=7)  # 6 is no id
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_coco(tmp_path, num_train=1, num_val=1, image_size=5)
    with pytest.raises(ValueError, match="size_weights"):
        make_synthetic_coco(tmp_path, num_train=1, num_val=1, size_weights=(1, 1))
    with pytest.raises(ValueError, match="do not fit"):
        make_synthetic_coco(tmp_path, num_train=1, num_val=1, image_size=96, size_weights=(0, 0, 1))
    with pytest.raises(ValueError, match="clutter"):
        make_synthetic_coco(tmp_path, num_train=1, num_val=1, clutter=-1)


def run_cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["make_synthetic_coco", *argv])
    runpy.run_module("scripts.make_synthetic_coco", run_name="__main__")


def test_cli(tmp_path, monkeypatch, capsys):
    run_cli(monkeypatch, "--out", str(tmp_path / "s"), "--num_train", "3", "--num_val", "2",
            "--image_size", "64", "--num_classes", "14")
    assert "--num_classes 14" in capsys.readouterr().out
    data = json.loads((tmp_path / "s" / "annotations" / "instances_val2017.json").read_text())
    assert len(data["images"]) == 2 and len(data["categories"]) == 8
    with pytest.raises(SystemExit) as exit_info:
        run_cli(monkeypatch, "--out", str(tmp_path / "t"), "--num_classes", "4")
    assert exit_info.value.code == 2 and "num_classes must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------- COCO dataset

def test_build_dataset_targets(default_data):
    out, _ = default_data
    val = build_dataset("val", args_for(out, input_scale=0.16))  # 800 * 0.16 = 128: no resize
    nested = torch.utils.data.Subset(torch.utils.data.Subset(val, [0, 1]), [1])
    coco = get_coco_api_from_dataset(nested)
    assert coco is val.coco
    for idx in (0, 7):
        img, target = val[idx]
        image_id = val.ids[idx]
        assert img.shape == (3, 128, 128) and img.dtype == torch.float32
        dtypes = {k: v.dtype for k, v in target.items()}
        assert dtypes == {"boxes": torch.float32, "labels": torch.int64, "image_id": torch.int64,
                          "area": torch.float32, "iscrowd": torch.int64,
                          "orig_size": torch.int64, "size": torch.int64}
        assert target["image_id"].tolist() == [image_id]
        assert target["orig_size"].tolist() == target["size"].tolist() == [128, 128]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        boxes = box_cxcywh_to_xyxy(target["boxes"]) * 128
        assert torch.allclose(boxes, expected, atol=1e-3)
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["area"].tolist() == [a["area"] for a in anns]

    train = build_dataset("train", args_for(out, input_scale=0.16))
    for idx in range(5):
        img, target = train[idx]
        h, w = img.shape[-2:]
        assert target["size"].tolist() == [h, w] and target["orig_size"].tolist() == [128, 128]
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        assert set(target["labels"].tolist()) <= {1, 2, 4, 5, 7, 9}


def test_train_without_augmentation_uses_val_pipeline(default_data):
    out, _ = default_data
    args = args_for(out, input_scale=0.125)
    args.train_augmentation = False
    train = build_dataset("train", args)
    (img_a, t_a), (img_b, t_b) = train[3], train[3]
    assert img_a.shape == (3, 100, 100) and t_a["size"].tolist() == [100, 100]  # 800 / 8
    assert torch.equal(img_a, img_b) and torch.equal(t_a["boxes"], t_b["boxes"])


def test_converter_drops_crowd_and_degenerate_boxes():
    anns = [{"bbox": [10, 10, 20, 30], "category_id": 3, "area": 500.0},
            {"bbox": [0, 0, 5, 5], "category_id": 4, "area": 25.0, "iscrowd": 1},
            {"bbox": [40, 5, 0, 10], "category_id": 5, "area": 0.0, "iscrowd": 0},
            {"bbox": [90, -5, 30, 20], "category_id": 6, "area": 600.0, "iscrowd": 0},
            {"bbox": [150, 10, 5, 5], "category_id": 7, "area": 25.0}]  # off the image
    _, t = ConvertCocoAnnotations()(Image.new("RGB", (100, 60)),
                                    {"image_id": 42, "annotations": anns})
    assert t["boxes"].tolist() == [[10, 10, 30, 40], [90, 0, 100, 15]]
    assert t["labels"].tolist() == [3, 6]
    assert t["area"].tolist() == [500, 600] and t["iscrowd"].tolist() == [0, 0]
    assert t["image_id"].tolist() == [42] and t["size"].tolist() == [60, 100]
    _, empty = ConvertCocoAnnotations()(Image.new("RGB", (8, 8)),
                                        {"image_id": 1, "annotations": []})
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def small_data(tmp_path):
    make_synthetic_coco(tmp_path, num_train=2, num_val=2, image_size=64)
    return tmp_path


def expect_error(args, must_name, image_set="val"):
    with pytest.raises(UserInputError) as info:
        build_dataset(image_set, args)
    message = str(info.value)
    assert "\n" not in message and str(must_name) in message, message
    return message


def test_missing_coco_path():
    assert "--coco_path" in expect_error(args_for(None), "not set")


def test_coco_path_not_a_folder(tmp_path):
    expect_error(args_for(tmp_path / "nowhere"), tmp_path / "nowhere")


def test_missing_image_folder(small_data):
    (small_data / "val2017").rename(small_data / "elsewhere")
    expect_error(args_for(small_data), small_data / "val2017")


def test_missing_annotation_file(small_data):
    ann = small_data / "annotations" / "instances_val2017.json"
    ann.unlink()
    expect_error(args_for(small_data), ann)


@pytest.mark.parametrize("content,expected", [
    ('{"images": [{"id": 1, "file_na', "not a valid COCO JSON file"),  # truncated
    ("", "not a valid COCO JSON file"),
    ("[1, 2]", "not a valid COCO JSON file"),  # JSON, but not an object
    ('{"images": [], "annotations": []}', "lacks the key(s) categories"),
])
def test_corrupt_annotation_file(small_data, capsys, content, expected):
    ann = small_data / "annotations" / "instances_val2017.json"
    ann.write_text(content)
    assert expected in expect_error(args_for(small_data), ann)
    assert capsys.readouterr().out == ""  # nothing half-parsed on the screen


def test_missing_image_file(small_data):
    dataset = build_dataset("val", args_for(small_data))
    missing = small_data / "val2017" / dataset.coco.loadImgs(dataset.ids[1])[0]["file_name"]
    missing.unlink()
    dataset[0]  # the other image still loads
    with pytest.raises(UserInputError, match=str(missing)):
        dataset[1]


def test_unknown_dataset_file_and_image_set(small_data):
    args = args_for(small_data)
    args.dataset_file = "voc"
    assert "coco" in expect_error(args, "voc")
    assert "train, val" in expect_error(args_for(small_data), "test", image_set="test")


def edit_annotations(root, split, edit):
    """Rewrite root's instances_{split}2017.json with edit(data) applied; returns its path."""
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))
    return ann_file


def test_missing_image_files_are_refused_when_the_dataset_is_built(small_data):
    names = sorted(p.name for p in (small_data / "val2017").iterdir())
    for name in names:
        (small_data / "val2017" / name).unlink()
    message = expect_error(args_for(small_data), small_data / "val2017" / names[0])
    assert "2 of the 2 images" in message and "copy them into" in message
    first = sorted(p.name for p in (small_data / "train2017").iterdir())[0]
    (small_data / "train2017" / first).unlink()
    assert "1 of the 2 images" in expect_error(args_for(small_data), small_data / "train2017" / first, "train")


def test_image_files_are_looked_for_with_one_listing_per_folder(small_data, monkeypatch):
    # an image in a subfolder is found in that subfolder's listing
    first = sorted(p.name for p in (small_data / "val2017").iterdir())[0]
    (small_data / "val2017" / "sub").mkdir()
    (small_data / "val2017" / first).rename(small_data / "val2017" / "sub" / first)
    edit_annotations(small_data, "val", lambda d: d["images"][0].update(file_name=f"sub/{first}"))
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: listed.append(str(path)) or real_listdir(path))
    dataset = build_dataset("val", args_for(small_data, input_scale=0.08))
    assert sorted(listed) == [str(small_data / "val2017"), str(small_data / "val2017" / "sub")]
    assert dataset[0][0].shape == (3, 64, 64)
    (small_data / "val2017" / "sub" / first).unlink()
    expect_error(args_for(small_data), small_data / "val2017" / "sub" / first)


def drop_id(data):
    del data["annotations"][1]["id"]


@pytest.mark.parametrize("edit,expected", [
    (drop_id, "annotations[1] has no 'id'"),
    (lambda d: d["annotations"][1].update(id=0), "annotations[1] has id 0;"),
    (lambda d: d["annotations"][1].update(id="2"), "annotations[1] has id '2';"),
    (lambda d: d["annotations"][1].update(id=1), "annotations[1] has id 1, as annotations[0] does"),
])
def test_annotation_ids_must_be_unique_integers_of_1_or_more(small_data, edit, expected):
    ann_file = edit_annotations(small_data, "val", edit)
    message = expect_error(args_for(small_data), ann_file)
    assert expected in message and "unique" in message


def test_a_missing_iscrowd_is_0_for_training_and_every_backend(small_data):
    def drop_iscrowd(data):
        for ann in data["annotations"]:
            del ann["iscrowd"]

    edit_annotations(small_data, "val", drop_iscrowd)
    val = build_dataset("val", args_for(small_data, input_scale=0.08))  # 800 * 0.08 = 64: no resize
    coco = val.coco
    assert all(ann["iscrowd"] == 0 for ann in coco.dataset["annotations"])
    predictions = {}
    for idx, image_id in enumerate(val.ids):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(val[idx][1]["labels"]) == len(anns)  # every object is a training target
        predictions[image_id] = {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                                                        (a["bbox"] for a in anns)]),
                                 "scores": torch.ones(len(anns)),
                                 "labels": torch.tensor([a["category_id"] for a in anns])}
    for backend in installed_backends():  # pycocotools raised KeyError 'iscrowd' here
        evaluator = CocoEvaluator(coco, ("bbox",), backend=backend)
        evaluator.update(predictions)
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        assert evaluator.stats()[0] == pytest.approx(1), backend


def test_an_annotation_file_that_is_not_utf8_is_refused(small_data):
    ann_file = small_data / "annotations" / "instances_val2017.json"
    text = ann_file.read_text()
    ann_file.write_bytes(gzip.compress(text.encode()))
    assert "not a UTF-8 JSON file (gzip-compressed)" in expect_error(args_for(small_data), ann_file)
    ann_file.write_bytes(text.replace('"shape"', '"form\xe9"').encode("latin-1"))
    assert "not a UTF-8 JSON file" in expect_error(args_for(small_data), ann_file)
    ann_file.write_bytes(text.encode("utf-8-sig"))  # a byte-order mark is fine
    assert len(build_dataset("val", args_for(small_data))) == 2


def test_a_train_category_missing_from_val_names_the_val_file(small_data):
    train_file = small_data / "annotations" / "instances_train2017.json"
    category = json.loads(train_file.read_text())["annotations"][0]["category_id"]
    val_file = edit_annotations(small_data, "val", lambda d: d.update(
        categories=[c for c in d["categories"] if c["id"] != category]))
    message = expect_error(args_for(small_data), val_file, image_set="train")
    assert message.startswith(f"annotation file {train_file}: annotations[0] (id 1) has category id {category}")
    assert f"the model's classes: those are the 'categories' of {val_file}" in message
    assert f"add category {category} there" in message


def test_an_image_of_another_size_than_its_json_entry_is_refused(small_data):
    dataset = build_dataset("val", args_for(small_data, input_scale=0.08))
    path = small_data / "val2017" / dataset.coco.loadImgs(dataset.ids[1])[0]["file_name"]
    Image.new("RGB", (48, 32)).save(path)
    dataset[0]  # the other image still loads
    with pytest.raises(UserInputError) as info:
        dataset[1]
    assert str(path) in str(info.value) and "is 48x32 pixels" in str(info.value)
    assert "gives 64x64 (width x height)" in str(info.value)
