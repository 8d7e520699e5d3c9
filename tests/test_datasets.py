"""Datasets: the demo generator, MSRC-21 (real data when available), a fake VOC tree, folders."""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affinitynet.data.datasets import (
    DATASETS,
    build_dataset,
    check_dataset,
    demo,
    ensure_msrc21,
    generate_demo,
    msrc21,
)
from affinitynet.errors import InputError
from affinitynet.files import save_label_png


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- demo ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    start = time.perf_counter()
    generate_demo(root, size=96, num_train=80, num_val=20, seed=3)
    print(f"\ndemo: 100 images of 96 px generated in {time.perf_counter() - start:.2f} s")
    return root


def test_demo_is_deterministic_per_seed(demo_root, tmp_path):
    again = tmp_path / "again"
    generate_demo(again, size=96, num_train=80, num_val=20, seed=3)
    assert _digest(again) == _digest(demo_root)
    other = tmp_path / "other"
    generate_demo(other, size=96, num_train=8, num_val=2, seed=4)
    first = (demo_root / "JPEGImages" / "train_00000.png").read_bytes()
    assert (other / "JPEGImages" / "train_00000.png").read_bytes() != first
    # An image depends on (seed, split, index) only, not on how many images the split has.
    smaller = tmp_path / "smaller"
    generate_demo(smaller, size=96, num_train=5, num_val=1, seed=3)
    assert (smaller / "JPEGImages" / "train_00004.png").read_bytes() == \
        (demo_root / "JPEGImages" / "train_00004.png").read_bytes()


def test_demo_labels_match_masks_and_objects_are_few(demo_root):
    dataset = build_dataset({"name": "demo", "root": str(demo_root), "demo_size": 96, "demo_train": 80,
                             "demo_val": 20, "demo_seed": 3}, "trainval")
    assert len(dataset) == 100 and dataset.skipped == []
    assert dataset.class_names == ["background", *demo.CLASS_NAMES] and len(demo.CLASS_NAMES) >= 4
    counts = Counter()
    for sample in dataset.samples:
        image = dataset.load_image(sample)
        mask = dataset.load_mask(sample)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        present = tuple(int(c) for c in np.unique(mask) if c != 0)
        assert present == sample.labels
        assert 255 not in np.unique(mask)                      # exact masks, no ignore band
        counts[len(sample.labels)] += 1
    assert set(counts) <= {0, 1, 2, 3} and counts[0] > 0 and counts[3] > 0
    labels = json.loads((demo_root / "labels.json").read_text())
    assert len(labels) == 100
    assert (demo_root / "classes.txt").read_text().split() == list(demo.CLASS_NAMES)
    assert len(build_dataset({"name": "demo", "root": str(demo_root), "demo_size": 96, "demo_train": 80,
                              "demo_val": 20, "demo_seed": 3}, "val")) == 20


def test_demo_tags_are_a_small_part_of_each_object():
    fractions = []
    for index in range(40):
        rgb, mask, labels = demo.render(0, "train", index, 128)
        tags = demo.tag_mask(0, "train", index, 128)
        assert not (tags & (mask == 0)).any()                  # tags lie inside bodies
        for label in labels:
            body = mask == label
            fractions.append((tags & body).sum() / body.sum())
            # The body around the tag is far larger than the tag and not class-coloured.
            assert body.sum() > 0.02 * mask.size
    fractions = np.array(fractions)
    assert fractions.size > 30
    assert fractions.max() < 0.2 and fractions.min() > 0.02


def test_demo_bodies_are_separated_by_background():
    for index in range(40):
        _, mask, labels = demo.render(1, "val", index, 128)
        horizontal = (mask[:, 1:] != mask[:, :-1]) & (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
        vertical = (mask[1:, :] != mask[:-1, :]) & (mask[1:, :] > 0) & (mask[:-1, :] > 0)
        assert not horizontal.any() and not vertical.any()


def test_demo_regenerates_when_parameters_change_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "d"
    generate_demo(root, size=64, num_train=6, num_val=2, seed=0)
    manifest = (root / "manifest.json").read_text()
    generate_demo(root, size=64, num_train=6, num_val=2, seed=0)            # complete: untouched
    assert (root / "manifest.json").read_text() == manifest
    generate_demo(root, size=64, num_train=3, num_val=2, seed=0)
    assert sorted(p.name for p in (root / "JPEGImages").iterdir())[:4] == \
        ["train_00000.png", "train_00001.png", "train_00002.png", "val_00000.png"]
    assert json.loads((root / "manifest.json").read_text())["num_train"] == 3
    # A killed run leaves no manifest, so the next call regenerates.
    (root / "manifest.json").unlink()
    assert not demo.is_generated(root, 64, 3, 2, 0)
    generate_demo(root, size=64, num_train=3, num_val=2, seed=0)
    assert demo.is_generated(root, 64, 3, 2, 0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(InputError, match="refusing"):
        generate_demo(foreign, size=64, num_train=2, num_val=1)


def test_dataset_names_and_dispatch(tmp_path):
    assert set(DATASETS.names()) == {"coco", "demo", "msrc21", "voc12", "folder"}
    assert all(isinstance(e.info["description"], str) and "\n" not in e.info["description"] for e in DATASETS)
    with pytest.raises(InputError, match="needs a root"):
        build_dataset({"name": "voc12", "root": None}, "train")
    with pytest.raises(InputError, match="not a PASCAL VOC"):
        build_dataset({"name": "voc12", "root": str(tmp_path)}, "train")
    with pytest.raises(InputError, match="not an MSRC-21"):
        build_dataset({"name": "msrc21", "root": str(tmp_path)}, "train")


# --- MSRC-21 -------------------------------------------------------------------------------------

def test_msrc21_object_protocol_counts_match_the_readme(msrc21_root):
    expected = {"train": {0: 65, 1: 277, 2: 13}, "val": {0: 8, 1: 49, 2: 2}}
    for split, histogram in expected.items():
        # The parent directory works as root too.
        dataset = build_dataset({"name": "msrc21", "root": str(msrc21_root.parent)}, split)
        assert dataset.skipped == []
        assert dict(Counter(len(s.labels) for s in dataset.samples)) == histogram
    train = build_dataset({"name": "msrc21", "root": str(msrc21_root)}, "train")
    per_class = Counter(label for sample in train.samples for label in sample.labels)
    assert train.class_names[1:] == list(msrc21.OBJECT_CLASSES[1:]) and len(train.class_names) == 15
    assert min(per_class.values()) == per_class[train.class_names.index("cat")] == 14
    assert max(per_class.values()) == per_class[train.class_names.index("person")] == 43
    trainval = build_dataset({"name": "msrc21", "root": str(msrc21_root)}, "trainval")
    assert len(trainval) == 414
    # The test images are kept aside: every entry is reported, none kept, nothing raised.
    test = build_dataset({"name": "msrc21", "root": str(msrc21_root)}, "test")
    assert len(test) == 0 and len(test.skipped) == 177
    assert test.skipped[0] == (f"{msrc21_root / 'Images' / '10_12_s.bmp'}: image file not found "
                               f"(listed at msrc21-test.txt line 1)")


def test_msrc21_masks_and_the_standard21_protocol(msrc21_root):
    dataset = build_dataset({"name": "msrc21", "root": str(msrc21_root)}, "val")
    sample = dataset.samples[0]
    mask = dataset.load_mask(sample)
    image = dataset.load_image(sample)
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= set(range(15)) | {255}
    standard = build_dataset({"name": "msrc21", "root": str(msrc21_root), "protocol": "standard21"}, "val")
    assert standard.has_background is False and standard.num_classes == 21
    assert standard.num_object_classes == 21 and standard.class_names[0] == "building"
    mask21 = standard.load_mask(standard.by_id(sample.id))
    assert set(np.unique(mask21)) <= set(range(21)) | {255}
    # Stuff pixels of the object protocol's background are ordinary classes in standard21.
    stuff = {msrc21.STANDARD21_CLASSES.index(name) for name in msrc21.OBJECT_BACKGROUND if name != "mountain"}
    assert set(np.unique(mask21[mask == 0])) <= stuff | {255}     # mountain is ignored in standard21
    target = standard.multi_hot(standard.by_id(sample.id))
    assert target.shape == (21,) and target.sum() == len(standard.by_id(sample.id).labels)


def test_msrc21_unknown_colour_is_refused(tmp_path):
    root = tmp_path / msrc21.DIRECTORY
    (root / "Images").mkdir(parents=True)
    (root / "GroundTruth").mkdir()
    for sample_id in ("a", "b"):
        Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "Images" / f"{sample_id}.bmp")
    good = np.zeros((4, 5, 3), np.uint8)
    good[1:3, 1:3] = (0, 0, 128)                                   # cow
    bad = good.copy()
    bad[0, 0] = (10, 20, 30)
    Image.fromarray(good).save(root / "GroundTruth" / "a_GT.bmp")
    Image.fromarray(bad).save(root / "GroundTruth" / "b_GT.bmp")
    (root / "train.txt").write_text("a\nb\n")
    dataset = build_dataset({"name": "msrc21", "root": str(tmp_path)}, "train")
    assert [s.id for s in dataset.samples] == ["a"]
    assert dataset.samples[0].labels == (msrc21.OBJECT_CLASSES.index("cow"),)
    assert dataset.skipped == [f"{root / 'GroundTruth' / 'b_GT.bmp'}: colour (10,20,30) at 1 pixels is not in "
                               f"the MSRC-21 colour code"]


def test_ensure_msrc21_without_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(msrc21, "_tarball_candidates", lambda: [tmp_path / "nowhere.tar.xz"])
    with pytest.raises(FileNotFoundError, match="AFFINITYNET_MSRC21_TAR"):
        ensure_msrc21(tmp_path / "cache")


# --- PASCAL VOC 2012 -------------------------------------------------------------------------------

def _voc_xml(names, difficult=()):
    objects = "".join(f"<object><name>{n}</name><difficult>{int(n in difficult)}</difficult></object>"
                      for n in names)
    return f"<annotation><filename>x.jpg</filename>{objects}</annotation>"


@pytest.fixture()
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug",
                   "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sample_id in ("2007_000001", "2007_000002", "2008_000003", "2008_000004"):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{sample_id}.jpg")
    (root / "Annotations" / "2007_000001.xml").write_text(_voc_xml(["cat", "person", "cat"]))
    (root / "Annotations" / "2007_000002.xml").write_text(_voc_xml(["dog", "bottle"], difficult=("bottle",)))
    mask = np.zeros((12, 16), np.uint8)
    mask[2:6, 2:6] = 8                                             # cat
    mask[0, :] = 255
    save_label_png(root / "SegmentationClass" / "2007_000001.png", mask)
    aug = np.zeros((12, 16), np.uint8)
    aug[5:9, 5:9] = 7                                              # car
    Image.fromarray(aug, mode="L").save(root / "SegmentationClassAug" / "2008_000003.png")  # grey, as SBD's
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000002\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n2007_000002\n2008_000003\n"
        "2008_000004\n2009_999999\n")
    return root


def test_voc12_labels_from_xml_then_masks(voc_root):
    dataset = build_dataset({"name": "voc12", "root": str(voc_root.parent.parent)}, "train")   # the parent works
    assert dataset.root == voc_root and len(dataset.class_names) == 21
    first, second = dataset.samples
    assert first.labels == (8, 15)                                 # cat, person (XML)
    assert second.labels == (5, 12)                                # bottle (difficult kept), dog
    assert first.mask_path.name == "2007_000001.png" and second.mask_path is None
    mask = dataset.load_mask(first)
    assert mask.shape == (12, 16) and mask[3, 3] == 8 and mask[0, 0] == 255
    assert dataset.load_mask(second) is None
    aug = build_dataset({"name": "voc12", "root": str(voc_root)}, "train_aug")
    assert [s.id for s in aug.samples] == ["2007_000001", "2007_000002", "2008_000003"]
    third = aug.by_id("2008_000003")
    assert third.labels == (7,) and third.mask_path.parent.name == "SegmentationClassAug"
    assert aug.skipped == [
        f"{voc_root / 'Annotations' / '2008_000004.xml'}: no annotation XML and no mask, so no image-level "
        f"labels (listed at train_aug.txt line 4)",
        f"{voc_root / 'JPEGImages' / '2009_999999.jpg'}: image file not found (listed at train_aug.txt line 5)"]
    report = check_dataset(aug, progress=False)
    assert report.num_images_ok == 3 and report.num_masks_ok == 2
    assert report.problems == [] and report.skipped == aug.skipped and not report.ok


def test_voc12_bad_xml_is_skipped(voc_root):
    (voc_root / "Annotations" / "2007_000002.xml").write_text(_voc_xml(["dragon"]))
    dataset = build_dataset({"name": "voc12", "root": str(voc_root)}, "train")
    assert [s.id for s in dataset.samples] == ["2007_000001"]
    assert dataset.skipped == [f"{voc_root / 'Annotations' / '2007_000002.xml'}: object name 'dragon' is not a VOC class"]
    (voc_root / "Annotations" / "2007_000002.xml").write_text("<annotation><object>")
    dataset = build_dataset({"name": "voc12", "root": str(voc_root)}, "train")
    assert dataset.skipped[0].startswith(f"{voc_root / 'Annotations' / '2007_000002.xml'}: not valid XML")
    with pytest.raises(InputError, match="split list for 'test' not found"):
        build_dataset({"name": "voc12", "root": str(voc_root)}, "test")


# --- folder ----------------------------------------------------------------------------------------

def _folder(tmp_path, names=("a.jpg", "b.png", "c.jpg", "sub/d.png")):
    root = tmp_path / "photos"
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8, 3), 100, np.uint8)).save(root / name)
    return root


def test_folder_csv_with_bom_crlf_unicode_and_separators(tmp_path):
    root = _folder(tmp_path)
    (root / "tags.csv").write_bytes("\ufeffa.jpg,chat;été\r\nb,été|chat\r\nc.jpg,\r\nsub/d.png,chat,été\r\n"
                                    .encode("utf-8"))
    dataset = build_dataset({"name": "folder", "root": str(root), "labels_file": "tags.csv"}, "train")
    assert dataset.class_names == ["background", "chat", "été"]
    assert dataset.skipped == []
    assert [(s.id, s.labels) for s in dataset.samples] == [("a", (1, 2)), ("b", (1, 2)), ("c", ()),
                                                           ("sub__d", (1, 2))]
    assert dataset.samples[1].image_path == root / "b.png"
    assert dataset.load_mask(dataset.samples[0]) is None


def test_folder_header_split_column_one_hot_and_json(tmp_path):
    root = _folder(tmp_path)
    (root / "tags.csv").write_text("filename,tags,split\na.jpg,cat;dog,train\nb.png,dog,val\nc.jpg,,train\n")
    (root / "classes.txt").write_text("background\ncat\ndog\nbird\n")
    section = {"name": "folder", "root": str(root), "labels_file": "tags.csv", "classes_file": "classes.txt"}
    train = build_dataset(section, "train")
    assert train.class_names == ["background", "cat", "dog", "bird"]
    assert [(s.id, s.labels) for s in train.samples] == [("a", (1, 2)), ("c", ())]
    assert [s.id for s in build_dataset(section, "trainval").samples] == ["a", "b", "c"]
    (root / "onehot.csv").write_text("image,cat,dog\na.jpg,1,0\nb.png,1,1\n")
    onehot = build_dataset({"name": "folder", "root": str(root), "labels_file": "onehot.csv"}, "train")
    assert [(s.id, s.labels) for s in onehot.samples] == [("a", (1,)), ("b", (1, 2))]
    (root / "tags.json").write_text(json.dumps({"a.jpg": ["cat"], "b.png": "cat|dog", "c.jpg": []}))
    from_json = build_dataset({"name": "folder", "root": str(root), "labels_file": str(root / "tags.json")}, "all")
    assert [(s.id, s.labels) for s in from_json.samples] == [("a", (1,)), ("b", (1, 2)), ("c", ())]


def test_folder_split_lists_masks_and_duplicates(tmp_path):
    root = _folder(tmp_path)
    (root / "tags.csv").write_text("a.jpg,cat\nb.png,dog\na.jpg,dog\nc.jpg,cat\n")
    (root / "val.txt").write_text("a\nc.jpg\nzzz\n")
    (root / "masks").mkdir()
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 1:3] = 1
    save_label_png(root / "masks" / "a.png", mask)
    dataset = build_dataset({"name": "folder", "root": str(root), "labels_file": "tags.csv"}, "val")
    assert [s.id for s in dataset.samples] == ["a", "c"]
    assert dataset.samples[0].mask_path == root / "masks" / "a.png" and dataset.samples[1].mask_path is None
    np.testing.assert_array_equal(dataset.load_mask(dataset.samples[0]), mask)
    assert dataset.skipped == [f"{root / 'tags.csv'}: line 3: duplicate id 'a' (first at line 1); skipped",
                               f"{root / 'val.txt'}: line 3: id 'zzz' is not in tags.csv"]
    everything = build_dataset({"name": "folder", "root": str(root), "labels_file": "tags.csv"}, "train_aug")
    assert [s.id for s in everything.samples] == ["a", "b", "c"]     # no train_aug list: every image
