"""Bad input: every problem is one line "<file>: <problem>", and a split is read past it."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from affinitynet.data.datasets import build_dataset, check_dataset
from affinitynet.errors import InputError
from affinitynet.files import load_image, save_label_png


def assert_one_line(message: str, path) -> None:
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and len(message) > len(f"{path}: ")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- single images ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zero", "truncated", "junk", "missing", "directory"])
def test_unreadable_images_give_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "photo.png"
    good = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)))
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "junk":
        path.write_bytes(b"this is not an image at all\n" * 10)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(InputError) as caught:
        load_image(path)
    assert_one_line(str(caught.value), path)


def test_image_modes_load_as_rgb_uint8_with_the_right_values(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=2))

    cmyk = np.zeros((3, 4, 4), np.uint8)
    cmyk[..., 0], cmyk[..., 1], cmyk[..., 2] = 10, 100, 200        # no black ink: RGB = 255 - CMY
    Image.frombytes("CMYK", (4, 3), cmyk.tobytes()).save(tmp_path / "cmyk.tif")
    rgb = load_image(tmp_path / "cmyk.tif")
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 4, 3)
    np.testing.assert_array_equal(rgb[0, 0], [245, 155, 55])

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., :3] = (30, 60, 90)
    rgba[..., 3] = 0                                                 # transparent: colour kept, alpha dropped
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), np.broadcast_to([30, 60, 90], (3, 4, 3)))

    wide = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "deep.png")            # 16-bit grey
    loaded = load_image(tmp_path / "deep.png")
    assert loaded.dtype == np.uint8 and loaded.shape == (3, 4, 3)
    np.testing.assert_array_equal(loaded[..., 0], np.round(wide / 65535 * 255).astype(np.uint8))

    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png"),
                                  [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 255, 0]]])


# --- a split with every kind of bad entry -----------------------------------------------------------

@pytest.fixture()
def messy(tmp_path):
    """A folder dataset: three good images, broken ones, bad masks, and bad lines in its CSV."""
    root = tmp_path / "data"
    (root / "masks").mkdir(parents=True)
    rgb = np.full((6, 8, 3), 120, np.uint8)
    for name in ("good1", "good2", "wrongsize", "outofrange"):
        Image.fromarray(rgb).save(root / f"{name}.png")
    (root / "zero.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(_png_bytes(Image.fromarray(rgb))[:40])
    (root / "junk.png").write_bytes(b"GIF89a but not really")
    (tmp_path / "outside.png").write_bytes(_png_bytes(Image.fromarray(rgb)))
    good_mask = np.zeros((6, 8), np.uint8)
    good_mask[2:4, 2:4] = 1
    save_label_png(root / "masks" / "good1.png", good_mask)
    save_label_png(root / "masks" / "wrongsize.png", np.zeros((5, 8), np.uint8))
    bad_values = good_mask.copy()
    bad_values[0, 0] = 7
    save_label_png(root / "masks" / "outofrange.png", bad_values)
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "tags.csv").write_text(
        "good1.png,cat\n"              # 1
        "zero.png,dog\n"               # 2
        "truncated.png,cat\n"          # 3
        "junk.png,\n"                  # 4
        "ghost.png,cat\n"              # 5: no such file
        "good2.png,cat;zebra\n"        # 6: tag not in the class list
        "../outside.png,cat\n"         # 7: escapes the root
        "/etc/hostname,cat\n"          # 8: absolute
        "wrongsize.png,\n"             # 9
        "outofrange.png,cat\n")        # 10
    return root


def test_reading_the_split_skips_bad_entries_with_one_line_each(messy):
    dataset = build_dataset({"name": "folder", "root": str(messy), "labels_file": "tags.csv",
                             "classes_file": "classes.txt"}, "train")
    assert [s.id for s in dataset.samples] == ["good1", "zero", "truncated", "junk", "wrongsize", "outofrange"]
    csv_path = messy / "tags.csv"
    assert dataset.skipped == [
        f"{messy / 'ghost.png'}: image file not found (named at tags.csv line 5)",
        f"{csv_path}: line 6: tag 'zebra' of 'good2.png' is not in the class list; image skipped",
        f"{csv_path}: line 7: path '../outside.png' escapes the dataset root",
        f"{csv_path}: line 8: absolute path '/etc/hostname' refused (paths must be relative to the dataset root)",
    ]
    for line, path in zip(dataset.skipped, [messy / "ghost.png", csv_path, csv_path, csv_path]):
        assert_one_line(line, path)


def test_loading_finds_broken_files_and_check_reports_them_all(messy):
    dataset = build_dataset({"name": "folder", "root": str(messy), "labels_file": "tags.csv",
                             "classes_file": "classes.txt"}, "train")
    with pytest.raises(InputError) as caught:
        dataset.load_image(dataset.by_id("truncated"))
    assert_one_line(str(caught.value), messy / "truncated.png")
    with pytest.raises(InputError) as caught:
        dataset.load_mask(dataset.by_id("wrongsize"))
    assert str(caught.value) == f"{messy / 'masks' / 'wrongsize.png'}: mask size 8x5 differs from its image 8x6"
    with pytest.raises(InputError) as caught:
        dataset.load_mask(dataset.by_id("outofrange"))
    assert str(caught.value) == f"{messy / 'masks' / 'outofrange.png'}: mask value 7 out of range (0..2 or 255)"

    report = check_dataset(dataset, progress=False)
    assert report.num_listed == 6 and report.num_images_ok == 3
    assert report.num_masks == 3 and report.num_masks_ok == 1
    assert report.skipped == dataset.skipped and report["skipped"] == dataset.skipped
    problems = report.problems
    assert report.get("problems") == problems
    assert [p.split(": ", 1)[0] for p in problems] == [
        str(messy / "zero.png"), str(messy / "truncated.png"), str(messy / "junk.png"),
        str(messy / "masks" / "wrongsize.png"), str(messy / "masks" / "outofrange.png")]
    assert problems[0] == f"{messy / 'zero.png'}: empty file (0 bytes)"
    assert all("\n" not in p for p in report.problems)
    assert report.images_per_class == {"cat": 3, "dog": 1}
    assert not report.ok and "5 problems:" in report.format() and "4 skipped:" in report.format()


def test_split_lists_with_missing_and_escaping_ids(tmp_path):
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "JPEGImages" / "ok.jpg")
    (root / "Annotations" / "ok.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    list_path = root / "ImageSets" / "Segmentation" / "train.txt"
    list_path.write_bytes(b"\xef\xbb\xbfok\r\nnothere\r\n../../etc/passwd\r\n\r\n")
    dataset = build_dataset({"name": "voc12", "root": str(root)}, "train")
    assert [s.id for s in dataset.samples] == ["ok"] and dataset.samples[0].labels == (8,)
    assert dataset.skipped == [
        f"{root / 'JPEGImages' / 'nothere.jpg'}: image file not found (listed at train.txt line 2)",
        f"{list_path}: line 3: path '../../etc/passwd' escapes the dataset root",
    ]


def test_broken_labels_or_class_files_stop_with_one_line(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "tags.json").write_text("{not json")
    with pytest.raises(InputError) as caught:
        build_dataset({"name": "folder", "root": str(root), "labels_file": "tags.json"}, "train")
    assert_one_line(str(caught.value), root / "tags.json")
    with pytest.raises(InputError) as caught:
        build_dataset({"name": "folder", "root": str(root), "labels_file": "absent.csv"}, "train")
    # Named as written, not under the root twice (my_photos/my_photos/tags.csv).
    assert str(caught.value) == f"absent.csv: labels file not found (looked in the working directory and in dataset.root {root})"
    (root / "tags.csv").write_bytes(b"a.png,\xff\xfe\n")
    with pytest.raises(InputError) as caught:
        build_dataset({"name": "folder", "root": str(root), "labels_file": "tags.csv"}, "train")
    assert str(caught.value).startswith(f"{root / 'tags.csv'}: not UTF-8 text")
    (root / "tags.csv").write_text("a.png,cat\n")
    (root / "classes.txt").write_text("cat\ncat\n")
    with pytest.raises(InputError, match="listed twice"):
        build_dataset({"name": "folder", "root": str(root), "labels_file": "tags.csv",
                       "classes_file": "classes.txt"}, "train")
