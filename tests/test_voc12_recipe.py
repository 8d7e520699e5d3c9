"""The voc12 recipe: its optimizers against the released psa code's step, the psa preset, and a
system test that runs every stage of ``--config voc12`` (ResNet-38, 21 classes, the void border)
on real VOC 2012 files: ``../shared/datasets/voc12-mini.tar.xz``, skipped when absent.
"""
from __future__ import annotations

import csv
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from affinitynet.config import DEFAULTS, flatten, load_config
from affinitynet.engine.training import build_optimizer
from affinitynet.models.affinity import affinity_loss_from_distances, feature_distances, pair_labels

PSA_LR, PSA_MOMENTUM, PSA_WEIGHT_DECAY = 0.1, 5e-4, 5e-4     # train_cls.py / train_aff.py as they ran
OPTIMIZER_KEYS = {"lr", "momentum", "weight_decay"}


def _steady_step(lr: float, momentum: float) -> float:
    """SGD's step per unit gradient once the momentum buffer has settled: lr / (1 - momentum)."""
    return lr / (1.0 - momentum)


def test_voc12_optimizers_take_the_released_code_step():
    config = load_config("voc12", check=False)
    cam, aff = config["cam"], config["affinity"]
    assert cam["optimizer"] == aff["optimizer"] == "sgd" and cam["momentum"] == aff["momentum"] == 0.9
    psa = _steady_step(PSA_LR, PSA_MOMENTUM)
    assert _steady_step(cam["lr"], cam["momentum"]) == pytest.approx(psa, rel=1e-3)
    assert cam["weight_decay"] == PSA_WEIGHT_DECAY
    # Eq. 10 is 4x psa's loss: a quarter of the step per unit of this project's gradient, and 4x
    # the weight decay so that decay keeps its share of the step.
    assert 4 * _steady_step(aff["lr"], aff["momentum"]) == pytest.approx(psa, rel=1e-3)
    assert aff["weight_decay"] == pytest.approx(4 * PSA_WEIGHT_DECAY)
    # The defaults are the paper's VOC settings, so they carry the same recipe.
    for section in ("cam", "affinity"):
        for key in OPTIMIZER_KEYS | {"optimizer"}:
            assert DEFAULTS[section][key] == config[section][key], f"{section}.{key}"


def test_voc12_psa_preset_differs_from_voc12_only_in_the_optimizers():
    voc12 = flatten(load_config("voc12", check=False))
    psa = flatten(load_config("voc12_psa", check=False))
    differ = {key for key in voc12 if voc12[key] != psa[key]}
    # The weight decays are voc12's already: 5e-4 for the CAM, 4 * 5e-4 for Eq. 10's 4x loss.
    assert differ == {"run_dir", "cam.lr", "cam.momentum", "affinity.lr", "affinity.momentum"}
    assert (psa["cam.lr"], psa["cam.momentum"], psa["cam.weight_decay"]) == (PSA_LR, PSA_MOMENTUM, PSA_WEIGHT_DECAY)
    assert (psa["affinity.lr"], psa["affinity.momentum"]) == (PSA_LR / 4, PSA_MOMENTUM)
    # The README's override set gives the preset's optimizers.
    overrides = ["cam.lr=0.1", "cam.momentum=0.0005", "affinity.lr=0.025", "affinity.momentum=0.0005",
                 "affinity.weight_decay=0.002"]
    assert flatten(load_config("voc12", overrides, check=False)) == {**psa, "run_dir": voc12["run_dir"]}


def _psa_affinity_loss(distances, pos_fg, pos_bg, neg):
    """psa's train_aff.py loss, written from its formula: bg/4 + fg/4 + neg/2 with each term a
    sum over its pairs / (count + 1e-5) and 1e-5 inside the logarithms."""
    aff = torch.exp(-distances)
    bg = torch.sum(-pos_bg * torch.log(aff + 1e-5)) / (pos_bg.sum() + 1e-5)
    fg = torch.sum(-pos_fg * torch.log(aff + 1e-5)) / (pos_fg.sum() + 1e-5)
    ng = torch.sum(-neg * torch.log(1.0 + 1e-5 - aff)) / (neg.sum() + 1e-5)
    return bg / 4 + fg / 4 + ng / 2


def _pairs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (1, 12, 12), generator=generator)
    labels[:, :3, :3] = 255                                      # some neutral pixels
    masks = pair_labels(labels, 5)
    return {name: masks[name].float() for name in ("pos_fg", "pos_bg", "neg")}, generator


def test_eq10_loss_is_four_times_psa_and_the_psa_overrides_reproduce_its_training():
    masks, generator = _pairs()
    start = torch.randn(1, 6, 12, 12, generator=generator)

    def trajectory(loss_fn, lr, momentum, weight_decay):
        features = torch.nn.Parameter(start.clone())
        section = {"optimizer": "sgd", "lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        optimizer = build_optimizer([([features], 1.0)], section)
        for _ in range(5):
            distances = feature_distances(features, 5, "mean")
            loss = loss_fn(distances)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return features.detach()

    ours = lambda d: affinity_loss_from_distances(d, masks["pos_fg"] > 0, masks["pos_bg"] > 0, masks["neg"] > 0)[0]
    theirs = lambda d: _psa_affinity_loss(d, masks["pos_fg"], masks["pos_bg"], masks["neg"])
    distances = feature_distances(start, 5, "mean")
    assert float(ours(distances)) == pytest.approx(4 * float(theirs(distances)), rel=1e-4)
    # psa's update (lr 0.1, momentum 5e-4, decay 5e-4 on its loss) from this project's loss with
    # the preset's affinity optimizer.
    psa = trajectory(theirs, PSA_LR, PSA_MOMENTUM, PSA_WEIGHT_DECAY)
    preset = load_config("voc12_psa", check=False)["affinity"]
    mine = trajectory(ours, preset["lr"], preset["momentum"], preset["weight_decay"])
    assert not torch.equal(psa, start)
    torch.testing.assert_close(mine, psa, rtol=1e-4, atol=1e-5)


# --- System test: every stage of --config voc12 on real VOC files ---------------------------------

VOC12_MINI = "voc12-mini.tar.xz"
REPO_ROOT = Path(__file__).resolve().parents[1]


def find_voc12_mini() -> Path | None:
    """``../shared/datasets/voc12-mini.tar.xz`` next to the checkout or the working directory."""
    for base in (REPO_ROOT.parent, Path.cwd().parent):
        path = base / "shared" / "datasets" / VOC12_MINI
        if path.is_file():
            return path
    return None


# ---- The ResNet-38 ImageNet weight file: the ONE place the system test gets it -----------------
# An MXNet .params file in the layout of psa's ilsvrc-cls_rna-a1_cls1000_ep-0001.params: every name
# and shape of Model A1 (fixtures/mxnet/a1_layout.json, from MXNet itself), float16 as a converted
# file may be, written with the byte layout test_mxnet_params checks against MXNet's own files.
# The values are resnet38d's initialisation (psa's file cannot be fetched here), so the recipe trains
# from a sane scale; `backbone.weights` reads it as it would the real file.
def resnet38_weight_file(folder: Path) -> Path:
    from test_mxnet_params import list_bytes, ndarray_bytes

    from affinitynet.models.backbones import create_backbone
    from affinitynet.models.backbones.mxnet_params import torch_key

    layout = json.loads((Path(__file__).parent / "fixtures" / "mxnet" / "a1_layout.json").read_text())
    state = create_backbone("resnet38d", pretrained=False).state_dict()
    arrays = []
    for name, shape in layout:
        key = torch_key(name)
        values = state[key].numpy() if key in state else np.zeros(shape, np.float32)   # linear1000
        assert list(values.shape) == shape, name
        arrays.append(ndarray_bytes(values.astype(np.float16)))
    path = folder / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    path.write_bytes(list_bytes(arrays, [name for name, _ in layout]))
    return path


# Small enough for a 2-core CPU: 112 px crops, one step of 2 images per network, inference at a
# quarter of the 513 px images (128 px), no flips, a short walk. Everything else, the optimizers
# included, is --config voc12 as shipped.
SMOKE = ("device=cpu", "threads=1", "num_workers=0",
         "cam.crop_size=112", "cam.resize_long=[112,144]", "cam.batch_size=2", "cam.epochs=1",
         "cam.scales=[0.25]", "cam.flip=false",
         "affinity.crop_size=112", "affinity.batch_size=2", "affinity.epochs=1",
         "random_walk.scale=0.25", "random_walk.t=4",
         "segmentation.crop_size=112", "segmentation.batch_size=2", "segmentation.epochs=1",
         "segmentation.scales=[0.25]", "segmentation.flip=false")
# A few of the archive's images keep every stage to seconds (ResNet-38 forwards take ~2 s each on
# one core): two training images (four classes between them) and two val images, in the lists
# the archive ships (train_aug stays its own file, so the train_aug + train merge runs too).
SPLITS = {"train": ["sample_008", "sample_120"], "train_aug": ["sample_008", "sample_120"],
          "val": ["sample_294", "sample_417"]}


@pytest.fixture
def voc12_mini(tmp_path):
    tarball = find_voc12_mini()
    if tarball is None:
        pytest.skip(f"{VOC12_MINI} not available (../shared/datasets next to the checkout)")
    with tarfile.open(tarball) as archive:
        archive.extractall(tmp_path / "data", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    for split, ids in SPLITS.items():
        assert set(ids) <= set((lists / f"{split}.txt").read_text().split()), split
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
    yield root
    # ResNet-38 checkpoints are 0.4-0.8 GB each (~4 GB a run); pytest keeps the last runs' folders.
    for path in tmp_path.rglob("*.pt*"):
        path.unlink()


@pytest.mark.system
def test_voc12_recipe_runs_every_stage_on_real_voc_files(voc12_mini, tmp_path, capsys):
    from affinitynet.cli import main

    root = voc12_mini
    run_dir = tmp_path / "run"
    weights = resnet38_weight_file(tmp_path)
    code = main(["run", "--config", "voc12", f"dataset.root={root}", f"run_dir={run_dir}",
                 f"backbone.weights={weights}", *SMOKE])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]

    config = load_config(run_dir / "config.yaml")
    assert config["backbone"]["name"] == "resnet38d" and config["cam"]["lr"] == 0.01
    for stage in ("train_cam", "infer_cam", "confident_regions", "train_affinity", "random_walk",
                  "train_seg", "infer_seg", "evaluate_run"):
        state = json.loads((run_dir / stage / "_stage.json").read_text())
        assert state["complete"] is True and state["skipped"] == [], stage
    for stage in ("train_cam", "train_affinity", "train_seg"):
        assert (run_dir / stage / "model.pt").is_file()
        with open(run_dir / stage / "log.csv", newline="") as handle:
            losses = [float(row["loss"]) for row in csv.DictReader(handle)]
        assert losses and all(math.isfinite(value) for value in losses), stage

    for image_id in SPLITS["train"]:
        assert (run_dir / "infer_cam" / "cams" / f"{image_id}.npz").is_file()
        assert (run_dir / "confident_regions" / "labels" / f"{image_id}.png").is_file()
        for folder in ("rw_labels", "pseudo_labels", "boundaries"):
            assert (run_dir / "random_walk" / folder / f"{image_id}.png").is_file()
    for image_id in SPLITS["val"]:
        assert (run_dir / "infer_seg" / "predictions" / f"{image_id}.png").is_file()

    assert "Table 1: pseudo labels on voc12 train (mIoU %)" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["class_names"]) == 21 and results["class_names"][0] == "background"
    assert set(results["rows"]) == {"CAM", "CAM+RW", "CAM+RW+dCRF", "Network"}
    assert [results["rows"][row]["num_images"] for row in ("CAM", "Network")] == [2, 2]
    assert all(0.0 <= results["rows"][row]["miou"] <= 100.0 for row in results["rows"])
