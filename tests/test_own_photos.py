"""A user's own tagged photos: tags matched whatever their case, typos reported with "did you mean",
untagged images listed, too many skipped images stop the run, size-dependent settings chosen from
the photos, label coverage measured without ground truth (and shown in the report), outputs
readable by others (the umask), and every config key explained."""
from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import tiny_pipeline as tiny
from PIL import Image

from affinitynet.config import DEFAULTS, KEY_HELP, flatten, load_config
from affinitynet.data.datasets import build_dataset, check_skipped_share, describe_classes, generate_demo
from affinitynet.data.datasets.base import Sample, SegmentationDataset
from affinitynet.data.label_coverage import label_coverage
from affinitynet.errors import InputError
from affinitynet.files import save_label_png, write_bytes


def photos(root: Path, names, size=(40, 60)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    return root


def folder(root: Path, tags: str, classes: str | None = None):
    (root / "tags.csv").write_text(tags)
    section = {"name": "folder", "root": str(root), "labels_file": "tags.csv"}
    if classes is not None:
        (root / "classes.txt").write_text(classes)
        section["classes_file"] = "classes.txt"
    return build_dataset(section, "train")


TAGS = ("image,tags\na.jpg,Flower\nb.jpg,flower\nc.jpg, FLOWER ;SIGN\nd.jpg,sign\ne.jpg,flwer\nf.jpg,flower\n"
        "g.jpg,Sign\n")


def test_tags_match_whatever_their_case_and_spaces(tmp_path):
    root = photos(tmp_path / "p", [f"{c}.jpg" for c in "abcdefg"])
    data = folder(root, TAGS)
    # Flower/flower/FLOWER are one class, SIGN/sign/Sign another; the typo is a class of its own, reported.
    assert data.class_names == ["background", "flower", "flwer", "sign"]
    assert {s.id: s.labels for s in data.samples} == {"a": (1,), "b": (1,), "c": (1, 3), "d": (3,), "e": (2,),
                                                      "f": (1,), "g": (3,)}
    assert data.warnings == ["class 'flwer' (1 image) is close to 'flower' (4 images): did you mean 'flower'? Fix "
                             "the tag, or list the classes in dataset.classes_file so that unknown tags are refused"]
    # With a class list, case-mismatched tags are accepted and the typo is refused with a hint.
    data = folder(root, TAGS, classes="Flower\nsign\n")
    assert data.class_names == ["background", "Flower", "sign"] and len(data) == 6
    assert data.skipped == [f"{root / 'tags.csv'}: line 6: tag 'flwer' of 'e.jpg' is not in the class list "
                            f"(did you mean 'Flower'?); image skipped"]
    # Short different words are not typos of each other.
    data = folder(root, "a.jpg,cat\nb.jpg,car\nc.jpg,cat\n")
    assert data.class_names == ["background", "car", "cat"] and data.warnings == []


def test_the_class_list_counts_warnings_and_untagged_images_are_printed(tmp_path):
    root = photos(tmp_path / "p", [f"{c}.jpg" for c in "abcdefg"] + ["x.jpg", "sub/y.png", ".hidden/z.jpg",
                                                                     "masks/a.png", "runs/r/infer_cam/labels/a.png"])
    (root / "runs" / "r" / "config.yaml").write_text("run_dir: runs/r\n")
    data = folder(root, TAGS)
    assert data.untagged == [str(root / "x.jpg"), str(root / "sub" / "y.png")]
    lines = describe_classes(data)
    assert lines[0] == "folder 'train': 7 images, 3 object classes (images tagged): flower 4, flwer 1, sign 3"
    assert lines[1] == ("warning: fewer than 5 images for 'flower' (4), 'flwer' (1), 'sign' (3): too few to learn "
                        "a class from; tag more images or merge the class")
    assert lines[2].startswith("warning: class 'flwer'")
    assert lines[3:] == ["2 images beside the tags file have no tags and are left out:",
                         f"  {root / 'x.jpg'}", f"  {root / 'sub' / 'y.png'}"]


def test_skipping_more_than_the_allowed_share_stops_the_run(tmp_path, capsys):
    root = photos(tmp_path / "p", [f"{i}.jpg" for i in range(10)])
    tags = "".join(f"{i}.jpg,{'Cat' if i < 7 else 'catt'}\n" for i in range(10))
    data = folder(root, tags, classes="cat\n")
    assert len(data) == 7 and len(data.skipped) == 3
    with pytest.raises(InputError) as caught:
        check_skipped_share(data, 0.1)
    message = str(caught.value)
    assert message.startswith(f"{root}: 3 of 10 images (30%) would be left out of split 'train', more than "
                              f"dataset.max_skipped (10%); first: {root / 'tags.csv'}: line 8: tag 'catt' of '7.jpg' "
                              f"is not in the class list (did you mean 'cat'?); image skipped.")
    assert message.endswith("allow it with dataset.max_skipped=0.35")
    check_skipped_share(data, 0.35)
    run_dir = tmp_path / "run"
    code, out, err = tiny.cli(["run", "--dataset", "folder", "--root", str(root), "dataset.labels_file=tags.csv",
                               "dataset.classes_file=classes.txt", "--run-dir", str(run_dir)], capsys)
    assert code == 2 and "would be left out" in err and len(err.strip().splitlines()) == 1
    assert out.startswith("auto settings for 60x40 images") and "folder 'train': 7 images, 1 object class" in out
    assert not run_dir.exists()


def test_size_rules_give_the_msrc21_and_demo_settings():
    from affinitynet.config import AUTO_KEYS
    from affinitynet.pipeline.size_rules import rules

    msrc = load_config("msrc21", check=False)
    for key, value in rules(213, 320).items():     # MSRC-21's photos: 320x213
        section, name = key.split(".")
        assert value == msrc[section][name], key
    demo = rules(128, 128)
    assert demo["cam.scales"] == [2.0] and demo["random_walk.t"] == 16 and demo["cam.crop_size"] == 128
    voc = rules(375, 500)
    assert voc["cam.scales"] == [0.5, 1.0, 1.5, 2.0] and voc["random_walk.t"] == 256
    assert voc["segmentation.scales"] == [0.5, 0.75, 1.0, 1.25, 1.5]
    # The keys the config lets be 'auto' are exactly those the rules set.
    assert sorted(voc) == sorted(AUTO_KEYS)


def test_label_coverage_counts_pixels_and_vanished_tags(tmp_path):
    names = ["background", "cat", "book"]
    samples = [Sample("a", tmp_path / "a.jpg", (1,)), Sample("b", tmp_path / "b.jpg", (1, 2)),
               Sample("c", tmp_path / "c.jpg", (2,)), Sample("d", tmp_path / "d.jpg", (1,))]
    data = SegmentationDataset("folder", tmp_path, "train", names, samples)
    labels = {"a": np.array([[0, 1], [1, 255]]), "b": np.array([[1, 1], [1, 0]]), "c": np.array([[0, 0], [255, 255]])}
    for key, label in labels.items():
        save_label_png(tmp_path / "labels" / f"{key}.png", label.astype(np.uint8))
    coverage = label_coverage(data, tmp_path / "labels")
    # a slow count: 9 labelled pixels, 3 background, 6 cat, 0 book
    assert coverage["images"] == 3
    assert coverage["pixel_percent"] == pytest.approx({"background": 100 * 4 / 9, "cat": 100 * 5 / 9, "book": 0.0})
    assert coverage["vanished"] == [{"id": "b", "classes": ["book"]}, {"id": "c", "classes": ["book"]}]
    assert coverage["worst"]["cat"] == [["a", pytest.approx(200 / 3, abs=1e-3)], ["b", 75.0]]
    assert coverage["worst"]["book"] == [["b", 0.0], ["c", 0.0]]


def test_a_run_on_photos_without_masks_reports_what_failed(tmp_path, capsys, monkeypatch):
    """The whole tiny pipeline on a folder of photos with tags and no masks: the class list before
    training, a summary line at the end, and a report that shows the label coverage honestly."""
    monkeypatch.chdir(tmp_path)
    demo = generate_demo(tmp_path / "demo", size=64, num_train=12, num_val=4)
    train = build_dataset({"name": "demo", "root": str(demo), "demo_size": 64, "demo_train": 12, "demo_val": 4},
                          "train", progress=False)
    root = tmp_path / "my photos"
    root.mkdir()
    rows = ["filename,tags"]
    for sample in train.samples:
        shutil.copy(sample.image_path, root / sample.image_path.name)
        rows.append(f"{sample.image_path.name},{';'.join(train.class_names[c].upper() for c in sample.labels)}")
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "runs" / "mine"
    overrides = [o for o in tiny.TINY if not o.startswith("dataset.")]
    code, out, err = tiny.cli(["run", "--dataset", "folder", "--root", str(root), "dataset.labels_file=tags.csv",
                               "--run-dir", str(run_dir), *overrides], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "auto settings for 64x64 images (the median of folder 'train'): random_walk.t 4"
    tagged = np.bincount([c for s in train.samples for c in s.labels], minlength=6)
    counts = ", ".join(f"{name.upper()} {tagged[train.class_names.index(name)]}"
                       for name in sorted(train.class_names[1:]))
    assert lines[1] == f"folder 'train': 12 images, 5 object classes (images tagged): {counts}"
    summary = [line for line in lines if line.startswith("summary: ")]
    assert len(summary) == 1 and "no ground truth, so no mIoU" in summary[0]
    assert "the evaluation images are the training images" in summary[0]
    assert re.search(r"tagged class missing from \d+ of 12 pseudo labels and \d+ of 12 predictions", summary[0])

    from affinitynet.report import write_report

    page = write_report(run_dir).read_text()
    assert "No results.json" not in page and 'id="no-ground-truth"' in page and 'id="eval-is-train"' in page
    for name in train.class_names[1:]:
        assert f'<tr data-class="{name.upper()}">' in page
    # The gallery shows every class: each tagged class has at least one row whose image carries it.
    gallery = re.findall(r'<tr data-id="([^"]+)">', page.split('id="gallery-label"')[1].split("</table>")[0])
    shown = {c for sample in train.samples if sample.id in gallery for c in sample.labels}
    assert shown == set(range(1, 6)), gallery


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_bytes(tmp_path / "out.png", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.png").stat().st_mode) == 0o666 & ~mask


def test_every_config_key_is_explained(capsys):
    assert set(KEY_HELP) == set(flatten(DEFAULTS))
    code, out, err = tiny.cli(["config", "show"], capsys)
    assert code == 0
    rows = out.splitlines()[1:]
    assert [row.split(" = ")[0].strip() for row in rows] == list(flatten(DEFAULTS))
    assert any(row.startswith("random_walk.beta") and "8.0" in row and "Hadamard power" in row for row in rows)
    code, out, err = tiny.cli(["config", "show", "--config", "folder"], capsys)
    assert re.search(r"^random_walk\.t +=\s+auto ", out, re.M)


def test_run_procs_on_gpus_leaves_the_auto_settings_to_its_processes(tmp_path, monkeypatch, capsys):
    """On GPUs ``run --procs N`` launches the whole command; the processes resolve and print the
    ``auto`` keys, so the launching process does not print them first."""
    import torch

    from affinitynet import cli
    from affinitynet.engine import distributed, training

    root = photos(tmp_path / "p", [f"{i}.jpg" for i in range(3)])
    (root / "tags.csv").write_text("".join(f"{i}.jpg,cat\n" for i in range(3)))
    launched = []
    for module in (training, cli):
        monkeypatch.setattr(module, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(distributed, "launch", lambda procs, argv: launched.append((procs, list(argv))) or 0)
    args = ["run", "--dataset", "folder", "--root", str(root), "dataset.labels_file=tags.csv",
            "--run-dir", str(tmp_path / "run"), "--procs", "2"]
    code, out, err = tiny.cli(args, capsys)
    assert code == 0, err
    assert launched == [(2, args)] and "auto settings" not in out and out.strip() == ""
    # A config that does not load is refused before any launch, in the config's own words.
    code, out, err = tiny.cli([*args, "device=gpu"], capsys)
    assert code == 2 and launched == [(2, args)]
    assert err.strip().splitlines() == ["affinitynet: error: config key 'device' must be 'auto', 'cpu', 'cuda' or "
                                        "'cuda:N', got 'gpu'"]
