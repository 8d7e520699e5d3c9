"""irn's recipe as options (issue 40): threshold confident regions with irn's label dCRF
(``cam_to_ir_label.py``), the walk's constant background over the CAMs times (1 - B)
(``make_sem_seg_labels.py``), irn's instance labels (``make_ins_seg_labels.py``), each against a
plain reference written from irn's steps on small arrays; the ``voc12_irn`` config; the tiny
pipeline in these modes; and the default configs' stage hashes unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_pipeline as tiny
import torch
import torch.nn.functional as F
from pydensecrf import densecrf
from pydensecrf.utils import unary_from_labels
from skimage import measure

from affinitynet import pipeline
from affinitynet.config import DEFAULTS, flatten, load_config
from affinitynet.files import load_label_png
from affinitynet.models.affinity import threshold_confident_regions
from affinitynet.ops.crf import IRN_LABEL_CRF, dense_crf_labels, label_unary
from affinitynet.ops.instance_labels import group_seeds, load_instances, threshold_instances
from affinitynet.ops.inter_pixel import path_max_affinities
from affinitynet.ops.pseudo_labels import label_maps, threshold_walk_scores, to_grid
from affinitynet.ops.random_walk import neighbour_offsets

NEW_KEYS = {"confident_regions": ("affinity.confidence", "affinity.conf_fg_threshold", "affinity.conf_bg_threshold"),
            "irn_walk": ("irn.background", "irn.bg_threshold"),
            "irn_instances": ("irn.background", "irn.instance_bg_threshold")}


def _image_and_cams(seed=0, height=13, width=18, classes=2):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    cams = rng.random((classes, height, width)).astype(np.float32) ** 3
    return image, cams


# --- irn's label dCRF and confident regions -------------------------------------------------

def _irn_crf_inference_label(img, labels, n_labels, t=10, gt_prob=0.7):
    """irn's misc/imutils.crf_inference_label, from its steps."""
    h, w = img.shape[:2]
    d = densecrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
    q = d.inference(t)
    return np.argmax(np.array(q).reshape((n_labels, h, w)), axis=0)


def _irn_confident(img, cams, classes, fg_thres, bg_thres):
    """irn's step/cam_to_ir_label.py for one image."""
    keys = np.pad(np.asarray(classes), (1, 0), mode="constant")
    fg_conf_cam = np.argmax(np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=fg_thres), axis=0)
    fg_conf = keys[_irn_crf_inference_label(img, fg_conf_cam, n_labels=keys.shape[0])]
    bg_conf_cam = np.argmax(np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=bg_thres), axis=0)
    bg_conf = keys[_irn_crf_inference_label(img, bg_conf_cam, n_labels=keys.shape[0])]
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[bg_conf + fg_conf == 0] = 0
    return conf.astype(np.uint8)


def test_label_unary_is_pydensecrf_unary_from_labels():
    labels = np.random.default_rng(1).integers(0, 4, (7, 9))
    assert np.array_equal(label_unary(labels, 4, 0.7), unary_from_labels(labels, 4, gt_prob=0.7, zero_unsure=False))
    assert IRN_LABEL_CRF.as_kwargs() == {"gaussian_sxy": 3.0, "gaussian_compat": 3.0, "bilateral_sxy": 50.0,
                                         "bilateral_srgb": 5.0, "bilateral_compat": 10.0, "iterations": 10}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_confident_regions_are_irns(seed):
    image, cams = _image_and_cams(seed, classes=1 + seed % 2)
    classes = [3, 7][:cams.shape[0]]
    ours = threshold_confident_regions(image, cams, classes, 0.30, 0.05)
    theirs = _irn_confident(image, cams, classes, 0.30, 0.05)
    assert np.array_equal(ours, theirs)
    assert set(np.unique(ours)) >= {0, 255} and set(np.unique(ours)) <= {0, 255, *classes}
    labels = np.argmax(np.concatenate([np.full((1,) + cams.shape[1:], 0.3, np.float32), cams]), axis=0)
    assert np.array_equal(dense_crf_labels(image, labels, 1 + len(classes)),
                          _irn_crf_inference_label(image, labels, 1 + len(classes)))


def test_threshold_confident_regions_without_classes_are_background():
    image, cams = _image_and_cams(classes=0)
    assert not threshold_confident_regions(image, cams, [], 0.3, 0.05).any()


# --- the walk with irn's background ---------------------------------------------------------

def _dense_transition(affinities, radius, beta, t):
    """irn's to_transition_matrix on the dense affinity matrix (ones on the diagonal), float64:
    W^beta, each column over its sum, to the power t."""
    _, h, w = affinities.shape
    dense = np.eye(h * w)
    for k, (dy, dx) in enumerate(neighbour_offsets(radius)):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    i, j = y * w + x, (y + dy) * w + x + dx
                    dense[i, j] = dense[j, i] = float(affinities[k, y, x])
    powered = dense ** beta
    return np.linalg.matrix_power(powered / powered.sum(axis=0, keepdims=True), t)


def _irn_walk_scores(cams, boundary, radius, beta, t, threshold, stride=4):
    """make_sem_seg_labels.py from its steps: the CAMs (on the grid) times (1 - edge) walked
    (x T), upsampled by the stride and cropped, over their largest value, below threshold."""
    affinities = path_max_affinities(torch.from_numpy(boundary), radius).numpy()
    grid = to_grid(torch.from_numpy(cams), stride).numpy().astype(np.float64)
    k, h, w = grid.shape
    x = (grid * (1 - boundary)).reshape(k, h * w)
    walked = (x @ _dense_transition(affinities, radius, beta, t)).reshape(k, 1, h, w)
    up = F.interpolate(torch.from_numpy(walked), scale_factor=stride, mode="bilinear",
                       align_corners=False)[:, 0, :cams.shape[1], :cams.shape[2]].numpy()
    up = up / up.max()
    return np.concatenate([np.full((1,) + up.shape[1:], threshold), up])


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_walk_is_irns(seed):
    image, cams = _image_and_cams(seed, height=26, width=31)
    rng = np.random.default_rng(seed + 10)
    boundary = (rng.random((7, 8)) ** 4).astype(np.float32)      # the grid of 26 x 31 at stride 4
    radius, beta, t, threshold = 3, 10.0, 8, 0.25
    affinities = path_max_affinities(torch.from_numpy(boundary), radius).float()
    ours = threshold_walk_scores(cams, torch.from_numpy(boundary), affinities, threshold, beta, t, radius, 4).numpy()
    theirs = _irn_walk_scores(cams, boundary, radius, beta, t, threshold)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
    walked, refined = label_maps(image, cams, [4, 9], affinities, 16.0, beta, t, radius, 4, None,
                                 threshold=threshold, boundary=torch.from_numpy(boundary))
    assert refined is None
    assert np.array_equal(walked, np.asarray([0, 4, 9], np.uint8)[np.argmax(theirs, axis=0)])
    assert (walked == 0).any() and (walked != 0).any()


def test_threshold_walk_without_classes_is_background():
    affinities = path_max_affinities(torch.zeros(3, 4), 3)
    scores = threshold_walk_scores(np.zeros((0, 10, 13), np.float32), torch.zeros(3, 4), affinities, 0.25, 10, 4, 3, 4)
    assert scores.shape == (1, 10, 13) and torch.all(scores == 0.25)
    with pytest.raises(ValueError, match="boundary"):
        label_maps(np.zeros((10, 13, 3), np.uint8), np.zeros((1, 10, 13), np.float32), [1], affinities, 16, 10, 4, 3,
                   4, None, threshold=0.25)


# --- irn's instance labels ------------------------------------------------------------------

def _irn_instances(cams, instance_ids, classes, walk, threshold, size):
    """make_ins_seg_labels.py from its steps, given the cluster map: one-hot groups (compressed
    ids), every class in every group, walked, scaled by the largest value, argmax under the
    background threshold, connected parts (connectivity 1), fragments under 1% scored 0."""
    groups = np.unique(instance_ids)
    one_hot = (instance_ids[None] == groups[:, None, None]).astype(np.float32)
    instance_cam = cams[:, None] * one_hot[None]                                  # (K, G, h, w)
    rw_up = walk(instance_cam.reshape(-1, *instance_ids.shape))
    rw_up = rw_up / rw_up.max()
    rw_bg = np.concatenate([np.full((1,) + rw_up.shape[1:], threshold, np.float32), rw_up])
    shape = np.argmax(rw_bg, axis=0)
    class_ids = np.repeat(classes, len(groups))
    found = []
    for index, (score, label) in enumerate(zip(rw_up, class_ids)):
        mask = shape == index + 1
        if mask.sum() < 1:
            continue
        segments = measure.label(mask, connectivity=1, background=0)
        for k in range(1, segments.max() + 1):
            seg = segments == k
            found.append((int(label), seg, 0.0 if seg.sum() < size[0] * size[1] * 0.01 else float(np.max(score * seg))))
    return found


def test_threshold_instances_are_irns():
    rng = np.random.default_rng(3)
    h, w, height, width = 6, 8, 22, 30
    cams = (rng.random((2, h, w)) ** 2).astype(np.float32)
    ids = np.zeros((h, w), np.int32)
    ids[:, :3], ids[:, 3:6], ids[:3, 6:] = 1, 2, 3          # and id 0: cells whose walk ended nowhere

    def walk(seeds):   # any fixed smoothing and upsampling stands for the walk here
        blurred = F.avg_pool2d(torch.from_numpy(seeds)[None], 3, stride=1, padding=1, count_include_pad=False)[0]
        return F.interpolate(blurred[None], size=(height, width), mode="bilinear", align_corners=False)[0].numpy()

    seeds, owners = group_seeds(cams, [5, 2], ids)
    assert seeds.shape == (8, h, w) and owners == [5, 5, 5, 5, 2, 2, 2, 2]
    ours = threshold_instances(walk(seeds), owners, 0.25)
    theirs = _irn_instances(cams, ids, np.asarray([5, 2]), walk, 0.25, (height, width))
    assert len(ours) == len(theirs) > 4
    # irn lists them by class and group, this project by descending score (stable).
    order = sorted(range(len(theirs)), key=lambda i: -theirs[i][2])
    for inst, index in zip(ours, order):
        label, mask, score = theirs[index]
        assert inst.label == label and np.array_equal(inst.mask, mask) and inst.score == score
    assert any(s == 0.0 for _, _, s in theirs), "a fragment"


# --- the config and the hashes ----------------------------------------------------------------

def test_voc12_irn_config_is_irns_recipe():
    config = load_config("voc12_irn")
    assert config["labels"]["method"] == "irn"
    assert (config["backbone"]["name"], config["backbone"]["output_stride"], config["backbone"]["atrous"],
            config["cam"]["head"]) == ("resnet50", 16, False, "irn")
    for section, epochs, batch in (("cam", 5, 16), ("irn", 3, 32)):
        part = config[section]
        assert (part["crop_size"], part["epochs"], part["batch_size"], part["lr"], part["weight_decay"]) == \
            (512, epochs, batch, 0.1, 1e-4)
    assert (config["affinity"]["confidence"], config["affinity"]["conf_fg_threshold"],
            config["affinity"]["conf_bg_threshold"]) == ("threshold", 0.30, 0.05)
    assert (config["irn"]["background"], config["irn"]["bg_threshold"], config["irn"]["instance_bg_threshold"],
            config["irn"]["crf"]) == ("threshold", 0.25, 0.25, "off")


def test_new_keys_are_hashed_only_away_from_their_defaults(tmp_path):
    defaults = flatten(DEFAULTS)
    assert (defaults["affinity.confidence"], defaults["irn.background"]) == ("alpha", "alpha")
    config = load_config("demo", [f"run_dir={tmp_path}", "labels.method=irn"])
    for name, keys in NEW_KEYS.items():
        assert set(keys) <= set(pipeline.stage(name).optional_keys)
        assert not set(keys) & set(pipeline.stage_inputs(config, name)["inputs"]["keys"])
    irn = load_config("demo", [f"run_dir={tmp_path}", "labels.method=irn", "irn.background=threshold"])
    assert pipeline.stage_hash(irn, "irn_walk") != pipeline.stage_hash(config, "irn_walk")
    assert pipeline.stage_hash(irn, "train_irn") == pipeline.stage_hash(config, "train_irn")


# --- the tiny pipeline in irn's modes ---------------------------------------------------------

@pytest.mark.slow
def test_tiny_pipeline_runs_irns_recipe(reference, tmp_path):
    ref_run, data_root = reference
    run_dir = tmp_path / "irn_recipe"
    extra = ("labels.method=irn", "affinity.confidence=threshold", "irn.background=threshold", "irn.crf=\"off\"")
    tiny.copy_stages(ref_run, run_dir, ["train_cam", "infer_cam"])
    for command in ("confident-regions", "train-irn", "irn-walk", "irn-instances"):
        code, _, _ = tiny.cli(tiny.argv(command, run_dir, data_root, *extra))
        assert code == 0, command
    config = tiny.config(run_dir, data_root, *extra)
    for path in sorted((run_dir / "confident_regions" / "labels").glob("*.png")):
        cam_label = load_label_png(ref_run / "infer_cam" / "labels" / path.name)
        assert set(np.unique(load_label_png(path))) <= set(np.unique(cam_label)) | {0, 255}
    # The thresholds differ from alpha's regions.
    assert any(not np.array_equal(load_label_png(path), load_label_png(ref_run / "confident_regions" / "labels" / path.name))
               for path in (run_dir / "confident_regions" / "labels").glob("*.png"))
    spec = pipeline.stage("irn_instances")
    for path in sorted(spec.output("detections", run_dir).glob("*.json")):
        found, _ = load_instances(spec.output("objects", run_dir) / f"{path.stem}.png", path)
        cam_label = load_label_png(ref_run / "infer_cam" / "labels" / f"{path.stem}.png")
        assert {inst.label for inst in found} <= set(np.unique(cam_label)) - {0}
    for name in NEW_KEYS:
        state = json.loads(pipeline.stage(name).marker(run_dir).read_text())
        assert state["complete"] is True and state["hash"] == pipeline.stage_hash(config, name)
    walk = json.loads(pipeline.stage("irn_walk").marker(run_dir).read_text())
    assert walk["inputs"]["keys"]["irn.background"] == "threshold"
    assert set(json.loads(spec.marker(run_dir).read_text())["map_r"]) == {"0.25", "0.5", "0.75"}


# --- the demo with instances of one class -------------------------------------------------------

def test_demo_same_class_puts_several_objects_of_one_class_in_an_image(tmp_path):
    from affinitynet.data.datasets import build_dataset, optional_dataset_keys
    from affinitynet.data.datasets.demo import _render

    for index in range(12):    # the default leaves every image as it was
        assert all(np.array_equal(a, b) for a, b in zip(_render(0, "train", index, 48)[:2],
                                                        _render(0, "train", index, 48, 0.0)[:2]))
    section = dict(load_config("demo")["dataset"], root=str(tmp_path / "demo"), demo_size=48, demo_train=16,
                   demo_val=2, demo_same_class=1.0)
    data = build_dataset(section, "train", progress=False)
    several = 0
    for sample in data.samples:
        instances = data.load_instances(sample)
        if len(instances) >= 2:
            assert len({inst.label for inst in instances}) == 1 and len(sample.labels) == 1
            several += 1
    assert several >= 3
    assert optional_dataset_keys()["dataset.demo_same_class"] == 0.0      # hashed only when set
