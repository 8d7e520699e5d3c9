"""``affinitynet report``: the HTML page, its pictures and tables, on a run directory written by hand
(no network is trained: every stage's files are faked in their real formats)."""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affinitynet.config import load_config, save_resolved
from affinitynet.data.datasets import build_dataset, generate_demo
from affinitynet.errors import InputError
from affinitynet.files import save_label_png, save_npz, save_rgb_png, write_json, write_text
from affinitynet.metrics import Instance
from affinitynet.ops.instance_labels import save_instances
from affinitynet.report import write_report

SIZE = 64
CLASSES = ["background", "stripe_tag", "checker_tag", "dot_tag", "bullseye_tag", "cross_tag"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("data") / "demo", size=SIZE, num_train=4, num_val=3)


def _config(run_dir: Path, root: str, *extra: str) -> dict:
    return load_config("demo", [f"run_dir={run_dir}", f"dataset.root={root}", f"dataset.demo_size={SIZE}",
                                "dataset.demo_train=4", "dataset.demo_val=3", *extra])


def _iou(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {name: float(rng.uniform(0, 100)) for name in CLASSES}


def make_run(run_dir: Path, demo_root: Path, config_root: str | None = None, method: str = "affinitynet") -> dict:
    """A complete run in the formats the stages write; returns results.json's content. ``method``
    ``irn``: IRN's stages instead of AffinityNet's, with instance labels (two of one class)."""
    extra = (f"labels.method={method}",)
    if config_root is None:
        config = _config(run_dir, str(demo_root), *extra)
    else:       # as saved by a run started in run_dir's grandparent
        config = _config(Path(run_dir.parent.name) / run_dir.name, config_root, *extra)
    walk = "irn_walk" if method == "irn" else "random_walk"
    save_resolved(config, run_dir / "config.yaml")
    train = build_dataset(config["dataset"] | {"root": str(demo_root)}, "train", progress=False)
    val = build_dataset(config["dataset"] | {"root": str(demo_root)}, "val", progress=False)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for sample in train.samples:
        classes = np.array(sample.labels, dtype=np.int16)
        cams = np.stack([np.exp(-((xx - rng.uniform()) ** 2 + (yy - rng.uniform()) ** 2) * 8) for _ in classes])
        save_npz(run_dir / "infer_cam" / "cams" / f"{sample.id}.npz", classes=classes, cams=cams.astype(np.float16))
        label = np.where(cams.max(0) > 0.5, classes[cams.argmax(0)], 0).astype(np.uint8)
        save_label_png(run_dir / "infer_cam" / "labels" / f"{sample.id}.png", label)
        confident = label.copy()
        confident[(cams.max(0) > 0.3) & (cams.max(0) < 0.6)] = 255
        save_label_png(run_dir / "confident_regions" / "labels" / f"{sample.id}.png", confident)
        save_rgb_png(run_dir / walk / "boundaries" / f"{sample.id}.png",
                     rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
        save_label_png(run_dir / walk / "rw_labels" / f"{sample.id}.png", label)
        save_label_png(run_dir / walk / "pseudo_labels" / f"{sample.id}.png", label)
        if method == "irn":     # the first class's region split in two instances, the others one each
            found = []
            for k, cls in enumerate(classes):
                region = label == cls
                halves = (region & (xx < 0.5), region & (xx >= 0.5)) if k == 0 else (region,)
                for half in halves:
                    if half.any():
                        found.append(Instance(int(cls), half, 0.9 - 0.1 * len(found)))
            save_instances(run_dir / "irn_instances" / "SegmentationObject" / f"{sample.id}.png",
                           run_dir / "irn_instances" / "detections" / f"{sample.id}.json", found, label.shape)
    for sample in val.samples:
        save_label_png(run_dir / "infer_seg" / "predictions" / f"{sample.id}.png",
                       rng.integers(0, len(CLASSES), (SIZE, SIZE), dtype=np.uint8))
    for stage, extra in (("train_cam", ""), ("train_affinity", ",pos_fg,pos_bg,neg,num_pos_fg"),
                         ("train_seg", ",pixel_accuracy")):
        parts = extra.count(",")
        lines = [f"epoch,lr,loss{extra},seconds"]
        for epoch in (1, 2, 3):
            values = ",".join(f"{1.0 / epoch + i * 0.1:.4g}" for i in range(parts))
            lines.append(f"{epoch},{0.01 / epoch:.4g},{2.0 / epoch:.4g}{',' if parts else ''}{values},12.5")
        write_text(run_dir / stage / "log.csv", "\n".join(lines) + "\n")
    rows = {"CAM": {"split": "train", "miou": 48.25, "iou": _iou(1), "num_images": 4},
            "CAM+RW": {"split": "train", "miou": 55.55, "iou": _iou(2), "num_images": 4},
            "CAM+RW+dCRF": {"split": "train", "miou": 58.749, "iou": _iou(3), "num_images": 4},
            "Network": {"split": "val", "miou": 61.66, "iou": _iou(4), "num_images": 3}}
    del rows["Network"]["iou"]["dot_tag"]       # a class absent from a split has no IoU
    stages = ("train_cam", "infer_cam", "confident_regions", "train_affinity", "random_walk", "train_seg",
              "infer_seg", "evaluate_run")
    if method == "irn":
        stages = stages[:3] + ("train_irn", "irn_walk", "irn_instances") + stages[5:]
    for stage in stages:
        state = {"stage": stage, "hash": "0" * 16, "complete": True, "seconds": 3725.5, "images": 4,
                 "reused": 1, "skipped": []}
        if stage == "infer_seg":
            state["skipped"] = ["data/x.png: truncated or damaged image <b>"]
        if stage == walk:
            state["table1"] = {t: {"miou": r["miou"], "iou": r["iou"]} for t, r in rows.items() if t != "Network"}
        write_json(run_dir / stage / "_stage.json", state)
    results = {"run_dir": str(run_dir), "dataset": "demo", "backbone": "mobilenetv2", "class_names": CLASSES,
               "rows": rows, "stages": {s: {"seconds": 1.0, "images": 4, "skipped": 0} for s in stages}}
    write_json(run_dir / "results.json", results)
    save_rgb_png(run_dir / "sweep" / "fig8.png", np.full((20, 30, 3), 200, np.uint8))
    return results


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.cells: dict[tuple[str, str, str], str] = {}
        self.ids: set[str] = set()
        self._cell: tuple[str, str, str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])
        if tag == "td" and "data-table" in attrs:
            self._cell = (attrs["data-table"], attrs["data-row"], attrs["data-class"])
            self.cells[self._cell] = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self.cells[self._cell] += data


def _parse(path: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_report_pictures_and_tables(tmp_path, demo_root):
    run_dir = tmp_path / "run"
    results = make_run(run_dir, demo_root)
    index = write_report(run_dir, gallery_size=3)
    assert index == run_dir / "report" / "index.html"
    text = index.read_text(encoding="utf-8")
    page = _parse(index)

    # Self-contained: every link is a file inside report/ (or an anchor), nothing from the web.
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    assert "@import" not in text and "url(" not in text
    for link in page.links:
        if not link.startswith("#"):
            assert not link.startswith("/") and ".." not in link, link
    # Every picture is a PNG on disk next to the page, and every PNG there is shown.
    assert len(page.images) >= 3 * 8 + 3
    for src in page.images:
        path = index.parent / src
        assert path.is_file(), src
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.load()
    shown = {(index.parent / src).resolve() for src in page.images}
    assert {p.resolve() for p in (index.parent).rglob("*.png")} == shown

    # Tables 5 and 1: every number of results.json, 1 decimal; "-" where a class has no IoU.
    for title, row in results["rows"].items():
        for name in CLASSES:
            expected = f"{row['iou'][name]:.1f}" if name in row["iou"] else "-"
            assert page.cells[("table5", title, name)].strip() == expected
            if title != "Network":
                assert page.cells[("table1", title, name)].strip() == expected
        assert page.cells[("table5", title, "mean")].strip() == f"{row['miou']:.1f}"
    assert page.cells[("table5", "CAM+RW+dCRF", "mean")].strip() == "58.7"
    assert ("table1", "Network", "mean") not in page.cells

    assert {"summary", "stage-table", "config", "results", "training", "gallery", "sweep", "legend",
            "gallery-label", "gallery-eval"} <= page.ids
    assert "1 h 02 min" in text                                   # 3725.5 s in the stage table
    assert "truncated or damaged image &lt;b&gt;" in text          # skipped lines, escaped
    for stage in ("train_cam", "train_affinity", "train_seg"):
        assert f"curves_{stage}.png" in page.images
    for name in ("image", "gt", "cam", "background", "confident", "boundaries", "rw", "pseudo"):
        assert f"gallery/train_00000_{name}.png" in page.images
    assert "gallery/val_00000_prediction.png" in page.images
    assert "gallery/train_00003_image.png" not in page.images      # gallery_size=3
    # Neutral pixels of the confident regions are white, as in Fig. 4a.
    confident = np.asarray(Image.open(index.parent / "gallery" / "train_00000_confident.png").convert("RGB"))
    assert (confident == 255).all(axis=2).any()

    # A second report with a smaller gallery leaves no orphan pictures behind.
    write_report(run_dir, gallery_size=1)
    page = _parse(index)
    assert {p.resolve() for p in index.parent.rglob("*.png")} == {(index.parent / s).resolve() for s in page.images}


def test_report_of_a_partial_run_never_crashes(tmp_path, demo_root):
    with pytest.raises(InputError):
        write_report(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text(encoding="utf-8")
    assert "no config.yaml" in text and "No stage has finished yet" in text

    run_dir = tmp_path / "partial"
    save_resolved(_config(run_dir, str(demo_root)), run_dir / "config.yaml")
    write_text(run_dir / "train_cam" / "log.csv", "epoch,lr,loss\n1,0.1,\n2,0.05,nan\n")
    write_text(run_dir / "train_affinity" / "log.csv", "")
    write_json(run_dir / "train_cam" / "_stage.json", {"stage": "train_cam", "complete": False})
    page = write_report(run_dir, gallery_size=0)
    text = page.read_text(encoding="utf-8")
    assert "No <code>results.json</code>" in text and 'id="gallery"' not in text
    assert "train_seg: no <code>log.csv</code> yet" in text
    for src in _parse(page).images:
        assert (page.parent / src).is_file()


def test_report_finds_a_relative_dataset_root(tmp_path, demo_root, monkeypatch):
    """Configs store dataset.root and run_dir relative to where the run was started; the report
    may be written from anywhere else."""
    base = tmp_path / "project"
    shutil.copytree(demo_root, base / "data" / "demo")
    run_dir = base / "runs" / "fake"
    make_run(run_dir, demo_root, config_root="data/demo")
    monkeypatch.chdir(tmp_path)
    page = _parse(write_report(run_dir, gallery_size=1))
    assert "gallery/train_00000_image.png" in page.images
    assert "gallery/train_00000_gt.png" in page.images


def test_tensorboard_event_files_only_when_available(tmp_path, demo_root, monkeypatch):
    run_dir = tmp_path / "run"
    make_run(run_dir, demo_root)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # import fails
    page = write_report(run_dir, gallery_size=0)
    assert not (run_dir / "report" / "tensorboard").exists()
    assert "No TensorBoard event files: torch.utils.tensorboard could not be imported" in page.read_text()

    scalars: list[tuple[str, str, float, int]] = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = Path(log_dir)
            (self.log_dir / "events.out.tfevents.fake").write_text("x")

        def add_scalar(self, tag, value, global_step):
            scalars.append((self.log_dir.name, tag, value, global_step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    for _ in range(2):              # a second report replaces the event files instead of adding to them
        scalars.clear()
        text = write_report(run_dir, gallery_size=0).read_text(encoding="utf-8")
    assert "tensorboard --logdir" in text
    board = run_dir / "report" / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == ["train_affinity", "train_cam", "train_seg"]
    assert all(len(list((board / s).iterdir())) == 1 for s in ("train_affinity", "train_cam", "train_seg"))
    tags = {tag for _, tag, _, _ in scalars}
    assert {"loss", "lr", "pos_fg", "pixel_accuracy", "seconds"} <= tags
    assert any(tag == "loss" and math.isclose(value, 1.0) and step == 2 for _, tag, value, step in scalars)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def test_report_renders_in_headless_chromium(tmp_path, demo_root):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    run_dir = tmp_path / "run"
    make_run(run_dir, demo_root)
    index = write_report(run_dir, gallery_size=3)
    url = index.resolve().as_uri()

    result = _run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", url)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert loaded == total == len(_parse(index).images) > 0
    assert re.search(r'data-row="CAM\+RW\+dCRF" data-class="mean"[^>]*>58\.7<', dom)

    shot = tmp_path / "page.png"
    result = _run_chromium(binary, tmp_path / "profile", "--window-size=1400,2000", f"--screenshot={shot}", url)
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1400, 2000)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10                                       # not a blank page
    if os.environ.get("AFFINITYNET_REPORT_SCREENSHOT"):           # to look at it by hand
        shutil.copy(shot, os.environ["AFFINITYNET_REPORT_SCREENSHOT"])


def test_instance_gallery_renders_in_headless_chromium(tmp_path, demo_root):
    """An IRN run: the gallery's instance column draws each image's masks with their classes and
    scores, and the browser loads every picture."""
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    run_dir = tmp_path / "run"
    make_run(run_dir, demo_root, method="irn")
    index = write_report(run_dir, gallery_size=2)
    page = _parse(index)
    assert "gallery/train_00000_instances.png" in page.images
    result = _run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom",
                           index.resolve().as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    assert loaded == int(re.search(r'data-images-total="(\d+)"', body).group(1)) == len(page.images)
    assert "<th" in dom and ">instances<" in dom
    cell = re.search(r'<tr data-id="train_00000">.*?<td data-column="instances">(.*?)</td>', dom, re.S).group(1)
    assert '<img src="gallery/train_00000_instances.png"' in cell
    listed = re.findall(r'<li data-class="([^"]+)" data-score="([\d.]+)">', cell)
    first = CLASSES[int(np.load(run_dir / "infer_cam" / "cams" / "train_00000.npz")["classes"][0])]
    assert listed[:2] == [(first, "0.900"), (first, "0.800")]     # the class split in two, highest first
    picture = np.asarray(Image.open(index.parent / "gallery" / "train_00000_instances.png").convert("RGB"))
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 3
    # AffinityNet's run has no instance column.
    other = tmp_path / "affinitynet"
    make_run(other, demo_root)
    assert "instances" not in _parse(write_report(other, gallery_size=1)).images[0]
    assert 'data-column="instances"' not in (other / "report" / "index.html").read_text(encoding="utf-8")
