"""``affinitynet <command>``: the whole pipeline, one command per stage, and the tools around it.

Every pipeline command takes ``--config FILE`` (a YAML file or a built-in name such as ``demo``)
and any number of ``key=value`` overrides (``random_walk.beta=10``); the dataset options
``--dataset``, ``--root`` and ``--split`` are spelled the same in every command.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import __version__
from .config import (
    DEFAULTS,
    builtin_config_path,
    builtin_configs,
    check_keys,
    defaults,
    flatten,
    load_config,
    save_resolved,
)
from .data import datasets
from .data.datasets import DATASETS, build_dataset
from .engine import distributed
from .engine.precision import cpu_amp_note
from .engine.training import resolve_device
from .errors import AffinityNetError, ConfigError, InputError
from .files import plural, write_json
from .metrics import evaluate_predictions, format_table
from .models.onnx_model import OPSET, export_onnx
from .pipeline import (
    ProcessesFailed,
    all_stages,
    is_complete,
    preflight,
    processes_runner,
    run_all,
    run_stage,
    run_summary,
    stages,
)
from .pipeline.lock import RunLock
from .pipeline.settings import check_names, key_help, load_run_config, reference_page
from .pipeline.size_rules import resolve_auto
from .predict import predict_files
from .released import KINDS, apply_layout, import_weights, imported_kinds
from .report import write_report
from .sweep import run_sweep

EXIT_BAD_INPUT = 2


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help=f"experiment YAML, or a built-in name: {', '.join(builtin_configs())} (default: "
                             "the run directory's saved config.yaml, else the built-in config of --dataset, else demo)")

    # No argparse choices: a plug-in named by the config's `plugins` adds its dataset after the
    # options are read; the config's check names the choices and the nearest one.
    parser.add_argument("--dataset", default=None,
                        help=f"dataset (overrides dataset.name): {', '.join(DATASETS.names())}, or a plug-in's")
    parser.add_argument("--root", default=None, help="dataset directory (overrides dataset.root)")
    parser.add_argument("--run-dir", default=None, help="output directory of the run (overrides run_dir)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. random_walk.beta=10 cam.epochs=5")


def _add_writer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="if another command is writing into the run directory, wait for it to end "
                             "(default: stop at once, saying which command it is)")


@contextlib.contextmanager
def _one_writer(config: dict[str, Any], args: argparse.Namespace) -> Iterator[None]:
    """This command as the one writer of its run directory (``run_lock``), from after its
    checks to its end. Under torchrun the job is one writer: rank 0 takes the lock, and every
    rank follows its answer."""

    device = resolve_device(config["device"])       # a device this machine lacks: refused before writing
    lock = RunLock(config["run_dir"], shlex.join(["affinitynet", *args.argv]), wait=args.wait)
    if not distributed.launched():
        lock.acquire()
    else:
        distributed.init_from_env(device)
        failure = None
        if distributed.is_main():
            try:
                lock.acquire()
            except Exception as error:   # every rank must hear it, or they would wait for rank 0 forever
                failure = error
        failure = distributed.all_gather_objects(failure)[0]
        if failure is not None:
            raise failure
    try:
        yield
    finally:
        lock.release()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _add_procs_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--procs", type=_positive_int, default=1, metavar="N",
                        help="run as N processes on this machine (torch.distributed.run), one thread each unless "
                             "`threads` says otherwise; on a CPU, `run` keeps each training in one process (faster "
                             "so) and runs every other stage as the N processes (docs/performance.md, Speed)")


def _config_from_args(args: argparse.Namespace, check: bool = True, resolve: bool = True) -> dict[str, Any]:
    """Defaults <- the base config <- the dataset options and ``key=value`` overrides.

    The base config is ``--config`` when given; else the saved ``config.yaml`` of the run
    directory named by ``--run-dir`` (a run describes itself, so a later command needs no dataset
    options); else the built-in config named after ``--dataset``; else the demo. A checked config
    gets its ``auto`` keys resolved and said, unless ``resolve`` is false."""

    overrides = list(args.overrides)
    if args.dataset:
        overrides.append(f"dataset.name={args.dataset}")
    if args.root:
        overrides.append(f"dataset.root={args.root}")
    run_dir = getattr(args, "run_dir", None)
    if run_dir:
        overrides.append(f"run_dir={run_dir}")
    if getattr(args, "strict", False):
        overrides.append("strict=true")
    base = args.config
    if base is None and run_dir and (Path(run_dir) / "config.yaml").is_file():
        base = Path(run_dir) / "config.yaml"
    elif base is None and args.dataset and builtin_config_path(args.dataset).is_file():
        base = args.dataset
    config = load_run_config(base, overrides, check_all=check)
    if check and resolve:
        _resolve_auto(config)
    return config


def _resolve_auto(config: dict[str, Any]) -> None:
    """The ``auto`` keys set from the training images (``size_rules``), and what was chosen said."""

    for line in resolve_auto(config):
        if distributed.is_main():
            print(line)


def _forced_stages(args: argparse.Namespace) -> tuple[set[str], bool]:
    """``run --force`` alone redoes every stage (and may replace another dataset's outputs);
    ``--force STAGE`` (repeatable) redoes those stages only."""

    known = all_stages()
    names: set[str] = set()
    every = False
    for value in args.force or ():
        if value == _ALL:
            every = True
            continue
        name = value.replace("-", "_")
        if name not in known:
            raise ConfigError(f"--force: unknown stage '{value}' (stages: {', '.join(known)})")
        names.add(name)
    return (set(known) if every else names), every


_ALL = "__all__"


def cmd_run(args: argparse.Namespace) -> int:
    config = _config_from_args(args, resolve=False)
    runner = None
    if args.procs > 1 and not distributed.launched():
        # On GPUs the trainings are data parallel too: the whole command runs as the processes,
        # which resolve the ``auto`` keys and say so themselves (not here, so said once).
        if resolve_device(config["device"]).type != "cpu":
            return distributed.launch(args.procs, args.argv)
        runner = processes_runner(args.procs)
    _resolve_auto(config)
    forced, every = _forced_stages(args)
    with _one_writer(config, args):
        preflight(config, replace=every, announce=True)
        # Under torchrun every rank runs this; one of them speaks.
        if distributed.is_main():
            print(f"affinitynet run: dataset {config['dataset']['name']}, backbone {config['backbone']['name']}, "
                  f"outputs in {config['run_dir']}")
            note = cpu_amp_note(resolve_device(config["device"]), config["amp"])
            if note:
                print(note)
        try:
            run_all(config, force=forced, runner=runner)
        except ProcessesFailed as failed:
            return failed.args[0]
    line = run_summary(config)
    if line and distributed.is_main():
        print(line)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    with _one_writer(config, args):
        preflight(config, replace=args.force, names=[args.stage_name])
        run_stage(config, args.stage_name, force=args.force)
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    spec = KINDS[args.kind]
    # Each key alone now; together once the file's layout is set (apply_layout).
    config = _config_from_args(args, check=False)
    check_keys(config)
    check_names(config)
    others = {stage: kind for stage, kind in imported_kinds(config).items() if stage != spec.stage}
    changed = apply_layout(config, args.kind, args.overrides, keep=others.values())
    if changed:
        print(f"import-weights: {', '.join(changed)} (the network of {spec.repository}'s {spec.file}"
              + "".join(f" and of the imported {kind}" for kind in others.values()) + ")")
    with _one_writer(config, args):
        import_weights(args.kind, args.file, config)
        run_dir = Path(config["run_dir"])
        save_resolved(config, run_dir / "config.yaml")
    for stage, kind in others.items():
        if not is_complete(config, stage):
            print(f"import-weights: the {kind} weights imported in {run_dir / stage} do not fit this config; "
                  f"import them again (affinitynet import-weights {kind} FILE --config {run_dir / 'config.yaml'})")
    print(f"imported {args.file} as {run_dir / spec.stage / 'model.pt'}; continue with "
          f"`affinitynet run --config {run_dir / 'config.yaml'}`")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    split = args.split or config["dataset"]["label_split"]
    data = build_dataset(config["dataset"], split)
    if not data.has_masks:
        print(f"affinitynet evaluate: {data.name} split '{split}' has no ground-truth masks", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = evaluate_predictions(data, args.pred)
    print(format_table({args.name: result["iou"]}, data.class_names,
                       f"{data.name} {split}: mIoU {result['miou']:.1f} over {result['num_images']} images"))
    for line in result.get("skipped", []):
        print(f"skipped: {line}", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    if args.strict and result.get("skipped"):
        return EXIT_BAD_INPUT
    return 0 if result["num_images"] > 0 else EXIT_BAD_INPUT


def cmd_datasets(args: argparse.Namespace) -> int:
    if args.action == "list":
        for entry in datasets.DATASETS:
            print(f"{entry.name:8s} {entry.info['description']}")
        return 0
    config = _config_from_args(args)
    if args.action == "generate":
        ds = config["dataset"]
        root = ds["root"] or datasets.default_demo_root(ds["demo_size"], ds["demo_train"], ds["demo_val"], ds["demo_seed"],
                                                        ds["demo_same_class"])
        datasets.generate_demo(root, ds["demo_size"], ds["demo_train"], ds["demo_val"], ds["demo_seed"], progress=True,
                               coco=args.coco, same_class=ds["demo_same_class"])
        print(f"demo dataset written to {root}")
        if args.coco:
            print(f"as COCO JSON: {', '.join(str(path) for path in datasets.demo.coco_files(root))} (read them with "
                  f"--dataset coco --root {root} dataset.images_dir=JPEGImages)")
        return 0
    split = args.split or config["dataset"]["train_split"]
    data = datasets.build_dataset(config["dataset"], split)
    for line in datasets.describe_classes(data, listed=len(data.skipped) + len(data.untagged)):
        print(line)
    report = datasets.check_dataset(data)
    problems = list(report.get("problems", []))
    left_out = len(data.skipped) + len(data.untagged) + len(problems)
    print(f"{data.name} '{split}': {plural(len(data), 'image')}, {plural(len(data.class_names) - 1, 'object class')}, "
          f"{plural(left_out, 'image')} left out or unreadable")
    for line in problems:
        print(f"  {line}")
    return EXIT_BAD_INPUT if left_out else 0


def cmd_config(args: argparse.Namespace) -> int:
    """show: every key with its value (the paper's defaults, or those of ``--config`` and
    overrides) and what it means; docs: the page docs/configuration.md."""

    if args.action == "docs":
        print(reference_page(), end="")
        return 0

    if args.config or args.overrides:
        values = flatten(load_config(args.config, args.overrides, check=False))
        source = " + ".join([args.config or "demo", *args.overrides])
    else:
        values, source = flatten(defaults()), "defaults: the paper's VOC settings"
    width = max(len(key) for key in values)
    print(f"# key = value ({source}): meaning")
    for key, value in values.items():
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        print(f"{key:<{width}} = {shown:<18} {key_help(key)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    return predict_files(args.checkpoint, args.inputs, args.out, scales=args.scales, flip=not args.no_flip,
                         crf=args.crf, device=args.device, strict=args.strict)


def cmd_export(args: argparse.Namespace) -> int:
    meta = export_onnx(args.checkpoint, args.out, opset=args.opset)
    print(f"exported {args.checkpoint} to {args.out} ({meta['backbone']}, {len(meta['class_names'])} classes, "
          f"any height and width); segment images with: affinitynet predict {args.out} IMAGES --out DIR")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(Path(args.run_dir), gallery_size=args.gallery)
    print(f"report written to {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    with _one_writer(config, args):
        run_sweep(config, which=args.grid)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="affinitynet",
        description="Pixel-level labels from image-level tags with AffinityNet (Ahn & Kwak, CVPR 2018), "
                    "and a segmentation network trained on them.")
    parser.add_argument("--version", action="version", version=f"affinitynet {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="more log output")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    commands.required = True

    _add_pipeline_commands(commands)
    _add_data_commands(commands)
    _add_model_commands(commands)
    return parser


def _add_pipeline_commands(commands) -> None:
    """``run``, one command per stage, ``import-weights``."""
    run = commands.add_parser("run", help="the whole pipeline, skipping stages whose outputs are current",
                              description="Run every stage in order: " + " -> ".join(s.command for s in stages(DEFAULTS))
                              + ". Stages whose outputs are complete and current are skipped.")
    _add_config_options(run)
    run.add_argument("--force", action="append", nargs="?", const=_ALL, metavar="STAGE",
                     help="re-run this stage (name, repeatable); alone: re-run every stage, replacing "
                          "the outputs of another dataset if the run directory holds them")
    _add_procs_option(run)
    _add_writer_options(run)
    run.set_defaults(func=cmd_run)

    for spec in stages():
        sub = commands.add_parser(spec.command, help=spec.help, description=spec.help[0].upper() + spec.help[1:] + ".")
        _add_config_options(sub)
        sub.add_argument("--force", action="store_true",
                         help="discard this stage's outputs and redo it (also when the run directory holds "
                              "another dataset's outputs: those are then all marked for redoing)")
        _add_procs_option(sub)
        _add_writer_options(sub)
        sub.set_defaults(func=cmd_stage, stage_name=spec.name)

    imported = commands.add_parser(
        "import-weights", help="a released psa/irn checkpoint as the finished training stage of a run",
        description="Load the authors' released weights (psa-cam: psa's res38_cls.pth, psa-aff: psa's "
                    "resnet38_aff.pth, irn-cam: irn's res50_cam.pth, irn-irn: irn's res50_irn.pth) into this project's "
                    "network and write them as RUN_DIR/train_cam/model.pt, RUN_DIR/train_affinity/model.pt or "
                    "RUN_DIR/train_irn/model.pt, with the config "
                    "keys of the file's network set (saved as RUN_DIR/config.yaml). `affinitynet run` then "
                    "skips that training stage.")
    imported.add_argument("kind", choices=sorted(KINDS), help="which released file")
    imported.add_argument("file", help="the released .pth file")
    _add_config_options(imported)
    _add_writer_options(imported)
    imported.set_defaults(func=cmd_import_weights)


def _add_data_commands(commands) -> None:
    """``evaluate``, ``datasets``, ``config``."""
    evaluate = commands.add_parser("evaluate", help="score index PNGs against a split's ground truth (mIoU)",
                                   description="Confusion matrix over the split, per-class IoU and mIoU "
                                               "(255 ignored), printed in the paper's table layout.")
    _add_config_options(evaluate)
    evaluate.add_argument("--split", default=None, help="split to score (default: dataset.label_split)")
    evaluate.add_argument("--pred", required=True, help="directory of predictions <id>.png")
    evaluate.add_argument("--json", default=None, help="write {miou, iou, num_images} here")
    evaluate.add_argument("--name", default="prediction", help="row name in the printed table")
    evaluate.set_defaults(func=cmd_evaluate)

    data = commands.add_parser("datasets", help="list, check or generate datasets",
                               description="list: the datasets known; check: open every image and mask of a "
                                           "split and report problems; generate: write the demo dataset (--coco: as COCO JSON too).")
    data.add_argument("action", choices=["list", "check", "generate"])
    _add_config_options(data)
    data.add_argument("--split", default=None, help="split to check (default: dataset.train_split)")
    data.add_argument("--coco", action="store_true", help="generate: also write the demo as COCO JSON "
                                                         "(annotations/instances_{train,val}.json)")
    data.set_defaults(func=cmd_datasets)

    config = commands.add_parser("config", help="print every config key with its value and meaning",
                                 description="show: every config key, its value (the defaults, or those of "
                                             "--config with overrides) and what it means. docs: the Markdown "
                                             "page of every key (docs/configuration.md).")
    config.add_argument("action", choices=["show", "docs"])
    config.add_argument("--config", "-c", default=None,
                        help=f"a YAML file or built-in name ({', '.join(builtin_configs())})")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    config.set_defaults(func=cmd_config)


def _add_model_commands(commands) -> None:
    """``predict``, ``export``, ``report``, ``sweep``."""
    predict = commands.add_parser("predict", help="segment image files or folders with a trained model",
                                  description="Masks (VOC-palette PNG) and colour overlays for images, from a "
                                              "segmentation checkpoint alone (it carries classes, "
                                              "normalisation and backbone).")
    predict.add_argument("checkpoint", help="train_seg/model.pt of a run, or its export by `affinitynet export` "
                                            "(.onnx: run by onnxruntime, same outputs)")
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("--out", required=True, help="output directory")
    predict.add_argument("--scales", type=float, nargs="+", default=[1.0], help="inference scales (A.2: 0.5 0.75 1 1.25 1.5)")
    predict.add_argument("--no-flip", action="store_true", help="no horizontal-flip averaging")
    predict.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--strict", action="store_true", help="stop at the first bad image")
    predict.set_defaults(func=cmd_predict)

    export = commands.add_parser("export", help="write the segmentation network as an ONNX file (predict runs it with onnxruntime)",
                                 description="Write a train_seg/model.pt as an ONNX file (any batch, height and "
                                             "width) with its classes, normalisation and output stride in the "
                                             "file's metadata; `affinitynet predict FILE.onnx` runs it with "
                                             "onnxruntime. Needs: pip install 'affinitynet[onnx]'.")
    export.add_argument("checkpoint", help="train_seg/model.pt of a run")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=_positive_int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    export.set_defaults(func=cmd_export)

    report = commands.add_parser("report", help="write an HTML report of a run",
                                 description="One self-contained HTML page with tables, charts, training "
                                             "curves and a gallery of every stage's output.")
    report.add_argument("run_dir")
    report.add_argument("--gallery", type=int, default=8, help="images in the gallery")
    report.set_defaults(func=cmd_report)

    sweep = commands.add_parser("sweep", help="hyper-parameter analysis of beta x t and alpha (Fig. 8)",
                                description="Re-run only the random walk and labelling over grids, reusing "
                                            "the saved CAMs and affinities, and plot pseudo-label mIoU.")
    _add_config_options(sweep)
    sweep.add_argument("--grid", choices=["beta_t", "alpha", "both"], default="both")
    _add_writer_options(sweep)
    sweep.set_defaults(func=cmd_sweep)


_OS_ERROR_HINTS = {
    errno.EACCES: "check the permissions of this path, or write elsewhere with --run-dir or --out",
    errno.EPERM: "check the permissions of this path, or write elsewhere with --run-dir or --out",
    errno.EROFS: "write elsewhere with --run-dir or --out",
    errno.ENOSPC: "disk full: free some space and re-run; finished outputs are kept and the run resumes",
    errno.EDQUOT: "disk quota exceeded: free some space and re-run; finished outputs are kept and the run resumes",
}


def _os_error_line(error: OSError) -> str:
    """``<path>: <reason> (<what to do>)`` on one line; an atomic write's temporary file is
    reported as the directory it was to be written in."""
    reason = error.strerror or (str(error).splitlines()[0] if str(error) else error.__class__.__name__)
    hint = _OS_ERROR_HINTS.get(error.errno)
    text = f"{reason} ({hint})" if hint else reason
    if error.filename is None:
        return text
    path = Path(os.fsdecode(error.filename))
    if path.name.startswith(".") and path.name.endswith(".tmp"):
        path = path.parent
    return f"{path}: {text}"


def _one_line(error: Exception) -> str:
    """The message on one line: a WeightsError lists mismatched keys on indented lines below
    its first, which become ``first rest1; rest2``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])] if len(lines) > 1 else lines)


def _report(line: str, shared: bool = False) -> None:
    """The line that ends a command, on stderr. Under torchrun an error that every process meets
    alike (``shared``) is printed by rank 0 alone."""
    if not shared or distributed.is_main():
        print(f"affinitynet: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`run --force train_cam cam.epochs=2`); argparse's single
    # positional list would refuse those after the first option.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "force", None) and isinstance(args.force, list):
        # `run --force cam.epochs=2`: argparse hands the override to --force as its stage.
        moved = [value for value in args.force if "=" in value]
        args.force = [_ALL if "=" in value else value for value in args.force]
        args.overrides = [*args.overrides, *moved]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if getattr(args, "procs", 1) > 1 and args.func is not cmd_run:   # `run` chooses per stage
        if not distributed.launched():   # the processes it starts see WORLD_SIZE and run the command
            return distributed.launch(args.procs, args.argv)
    try:
        return args.func(args)
    except AffinityNetError as error:
        # Every process reads the same config, run directory and weight files; an input file's
        # error may be one process's own (its share of the images).
        _report(f"error: {_one_line(error)}", shared=not isinstance(error, InputError))
        return EXIT_BAD_INPUT
    except OSError as error:  # read-only or full output directory, permissions, ...
        if args.verbose:
            raise
        _report(f"error: {_os_error_line(error)}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _report("interrupted; finished outputs are kept and a re-run resumes", shared=True)
        return 130
    except Exception as error:   # not the user's mistake: a bug, or a library's failure
        if args.verbose:
            raise
        _report(f"error: {_internal_error_line(error)}")
        return 1


def _internal_error_line(error: Exception) -> str:
    """One line for an error that is not the user's, naming the file its traceback went to."""
    first = str(error).splitlines()[0] if str(error) else ""
    what = f"{error.__class__.__name__}: {first}" if first else error.__class__.__name__
    name = f"affinitynet-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path = Path(tempfile.gettempdir()) / name
    try:
        path.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    except OSError:
        return f"{what} (the traceback could not be saved; run again with --verbose to see it)"
    return f"{what} (the full traceback is in {path}; --verbose prints it)"


if __name__ == "__main__":
    sys.exit(main())
