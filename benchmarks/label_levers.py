"""An A/B of one lever on the pseudo labels (issue 41) against the MSRC-21 benchmark's runs: the
lever's overrides on the msrc21 config, seed by seed, beside the runs of
``benchmarks/msrc21.py`` (the baseline, which must be complete for the seeds asked), seeded as
they are: whole pipelines, or with ``--no-whole-pipeline`` the segmentation network on seed 0's
labels.

    python -m benchmarks.label_levers LEVER [--seeds 3] [--baseline runs/msrc21] [--procs 2] [--no-whole-pipeline]
    python -m benchmarks.label_levers LEVER --first-seed 3   # the confirmation on fresh seeds 3-5 (``confirm``)

Levers (``LEVERS``):

- ``refine``: the refinement round, ``labels.refine=true`` (a first network on the walk's labels
  relabels the training images where it is confident; docs/label-refinement.md);
- ``walk_labels``: the walk's labels train the network, ``random_walk.crf=off``, instead of the
  band (the refinement that never loses to the walk is none);
- ``recam``: ReCAM's maps, ``cam.method=recam`` (the CAM network fine-tuned with a softmax
  cross-entropy on its class-pooled features, ``train_recam``);
- ``walk_cams``: the confident regions cut from the CAMs walked with a first AffinityNet,
  ``affinity.refine_cams=true`` (that AffinityNet is the baseline's own);
- ``cam_fine_tune``: the CAM network's last 2 of 8 epochs at stride 8, the stride it runs at,
  ``cam.fine_tune_epochs=2`` (the segmentation network's kept rule, DeepLab's fine-tuning at 8;
  trained at 16 throughout, the CAMs' labels fell 1.2 points, docs/history.md);
- ``cam_stride8``: the CAM network trained at stride 8 throughout, ``cam.train_output_stride=null``
  (the backbone's stride): the setting before training at 16 was kept for its speed, when the
  walk's labels were higher (docs/history.md, "Training at output stride 16"); it costs
  train-cam's time, not weights;
- ``walk_scale2``: the walk on a grid twice as fine, ``random_walk.scale=2`` (AffinityNet sees the
  image enlarged twice, a cell spans 4 px) with ``random_walk.t=512``, the size rule's t for that
  grid (``size_rules.walk_length`` of the enlarged image: the reach in pixels stays the same);
- ``walk_flip``: the walk's affinities from AffinityNet's features averaged over the image and its
  mirror image, ``random_walk.flip=true`` (the CAMs' test-time flip, 4.2, for the affinities; the
  same AffinityNet, twice its inference);
- ``regions_alpha32``: the confident background cut at the released code's high alpha, 32, instead
  of the paper's 24, ``affinity.alpha_high=32`` (psa's README gives its random walk 61.0 on VOC
  train with alphas 4/16/32 and its released weights, the paper 58.1 with 4/16/24): a weaker
  background score, so only the surer background is confident; AffinityNet trains again on those
  regions;
- ``irn``: IRN's labels instead of AffinityNet's, ``labels.method=irn`` (with its default, the
  band);
- ``irn_walk_labels``: ``walk_labels`` for IRN, ``irn.crf=off``, against ``irn``'s runs (a lever
  with a ``baseline`` lever is measured against that lever's runs, seed by seed).

Seed k runs as the baseline's seed k does: seed 0 with the run's seed in ``runs/msrc21_<lever>``,
every further seed in ``runs/msrc21_<lever>_pipeline<k>`` with ``seed=k``, the whole pipeline's
seed, against ``runs/msrc21_pipeline<k>`` (the issue's rule: whole-pipeline seeds). With
``--no-whole-pipeline`` a further seed is ``segmentation.seed=k`` in ``runs/msrc21_<lever>_seed<k>``,
against ``runs/msrc21_seed<k>`` of ``benchmarks/msrc21.py --no-whole-pipeline``: the levers
measured before whole-pipeline seeds were (docs/label-refinement.md says which). Work the lever
leaves unchanged is not done twice: every stage whose hash under the lever's config is that of a
finished stage of the baseline's (or of the lever's seed 0) is linked from it, under its own name
(the refinement round's first network is the baseline's ``train_seg`` of the same seed: the same
labels, keys and seed). The rest runs as ``affinitynet run --procs``. The bound (ground truth)
does not depend on the labels: the baseline's is used.

Writes ``benchmarks/results/label_levers_<lever>.json``: per seed, Table 1 on train and the
network on val for the baseline and the lever, and the seconds of the stages the lever ran; the
A/B table of docs/label-refinement.md is rendered from it (``python -m benchmarks.render``).
Resumable: run the command again after an interruption.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from affinitynet.config import load_config
from affinitynet.data.datasets import build_dataset, ensure_msrc21
from affinitynet.files import IGNORE_INDEX, load_label_png, read_json
from affinitynet.pipeline import label_stage, stage, stages, training_label_stage

from .common import Benchmark
from .seed_spread import affinitynet, link_finished, seed_overrides, seed_run_dirs, seed_weak_dir, spread

class Lever(NamedTuple):
    """A lever's overrides; its aim, "gain" (it must raise the network) or "no loss" (it fixes a
    rule the issue sets, the training labels never below the walk's, and must not lower the network);
    and the lever whose runs are its baseline (None: those of ``benchmarks/msrc21.py``)."""
    overrides: tuple[str, ...]
    aim: str
    baseline: str | None = None


LEVERS: dict[str, Lever] = {
    "refine": Lever(("labels.refine=true",), "gain"),
    "walk_labels": Lever(("random_walk.crf=off",), "no loss"),
    "recam": Lever(("cam.method=recam",), "gain"),
    "walk_cams": Lever(("affinity.refine_cams=true",), "gain"),
    "cam_fine_tune": Lever(("cam.fine_tune_epochs=2",), "gain"),
    "cam_stride8": Lever(("cam.train_output_stride=null",), "gain"),
    "walk_scale2": Lever(("random_walk.scale=2", "random_walk.t=512"), "gain"),
    "walk_flip": Lever(("random_walk.flip=true",), "gain"),
    "regions_alpha32": Lever(("affinity.alpha_high=32",), "gain"),
    "irn": Lever(("labels.method=irn",), "gain"),
    "irn_walk_labels": Lever(("labels.method=irn", "irn.crf=off"), "no loss", baseline="irn"),
}


# The results file of a lever's confirmation on fresh seeds (``--first-seed``), before its seeds
# (``_seeds3-5``): beside the lever's own, never over it.
CONFIRMATION = "label_levers_{}_seeds"
# The one-sided 5% quantile of Student's t with 2 degrees of freedom: the confirmation's 3 seeds.
T_5PCT_2DF = 2.920


def run_base(lever: str) -> str:
    """Where seed 0 of ``lever`` runs (seed k: ``seed_spread.seed_weak_dir``)."""
    return f"runs/msrc21_{lever}"


def walk_row(seed: dict) -> str:
    """The Table 1 row of the walk of a seed's label method (CAM+RW; CAM+IRN for IRN): records
    written before IRN's levers name none, and were all AffinityNet's."""
    return seed.get("walk_row", "CAM+RW")


def stops_at_seed_0(first: dict, aim: str) -> bool:
    """Whether the rule runs no further seeds after seed 0's record ``first``: a lever that aims at
    a gain whose network is below the baseline's (``decide``)."""
    return aim == "gain" and first["network_val_miou"] < first["baseline_network_val_miou"]


def decide(seeds: list[dict], aim: str) -> str:
    """Whether a lever is kept, by the rule fixed before any lever was measured
    (docs/label-refinement.md, "Levers on the labels, measured"). Over 3 seeds, against the
    baseline's network on the same seeds, with ``noise`` the larger of the two standard
    deviations: a lever that aims at a gain is kept when the network's mean on val rises by more
    than ``noise``; one that aims at no loss, when it falls by no more than ``noise``. Either way
    its training labels on train (seed 0; ignored pixels count as misses, as in Table 1) must not
    be below its CAM+RW. A gain lever whose seed-0 network is below the baseline's seed 0 is not
    run on further seeds: the other two would have to make up the loss and a seed spread besides."""
    first = seeds[0]
    training = first["training_labels"]
    walk = walk_row(first)
    labels_ok = first["table1"][training] >= first["table1"][walk]
    networks = [s["network_val_miou"] for s in seeds]
    baseline = [s["baseline_network_val_miou"] for s in seeds]
    if len(seeds) < 3:
        if stops_at_seed_0(first, aim):
            return "not kept: seed 0's network is below the baseline's (no further seeds)"
        return f"undecided: {len(seeds)} of 3 seeds"
    change = statistics.mean(networks) - statistics.mean(baseline)
    noise = max(statistics.stdev(networks), statistics.stdev(baseline))
    network_ok = change > noise if aim == "gain" else change >= -noise
    reasons = ([] if network_ok else [f"the network's change of {change:+.1f} is "
                                      f"{'within' if abs(change) <= noise else 'beyond'} the seed spread {noise:.1f}"])
    reasons += [] if labels_ok else [f"its training labels are below {walk}"]
    return f"kept (network {change:+.1f}, spread {noise:.1f})" if not reasons else "not kept: " + "; ".join(reasons)


def confirm(seeds: list[dict]) -> str:
    """The confirmation rule, fixed before any confirmation seed ran (docs/label-refinement.md,
    "The confirmation rule"): on 3 fresh whole-pipeline seeds, a gain lever is kept when the mean
    of its seed-by-seed differences of the network on val against the baseline's is positive and
    at least ``T_5PCT_2DF`` standard errors (a one-sided paired t-test at 5%), and its training
    labels on the first of them are not below its walk's."""
    if len(seeds) < 3:
        return f"undecided: {len(seeds)} of 3 seeds"
    differences = [s["network_val_miou"] - s["baseline_network_val_miou"] for s in seeds]
    change, error = statistics.mean(differences), statistics.stdev(differences) / len(differences) ** 0.5
    first = seeds[0]
    reasons = ([] if change > 0 and change >= T_5PCT_2DF * error else
               [f"the mean difference {change:+.1f} is under {T_5PCT_2DF} standard errors ({error:.1f})"])
    if first["table1"][first["training_labels"]] < first["table1"][walk_row(first)]:
        reasons.append(f"its training labels are below {walk_row(first)}")
    return (f"confirmed (network {change:+.1f}, standard error {error:.1f})" if not reasons
            else "not confirmed: " + "; ".join(reasons))


def refinement_shares(config: dict) -> dict[str, float]:
    """Where the refinement round's first network and the method's labels differ, who is right:
    over the labelled pixels of the label split, the share (%) of each of the rule's three cases
    (agreement, the network's confident label taken, ignored) and, where the network's label was
    taken, how often it and the method's label are the ground truth's."""
    data = build_dataset(config["dataset"], config["dataset"]["label_split"])
    method = label_stage(config).output("pseudo_labels", config)
    round_ = training_label_stage(config)
    counts = dict.fromkeys(("labelled", "agree", "taken", "ignored", "taken_network_right", "taken_method_right"), 0)
    for sample in data.samples:
        truth = data.load_mask(sample)
        if truth is None:
            continue
        labelled = truth != IGNORE_INDEX
        walk = load_label_png(method / f"{sample.id}.png")
        network = load_label_png(round_.output("network_labels", config) / f"{sample.id}.png")
        refined = load_label_png(round_.output("pseudo_labels", config) / f"{sample.id}.png")
        taken = (network != walk) & (refined != IGNORE_INDEX) & labelled
        counts["labelled"] += int(labelled.sum())
        counts["agree"] += int(((network == walk) & labelled).sum())
        counts["taken"] += int(taken.sum())
        counts["ignored"] += int(((refined == IGNORE_INDEX) & labelled).sum())
        counts["taken_network_right"] += int((taken & (network == truth)).sum())
        counts["taken_method_right"] += int((taken & (walk == truth)).sum())
    share = lambda part, whole: round(100 * counts[part] / max(counts[whole], 1), 2)  # noqa: E731
    return {"split": data.split, "agree_pct": share("agree", "labelled"), "taken_pct": share("taken", "labelled"),
            "ignored_pct": share("ignored", "labelled"),
            "taken_network_right_pct": share("taken_network_right", "taken"),
            "taken_method_right_pct": share("taken_method_right", "taken")}


# What a lever's run shows beyond Table 1, against the label split's ground truth.
DIAGNOSTICS = {"refine": refinement_shares}


def table1_and_network(run_dir: Path) -> tuple[dict[str, float], float, str]:
    results = read_json(run_dir / "results.json")
    rows = results["rows"]
    return ({title: row["miou"] for title, row in rows.items() if title != "Network"},
            rows["Network"]["miou"], results["training_labels"])


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__, devices=("auto", "cpu", "cuda"), results_name="label_levers_<lever>")
    bench.parser.add_argument("lever", choices=sorted(LEVERS))
    bench.parser.add_argument("--seeds", type=int, default=3, help="seeds, each complete in the baseline")
    bench.parser.add_argument("--baseline", default="runs/msrc21", help="seed 0's run of benchmarks/msrc21.py")
    bench.parser.add_argument("--procs", type=int, default=2, help="processes of the stages after the trainings")
    bench.parser.add_argument("--whole-pipeline", action=argparse.BooleanOptionalAction, default=True,
                              help="seed k is the whole pipeline's (seed=k), against benchmarks/msrc21.py's "
                                   "whole-pipeline seeds; without it, the segmentation network's on seed 0's "
                                   "labels, against those of benchmarks/msrc21.py --no-whole-pipeline")
    bench.parser.add_argument("--first-seed", type=int, default=0,
                              help="the first seed; above 0, the confirmation on fresh whole-pipeline seeds "
                                   "(docs/label-refinement.md, \"The confirmation rule\"), written beside the "
                                   "lever's results as label_levers_<lever>_seeds<first>-<last>.json")
    args = bench.parse(argv)
    lever = LEVERS[args.lever]
    whole = args.whole_pipeline
    if args.first_seed < 0 or (args.first_seed and not whole):
        bench.parser.error("--first-seed: a seed of 0 or more, and above 0 only with whole-pipeline seeds")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    base_runs = args.baseline if lever.baseline is None else run_base(lever.baseline)
    making = ((f"python -m benchmarks.msrc21{'' if whole else ' --no-whole-pipeline'} --seeds {{}}")
              if lever.baseline is None else
              f"python -m benchmarks.label_levers {lever.baseline}{'' if whole else ' --no-whole-pipeline'} --seeds {{}}")
    # The bound (ground truth) never depends on the labels: the benchmark's own, for every lever.
    bounds = [stage("infer_seg").marker(seed_run_dirs(Path(args.baseline), Path(args.baseline + "_gt"), seed, whole)[1])
              for seed in seeds]
    for seed, bound in zip(seeds, bounds):
        for needed in (seed_weak_dir(Path(base_runs), seed, whole) / "results.json", bound):
            if not needed.is_file():
                bench.parser.error(f"{needed}: no finished baseline run of seed {seed} ({making.format(seed + 1)})")
    root = str(ensure_msrc21("data/msrc21"))
    placed = [f"device={args.device}"] if args.device != "auto" else []
    threads = [f"threads={args.threads}"] if args.threads else []
    common = [f"dataset.root={root}", *placed, *lever.overrides]
    base = run_base(args.lever)
    per_seed = []
    for seed, bound_marker in zip(seeds, bounds):
        baseline = seed_weak_dir(Path(base_runs), seed, whole)
        bound = read_json(bound_marker)["segmentation"]["miou"]
        run_dir = seed_weak_dir(Path(base), seed, whole)
        overrides = [*common, *seed_overrides(seed, whole), f"run_dir={run_dir}"]
        config = load_config("msrc21", overrides)
        # A whole-pipeline seed shares no stage with seed 0: only its baseline's are linked.
        sources = list(dict.fromkeys(([Path(base)] if seed and not whole else [])
                                     + [baseline, Path(base_runs), Path(args.baseline)]))
        linked = link_finished(config, sources)
        print(f"seed {seed}: linked {', '.join(linked) or 'nothing'} from {', '.join(map(str, sources))}")
        command = affinitynet("run", "--config", "msrc21", *overrides, *threads, procs=args.procs)
        if subprocess.run(command).returncode != 0:
            print("benchmark: a stage failed (see above); run the command again to resume", file=sys.stderr)
            return 1
        labels, network, training = table1_and_network(run_dir)
        base_labels, base_network, base_training = table1_and_network(baseline)
        ran = {spec.name: read_json(spec.marker(config)).get("seconds") for spec in stages(config)
               if spec.name not in linked}
        diagnostic = DIAGNOSTICS[args.lever](config) if args.lever in DIAGNOSTICS else None
        per_seed.append({"seed": seed, "table1": labels, "diagnostic": diagnostic, "training_labels": training,
                         "walk_row": label_stage(config).label_rows(config)[0][0],
                         "network_val_miou": network, "baseline_table1": base_labels, "baseline_training_labels": base_training,
                         "baseline_network_val_miou": base_network, "upper_bound_val_miou": bound,
                         "linked": linked, "seconds": ran, "lever_seconds": round(sum(v or 0 for v in ran.values()), 1)})
        print(f"seed {seed}: training labels ({training}) {labels[training]:.1f} against the baseline's "
              f"({base_training}) {base_labels[base_training]:.1f}; network on val {network:.1f} against "
              f"{base_network:.1f}; the lever's stages ran {per_seed[-1]['lever_seconds'] / 60:.1f} min")
        if seed == 0 and args.seeds > 1 and stops_at_seed_0(per_seed[0], lever.aim):
            print("seed 0's network is below the baseline's: by the rule no further seeds run")
            break
    networks = [s["network_val_miou"] for s in per_seed]
    base_networks = [s["baseline_network_val_miou"] for s in per_seed]
    first = per_seed[0]
    training = first["training_labels"]
    print(f"network on val: lever {spread(networks)}; baseline {spread(base_networks)}")
    summary = {f"training labels ({training}, train), seed {first['seed']}": first["table1"][training],
               f"{first['walk_row']} (train), seed {first['seed']}": first["table1"][first["walk_row"]],
               f"network (val), lever, mean over {len(networks)} seeds": statistics.mean(networks),
               f"network (val), baseline, mean over {len(networks)} seeds": statistics.mean(base_networks)}
    decision = confirm(per_seed) if args.first_seed else decide(per_seed, lever.aim)
    print(f"decision: {decision}")
    name = (f"{CONFIRMATION.format(args.lever)}{seeds[0]}-{seeds[-1]}" if args.first_seed
            else f"label_levers_{args.lever}")
    bench.write({"lever": args.lever, "overrides": list(lever.overrides), "aim": lever.aim,
                 "baseline": lever.baseline, "whole_pipeline": whole, "first_seed": args.first_seed,
                 "seeds": per_seed, "network_val_miou": networks, "baseline_network_val_miou": base_networks,
                 "decision": decision, "summary": {**summary, "decision": decision}}, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
