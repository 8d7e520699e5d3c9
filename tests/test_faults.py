"""Faults while the pipeline runs: a SIGKILL inside every stage, a full disk, a loss that stops
being finite, a read-only output directory, and bad images in batch stages.

Everything runs the tiny pipeline of ``tiny_pipeline.py`` (64 px demo images, one CPU thread,
deterministic); one uninterrupted reference run per session is what resumed runs must match:
label PNGs byte for byte, .npz arrays exactly, model and optimizer state dicts tensor for tensor.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import types
from pathlib import Path

import pytest
import tiny_pipeline as tiny

from affinitynet.engine.checkpoints import load_checkpoint
from affinitynet.errors import InputError
from affinitynet.files import load_image
from affinitynet.pipeline import lock as run_lock
from affinitynet.stages import common as stage_common

STEPS = tiny.STEPS_PER_EPOCH


def one_line_error(err: str) -> str:
    """The message of the one ``affinitynet: error:`` line, which ends stderr (progress bars
    may come before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "affinitynet: error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("affinitynet: error: "), err
    return errors[0][len("affinitynet: error: "):]


# --- SIGKILL inside every stage, then resume -------------------------------------------------------

# Where each stage is killed. The chain runs `affinitynet run` again after every kill, so each
# child first resumes the stage killed before and is then killed in the next one.
KILL_POINTS = (
    # epoch 2, step 2 of 3: the epoch-1 checkpoint is on disk, epoch 2 must restart from it
    ("train_cam", {"kind": "optimizer_step", "count": STEPS + 2}),
    # the third CAM .npz fully written to its temporary file but not yet renamed into place
    ("infer_cam", {"kind": "before_replace", "pattern": "*/infer_cam/cams/*.npz", "count": 3}),
    ("confident_regions", {"kind": "after_replace", "pattern": "*/confident_regions/labels/*.png", "count": 5}),
    # epoch 2, step 1
    ("train_affinity", {"kind": "optimizer_step", "count": STEPS + 1}),
    # half-way through the outputs of the sixth image (boundaries and walked labels written, not
    # the CRF labels nor the affinities)
    ("random_walk", {"kind": "after_replace", "pattern": "*/random_walk/rw_labels/*.png", "count": 6}),
    # while writing the epoch-1 checkpoint: no checkpoint yet, training restarts from epoch 1
    ("train_seg", {"kind": "before_replace", "pattern": "*/train_seg/checkpoint.pt", "count": 1}),
    ("infer_seg", {"kind": "after_replace", "pattern": "*/infer_seg/predictions/*.png", "count": 2}),
    # results.json written, completion marker not
    ("evaluate_run", {"kind": "after_replace", "pattern": "*/results.json", "count": 1}),
)


def test_sigkill_inside_every_stage_then_resume_gives_the_reference_outputs(reference, tmp_path, capsys):
    ref_run, data_root = reference
    run = tmp_path / "run"
    args = tiny.argv("run", run, data_root)
    kills = []
    for stage, point in KILL_POINTS:
        killed = tiny.kill_at(args, point, tmp_path / "children")
        kills.append(killed)
        state = tiny.stage_state(run, stage)
        assert state is not None and state["complete"] is False, f"{stage}: not killed inside the stage: {killed}"
        earlier = tiny.STAGE_NAMES[:tiny.STAGE_NAMES.index(stage)]
        assert all(tiny.stage_state(run, name)["complete"] for name in earlier), earlier
        directory = run / stage
        if stage in ("train_cam", "train_affinity"):
            assert load_checkpoint(directory / "checkpoint.pt")["epoch"] == 1
            assert not (directory / "model.pt").exists()
        elif stage == "train_seg":
            assert not (directory / "checkpoint.pt").exists()
            assert [p.name.startswith(".checkpoint.pt.") for p in tiny.temporary_files(directory)] == [True]
        elif stage == "infer_cam":
            assert len(list((directory / "labels").glob("*.png"))) == 3
            assert len(list((directory / "cams").glob("*.npz"))) == 2
            assert len(tiny.temporary_files(directory / "cams")) == 1
        elif stage == "evaluate_run":
            assert (run / "results.json").exists()

    # The child after a kill in training says where it resumes.
    assert "[train_cam] resuming: the outputs it finished are kept" in kills[1]["log"]
    assert "cam: resuming at epoch 2/2 from" in kills[1]["log"]
    code, out, err = tiny.cli(args, capsys)
    assert code == 0, err
    assert all(tiny.stage_state(run, name)["complete"] for name in tiny.STAGE_NAMES)
    assert tiny.temporary_files(run) == [], "a resumed stage left an interrupted write's temporary file"
    result = tiny.compare_runs(ref_run, run)
    assert result["differences"] == [], result["differences"]
    assert result["compared"] == 98   # 3 + 24 + 12 + 3 + 48 + 3 + 4 files of the stages, and results.json
    # The confident share of a resumed stage counts the maps written before the kill too.
    share = tiny.stage_state(run, "confident_regions")["confident_share"]
    assert share == tiny.stage_state(ref_run, "confident_regions")["confident_share"] and 0 < share < 1
    print(f"\n[faults] {len(kills)} SIGKILLs, one inside each stage; after resuming, {result['compared']} output "
          f"files equal the reference, 0 lost; kill-to-kill seconds: "
          + ", ".join(f"{k['seconds']:.1f}" for k in kills))


# --- a full disk ----------------------------------------------------------------------------------

class DiskFull:
    """``affinitynet.files.atomic_write`` that fails like a full disk on the ``fail_at``-th write
    below ``under``: half the data reaches the temporary file, then write() raises ENOSPC."""

    def __init__(self, monkeypatch, under: Path, fail_at: int, name: str | None = None):
        import affinitynet.files as io_module

        self.real = io_module.atomic_write
        self.under, self.fail_at, self.name = under, fail_at, name
        self.writes, self.failed = 0, None
        monkeypatch.setattr(io_module, "atomic_write", self.atomic_write)

    @contextlib.contextmanager
    def atomic_write(self, path, mode="wb"):
        path = Path(path)
        with self.real(path, mode) as handle:
            if self.under in path.parents and (self.name is None or path.name == self.name):
                self.writes += 1
                if self.writes == self.fail_at:
                    self.failed = path
                    yield _FullDiskWriter(handle)
                    return
            yield handle


class _FullDiskWriter:
    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)


DISK_FULL = "No space left on device (disk full: free some space and re-run; finished outputs are kept and the run resumes)"


def test_disk_full_in_a_per_image_stage_leaves_no_partial_file_and_resumes(reference, tmp_path, monkeypatch, capsys):
    ref_run, data_root = reference
    run = tiny.copy_stages(ref_run, tmp_path / "run", ["train_cam"])
    # Writes below infer_cam/: the marker, then per image its label PNG and its CAM .npz; the
    # sixth is the third image's label PNG.
    disk = DiskFull(monkeypatch, run / "infer_cam", fail_at=6)
    args = tiny.argv("infer-cam", run, data_root)
    code, out, err = tiny.cli(args, capsys)
    target = run / "infer_cam" / "labels" / "train_00002.png"
    assert disk.failed == target
    assert code == 2 and one_line_error(err) == f"{target}: {DISK_FULL}"
    assert not target.exists() and tiny.temporary_files(run) == []
    assert sorted(p.name for p in (run / "infer_cam" / "labels").iterdir()) == ["train_00000.png", "train_00001.png"]
    assert tiny.stage_state(run, "infer_cam")["complete"] is False

    monkeypatch.undo()
    code, out, err = tiny.cli(args, capsys)
    assert code == 0, err
    state = tiny.stage_state(run, "infer_cam")
    assert state["complete"] and state["reused"] == 2 and state["images"] == 10
    result = tiny.compare_runs(ref_run, run, ["infer_cam"])
    assert result["differences"] == [] and result["compared"] == 24


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(reference, tmp_path, monkeypatch, capsys):
    ref_run, data_root = reference
    run = tiny.copy_stages(ref_run, tmp_path / "run", ["confident_regions"])
    checkpoint = run / "train_affinity" / "checkpoint.pt"
    disk = DiskFull(monkeypatch, run / "train_affinity", fail_at=2, name="checkpoint.pt")   # after epoch 2
    args = tiny.argv("train-affinity", run, data_root)
    code, out, err = tiny.cli(args, capsys)
    assert disk.failed == checkpoint
    assert code == 2 and one_line_error(err) == f"{checkpoint}: {DISK_FULL}"
    assert load_checkpoint(checkpoint)["epoch"] == 1          # the epoch-1 checkpoint, intact
    assert tiny.temporary_files(run) == [] and not (run / "train_affinity" / "model.pt").exists()

    monkeypatch.undo()
    code, out, err = tiny.cli(args, capsys)
    assert code == 0, err
    result = tiny.compare_runs(ref_run, run, ["train_affinity"])
    assert result["differences"] == [] and result["compared"] == 3      # model.pt, checkpoint.pt, log.csv


# --- a loss that is not finite ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_loss_stops_with_the_epoch_1_checkpoint_intact(reference, tmp_path, monkeypatch, capsys, bad):
    ref_run, data_root = reference
    run = tiny.copy_stages(ref_run, tmp_path / "run", ["confident_regions"])
    real_make_step = stage_common.affinity_step
    calls = [0]

    def make_step(*args, **kwargs):
        step = real_make_step(*args, **kwargs)

        def poisoned(model, batch):
            loss, parts = step(model, batch)
            calls[0] += 1
            if calls[0] == STEPS + 1:                       # first step of epoch 2
                loss = loss * float(bad)
            return loss, parts
        return poisoned

    monkeypatch.setattr(stage_common, "affinity_step", make_step)
    args = tiny.argv("train-affinity", run, data_root)
    code, out, err = tiny.cli(args, capsys)
    checkpoint = run / "train_affinity" / "checkpoint.pt"
    message = one_line_error(err)
    assert code == 2
    assert message.startswith(f"affinity: loss became {bad} at epoch 2, step 1"), message
    assert f"the last good checkpoint {checkpoint} (after epoch 1) is intact" in message
    assert "Lower affinity.lr" in message
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 1
    from affinitynet.models.networks import build_network

    model = build_network("affinity", tiny.config(run, data_root), 6, pretrained=False)
    model.load_state_dict(state["model"])                   # loadable, strictly
    assert not (run / "train_affinity" / "model.pt").exists()
    assert tiny.stage_state(run, "train_affinity")["complete"] is False

    if bad == "nan":  # resuming from that checkpoint gives the uninterrupted run's weights exactly
        monkeypatch.undo()
        code, out, err = tiny.cli(args, capsys)
        assert code == 0, err
        assert tiny.compare_runs(ref_run, run, ["train_affinity"])["differences"] == []


# --- a read-only output directory --------------------------------------------------------------------

@contextlib.contextmanager
def read_only(directory: Path, monkeypatch):
    """``directory`` made read-only. As root (a container), permissions do not stop writes, so
    the refusal the kernel would give is simulated where files are created."""
    mode = directory.stat().st_mode
    os.chmod(directory, 0o555)
    probe = directory / ".probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        simulated = False
    else:
        probe.unlink()
        simulated = True
        import tempfile

        import affinitynet.files as io_module

        def mkstemp(suffix=None, prefix=None, dir=None, text=False):
            if dir is not None and (Path(dir) == directory or directory in Path(dir).parents):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                                      str(Path(dir) / f"{prefix}abcdefgh{suffix}"))
            return tempfile.mkstemp(suffix, prefix, dir, text)

        monkeypatch.setattr(io_module, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))
        real_open = os.open

        def open_refusing_new_files(path, flags, mode=0o777, *, dir_fd=None):
            if flags & os.O_CREAT and (Path(path).parent == directory or directory in Path(path).parents):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(run_lock, "os", types.SimpleNamespace(**{**vars(os), "open": open_refusing_new_files}))
    try:
        yield simulated
    finally:
        os.chmod(directory, mode)


@pytest.mark.parametrize("command", ["run", "infer-cam", "predict"])
def test_read_only_output_directory_is_one_line_exit_2(reference, tmp_path, monkeypatch, capsys, command):
    ref_run, data_root = reference
    if command == "run":
        out = tmp_path / "run"
        out.mkdir()
        args = tiny.argv("run", out, data_root)
    elif command == "infer-cam":
        out = tiny.copy_stages(ref_run, tmp_path / "run", ["train_cam"])
        args = tiny.argv("infer-cam", out, data_root)
    else:
        out = tmp_path / "masks"
        out.mkdir()
        args = ["predict", str(ref_run / "train_seg" / "model.pt"),
                str(data_root / "JPEGImages" / "val_00000.png"), "--out", str(out)]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with read_only(out, monkeypatch):
        code, stdout, err = tiny.cli(args, capsys)
    assert code == 2
    assert one_line_error(err) == (f"{out}: Permission denied (check the permissions of this path, "
                                   f"or write elsewhere with --run-dir or --out)")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    if command == "run":                   # refused before any work: no stage started
        assert "[train_cam]" not in stdout and "train-cam" not in stdout, stdout


# --- batch stages and one bad image ----------------------------------------------------------------------

def test_one_truncated_image_is_skipped_logged_and_counted(reference, tmp_path, capsys):
    ref_run, data_root = reference
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    bad = data / "JPEGImages" / "train_00003.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(InputError) as caught:
        load_image(bad)
    line = str(caught.value)
    assert line.startswith(f"{bad}: truncated or damaged image")
    run = tmp_path / "run"

    def stage(command, *flags):
        return tiny.cli(tiny.argv(command, run, data, "cam.epochs=1", flags=flags), capsys)

    code, out, err = stage("train-cam")
    assert code == 0, err
    state = tiny.stage_state(run, "train_cam")
    assert state["skipped"] == [line] and state["images"] == 11   # counted as the per-image stages count

    # --strict stops the training stages too.
    code, out, err = tiny.cli(tiny.argv("train-cam", tmp_path / "strict", data, "cam.epochs=1", flags=["--strict"]),
                              capsys)
    assert code == 2 and one_line_error(err) == f"{line} (--strict stops at the first bad input)"

    # --strict: the first bad image stops the stage, with its one line, exit 2; finished images stay.
    code, out, err = stage("infer-cam", "--strict")
    assert code == 2 and one_line_error(err) == line
    assert tiny.stage_state(run, "infer_cam")["complete"] is False
    assert sorted(p.stem for p in (run / "infer_cam" / "labels").iterdir()) == [f"train_0000{i}" for i in range(3)]

    # Without: the stage completes, the image is skipped, logged and counted; exit 0.
    code, out, err = stage("infer-cam")
    assert code == 0, err
    state = tiny.stage_state(run, "infer_cam")
    assert state["complete"] and state["skipped"] == [line]
    assert state["images"] + state["reused"] == 11 and state["reused"] == 3
    assert f"skipped: {line}" in out and "1 skipped" in out
    assert not (run / "infer_cam" / "cams" / "train_00003.npz").exists()
    assert len(list((run / "infer_cam" / "cams").glob("*.npz"))) == 11

    # The next stage reads past it the same way.
    code, out, err = stage("confident-regions")
    assert code == 0, err
    state = tiny.stage_state(run, "confident_regions")
    assert state["complete"] and state["skipped"] == [line] and state["images"] == 11


def test_map_images_fails_only_when_nothing_succeeds_or_strict(tmp_path):
    from affinitynet.pipeline import map_images

    def work(item):
        if item.startswith("bad"):
            raise InputError(tmp_path / item, "not a readable image")
        (tmp_path / item).write_text("done")

    def fresh():
        return types.SimpleNamespace(images=0, reused=0, skipped=[])

    outputs = lambda item: [tmp_path / item]                                   # noqa: E731
    run = fresh()
    map_images(run, ["a", "bad1", "b", "bad2"], outputs, work, "test")
    assert (run.images, run.reused, len(run.skipped)) == (2, 0, 2)
    assert run.skipped == [f"{tmp_path / 'bad1'}: not a readable image", f"{tmp_path / 'bad2'}: not a readable image"]

    run = fresh()
    map_images(run, ["a", "bad1", "b"], outputs, work, "test")                # done before: reused
    assert (run.images, run.reused, len(run.skipped)) == (0, 2, 1)

    run = fresh()
    with pytest.raises(InputError, match="bad1"):
        map_images(run, ["c", "bad1", "d"], outputs, work, "test", strict=True)
    assert run.images == 1 and not (tmp_path / "d").exists()

    run = fresh()
    with pytest.raises(RuntimeError) as caught:
        map_images(run, ["bad1", "bad2"], outputs, work, "test")
    assert str(caught.value) == f"test: every one of 2 inputs failed; first: {tmp_path / 'bad1'}: not a readable image"


def test_predict_skips_bad_images_and_fails_only_when_none_is_segmented(reference, tmp_path, capsys):
    ref_run, data_root = reference
    model = str(ref_run / "train_seg" / "model.pt")
    good = data_root / "JPEGImages" / "val_00000.png"
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(InputError) as caught:
        load_image(bad)
    line = str(caught.value)

    code, out, err = tiny.cli(["predict", model, str(good), str(bad), "--out", str(tmp_path / "a")], capsys)
    assert code == 0 and err == f"skipped: {line}\n"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["legend.png", "val_00000.png", "val_00000_overlay.png"]
    assert (tmp_path / "a" / "val_00000.png").read_bytes() != b""

    code, out, err = tiny.cli(["predict", model, str(bad), str(good), "--out", str(tmp_path / "b"), "--strict"], capsys)
    assert code == 2 and err.splitlines()[0] == f"skipped: {line}"
    assert not (tmp_path / "b" / "val_00000.png").exists()

    code, out, err = tiny.cli(["predict", model, str(bad), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and err == f"skipped: {line}\n"


def test_a_stage_command_on_a_finished_stage_skips_it_unless_forced(reference, tmp_path, capsys):
    ref_run, data_root = reference
    run = tiny.copy_stages(ref_run, tmp_path / "run", ["train_cam"])
    before = tiny.stage_state(run, "train_cam")
    code, out, err = tiny.cli(tiny.argv("train-cam", run, data_root), capsys)
    assert code == 0, err
    assert "[train_cam] up to date, skipped" in out
    assert tiny.stage_state(run, "train_cam") == before    # its recorded time is kept
    code, out, err = tiny.cli(tiny.argv("train-cam", run, data_root, flags=["--force"]), capsys)
    assert code == 0, err
    after = tiny.stage_state(run, "train_cam")
    assert after["complete"] and after["images"] == 12 and after["seconds"] != before["seconds"]
    assert "up to date" not in out
