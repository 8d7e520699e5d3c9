"""The coco dataset: COCO-format instances files read to tags, class masks and instances
(polygons and RLE, crowd regions void, overlaps), tags-only files and category subsets, bad
input in one line, the demo written as COCO JSON, and the whole pipeline on it giving the native
demo's results to the last digit."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tiny_pipeline as tiny
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from affinitynet import pipeline
from affinitynet.cli import main
from affinitynet.data.datasets import (
    build_dataset,
    check_dataset,
    describe_classes,
    generate_demo,
)
from affinitynet.data.datasets.demo import coco_files
from affinitynet.errors import InputError
from affinitynet.files import read_json

# COCO 2014's 80 category ids: 1..90 with gaps.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
H, W = 16, 20


def _image(folder: Path, name: str, size=(H, W)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(folder / name)


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    if compressed:
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
    # Uncompressed (crowd regions in COCO): run lengths in column-major order, from 0s.
    flat = mask.astype(np.uint8).flatten(order="F")
    runs, value, count = [], 0, 0
    for pixel in flat:
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    runs.append(count)
    return {"size": list(mask.shape), "counts": runs}


def _box(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _dataset(root: Path, images, annotations, categories=((1, "cat"), (2, "dog"), (3, "person")),
             split: str = "train", **section) -> object:
    """Write ``annotations/instances_<split>.json`` and the images of ``images`` ({file: extra}),
    and read the split."""
    document = {"images": [{"id": i, "file_name": name, "height": H, "width": W, **extra}
                           for i, (name, extra) in enumerate(images.items(), start=1)],
                "annotations": [{"id": 100 + i, **a} for i, a in enumerate(annotations)],
                "categories": [{"id": c, "name": n, "supercategory": "x"} for c, n in categories]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    for name in images:
        _image(root / split, name)
    return build_dataset({"name": "coco", "root": str(root), **section}, split)


def test_coco_2014_category_ids_become_contiguous_classes_named_by_the_file(tmp_path):
    categories = [(i, f"class{i}") for i in reversed(COCO_IDS)]     # any order in the file
    data = _dataset(tmp_path, {"a.jpg": {}}, [{"image_id": 1, "category_id": 90, "segmentation": _rle(_box(0, 4, 0, 4))},
                                              {"image_id": 1, "category_id": 13, "segmentation": []}],
                    categories=categories)
    assert data.class_names == ["background", *(f"class{i}" for i in COCO_IDS)] and data.num_classes == 81
    assert data.samples[0].labels == (COCO_IDS.index(13) + 1, 80)
    # A tag without a mask: the image has no ground truth (its object would score as background).
    assert data.samples[0].mask_path is None and not data.has_masks


def test_masks_from_polygons_and_rle_crowd_void_overlaps(tmp_path):
    dog, other_cat = _box(6, 14, 8, 16), _box(8, 12, 0, 4)
    crowd = _box(0, 16, 14, 20)
    polygon = [2, 2, 10, 2, 10, 10, 2, 10]           # the cat's box as a polygon (x, y pairs)
    data = _dataset(tmp_path, {"a.png": {}}, [
        {"image_id": 1, "category_id": 1, "segmentation": [polygon], "iscrowd": 0},
        {"image_id": 1, "category_id": 2, "segmentation": _rle(dog)},
        {"image_id": 1, "category_id": 1, "segmentation": _rle(other_cat, compressed=False)},
        {"image_id": 1, "category_id": 3, "segmentation": _rle(crowd, compressed=False), "iscrowd": 1}])
    sample = data.samples[0]
    assert sample.labels == (1, 2, 3)                  # a crowd is a tag too
    # The same pixels as pycocotools' own reading of each annotation.
    coco = COCO(str(tmp_path / "annotations" / "instances_train.json"))
    truth = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds())]
    mask = data.load_mask(sample)
    expected = np.zeros((H, W), np.uint8)
    expected[truth[0]] = 1
    expected[truth[1] & ~truth[0]] = 2
    expected[truth[0] & truth[1]] = 255                # claimed by a cat and a dog: void
    expected[truth[2]] = 1                             # a second cat overlapping the first: cat
    expected[truth[3] & ~(truth[0] | truth[1] | truth[2])] = 255     # crowd: void where no object is
    assert np.array_equal(mask, expected)
    assert (mask == 255).any() and (mask[crowd & (mask != 2)] == 255).all()
    instances = data.load_instances(sample)
    assert [i.label for i in instances] == [1, 2, 1]    # file order, crowd left out, overlaps kept
    for instance, pixels in zip(instances, truth[:3]):
        assert np.array_equal(instance.mask, pixels)
    assert np.array_equal(truth[1], dog) and np.array_equal(truth[2], other_cat)
    report = check_dataset(data, progress=False)
    assert report.ok and report.num_masks_ok == 1


def test_images_without_annotations_are_listed_and_an_empty_tag_list_is_background(tmp_path):
    data = _dataset(tmp_path, {"a.png": {}, "empty.png": {}, "none.png": {"category_ids": []},
                               "tagged.png": {"category_ids": [2]}},
                    [{"image_id": 1, "category_id": 1, "segmentation": _rle(_box(0, 4, 0, 4))},
                     {"image_id": 4, "category_id": 2, "segmentation": _rle(_box(4, 8, 0, 4))}])
    assert data.ids == ["a", "none", "tagged"]
    assert data.untagged == [f"{tmp_path / 'train' / 'empty.png'} (image 2 of instances_train.json: no annotations)"]
    background = data.by_id("none")
    assert background.labels == () and np.array_equal(data.load_mask(background), np.zeros((H, W), np.uint8))
    assert data.load_instances(background) == []
    assert data.by_id("tagged").labels == (2,) and data.load_mask(data.by_id("tagged")).max() == 2
    assert any("have no tags and are left out" in line for line in describe_classes(data))


def test_tags_only_files_and_a_category_subset(tmp_path):
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]},
                   {"image_id": 2, "category_id": 3}]
    images = {"a.jpg": {"category_ids": [2]}, "b.jpg": {}, "c.jpg": {"category_ids": [1, 3]}}
    data = _dataset(tmp_path, images, annotations)
    assert [s.labels for s in data.samples] == [(1, 2), (3,), (1, 3)] and not data.has_masks
    assert data.load_mask(data.samples[0]) is None and data.load_instances(data.samples[0]) is None
    subset = build_dataset({"name": "coco", "root": str(tmp_path), "category_subset": ["Person", "cat"]}, "train")
    assert subset.class_names == ["background", "cat", "person"]        # in id order, spelt as the file spells them
    # 'dog' is left out as if never annotated: no tag.
    assert [s.labels for s in subset.samples] == [(1,), (2,), (1, 2)]
    with pytest.raises(InputError) as caught:
        build_dataset({"name": "coco", "root": str(tmp_path), "category_subset": ["dogs"]}, "train")
    assert str(caught.value) == (f"{tmp_path / 'annotations' / 'instances_train.json'}: dataset.category_subset names "
                                 f"'dogs', which is not a category of this file (did you mean 'dog'?)")


def test_a_subset_makes_left_out_objects_background_in_the_masks(tmp_path):
    data = _dataset(tmp_path, {"a.png": {}}, [
        {"image_id": 1, "category_id": 1, "segmentation": _rle(_box(0, 4, 0, 4))},
        {"image_id": 1, "category_id": 2, "segmentation": _rle(_box(8, 12, 8, 12))}], category_subset=["dog"])
    mask = data.load_mask(data.samples[0])
    assert data.class_names == ["background", "dog"] and data.samples[0].labels == (1,)
    assert set(np.unique(mask[:4, :4])) == {0} and set(np.unique(mask[8:12, 8:12])) == {1}


def test_unknown_category_ids_skip_their_image_with_one_line(tmp_path):
    data = _dataset(tmp_path, {"a.png": {}, "b.png": {}, "c.png": {"category_ids": [7]}},
                    [{"image_id": 1, "category_id": 99, "segmentation": _rle(_box(0, 4, 0, 4))},
                     {"image_id": 2, "category_id": 1, "segmentation": _rle(_box(0, 4, 0, 4))},
                     {"image_id": 42, "category_id": 1}])
    path = tmp_path / "annotations" / "instances_train.json"
    assert data.ids == ["b"]
    assert data.skipped == [
        f"{path}: image 1 'a.png': annotation 100: category id 99 is not in the file's categories; image skipped",
        (f"{path}: image 3 'c.png': category_ids names category id 7, which is not in the file's categories; "
         f"image skipped")]
    assert data.warnings == [f"{path}: annotation 102: image id 42 is not in the file's images; annotation left out"]


def test_polygons_outside_the_image(tmp_path):
    data = _dataset(tmp_path, {"out.png": {}, "edge.png": {}, "odd.png": {}, "size.png": {}, "text.png": {}}, [
        {"image_id": 1, "category_id": 1, "segmentation": [[25, 2, 30, 2, 30, 8]]},
        # Points a little past the edge, as labelling tools export them: clipped to the image.
        {"image_id": 2, "category_id": 1, "segmentation": [[-1.5, -1, 21, -1, 21, 17, -1.5, 17]]},
        {"image_id": 3, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5]]},
        {"image_id": 4, "category_id": 1, "segmentation": {"size": [8, 8], "counts": "abc"}},
        {"image_id": 5, "category_id": 1, "segmentation": [[1, 1, 5, "1", 5, 5]]}])
    path = tmp_path / "annotations" / "instances_train.json"
    assert data.ids == ["edge"]
    assert data.skipped == [
        (f"{path}: image 1 'out.png': annotation 100: polygon lies outside the 20x16 image (x 25..30, y 2..8); "
         f"image skipped"),
        (f"{path}: image 3 'odd.png': annotation 102: polygon has 5 coordinates (x, y pairs, at least 3 points); "
         f"image skipped"),
        f"{path}: image 4 'size.png': annotation 103: RLE size 8x8 differs from the image's 20x16; image skipped",
        f"{path}: image 5 'text.png': annotation 104: polygon is not a list of numbers; image skipped"]
    assert (data.load_mask(data.samples[0]) == 1).all()


def test_an_image_of_another_size_than_the_file_says_is_one_line_where_its_mask_is_read(tmp_path):
    data = _dataset(tmp_path, {"a.png": {}}, [{"image_id": 1, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}])
    _image(tmp_path / "train", "a.png", size=(12, 20))
    with pytest.raises(InputError) as caught:
        data.load_mask(data.samples[0])
    assert str(caught.value) == f"{tmp_path / 'train' / 'a.png'}: is 20x12 but instances_train.json gives 20x16"
    assert check_dataset(data, progress=False).problems == [str(caught.value)]


def test_a_category_named_background_and_a_file_read_once(tmp_path):
    categories = ((1, "cat"), (2, "Background"))
    with pytest.raises(InputError) as caught:
        _dataset(tmp_path, {"a.png": {}}, [{"image_id": 1, "category_id": 1}], categories=categories)
    assert str(caught.value) == (f"{tmp_path / 'annotations' / 'instances_train.json'}: category 2 is named "
                                 f"'Background', which is always class 0: rename it, or leave it out with "
                                 f"dataset.category_subset")
    section = {"name": "coco", "root": str(tmp_path), "category_subset": ["cat"]}
    first = build_dataset(section, "train")
    assert first.class_names == ["background", "cat"] and first.ids == ["a"]
    # Read again (each stage reads its splits): the same split, in a dataset of its own.
    first.samples.clear()
    assert build_dataset(section, "train").ids == ["a"]


@pytest.mark.parametrize("text, problem", [
    ('{"images": [], "categories": [', "not valid JSON (line 1 column 31: Expecting value)"),
    ('[1, 2]', "not a COCO instances file (a JSON object with 'images' and 'categories')"),
    ('{"images": []}', "'categories' must be a list (missing); not a COCO instances file"),
    (('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "cat"}], '
      '"annotations": [{"id": 5, "image_id": 1, "category_id": 1}, {"id": 6, "image_id": "1", "category_id": 1}]}'),
     "annotation 6: an annotation needs an integer 'image_id' and 'category_id'"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}]}',
     "category 1: a category needs a 'name'"),
    ('{"images": [{"file_name": "a.png"}], "categories": []}', "images[0]: an image needs an integer 'id'"),
    ('{"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], "categories": []}',
     "image 1: id 1 is used twice"),
    ('{"images": [{"id": 1, "file_name": "a.png", "height": -3, "width": 4}], "categories": []}',
     "image 1: 'height' and 'width' must be positive integers, got [-3, 4]"),
])
def test_a_malformed_file_stops_with_one_line_naming_it_and_the_entry(tmp_path, text, problem):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train").mkdir()
    path = tmp_path / "annotations" / "instances_train.json"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        build_dataset({"name": "coco", "root": str(tmp_path)}, "train")
    assert str(caught.value) == f"{path}: {problem}"


def test_split_files_and_folders_from_the_keys(tmp_path):
    _dataset(tmp_path, {"a.png": {}}, [{"image_id": 1, "category_id": 1}], split="train2014")
    _dataset(tmp_path, {"b.png": {}, "c.png": {}}, [{"image_id": 1, "category_id": 2}, {"image_id": 2, "category_id": 1}],
             split="val2014")
    assert build_dataset({"name": "coco", "root": str(tmp_path)}, "train2014").ids == ["a"]
    assert build_dataset({"name": "coco", "root": str(tmp_path)}, "val2014").ids == ["b", "c"]
    # One export for every split, its images in one folder named absolute.
    single = {"name": "coco", "root": str(tmp_path), "annotations_file": "annotations/instances_val2014.json",
              "images_dir": str(tmp_path / "val2014")}
    assert build_dataset(single, "train").ids == build_dataset(single, "val").ids == ["b", "c"]
    with pytest.raises(InputError) as caught:
        build_dataset({"name": "coco", "root": str(tmp_path)}, "test2014")
    assert str(caught.value) == (f"{tmp_path / 'annotations' / 'instances_test2014.json'}: annotations of split "
                                 f"'test2014' not found (dataset.annotations_file is 'annotations/instances_{{split}}.json')")
    (tmp_path / "annotations" / "instances_x.json").write_text("{}")
    with pytest.raises(InputError, match=r"x: images of split 'x' not found \(dataset.images_dir is '\{split\}'\)"):
        build_dataset({"name": "coco", "root": str(tmp_path)}, "x")


def test_bad_input_stops_the_cli_in_one_line_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "export"
    _dataset(root, {"a.png": {}}, [{"image_id": 1, "category_id": 1}])
    path = root / "annotations" / "instances_train.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "cat"}], '
                    '"annotations": [{"id": 9, "category_id": 1}]}')
    run_dir = tmp_path / "run"
    code = main(["run", "--dataset", "coco", "--root", str(root), "--run-dir", str(run_dir), "device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and not run_dir.exists()
    assert err == (f"affinitynet: error: {path}: annotation 9: an annotation needs an integer 'image_id' and "
                   f"'category_id'\n")
    assert main(["config", "show", "--config", "coco"]) == 0
    assert "dataset.category_subset" in capsys.readouterr().out


def test_the_demo_as_coco_reads_the_same(tmp_path, capsys):
    root = tmp_path / "demo"
    generate_demo(root, size=48, num_train=10, num_val=3, seed=1)
    assert not any(path.exists() for path in coco_files(root))
    # Asked later, the COCO files are written beside the complete set (the CLI's --coco).
    assert main(["datasets", "generate", "--coco", "--config", "demo", "--root", str(root), "dataset.demo_size=48",
                 "dataset.demo_train=10", "dataset.demo_val=3", "dataset.demo_seed=1"]) == 0
    assert "dataset.images_dir=JPEGImages" in capsys.readouterr().out
    assert all(path.is_file() for path in coco_files(root))
    section = {"root": str(root), "demo_size": 48, "demo_train": 10, "demo_val": 3, "demo_seed": 1}
    for split in ("train", "val"):
        native = build_dataset({"name": "demo", **section}, split)
        coco = build_dataset({"name": "coco", "root": str(root), "images_dir": "JPEGImages"}, split)
        assert coco.class_names == native.class_names and coco.ids == native.ids
        assert coco.skipped == coco.untagged == coco.warnings == []
        for a, b in zip(native.samples, coco.samples):
            assert (a.labels, a.image_path) == (b.labels, b.image_path)
            assert np.array_equal(native.load_mask(a), coco.load_mask(b))
            assert [(i.label, i.mask.tobytes()) for i in native.load_instances(a)] == \
                   [(i.label, i.mask.tobytes()) for i in coco.load_instances(b)]
    # Regenerated with other parameters, the old COCO files go with the old images.
    generate_demo(root, size=48, num_train=4, num_val=2, seed=1)
    assert not any(path.exists() for path in coco_files(root))


# --- the whole pipeline ---------------------------------------------------------------------------

IRN_STAGES = ("train_cam", "infer_cam", "confident_regions", "train_irn", "irn_walk", "irn_instances", "train_seg",
              "infer_seg", "evaluate_run")
# IRN, so that Table 3 is scored on the COCO file's instances too; IRNet one epoch (the tiny
# pipeline's two epochs of the other networks give Tables 1 and 2 something else than zeros).
IRN = ("labels.method=irn", "irn.epochs=1")


def _tables(output: str) -> list[str]:
    """The printed tables (Table 1, 2, 3, 5), their titles without the dataset's name."""
    lines = output.splitlines()
    found = []
    for start, line in enumerate(lines):
        if re.match(r"Table \d", line):
            end = start + 1
            while end < len(lines) and lines[end] and not lines[end].startswith(("[", "Table", "summary")):
                end += 1
            found.append("\n".join([re.sub(r" on (demo|coco) ", " on DATASET ", line), *lines[start + 1:end]]))
    return found


@pytest.mark.slow
def test_the_demo_as_coco_gives_the_native_demos_results_to_the_last_digit(tmp_path, capsys):
    data_root = tmp_path / "data"
    generate_demo(data_root, size=64, num_train=12, num_val=4, seed=0, coco=True)
    native, coco = tmp_path / "native", tmp_path / "coco"
    code, out_native, err = tiny.cli(tiny.argv("run", native, data_root, *IRN), capsys)
    assert code == 0, err[-2000:]
    code, out_coco, err = tiny.cli(tiny.argv("run", coco, data_root, *IRN, "dataset.name=coco",
                                             "dataset.images_dir=JPEGImages"), capsys)
    assert code == 0, err[-2000:]
    assert "coco 'train': 12 images" in out_coco
    # Every output file the same, byte for byte (labels, instance masks, models), and the scores.
    comparison = tiny.compare_runs(native, coco, IRN_STAGES)
    assert comparison["differences"] == [] and comparison["compared"] > 100
    a, b = read_json(native / "results.json"), read_json(coco / "results.json")
    assert (a["dataset"], b["dataset"]) == ("demo", "coco") and a["class_names"] == b["class_names"]
    assert a["rows"] == b["rows"] and {"CAM", "CAM+IRN", "Network"} <= set(a["rows"])
    assert a["rows"]["Network"]["num_images"] == 4 and a["rows"]["CAM"]["num_images"] == 12
    # Table 3 from the COCO ground truth (the empty image included).
    assert a["instances"] == b["instances"] and a["instances"]["irn_instances"]["num_images"] == 12
    tables = _tables(out_native)
    assert [table.split("\n")[0][:7] for table in tables] == ["Table 1"] * 2 + ["Table 3", "Table 2", "Table 2",
                                                                             "Table 5"]
    assert tables == _tables(out_coco)
    (tmp_path / "tables.txt").write_text("\n\n".join(tables) + "\n")
    (tmp_path / "stages.txt").write_text("\n".join(line for line in (out_native + out_coco).splitlines()
                                                   if line.startswith("[")) + "\n")
    state = pipeline.stage("irn_instances").marker(coco)
    assert read_json(state)["map_r"] == read_json(pipeline.stage("irn_instances").marker(native))["map_r"]
