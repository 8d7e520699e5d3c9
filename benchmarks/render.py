"""Render the results tables of the README and the docs from the benchmarks' JSON files.

    python -m benchmarks.render            # rewrite every table from benchmarks/results/*.json
    python -m benchmarks.render --check    # change nothing; exit 1 naming each table that differs

A table lives between two marker comments in README.md, docs/index.md or docs/results.md::

    <!-- results:NAME -->
    ...rendered, never edited by hand...
    <!-- /results:NAME -->

``NAME`` is one of ``TABLES`` below, each rendered from one or more files of
``benchmarks/results/``. A file that is missing renders as a placeholder row that says which
command writes it. The rendering reads nothing but those files, so a table differs from its file
only when one of them was edited or rerun without ``python -m benchmarks.render``
(tests/test_results_render.py checks it).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from .label_levers import CONFIRMATION, LEVERS, walk_row

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/index.md", "docs/results.md", "docs/irn.md", "docs/deploy.md", "docs/label-refinement.md")
RESULTS = Path("benchmarks") / "results"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)

# The pipeline benchmarks: (results file, its row's title, the command that writes the file).
PIPELINES = {
    "msrc21": ("MSRC-21, object protocol", "python -m benchmarks.msrc21"),
    "seed_spread_demo": ("demo (synthetic)", "python -m benchmarks.seed_spread --config demo"),
}
# Every other benchmark, in the order of the speed table: (results file, command that writes it).
BENCHMARKS = {
    "random_walk": "python -m benchmarks.random_walk",
    "irn_walk": "python -m benchmarks.irn_walk",
    "affinity_pairs": "python -m benchmarks.affinity_pairs",
    "backbone_speed": "python -m benchmarks.backbone_speed",
    "cam_training": "python -m benchmarks.cam_training",
    "stage_throughput": "python -m benchmarks.stage_throughput",
    "inference_threads": "python -m benchmarks.inference_threads",
    "segmentation_inference": "python -m benchmarks.segmentation_inference",
    "distributed_cam_inference": "python -m benchmarks.distributed_cam_inference",
    "mxnet_params": "python -m benchmarks.mxnet_params MXNET_PYTHON",
    "psa_equivalence": "python -m benchmarks.psa_equivalence PSA_CHECKOUT",
    "irn_equivalence": "python -m benchmarks.irn_equivalence IRN_CHECKOUT",
    "affinity_label_precision": "python -m benchmarks.affinity_label_precision runs/msrc21",
    "crf_changes": "python -m benchmarks.crf_changes runs/msrc21",
    "background_errors": "python -m benchmarks.background_errors runs/msrc21 runs/msrc21_gt",
    "onnx_predict": "python -m benchmarks.onnx_predict RUN_DIR/train_seg/model.pt",
    "irn_same_class": "python -m benchmarks.irn_same_class",
}


def load(root: Path, name: str) -> dict[str, Any] | None:
    path = root / RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def placeholder(command: str) -> str:
    return f"not yet measured at this commit: run `{command}`"


# --- formatting ---------------------------------------------------------------------------------

def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        magnitude = abs(value)
        if magnitude == 0:
            return "0"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        if magnitude >= 0.01:
            return f"{value:.3f}"
        return f"{value:.1e}"
    if isinstance(value, (list, tuple)):
        return " / ".join(number(v) for v in value)
    return str(value).replace("|", "\\|")


def one(value: float | None) -> str:
    """An mIoU (percent) to one decimal, as the paper prints them."""
    return "-" if value is None else f"{value:.1f}"


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f} (one seed)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def listed(values: list[float]) -> str:
    """Each seed's mIoU, in the seeds' order."""
    return ", ".join(one(v) for v in values)


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def machine(env: dict[str, Any]) -> str:
    """The CPU in a few words: its model, its cores and its widest vector unit (AMX, AVX512-BF16,
    AVX-512, AVX2: what decides how fast a convolution runs, and whether ``amp: native`` runs
    bfloat16), and the GPU when one ran the networks."""
    flags = set((env.get("cpu_flags") or "").split())
    vector = next((name for flag, name in (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"),
                                           ("avx2", "AVX2"))
                   if flag in flags), None)
    cpu = f"{env.get('cpu_model') or 'unknown CPU'} ({env.get('cpus')} CPUs{', ' + vector if vector else ''})"
    return f"{env['gpu']}, {cpu}" if env.get("gpu") else cpu


def provenance(record: dict[str, Any]) -> str:
    env = record.get("environment", {})
    head = env.get("commit")
    commit = f"commit `{head[:7]}`" if head else "no commit"
    if env.get("dirty"):
        commit += " with local changes"
    return (f"{commit}, {machine(env)}, torch {env.get('torch')}, {env.get('threads')} threads, "
            f"{(env.get('date') or '')[:10]}")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- the pipeline benchmarks --------------------------------------------------------------------

def table1_seeds(results: dict[str, Any], title: str) -> list[float]:
    """Table 1's row ``title`` of each seed where every seed ran the whole pipeline (else none)."""
    return [t[title] for t in results.get("table1_seeds", []) if title in t]


def _labels(results: dict[str, Any], title: str) -> str:
    """Table 1's row ``title``: mean +- std over the seeds where each seed ran the whole pipeline,
    else seed 0's."""
    per_seed = table1_seeds(results, title)
    if len(per_seed) > 1:
        return spread(per_seed)
    row = results.get("rows", {}).get(title)
    return one(None if row is None else row["miou"])


def time_of(results: dict[str, Any], env: dict[str, Any]) -> str:
    """Seed 0's time with its bound from the stages' records (a resumed command keeps them; its own
    wall time is only the resumed part's), else the command's wall time."""
    recorded = results.get("recorded_seconds_seed0")
    if recorded is None:
        return minutes(env.get("wall_seconds"))
    return f"seed 0 with its bound {minutes(recorded)} (stages' records)"


def headline() -> Callable[[Path], str]:
    def render(root: Path) -> str:
        header = ["", "CAM (train)", "CAM+RW (train)", "pseudo labels (train)", "network (val)",
                  "upper bound (val)", "measured"]
        rows = []
        for name, (title, command) in PIPELINES.items():
            record = load(root, name)
            if record is None:
                rows.append([f"{title}", placeholder(command), "", "", "", "", ""])
                continue
            r = record["results"]
            training = r.get("training_labels")
            env = record["environment"]
            rows.append([
                f"{title} (`{record['command']}`)",
                _labels(r, "CAM"), _labels(r, "CAM+RW"),
                f"{_labels(r, training)} ({training})",
                f"{spread(r['network_val_miou'])} ({len(r['network_val_miou'])} seeds)",
                spread(r["upper_bound_val_miou"]),
                f"{provenance(record)}; {time_of(r, env)}",
            ])
        return table(header, rows)
    return render


def _per_record(name: str, empty: list[str], body: Callable[[dict[str, Any]], str]) -> Callable[[Path], str]:
    """The table of pipeline benchmark ``name``: ``body(record)`` of its file, or a row saying
    what to run (under the header ``empty``) while there is none."""
    command = PIPELINES[name][1]

    def render(root: Path) -> str:
        record = load(root, name)
        return table(empty, [[placeholder(command), "-"]]) if record is None else body(record)
    return render


def label_table(name: str) -> Callable[[Path], str]:
    """Table 1 (the pseudo labels on the label split) and Table 2 (seed 0's network and bound on
    the evaluation split) per class."""
    def body(record: dict[str, Any]) -> str:
        r = record["results"]
        classes = r["class_names"]
        rows = []
        for row_title, row in r["rows"].items():
            label = f"{'network, seed 0' if row_title == 'Network' else row_title} ({row['split']})"
            if row_title == r.get("training_labels"):
                label += ", trains the network"
            rows.append([label, *(one(row["iou"].get(c)) for c in classes),
                         f"**{one(row['miou'])}**"])
        bound = r.get("upper_bound_seed0")
        if bound:
            rows.append([f"upper bound, seed 0 ({r['eval_split']})",
                         *(one((bound.get("iou") or {}).get(c)) for c in classes), f"**{one(bound['miou'])}**"])
        return (table(["", *classes, "mean"], rows)
                + f"\nMeasured by `{record['command']}`: {provenance(record)}.\n")
    return _per_record(name, ["", "mean"], body)


def seed_table(name: str) -> Callable[[Path], str]:
    """The network and the bound over the training seeds, and the time."""
    def body(record: dict[str, Any]) -> str:
        r = record["results"]
        networks, bounds, ratios = r["network_val_miou"], r["upper_bound_val_miou"], r["ratio"]
        seeds = [f"seed {k}" for k in range(len(networks))]
        titles = (r.get("table1_seeds") or [{}])[0]   # only where every seed ran the whole pipeline
        rows = [[f"pseudo labels, {title} ({r['label_split']})", *(one(v) for v in table1_seeds(r, title)),
                 spread(table1_seeds(r, title))]
                for title in titles]
        whose = "its own" if r.get("whole_pipeline") else "seed 0's"
        rows += [[f"network on {whose} {r.get('training_labels')} labels ({r['eval_split']})",
                 *(one(v) for v in networks), f"**{spread(networks)}**"],
                [f"upper bound, ground truth ({r['eval_split']})", *(one(v) for v in bounds), spread(bounds)],
                ["network / bound", *(f"{v:.3f}" for v in ratios), f"{r['ratio_of_means']:.3f} (of the means)"]]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r.get("stage_seconds", {}).items() if v is not None)
        env = record["environment"]
        return (table(["", *seeds, "mean ± std"], rows)
                + f"\nMeasured by `{record['command']}`: {provenance(record)}. The command took "
                  f"{minutes(env.get('wall_seconds'))}; seed 0, the pipeline with its bound beside it, "
                  f"{minutes(r.get('recorded_seconds_seed0'))} from the stages' records. Seconds per stage "
                  f"of seed 0: {stages}.\n")
    return _per_record(name, ["", "mean ± std"], body)


# --- every other benchmark ----------------------------------------------------------------------

def benchmarks_table(root: Path) -> str:
    rows = []
    for name, command in BENCHMARKS.items():
        record = load(root, name)
        if record is None:
            rows.append([f"`{name}`", placeholder(command), "", ""])
            continue
        summary = record["results"].get("summary", {})
        figures = "; ".join(f"{number(key)}: {number(value)}" for key, value in summary.items())
        env = record["environment"]
        rows.append([f"`{name}`", f"{figures} (`{record['command']}`)", provenance(record),
                     minutes(env.get("wall_seconds"))])
    return table(["benchmark", "what it measured (`its command`)", "measured", "wall time"], rows)


def irn_equivalence(root: Path) -> str:
    """``benchmarks/irn_equivalence.py``'s comparison of irn's steps and this project's stages."""
    record = load(root, "irn_equivalence")
    if record is None:
        return table(["compared", "irn's step", "this project's stage", "result"],
                     [[placeholder(BENCHMARKS["irn_equivalence"]), "", "", ""]])
    r = record["results"]
    worst, walk, inst = r["max"], r["walk_agreement"], r["instances"]
    rows = [
        ["networks on irn's padded image and mirror", "`EdgeDisplacement` (`Net.forward`)", "`IRNet`, `irn.layout: irn`",
         f"boundary logits max \\|diff\\| {number(worst['network_boundary_logits_max'])}, displacements "
         f"{number(worst['network_displacement_max'])}"],
        ["CAMs (`high_res`, present classes)", "`make_cam`", "`infer-cam`", f"max \\|diff\\| {number(worst['cam_max'])}"],
        ["confident regions", "`cam_to_ir_label`", "`confident-regions` (`affinity.confidence: threshold`)",
         f"{r['confident_region_agreement']:.2f}% of pixels agree"],
        ["boundary maps", "`make_sem_seg_labels` (image padded to 512)", "`irn-walk` (image unpadded)",
         f"max \\|diff\\| {number(worst['boundary_max'])}, mean {number(r['boundary_mean'])}"],
        ["walked semantic labels", "`make_sem_seg_labels`", "`irn-walk` (`irn.background: threshold`)",
         f"{walk['stage']:.2f}% of pixels agree"],
        ["the same, on irn's CAMs and boundary map", "`make_sem_seg_labels`", "`ops.random_walk`",
         f"{walk['irn_inputs']:.2f}% of pixels agree"],
        ["instances", "`make_ins_seg_labels`", "`irn-instances`",
         f"irn {inst['irn']}, ours {inst['ours']}; {inst['matched_at_0.5']} matched at IoU >= 0.5 (mean IoU "
         f"{number(inst['mean_iou_of_matched'])}); their scores differ by {number(inst['score_mean_abs_diff_of_matched'])} "
         f"on average, {number(inst['score_max_abs_diff_of_matched'])} at most"],
    ]
    settings = r["settings"]
    return (table(["compared", "irn's step", "this project's stage", "result"], rows)
            + f"\n{settings['images']} voc12-mini photos at long side {settings['long_side']}, measured by "
              f"`{record['command']}`: {provenance(record)}.\n")


def irn_same_class(root: Path) -> str:
    """``benchmarks/irn_same_class.py``: Table 3 (mAP^r) on the demo with same-class objects, per seed."""
    record = load(root, "irn_same_class")
    if record is None:
        return table(["mAP^r (%)", "mean ± std"], [[placeholder(BENCHMARKS["irn_same_class"]), ""]])
    r = record["results"]
    seeds = r.get("seeds", [])
    rows = [[f"IoU {t}", *(one(v) for v in values), f"**{spread(values)}**"] for t, values in r["map_r"].items()]
    if seeds:
        rows.append(["displacement loss, last epoch (fg / bg)",
                     *(f"{number(s['displacement_loss']['fg'])} / {number(s['displacement_loss']['bg'])}" for s in seeds), ""])
    count = len(next(iter(r["map_r"].values())))
    return (table(["mAP^r (%)", *(f"seed {k}" for k in range(count)), "mean ± std"], rows)
            + f"\nMeasured by `{record['command']}`: {provenance(record)}; "
              f"{minutes(record['environment'].get('wall_seconds'))}.\n")


def onnx_predict(root: Path) -> str:
    """``benchmarks/onnx_predict.py``: predict's rate with each engine, per thread count."""
    header = ["threads", "PyTorch (model.pt)", "onnxruntime (.onnx)", "ratio ort/pt (per round)", "labels equal"]
    record = load(root, "onnx_predict")
    if record is None:
        return table(header, [[placeholder(BENCHMARKS["onnx_predict"]), "", "", "", ""]])
    r = record["results"]
    rows = [[str(row["threads"]), f"{row['pytorch_images_per_s']:.2f} images/s",
             f"{row['onnxruntime_images_per_s']:.2f} images/s",
             f"{row['ratio']:.2f}x ({', '.join(format(x['ratio'], '.2f') for x in row['rounds'])})",
             f"{100 * row['equal_labels']:.4f}%"] for row in r["thread_counts"]]
    load_average = record["environment"].get("load_average")
    return (table(header, rows)
            + f"\n{r['images']} MSRC-21 val images, scales {r['scales']}, flip {number(r['flip'])}, the medians of "
              f"{r['rounds']} rounds; a {r['backbone']} segmentation network of {r['classes']} classes; onnxruntime "
              f"{r['onnxruntime']}. Measured by `{record['command']}`: {provenance(record)}; "
              f"{minutes(record['environment'].get('wall_seconds'))}"
              + (f"; load average {number(load_average)} at the end" if load_average else "") + ".\n")


def label_levers(root: Path) -> str:
    """``benchmarks/label_levers.py``: each lever's A/B against the MSRC-21 benchmark's runs (issue 41)."""
    # A confirmation's first seed is not 0 (its row says which seeds it ran).
    header = ["lever", "training labels, train (first seed; whole pipelines: per seed)",
              "the walk's labels, train, first seed",
              "network, val (per seed)",
              "baseline network, val", "time of the lever's stages, first seed", "decision"]
    rows, sources, notes = [], [], []
    for name, lever in LEVERS.items():
        record = load(root, f"label_levers_{name}")
        if record is None:
            rows.append([f"`{name}`", placeholder(f"python -m benchmarks.label_levers {name}"), "", "", "", "", ""])
            continue
        # Its confirmations on fresh seeds (label_levers --first-seed) follow the lever's own row.
        confirmations = [load(root, path.stem) for path in sorted((root / RESULTS).glob(f"{CONFIRMATION.format(name)}*.json"))]
        for record in (record, *confirmations):
            row, source, note = _lever_row(name, lever, record)
            rows.append(row)
            sources.append(source)
            notes += [note] if note else []
    return (table(header, rows) + ("\nMeasured by " + "; ".join(sources) + ".\n" if sources else "")
            + "".join(f"\n{note}\n" for note in notes))


def _lever_row(name: str, lever, record: dict[str, Any]) -> tuple[list[str], str, str | None]:
    """The row of one record of ``label_levers`` (a lever's A/B or its confirmation), its source
    and its diagnostic note (None without one)."""
    r = record["results"]
    first = r["seeds"][0]
    training = first["training_labels"]
    base_training = first["baseline_training_labels"]
    walk = walk_row(first)
    networks, baseline = r["network_val_miou"], r["baseline_network_val_miou"]
    against = f"; against `{lever.baseline}`" if lever.baseline else ""
    # Records from before whole-pipeline seeds name none: their seeds were the network's.
    against += "; seeds: whole pipelines" if r.get("whole_pipeline") else "; seeds: the network's on seed 0's labels"
    seeds_run = [seed["seed"] for seed in r["seeds"]]
    confirming = r.get("first_seed", 0) > 0
    against += f"; confirmation on seeds {seeds_run[0]}-{seeds_run[-1]}" if confirming else ""
    # A whole pipeline's seeds differ in their labels too; the network's seeds share seed 0's.
    labelled = r["seeds"] if r.get("whole_pipeline") else [first]
    labels = [seed["table1"][training] for seed in labelled]
    base_labels = [seed["baseline_table1"][base_training] for seed in labelled]
    row = [f"`{name}` ({', '.join(f'`{o}`' for o in lever.overrides)}; aim: {lever.aim}{against})",
           (f"{one(labels[0])} ({training}; baseline {one(base_labels[0])})" if len(labels) == 1 else
            f"{spread(labels)} ({listed(labels)}; {training}; baseline {spread(base_labels)}: {listed(base_labels)})"),
           f"{one(first['table1'][walk])} ({walk})",
           f"**{spread(networks)}** ({listed(networks)})",
           f"{spread(baseline)} ({listed(baseline)})",
           minutes(first["lever_seconds"]), r["decision"]]
    source = f"`{name}`{' (confirmation)' if confirming else ''}: `{record['command']}`, {provenance(record)}"
    shares = first.get("diagnostic")
    note = shares and (f"`{name}`, seed 0, against the ground truth of {shares['split']}: of the labelled pixels, "
                       f"{shares['agree_pct']:.1f}% keep the method's label (the network agrees), "
                       f"{shares['taken_pct']:.1f}% take the network's, which is right on "
                       f"{shares['taken_network_right_pct']:.1f}% of them and the method's on "
                       f"{shares['taken_method_right_pct']:.1f}%, and {shares['ignored_pct']:.1f}% are ignored.")
    return row, source, note or None


TABLES: dict[str, Callable[[Path], str]] = {
    "headline": headline(),
    "msrc21-labels": label_table("msrc21"),
    "msrc21-network": seed_table("msrc21"),
    "demo-labels": label_table("seed_spread_demo"),
    "demo-network": seed_table("seed_spread_demo"),
    "benchmarks": benchmarks_table,
    "irn-equivalence": irn_equivalence,
    "irn-same-class": irn_same_class,
    "onnx-predict": onnx_predict,
    "label-levers": label_levers,
}


# --- the pages ----------------------------------------------------------------------------------

def render_page(text: str, root: Path) -> tuple[str, list[str]]:
    """``text`` with every table rendered again, and the names of those that changed."""
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"results:{name} is no table of benchmarks/render.py ({', '.join(TABLES)})")
        body = TABLES[name](root)
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), changed


def _tables(root: Path, write: bool) -> list[str]:
    """``PAGE: results:NAME`` of every table that differs from its JSON files; ``write``
    rewrites them."""
    found = []
    for page in PAGES:
        path = root / page
        if path.is_file():
            text, changed = render_page(path.read_text(encoding="utf-8"), root)
            if changed and write:
                path.write_text(text, encoding="utf-8")
            found += [f"{page}: results:{name}" for name in changed]
    return found


def stale(root: Path = ROOT) -> list[str]:
    """``PAGE: results:NAME`` of every table that differs from its JSON files."""
    return _tables(root, write=False)


def render(root: Path = ROOT) -> list[str]:
    """Rewrite every table; the ``PAGE: results:NAME`` that changed."""
    return _tables(root, write=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render",
                                     description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a table differs from its JSON files")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    if args.check:
        found = stale(args.root)
        for entry in found:
            print(f"stale: {entry} (python -m benchmarks.render rewrites it)")
        return 1 if found else 0
    for entry in render(args.root):
        print(f"rendered: {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
