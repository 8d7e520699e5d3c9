"""IRN as the label method (``labels.method: irn``) on the tiny pipeline: the graph runs IRNet's
stages instead of AffinityNet's, every key they read is hashed, their labels train the network,
Table 1 shows them, and the instance labels partition the semantic ones, in files that
pycocotools and a VOC reader read back."""
from __future__ import annotations

import json

import numpy as np
import tiny_pipeline as tiny
from test_stage_contract import loose_reads

from affinitynet import pipeline
from affinitynet.files import load_label_png


def test_irn_runs_instead_of_affinitynet_and_its_labels_train_the_network(reference, tmp_path, monkeypatch):
    ref_run, data_root = reference
    run_dir = tmp_path / "irn"
    config = tiny.config(run_dir, data_root, "labels.method=irn")
    assert [s.name for s in pipeline.stages(config)] == ["train_cam", "infer_cam", "confident_regions", "train_irn",
                                                         "irn_walk", "irn_instances", "train_seg", "infer_seg",
                                                         "evaluate_run"]
    tiny.copy_stages(ref_run, run_dir, ["train_cam", "infer_cam", "confident_regions"])
    reads = tiny.recording_run(config, monkeypatch)
    assert list(reads) == ["train_irn", "irn_walk", "irn_instances", "train_seg", "infer_seg", "evaluate_run"]
    assert loose_reads(config, reads) == {}, "keys read but not hashed"
    assert not (run_dir / "train_affinity").exists() and not (run_dir / "random_walk").exists()
    labels = sorted((run_dir / "irn_walk" / "pseudo_labels").glob("*.png"))
    assert len(labels) == 12
    for path in labels:
        label = load_label_png(path)
        cam_label = load_label_png(ref_run / "infer_cam" / "labels" / path.name)
        assert label.shape == cam_label.shape
        # Only the image's own classes (and background) appear in its labels.
        assert set(np.unique(label)) <= set(np.unique(cam_label)) | {0}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["training_labels"] == "CAM+IRN+dCRF in band"
    assert {"CAM", "CAM+IRN", "CAM+IRN+dCRF", "CAM+IRN+dCRF in band", "Network"} <= set(results["rows"])
    state = json.loads(pipeline.stage("train_seg").marker(run_dir).read_text())
    assert list(state["inputs"]["upstream"]) == ["irn_walk"]
    meta = json.loads(pipeline.stage("train_irn").marker(run_dir).read_text())
    assert meta["complete"] is True and meta["images"] == 12
    check_instances(run_dir, config)


def check_instances(run_dir, config):
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO

    from affinitynet.ops.instance_labels import load_instances
    from affinitynet.stages.common import label_images

    spec = pipeline.stage("irn_instances")
    semantic_dir = pipeline.stage("irn_walk").output("pseudo_labels", run_dir)
    data = label_images(config)
    document = COCO(str(spec.output("coco", run_dir)))
    assert len(document.getImgIds()) == 12
    by_name = {image["sample_id"]: image["id"] for image in document.dataset["images"]}
    for sample in data.samples:
        found, shape = load_instances(spec.output("objects", run_dir) / f"{sample.id}.png",
                                      spec.output("detections", run_dir) / f"{sample.id}.json")
        semantic = load_label_png(semantic_dir / f"{sample.id}.png")
        assert shape == semantic.shape
        # A partition of the semantic labels' objects, each instance of one class.
        covered = np.zeros(shape, dtype=int)
        for inst in found:
            covered += inst.mask
            assert set(np.unique(semantic[inst.mask])) == {inst.label}
        assert np.array_equal(covered, (semantic != 0) & (semantic != 255))
        assert [inst.score for inst in found] == sorted((inst.score for inst in found), reverse=True)
        annotations = document.loadAnns(document.getAnnIds(imgIds=[by_name[sample.id]]))
        assert len(annotations) == len(found)
        for inst, annotation in zip(found, annotations):
            assert annotation["category_id"] == inst.label and annotation["score"] == inst.score
            assert np.array_equal(document.annToMask(annotation).astype(bool), inst.mask)
            assert annotation["area"] == inst.mask.sum()
            assert annotation["bbox"] == list(coco_mask.toBbox(document.annToRLE(annotation)))
    state = json.loads(spec.marker(run_dir).read_text())
    # The demo writes its instances, so the stage scores its labels (Table 3).
    assert set(state["map_r"]) == {"0.25", "0.5", "0.75"} and state["instance_images"] == 12
    assert state["map_r"]["0.25"] >= state["map_r"]["0.5"] >= state["map_r"]["0.75"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["instances"]["irn_instances"]["map_r"] == state["map_r"]
    check_report(run_dir, state)


def check_report(run_dir, instances):
    """The report reads IRN's stages: Table 1 from irn-walk, Table 3 from the instances, the
    gallery's boundaries and walked labels from irn-walk."""
    from test_report import _parse

    from affinitynet.report import write_report

    index = write_report(run_dir, gallery_size=1)
    page = _parse(index)
    walk = json.loads(pipeline.stage("irn_walk").marker(run_dir).read_text())["table1"]
    assert page.cells[("table1", "CAM+IRN", "mean")].strip() == f"{walk['CAM+IRN']['miou']:.1f}"
    for threshold, value in instances["map_r"].items():
        assert page.cells[("table3", f"mAP^r at IoU {threshold}", "mean")].strip() == f"{value:.1f}"
    first = sorted((run_dir / "irn_walk" / "boundaries").glob("*.png"))[0].stem
    for name in ("boundaries", "rw"):
        assert f"gallery/{first}_{name}.png" in page.images
