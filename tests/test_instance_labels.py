"""IRN's instance pseudo labels (``instance_labels``): the seeds, the split of the semantic labels
among the instances against a slow reference written from the definition, the files (VOC index
PNG + JSON, COCO RLE read back by pycocotools) and the datasets' instance ground truth."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from affinitynet.data.datasets import build_dataset
from affinitynet.data.datasets.coco import coco_document, rle
from affinitynet.data.datasets.demo import build_demo, instance_mask, render
from affinitynet.errors import InputError
from affinitynet.files import VOC_PALETTE, save_label_png
from affinitynet.metrics import Instance
from affinitynet.ops.instance_labels import (
    FRAGMENT_SHARE,
    instance_seeds,
    load_instances,
    object_map,
    save_instances,
    split_instances,
)


def test_seeds_are_each_class_map_on_each_instance_and_a_class_no_instance_sees_is_whole():
    ids = np.array([[1, 1, 0, 2],
                    [1, 0, 0, 2]])
    cams = np.array([[[0.5, 0.0, 0.1, 0.9], [0.2, 0.3, 0.0, 0.4]],     # class 3: on instances 1 and 2
                     [[0.0, 0.0, 0.7, 0.0], [0.0, 0.6, 0.2, 0.0]]],    # class 5: only where no instance is
                    dtype=np.float32)
    seeds, owners = instance_seeds(cams, [3, 5], ids)
    assert owners == [3, 3, 5]
    np.testing.assert_array_equal(seeds[0], np.float32([[0.5, 0.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(seeds[1], np.float32([[0.0, 0.0, 0.0, 0.9], [0.0, 0.0, 0.0, 0.4]]))
    np.testing.assert_array_equal(seeds[2], cams[1])
    # An instance where the class's map is zero gives no seed of that class.
    zero_on_2 = cams.copy()
    zero_on_2[0][:, 3] = 0
    assert instance_seeds(zero_on_2, [3, 5], ids)[1] == [3, 5]


def reference_split(semantic, walked, owners, share):
    """The definition, pixel by pixel: each object pixel to the largest walked seed of its class
    (the first on ties), parts by flood fill over 4-neighbours, score = part's max / image's max,
    0 below the share of the image."""
    h, w = semantic.shape
    assignment = {}
    for y in range(h):
        for x in range(w):
            c = int(semantic[y, x])
            if c in (0, 255):
                continue
            rows = [s for s in range(len(owners)) if owners[s] == c]
            best = max(rows, key=lambda s: (walked[s, y, x], -s))
            assignment[(y, x)] = (c, best)
    seen, parts = set(), []
    for start in sorted(assignment):
        if start in seen:
            continue
        key, stack, part = assignment[start], [start], []
        seen.add(start)
        while stack:
            y, x = stack.pop()
            part.append((y, x))
            for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if n in assignment and n not in seen and assignment[n] == key:
                    seen.add(n)
                    stack.append(n)
        mask = np.zeros((h, w), dtype=bool)
        for p in part:
            mask[p] = True
        score = 0.0 if len(part) < share * h * w else float(walked[key[1]][mask].max() / walked.max())
        parts.append((key[0], mask, score))
    return parts


def test_split_matches_the_pixelwise_reference_on_random_maps():
    rng = np.random.default_rng(3)
    for trial in range(20):
        h, w = 9, 11
        semantic = rng.choice([0, 2, 4, 255], size=(h, w), p=[0.3, 0.3, 0.3, 0.1]).astype(np.uint8)
        owners = [2, 2, 4, 2, 4]
        walked = rng.random((len(owners), h, w))
        walked[rng.random(walked.shape) < 0.2] = 0.5          # ties, resolved to the first seed
        share = [0.0, 0.03][trial % 2]
        got = split_instances(semantic, walked, owners, fragment_share=share)
        want = reference_split(semantic, walked, owners, share)
        assert len(got) == len(want)
        key = lambda item: item[1].tobytes()                  # noqa: E731
        for (label, mask, score), inst in zip(sorted(want, key=key),
                                              sorted(((i.label, i.mask, i.score) for i in got), key=key)):
            assert inst[0] == label and np.array_equal(inst[1], mask) and inst[2] == pytest.approx(score)
        assert [i.score for i in got] == sorted((i.score for i in got), reverse=True)


def test_split_without_seeds_of_a_class_keeps_its_parts_at_score_zero():
    semantic = np.array([[1, 0, 1], [1, 0, 0]], dtype=np.uint8)
    found = split_instances(semantic, np.zeros((0, 2, 3)), [])
    assert [(i.label, i.score, int(i.mask.sum())) for i in found] == [(1, 0.0, 2), (1, 0.0, 1)]
    assert FRAGMENT_SHARE == 0.01


def test_object_map_and_files_round_trip(tmp_path):
    a = np.zeros((4, 5), dtype=bool)
    a[:2, :2] = True
    b = np.zeros((4, 5), dtype=bool)
    b[3, 1:] = True
    void = np.zeros((4, 5), dtype=bool)
    void[0, 4] = True
    instances = [Instance(7, a, 0.9), Instance(2, b, 0.25)]
    objects = object_map(instances, (4, 5), void)
    assert objects[0, 0] == 1 and objects[3, 2] == 2 and objects[0, 4] == 255 and objects[2, 2] == 0
    with pytest.raises(ValueError, match="overlap"):
        object_map([Instance(1, a), Instance(1, a)], (4, 5))
    save_instances(tmp_path / "x.png", tmp_path / "x.json", instances, (4, 5), void)
    png = Image.open(tmp_path / "x.png")
    assert png.mode == "P" and png.getpalette()[3:6] == VOC_PALETTE[1].tolist()
    back, shape = load_instances(tmp_path / "x.png", tmp_path / "x.json")
    assert shape == (4, 5)
    assert [(i.label, i.score) for i in back] == [(7, 0.9), (2, 0.25)]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(back, instances))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InputError, match="x.json"):
        load_instances(tmp_path / "x.png", tmp_path / "x.json")


def test_coco_rle_and_document_read_back_by_pycocotools(tmp_path):
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO

    rng = np.random.default_rng(0)
    masks = [rng.random((6, 7)) < 0.4 for _ in range(3)]
    for mask in masks:
        encoded = rle(mask)
        assert encoded["size"] == [6, 7] and isinstance(encoded["counts"], str)
        decoded = coco_mask.decode({"size": encoded["size"], "counts": encoded["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask)
    images = [("a", "a.jpg", (6, 7), [Instance(1, masks[0], 0.5), Instance(3, masks[1], 0.1)]),
              ("b", "b.jpg", (6, 7), []), ("c", "c.jpg", (6, 7), [Instance(2, masks[2], 1.0)])]
    document = coco_document(images, ["background", "cat", "dog", "sheep"])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(document))
    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog", "sheep"]
    assert coco.getImgIds() == [1, 2, 3] and coco.getAnnIds(imgIds=[2]) == []
    expected = [(1, masks[0]), (1, masks[1]), (3, masks[2])]
    for annotation, (image_id, mask) in zip(coco.loadAnns(coco.getAnnIds()), expected):
        assert annotation["image_id"] == image_id
        assert np.array_equal(coco.annToMask(annotation).astype(bool), mask)
        ys, xs = np.nonzero(mask)
        assert annotation["area"] == mask.sum()
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_demo_writes_its_objects_as_voc_instances(tmp_path):
    data = build_demo(tmp_path / "demo", "train", size=64, num_train=8, num_val=2, progress=False)
    assert data.has_instances
    counted = 0
    for index, sample in enumerate(data.samples):
        _, mask, present = render(0, "train", index, 64)
        objects = instance_mask(0, "train", index, 64)
        truth = data.load_instances(sample)
        # One object per class here (the demo's images hold distinct classes), each a whole body.
        assert sorted(inst.label for inst in truth) == present
        for inst in truth:
            assert np.array_equal(inst.mask, mask == inst.label)
        assert np.array_equal(np.asarray(Image.open(sample.instance_path)), objects)
        counted += len(truth)
    assert counted > 0


def test_voc_reads_segmentation_object_and_refuses_an_object_without_class(tmp_path):
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    classes = np.zeros((6, 8), dtype=np.uint8)
    classes[1:3, 1:3] = 15                     # person
    classes[1:3, 5:7] = 15
    classes[4:6, 0:8] = 7                      # car
    classes[3, :] = 255
    objects = np.zeros_like(classes)
    objects[1:3, 1:3], objects[1:3, 5:7], objects[4:6, :] = 1, 2, 3
    objects[3, :] = 255
    for sample_id in ("2007_000001", "2007_000002"):
        Image.fromarray(np.full((6, 8, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{sample_id}.jpg")
        save_label_png(root / "SegmentationClass" / f"{sample_id}.png", classes)
    save_label_png(root / "SegmentationObject" / "2007_000001.png", objects)
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n")
    data = build_dataset({"name": "voc12", "root": str(root)}, "train")
    first, second = data.samples
    assert second.instance_path is None and data.load_instances(second) is None
    truth = data.load_instances(first)
    assert [inst.label for inst in truth] == [15, 15, 7]
    assert [int(inst.mask.sum()) for inst in truth] == [4, 4, 16]
    objects[0, 0] = 4                          # an object on background
    save_label_png(root / "SegmentationObject" / "2007_000001.png", objects)
    with pytest.raises(InputError, match="SegmentationObject.*object 4 has no object class"):
        data.load_instances(first)
