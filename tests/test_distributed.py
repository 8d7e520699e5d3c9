"""Multi-process runs (torchrun, 2 gloo processes on the CPU) give the single-process results:
the same weights after a CAM epoch (and after a resume), byte-identical per-image outputs of the
sharded stages, and exactly the same confusion matrices when evaluation is split over ranks.
Plus the mixed-precision / channels-last code paths of the training loop, run on the CPU.

Every stage runs on a tiny demo (16 training images of 64x64, MobileNetV2, one epoch).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from affinitynet.config import builtin_config_path
from affinitynet.engine import distributed
from affinitynet.engine.checkpoints import load_checkpoint
from affinitynet.engine.precision import AmpModule, amp_dtype, for_inference, use_channels_last
from affinitynet.engine.training import EpochDataset, train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TINY = ["dataset.demo_size=64", "dataset.demo_train=16", "dataset.demo_val=4",
        "cam.crop_size=64", "cam.resize_long=[56,72]", "cam.batch_size=4", "cam.epochs=1",
        "affinity.crop_size=64", "affinity.batch_size=4", "affinity.epochs=1",
        "backbone.name=mobilenetv2", "threads=1"]
STAGES_BEFORE_WALK = ("train-cam", "infer-cam", "confident-regions", "train-affinity", "random-walk")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def affinitynet(root: Path, run_dir: Path, command: str, *overrides: str, nproc: int = 1,
                script: str | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    """``affinitynet <command> --config demo <tiny overrides>``, in one process or under torchrun."""
    if nproc == 1:
        launcher = [sys.executable] + (["-c", script] if script else ["-m", "affinitynet"])
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "affinitynet"]
    args = [command, "--config", str(builtin_config_path("demo")), *TINY,
            f"dataset.root={root / 'data'}", f"run_dir={run_dir}", *overrides]
    done = subprocess.run(launcher + args, cwd=root, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == expect, f"{' '.join(launcher + args)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def reference(workspace) -> Path:
    """The single-process run, up to the random walk (about 15 s)."""
    run_dir = workspace / "single"
    for command in STAGES_BEFORE_WALK:
        affinitynet(workspace, run_dir, command)
    return run_dir


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _stage_summary(run_dir: Path, stage: str, processes: int = 1) -> dict:
    """The stage's record without how it was run (checked here: ``processes`` of one thread, in
    float32: ``amp: auto`` on a CPU)."""
    summary = json.loads((run_dir / stage / "_stage.json").read_text())
    assert (summary.pop("processes"), summary.pop("threads")) == (processes, 1), stage
    assert summary.pop("precision") == "float32", stage
    summary.pop("seconds")
    return summary


def _files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file() and not path.name.startswith(".")}


def test_cam_epoch_two_processes_gives_single_process_weights(workspace, reference):
    run_dir = workspace / "ddp_train"
    affinitynet(workspace, run_dir, "train-cam", nproc=2)
    _assert_same_weights(reference / "train_cam" / "model.pt", run_dir / "train_cam" / "model.pt")
    # The log is the mean over all ranks' steps: the single-process loss.
    single = load_checkpoint(reference / "train_cam" / "model.pt")["history"]
    double = load_checkpoint(run_dir / "train_cam" / "model.pt")["history"]
    assert [row["epoch"] for row in double] == [1]
    assert double[0]["loss"] == pytest.approx(single[0]["loss"], abs=1e-5)
    summary = _stage_summary(run_dir, "train_cam", processes=2)
    assert summary["complete"] and summary["images"] == 16


RESUME_AFTER_FIRST_EPOCH = """
import sys
import affinitynet.engine.training as training
write_log = training._write_log
def stop(path, history):
    write_log(path, history)
    raise SystemExit(75)   # killed right after the first epoch's checkpoint
training._write_log = stop
from affinitynet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_with_two_processes_continues_a_single_process_run(workspace):
    """A run stopped after epoch 1 (one process) and resumed by torchrun (two) ends with the
    weights of an uninterrupted single-process run."""
    two_epochs = "cam.epochs=2"
    whole, resumed = workspace / "whole", workspace / "resumed"
    affinitynet(workspace, whole, "train-cam", two_epochs)
    affinitynet(workspace, resumed, "train-cam", two_epochs, script=RESUME_AFTER_FIRST_EPOCH, expect=75)
    assert load_checkpoint(resumed / "train_cam" / "checkpoint.pt")["epoch"] == 1
    assert not (resumed / "train_cam" / "model.pt").exists()
    affinitynet(workspace, resumed, "train-cam", two_epochs, nproc=2)
    _assert_same_weights(whole / "train_cam" / "model.pt", resumed / "train_cam" / "model.pt")
    assert [row["epoch"] for row in load_checkpoint(resumed / "train_cam" / "model.pt")["history"]] == [1, 2]


def test_run_procs_trains_in_one_process_and_shards_the_rest_into_identical_files(workspace, reference):
    """``run --procs 2`` on a CPU: each training in one process (the reference's weights); every
    other stage as two processes (torchrun started by affinitynet), which write byte for byte the
    single-process files and record the single-process scores (all-reduced confusion matrices);
    each stage's record says how it ran."""
    run_dir = workspace / "run_procs"
    affinitynet(workspace, run_dir, "run", "--procs", "2", "segmentation.crop_size=64", "segmentation.batch_size=4",
                "segmentation.epochs=1", "segmentation.scales=[1.0]")
    for stage in ("train_cam", "train_affinity"):
        _assert_same_weights(reference / stage / "model.pt", run_dir / stage / "model.pt")
    for folder in ("infer_cam/cams", "infer_cam/labels", "confident_regions/labels", "random_walk/affinities",
                   "random_walk/boundaries", "random_walk/rw_labels", "random_walk/pseudo_labels"):
        single, double = _files(reference / folder), _files(run_dir / folder)
        assert len(single) == 16 and single.keys() == double.keys(), folder
        different = [name for name in single if single[name] != double[name]]
        assert not different, f"{folder}: {different} differ from the single-process files"
    for stage in ("infer_cam", "confident_regions", "random_walk"):
        assert _stage_summary(run_dir, stage, processes=2) == _stage_summary(reference, stage)
    assert _stage_summary(run_dir, "infer_cam", processes=2)["cam"]["num_images"] == 16
    ran = {path.parent.name: (summary["processes"], summary["threads"])
           for path in run_dir.glob("*/_stage.json") for summary in [json.loads(path.read_text())]}
    assert ran == {"train_cam": (1, 1), "infer_cam": (2, 1), "confident_regions": (2, 1), "train_affinity": (1, 1),
                   "random_walk": (2, 1), "train_seg": (1, 1), "infer_seg": (2, 1), "evaluate_run": (2, 1)}


def test_procs_error_is_one_line_and_its_exit_code(workspace):
    """``--procs 2`` on a stage whose inputs are missing: the processes' error once, its exit
    code, none of torchrun's report, and nothing written."""
    run_dir = workspace / "procs_error"
    done = affinitynet(workspace, run_dir, "random-walk", "--procs", "2", expect=2)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["affinitynet: error: stage 'random_walk' needs the outputs of 'infer_cam', which are missing "
                     "or were made with other settings: run `affinitynet infer-cam` (or `affinitynet run`) first"]
    assert not (run_dir / "random_walk").exists()
    refused = affinitynet(workspace, run_dir, "random-walk", "--procs", "0", expect=2)
    assert "argument --procs: 0 is not a positive number" in refused.stderr


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_writing(workspace):
    run_dir = workspace / "uneven"
    done = affinitynet(workspace, run_dir, "train-cam", "--procs", "2", "cam.batch_size=3", expect=2)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["affinitynet: error: config key 'cam.batch_size' (3) must be divisible by the number of "
                     "processes (2)"]
    assert not run_dir.exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _score_worker(rank: int, world: int, port: int, overrides: list[str], pred_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from affinitynet.config import load_config
    from affinitynet.stages.common import score

    distributed.init_from_env(torch.device("cpu"))
    assert distributed.world_size() == world and distributed.rank() == rank
    config = load_config(builtin_config_path("demo"), overrides)
    result = score(config, pred_dir, "label_split", "CAM")
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    else:
        assert result is None


def test_evaluation_on_two_ranks_equals_single_process(workspace, reference):
    """Exact confusion matrix, scores and skipped lines (in dataset order), with some
    predictions missing or of the wrong size so that both ranks skip images."""
    from affinitynet.config import load_config
    from affinitynet.files import load_label_png, save_label_png
    from affinitynet.metrics import evaluate_predictions
    from affinitynet.stages.common import dataset

    overrides = [*TINY, f"dataset.root={workspace / 'data'}", f"run_dir={reference}"]
    pred_dir = workspace / "predictions"
    shutil.copytree(reference / "infer_cam" / "labels", pred_dir)
    names = sorted(pred_dir.glob("*.png"))
    for path in names[1:4]:
        path.unlink()
    save_label_png(names[6], load_label_png(names[6])[:-1])
    (pred_dir / names[9].name).write_bytes(b"not a png")

    data = dataset(load_config(builtin_config_path("demo"), overrides), "label_split")
    expected = evaluate_predictions(data, pred_dir, progress=False)
    assert len(expected["skipped"]) == 5 and expected["num_images"] == 11

    out = workspace / "score.json"
    torch.multiprocessing.spawn(_score_worker, args=(2, _free_port(), overrides, str(pred_dir), str(out)),
                                nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result.pop("title") == "CAM" and result.pop("split") == data.split
    assert result == json.loads(json.dumps(expected))
    assert np.array_equal(np.asarray(result["confusion"]), np.asarray(expected["confusion"]))


# --- mixed precision and channels-last, exercised on the CPU -----------------------------------

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Conv2d(8, 2, 1)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.features(x)).mean((2, 3))


class _Blobs(EpochDataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return torch.randn(3, 16, 16, generator=generator), torch.tensor([index % 2, 1 - index % 2], dtype=torch.float32)


def _freeze(model):
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.eval()
            layer.requires_grad_(False)


def _step(seen):
    def step(model, batch):
        images, targets = batch
        logits = model(images)
        seen.append((logits.dtype, images.is_contiguous(memory_format=torch.channels_last)))
        return nn.functional.binary_cross_entropy_with_logits(logits, targets), {}
    return step


SECTION = {"batch_size": 4, "epochs": 1, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
           "poly_power": 0.9}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_cpu(tmp_path, amp):
    torch.manual_seed(0)
    model = _Tiny()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    seen = []
    result = train(model=model, groups=[(model.parameters(), 1.0)], dataset=_Blobs(), step=_step(seen),
                   section=SECTION, out_dir=tmp_path, seed=0, device=torch.device("cpu"), meta={}, desc="tiny",
                   prepare=_freeze, amp=amp, channels_last="on")
    assert len(seen) == 2 and all(dtype == torch.float32 for dtype, _ in seen)   # the loss sees float32
    state = load_checkpoint(result.model_path)["model"]
    assert all(torch.isfinite(value).all() for value in state.values())
    assert not torch.equal(state["classifier.weight"], before["classifier.weight"])
    assert torch.equal(state["body.1.running_mean"], before["body.1.running_mean"])   # BatchNorm stayed frozen
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ("scaler" in checkpoint) == (amp == "fp16")   # a GradScaler for float16 only


@pytest.mark.parametrize("optimizer,power", [("sgd", 0.9), ("adam", 0.9), ("adam", 0.0)])
def test_learning_rate_follows_the_poly_schedule_for_both_optimizers(tmp_path, optimizer, power):
    section = {**SECTION, "epochs": 3, "optimizer": optimizer, "poly_power": power}
    model = _Tiny()
    result = train(model=model, groups=[(model.parameters(), 1.0)], dataset=_Blobs(), step=_step([]),
                   section=section, out_dir=tmp_path, seed=0, device=torch.device("cpu"), meta={}, desc="tiny")
    # 8 samples in batches of 4: 2 steps per epoch, 6 in all; the log holds the rate of each
    # epoch's last step, lr * (1 - step / 6)^power with step 1, 3, 5.
    expected = [0.01 * (1 - step / 6) ** power for step in (1, 3, 5)]
    assert [row["lr"] for row in result.history] == pytest.approx(expected, rel=1e-12)


def test_amp_settings_and_inference_wrapper():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "off") is None and amp_dtype(cpu, False) is None
    assert amp_dtype(cpu, "bf16") == torch.bfloat16 and amp_dtype(cpu, "fp16") == torch.float16
    assert not use_channels_last(cpu, "auto", torch.bfloat16, training=True) and use_channels_last(cpu, "on")
    # CPU inference: NHWC where the backbone says its NHWC forward pass is the faster one.
    assert use_channels_last(cpu, "auto", cpu_nhwc=True) and not use_channels_last(cpu, "auto")
    assert not use_channels_last(cpu, "off", cpu_nhwc=True) and use_channels_last(cpu, "on")
    with pytest.raises(Exception, match="amp"):
        amp_dtype(cpu, "fp8")
    model = _Tiny().eval()
    assert for_inference(model, cpu, "auto", "off") is model   # float32, NCHW: untouched
    wrapped = for_inference(_Tiny().eval(), cpu, "bf16", "on", methods=("features",))
    assert isinstance(wrapped, AmpModule)
    wrapped.module.load_state_dict(model.state_dict())
    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        low, full = wrapped.features(image), model.features(image)
    assert low.dtype == torch.float32 and low.is_contiguous()
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.05)
    assert wrapped.classifier is wrapped.module.classifier   # other attributes read through
    assert next(wrapped.parameters()).dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_cpu_amp_note_and_amp_native_follow_the_cpu(monkeypatch, native):
    import affinitynet.engine.precision as precision

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    float32, bf16 = precision.cpu_amp_note(cpu, "auto"), precision.cpu_amp_note(cpu, "bf16")
    if native:
        assert "amp=bf16" in float32 and "natively" in float32 and bf16 is None
    else:
        assert float32 is None and "amp=off is faster" in bf16
    assert precision.cpu_amp_note(cpu, "off") == float32 and "\n" not in (float32 or bf16)
    assert precision.cpu_amp_note(torch.device("cuda"), "off") is None
    # amp=native: bf16 only where the CPU computes it, so never the setting that disagrees with it.
    assert precision.amp_dtype(cpu, "native") == (torch.bfloat16 if native else None)
    assert precision.dtype_name(cpu, "native") == ("bfloat16" if native else "float32")
    assert precision.cpu_amp_note(cpu, "native") is None
    assert precision.amp_dtype(cpu, "auto") is None         # auto stays float32 on a CPU


@pytest.mark.parametrize("setting,spins", [({}, "10000"), ({"GOMP_SPINCOUNT": "7"}, "7"),
                                            ({"OMP_WAIT_POLICY": "PASSIVE"}, "0")])
def test_openmp_spin_count_is_set_before_torch_loads_libgomp(setting, spins):
    """The command's OpenMP threads spin 10000 times at a barrier, not libgomp's 300000, which
    libgomp reads once when torch loads it; a user's own setting of either variable wins. libgomp
    prints what it read under OMP_DISPLAY_ENV."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(setting, OMP_DISPLAY_ENV="VERBOSE")
    done = subprocess.run([sys.executable, "-m", "affinitynet", "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"GOMP_SPINCOUNT = '{spins}'" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("name,nhwc", [("mobilenetv2", True), ("efficientnet_lite0", False)])
def test_cpu_inference_layout_is_the_backbones_measured_one(name, nhwc):
    from affinitynet.models.backbones import create_backbone
    from affinitynet.models.cam import CAMNet

    torch.manual_seed(0)
    model = CAMNet(create_backbone(name, pretrained=False), 3).eval()
    image = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected = model.cams(image)
    wrapped = for_inference(model, torch.device("cpu"), "auto", "auto", methods=("cams",))
    assert isinstance(wrapped, AmpModule) == nhwc
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last) == nhwc
    with torch.no_grad():
        maps = wrapped.cams(image)
    assert maps.is_contiguous()
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-4)


class _RankSkips(_Blobs):
    """Rank 1's first two samples (its whole first share of a batch) fail to load."""

    calls = 0

    def __getitem__(self, index):
        self.calls += 1
        if distributed.rank() == 1 and self.calls <= 2:
            return ("skip", f"sample {index}: unreadable")
        return super().__getitem__(index)


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), AFFINITYNET_DIST_TIMEOUT_MIN="2")   # a hang fails, a slow CI machine does not
    torch.set_num_threads(1)
    from affinitynet.errors import TrainingError

    distributed.init_from_env(torch.device("cpu"))
    for scenario in ("skip", "nan"):
        torch.manual_seed(0)
        model = _Tiny()   # BatchNorm left in training mode: plain BatchNorm on a CPU, buffers synced
        before = model.classifier.weight.detach().clone()

        def step(net, batch):
            loss, parts = _step([])(net, batch)
            if scenario == "nan" and rank == 1:
                loss = loss * float("nan")
            return loss, parts

        try:
            result = train(model=model, groups=[(model.parameters(), 1.0)], dataset=_RankSkips(), step=step,
                           section=dict(SECTION, epochs=2), out_dir=Path(out) / scenario, seed=0,
                           device=torch.device("cpu"), meta={}, desc="tiny", amp="bf16")
            outcome = {"skipped": result.skipped, "steps_changed": not torch.equal(before, model.classifier.weight)}
        except TrainingError as error:
            outcome = {"error": str(error)}
        torch.save({"outcome": outcome, "state": model.state_dict()}, Path(out) / f"{scenario}{rank}.pt")


def test_ranks_agree_on_skipped_batches_and_non_finite_losses(tmp_path):
    """A rank whose share of a batch failed to load, or whose loss is NaN, makes every rank skip
    the step or stop: none is left waiting in DDP's all-reduce. BatchNorm in training mode runs
    (unsynchronised on a CPU) and mixed precision goes through DDP."""
    torch.multiprocessing.spawn(_train_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"skip{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0]["outcome"] == {"skipped": [], "steps_changed": True}
    skipped = ranks[1]["outcome"]["skipped"]
    assert ranks[1]["outcome"]["steps_changed"] and len(skipped) == 2
    assert all(line.endswith(": unreadable") for line in skipped)
    for name, value in ranks[0]["state"].items():   # DDP kept the replicas' weights equal
        if "running_" not in name and "num_batches" not in name:   # statistics: synced at the next forward
            torch.testing.assert_close(ranks[1]["state"][name], value)
    # Step 1 was skipped (rank 1 had no images), so the NaN comes at step 2.
    ranks = [torch.load(tmp_path / f"nan{rank}.pt", weights_only=True) for rank in range(2)]
    assert "loss became non-finite in another process at epoch 1, step 2" in ranks[0]["outcome"]["error"]
    assert "loss became nan at epoch 1, step 2" in ranks[1]["outcome"]["error"]


def test_is_main_before_the_group_is_joined(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main() and distributed.world_size() == 1
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("RANK", "1")
    assert distributed.is_main()
