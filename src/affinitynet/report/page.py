"""The report's page: the header, the tables, the training curves, the coverage, the sweep and the
gallery, assembled into one self-contained HTML file."""
from __future__ import annotations

import csv
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ..config import DEFAULTS, load_config
from ..data.label_coverage import RARE_PIXEL_PERCENT
from ..errors import InputError
from ..files import save_rgb_png, write_bytes, write_text
from ..pipeline import CONFIG_FILE, MARKER, label_stage, stage
from ..sweep import figure_path
from .charts import _curves_figure, _iou_bar_chart, _iou_table, write_tensorboard
from .common import (
    _curve_names,
    _esc,
    _fmt_scalar,
    _fmt_seconds,
    _number,
    _read_json_or_none,
    _stage_order,
    _training_stages,
    read_log_csv,
)
from .gallery import _Gallery


def write_report(run_dir: str | os.PathLike, gallery_size: int = 8) -> Path:
    """Write ``run_dir/report/index.html`` and its PNGs; return the path of the page.

    ``gallery_size`` is the number of label-split images in the gallery (0: no gallery), or one per
    class when there are more classes; about half as many evaluation-split images with the
    network's predictions (again at least one per class) are added after them.
    Raises :class:`InputError` only when ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run directory not found")
    builder = _ReportBuilder(run_dir, max(0, int(gallery_size)))
    return builder.build()


# ----------------------------------------------------------------------------------------------

class _ReportBuilder:
    def __init__(self, run_dir: Path, gallery_size: int):
        self.run_dir = run_dir
        self.out = run_dir / "report"
        self.gallery_size = gallery_size
        self.written: set[Path] = set()
        self.config: dict[str, Any] | None = None
        self.config_text: str | None = None
        self.results: dict[str, Any] | None = None
        self.stages: dict[str, dict[str, Any]] = {}
        self.header_notes: list[str] = []

    # -- files ---------------------------------------------------------------------------------

    def _save_png(self, name: str, data: bytes | np.ndarray) -> str:
        path = self.out / name
        if isinstance(data, bytes):
            write_bytes(path, data)
        else:
            save_rgb_png(path, data)
        self.written.add(path)
        return name

    def _drop_stale(self) -> None:
        """PNGs of an earlier report that this one no longer links (e.g. a smaller gallery)."""
        for folder in (self.out, self.out / "gallery"):
            if folder.is_dir():
                for path in folder.glob("*.png"):
                    if path not in self.written:
                        path.unlink(missing_ok=True)

    # -- inputs --------------------------------------------------------------------------------

    def _load_inputs(self) -> None:
        config_path = self.run_dir / CONFIG_FILE
        if config_path.is_file():
            try:

                self.config_text = config_path.read_text(encoding="utf-8")
                self.config = load_config(config_path, check=False)
            except Exception as error:  # ConfigError, YAML or schema problems: show what we can
                self.header_notes.append(f"config.yaml could not be read ({str(error).splitlines()[0]})")
        else:
            self.header_notes.append("no config.yaml in the run directory")
        self.results = _read_json_or_none(stage("evaluate_run").output("results", self.run_dir), self.header_notes)

        for path in sorted(self.run_dir.glob(f"*/{MARKER}")):
            state = _read_json_or_none(path, self.header_notes)
            if isinstance(state, dict):
                self.stages[path.parent.name] = state
        order = _stage_order()
        self.stages = dict(sorted(self.stages.items(),
                                  key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))

    def _info(self, key: str) -> str:
        if self.config is not None:
            section = self.config.get(key)
            if isinstance(section, dict) and section.get("name"):
                return str(section["name"])
        if self.results and self.results.get(key):
            return str(self.results[key])
        return "unknown"

    def _label_stage(self) -> str:
        """The stage whose labels trained the run's network (``labels.method``)."""

        return label_stage(self.config or DEFAULTS).name

    def _class_names(self) -> list[str]:
        if self.results and isinstance(self.results.get("class_names"), list):
            return [str(n) for n in self.results["class_names"]]
        table1 = self.stages.get(self._label_stage(), {}).get("table1")
        if isinstance(table1, dict):
            for row in table1.values():
                if isinstance(row, dict) and isinstance(row.get("iou"), dict):
                    return list(row["iou"])
        return []

    # -- page ----------------------------------------------------------------------------------

    def build(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self._load_inputs()
        sections = [self._header(), self._results_section(), self._training_section(),
                    self._gallery_section(), self._sweep_section()]
        page = _page(f"AffinityNet report: {self.run_dir.name}", [s for s in sections if s])
        self._drop_stale()
        index = self.out / "index.html"
        write_text(index, page)
        return index

    def _header(self) -> str:
        stage_times = [(self.run_dir / name / MARKER).stat().st_mtime for name in self.stages]
        last_stage = (datetime.fromtimestamp(max(stage_times)).strftime("%Y-%m-%d %H:%M")
                      if stage_times else "-")
        facts = [("Dataset", self._info("dataset")), ("Backbone", self._info("backbone")),
                 ("Run directory", str(self.run_dir.resolve())),
                 ("Last stage finished", last_stage),
                 ("Report written", datetime.now().strftime("%Y-%m-%d %H:%M"))]
        if self.config is not None:
            dataset = self.config.get("dataset", {})
            facts.insert(2, ("Splits", f"labels: {dataset.get('label_split', '-')}, "
                                       f"evaluation: {dataset.get('eval_split', '-')}"))
        parts = [f'<h1>AffinityNet run <code>{_esc(self.run_dir.name)}</code></h1>',
                 '<dl class="facts">' + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts) + "</dl>"]
        parts += [f'<p class="note">{_esc(n)}</p>' for n in self.header_notes]
        if self.config_text is not None:
            parts.append('<details id="config"><summary>Resolved configuration (config.yaml)</summary>'
                         f"<pre>{_esc(self.config_text)}</pre></details>")
        parts.append('<h2 id="stages">Stages</h2>')
        if not self.stages:
            parts.append('<p class="note">No stage has finished yet (no <code>*/_stage.json</code>).</p>')
        else:
            parts.append(self._stage_table())
        return '<section id="summary">' + "\n".join(parts) + "</section>"

    def _stage_table(self) -> str:
        rows = []
        standard = {"stage", "hash", "complete", "seconds", "images", "reused", "skipped"}
        for name, state in self.stages.items():
            skipped = state.get("skipped") or []
            if not isinstance(skipped, list):
                skipped = [str(skipped)]
            if skipped:
                lines = "".join(f"<li>{_esc(line)}</li>" for line in skipped)
                skipped_cell = (f"<details><summary>{len(skipped)}</summary>"
                                f'<ul class="skipped">{lines}</ul></details>')
            else:
                skipped_cell = "0"
            extras = ", ".join(f"{_esc(k)} = {_esc(_fmt_scalar(v))}" for k, v in state.items()
                               if k not in standard and isinstance(v, (int, float, str)) and not isinstance(v, bool))
            imported = state.get("imported")
            if isinstance(imported, dict):   # written by import-weights, not trained here
                extras = ", ".join(filter(None, [extras, f"imported = {_esc(imported.get('kind'))} "
                                                         f"({_esc(Path(str(imported.get('file'))).name)})"]))
            complete = state.get("complete")
            status = "done" if complete else ("incomplete" if complete is False else "-")
            rows.append(f'<tr data-stage="{_esc(name)}"><th scope="row">{_esc(name)}</th>'
                        f'<td class="{"ok" if complete else "warn"}">{status}</td>'
                        f'<td class="num" data-key="seconds" data-value="{_esc(state.get("seconds"))}">'
                        f'{_esc(_fmt_seconds(state.get("seconds")))}</td>'
                        f'<td class="num" data-key="images">{_esc(state.get("images", "-"))}</td>'
                        f'<td class="num" data-key="reused">{_esc(state.get("reused", "-"))}</td>'
                        f'<td class="num" data-key="skipped">{skipped_cell}</td>'
                        f'<td class="extras">{extras}</td></tr>')
        return ('<table id="stage-table" class="data"><thead><tr><th>stage</th><th>status</th><th>time</th>'
                "<th>images</th><th>reused</th><th>skipped</th><th>other</th></tr></thead><tbody>"
                + "".join(rows) + "</tbody></table>")

    # -- results -------------------------------------------------------------------------------

    def _results_section(self) -> str:
        class_names = self._class_names()
        parts = ['<h2>Results</h2>']
        table_rows: dict[str, Mapping[str, Any]] = {}
        rows = (self.results or {}).get("rows")
        if isinstance(rows, dict) and rows:
            caption = ("Table 5 layout: every stage scored on the ground truth of its split (IoU %). "
                       "The rows before Network (CAM, CAM+RW, CAM+RW+dCRF ...) are the synthesized labels of "
                       "the label split (Table 1), the last of them the network's training labels; Network "
                       "is the segmentation network on the evaluation split (Table 2).")
            parts.append(_iou_table("table5", rows, class_names, caption, with_split=True))
            table_rows = rows
        elif self.results is None:
            parts.append('<p class="note">No <code>results.json</code> yet '
                         "(run <code>affinitynet evaluate-run</code>).</p>")
        else:
            parts.append('<p class="note" id="no-ground-truth">This dataset has no ground-truth masks, so no '
                         "mIoU can be computed and no table of scores is shown. The label coverage below "
                         "needs none: it shows what the labels lack, measured against the image tags.</p>")
        labels = self._label_stage()
        table1 = self.stages.get(labels, {}).get("table1")
        split = (self.config or {}).get("dataset", {}).get("label_split", "label split")
        if isinstance(table1, dict) and table1:
            caption = (f"Table 1 layout: synthesized segmentation labels of the {split} split in IoU % "
                       f"(from {labels}/_stage.json; RW = random walk with AffinityNet, IRN = IRN's walk).")
            parts.append(_iou_table("table1", table1, class_names, caption, with_split=False))
            if not table_rows:
                table_rows = table1
        instances = (self.results or {}).get("instances")
        for name, scores in (instances.items() if isinstance(instances, dict) else ()):
            rows3 = {f"mAP^r at IoU {t}": {"iou": scores["ap_r"][t], "miou": scores["map_r"][t]}
                     for t in scores["map_r"]}
            caption = (f"Table 3 layout: instance pseudo labels of the {split} split, average precision (%) of "
                       f"the masks at each IoU over {scores.get('num_images')} images (from {name}/_stage.json).")
            parts.append(_iou_table("table3", rows3, class_names[1:], caption, with_split=False))
        if table_rows and class_names:
            name = self._save_png("iou_bars.png", _iou_bar_chart(table_rows, class_names))
            parts.append(f'<figure><img src="{name}" alt="per-class IoU bar chart" class="chart">'
                         "<figcaption>Per-class IoU of every row above (higher is better).</figcaption></figure>")
        coverage = self._coverage_tables()
        if coverage:
            parts.append(coverage)
        return '<section id="results">' + "\n".join(parts) + "</section>"

    def _coverage_tables(self) -> str:
        """Per class: images tagged and the share of pixels in each label source; then the images
        whose tagged class vanished. Needs no ground truth (``coverage`` in results.json)."""
        coverage = (self.results or {}).get("coverage")
        if not isinstance(coverage, dict):
            if self.results is not None:
                return ('<p class="note">This results.json predates the label coverage: run '
                        "<code>affinitynet evaluate-run --force</code> to measure it.</p>")
            return ""
        sources = coverage.get("sources") or {}
        tagged = coverage.get("images_tagged") or {}
        parts = ['<h3 id="coverage">Label coverage (no ground truth needed)</h3>']
        if coverage.get("eval_is_training_images"):
            parts.append('<p class="note" id="eval-is-train">The evaluation split is the training images: the '
                         "network's predictions below are of photos it was trained on, so they show how well it "
                         "fits its pseudo labels, not how it does on new photos.</p>")
        head = "<th>class</th><th>images tagged</th>" + "".join(
            f"<th>% of pixels: {_esc(title)} ({_esc(source.get('split', '-'))})</th>" for title, source in sources.items())
        body = []
        for name in ["background", *tagged]:
            cells = [f'<th scope="row">{_esc(name)}</th>',
                     f'<td class="num">{_esc(tagged.get(name, "-"))}</td>']
            for title, source in sources.items():
                share = _number((source.get("pixel_percent") or {}).get(name))
                rare = share is not None and name != "background" and share < RARE_PIXEL_PERCENT
                cells.append(f'<td class="num{" warn" if rare else ""}" data-source="{_esc(title)}" '
                             f'data-class="{_esc(name)}">{"-" if share is None else f"{share:.2f}"}</td>')
            body.append(f'<tr data-class="{_esc(name)}">' + "".join(cells) + "</tr>")
        parts.append('<div class="scroll"><table id="coverage-table" class="data"><caption>Share of the labelled '
                     f"pixels per class (%); a class under {RARE_PIXEL_PERCENT}% is marked: the labels have (almost) "
                     f"lost it.</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
        for title, source in sources.items():
            vanished = source.get("vanished") or []
            if not vanished:
                parts.append(f'<p id="vanished-{_esc(title.replace(" ", "-"))}">Every image keeps its tagged classes '
                             f"in its {_esc(title)} ({_esc(source.get('images'))} images).</p>")
                continue
            items = "".join(f"<li><code>{_esc(v.get('id'))}</code>: {_esc(', '.join(v.get('classes', [])))}</li>"
                            for v in vanished)
            parts.append(f'<details class="vanished" id="vanished-{_esc(title.replace(" ", "-"))}" open><summary>'
                         f"{len(vanished)} of {_esc(source.get('images'))} images lack a tagged class in their "
                         f"{_esc(title)}</summary><ul>{items}</ul></details>")
        return "\n".join(parts)

    # -- training ------------------------------------------------------------------------------

    def _training_section(self) -> str:
        parts = ["<h2>Training curves</h2>"]
        logs: dict[str, dict[str, list[float]]] = {}

        for trained in _training_stages():
            path = stage(trained).output("log", self.run_dir)
            imported = (self.stages.get(trained) or {}).get("imported")
            if isinstance(imported, dict) and not path.is_file():
                parts.append(f'<p class="note">{_esc(trained)}: weights imported ({_esc(imported.get("kind"))}, '
                             f'<code>{_esc(imported.get("file"))}</code>), not trained in this run.</p>')
                continue
            if not path.is_file():
                parts.append(f'<p class="note">{_esc(trained)}: no <code>log.csv</code> yet.</p>')
                continue
            try:
                columns = read_log_csv(path)
            except (OSError, csv.Error, UnicodeDecodeError) as error:
                parts.append(f'<p class="note">{_esc(trained)}/log.csv unreadable ({_esc(error)}).</p>')
                continue
            if "epoch" not in columns or not _curve_names(columns):
                parts.append(f'<p class="note">{_esc(trained)}/log.csv has no epochs yet.</p>')
                continue
            logs[trained] = columns
            name = self._save_png(f"curves_{trained}.png", _curves_figure(trained, columns))
            last = {k: v[-1] for k, v in columns.items()}
            summary = ", ".join(f"{_esc(k)} {_esc(_fmt_scalar(v))}" for k, v in last.items() if math.isfinite(v))
            parts.append(f'<figure id="curves-{_esc(trained)}"><img src="{name}" alt="{_esc(trained)} training curves" '
                         f'class="chart"><figcaption><b>{_esc(trained)}</b>: last epoch: {summary}. '
                         f'Source: <code>{_esc(trained)}/log.csv</code>.</figcaption></figure>')
        missing = write_tensorboard(logs, self.out / "tensorboard") if logs else "no logs"
        if missing is None:
            parts.append('<p class="note">The same logs as TensorBoard event files: '
                         f"<code>tensorboard --logdir {_esc(self.out / 'tensorboard')}</code>.</p>")
        elif logs:
            parts.append(f'<p class="note">No TensorBoard event files: torch.utils.tensorboard could not be imported '
                         f'({_esc(missing)}; <code>pip install tensorboard</code> adds them).</p>')
        return '<section id="training">' + "\n".join(parts) + "</section>"

    # -- gallery -------------------------------------------------------------------------------

    def _gallery_section(self) -> str:
        if self.gallery_size == 0:
            return ""
        gallery = _Gallery(self)
        return '<section id="gallery">' + gallery.render() + "</section>"

    # -- sweep ---------------------------------------------------------------------------------

    def _sweep_section(self) -> str:
        source = figure_path(self.run_dir)
        if not source.is_file():
            return ""
        try:
            with Image.open(source) as image:
                image.verify()
        except Exception:
            return '<section id="sweep"><h2>Hyper-parameter sweep</h2><p class="note">sweep/fig8.png is damaged.</p></section>'
        name = self._save_png("fig8.png", source.read_bytes())
        return ('<section id="sweep"><h2>Hyper-parameter sweep (Fig. 8)</h2>'
                f'<figure><img src="{name}" alt="sweep of beta, t and alpha" class="chart">'
                "<figcaption>Pseudo-label mIoU against the random-walk parameters "
                "(from <code>affinitynet sweep</code>).</figcaption></figure></section>")


# ----------------------------------------------------------------------------------------------
# Page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; padding: 0 24px 48px;
       max-width: 1500px; color: #1d2125; background: #fafafa; line-height: 1.45; }
nav { position: sticky; top: 0; background: #fafafa; padding: 8px 0; border-bottom: 1px solid #ddd; z-index: 1; }
nav a { margin-right: 16px; color: #1f5fa8; text-decoration: none; font-weight: 600; }
h1 { font-size: 1.6em; margin: 16px 0 8px; } h2 { margin-top: 32px; border-bottom: 2px solid #ccd; padding-bottom: 4px; }
h3 { margin: 20px 0 6px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0 12px; }
dl.facts dt { font-weight: 600; color: #555; } dl.facts dd { margin: 0; font-family: ui-monospace, monospace; }
pre { background: #f0f0f0; padding: 8px 12px; max-height: 480px; overflow: auto; font-size: 12px; }
details summary { cursor: pointer; color: #1f5fa8; }
.note { color: #8a5a00; background: #fff6e0; border-left: 3px solid #e0a800; padding: 4px 10px; margin: 6px 0; }
.scroll { overflow-x: auto; }
table.data { border-collapse: collapse; margin: 10px 0; font-size: 13px; background: #fff; }
table.data th, table.data td { border: 1px solid #d6d6d6; padding: 3px 8px; }
table.data thead th { background: #eef1f5; }
table.data tbody th { text-align: left; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data td.mean { font-weight: 700; }
table.data caption { caption-side: top; text-align: left; color: #444; padding: 4px 0; font-size: 13px; }
td.ok { color: #2e7d32; } td.warn { color: #b26a00; } td.num.warn { background: #fde2e1; font-weight: 700; } td.extras { color: #555; font-size: 12px; }
ul.skipped { margin: 4px 0; padding-left: 18px; text-align: left; font-family: ui-monospace, monospace; font-size: 11px; }
img.chart { max-width: 100%; background: #fff; border: 1px solid #ddd; }
figure { margin: 12px 0; } figcaption { font-size: 13px; color: #444; }
table.gallery { border-collapse: collapse; background: #fff; }
table.gallery th, table.gallery td { border: 1px solid #e0e0e0; padding: 4px; vertical-align: top; text-align: center; }
table.gallery thead th { font-size: 12px; background: #eef1f5; max-width: 150px; }
table.gallery tbody th { font-size: 11px; font-family: ui-monospace, monospace; writing-mode: vertical-rl;
                         transform: rotate(180deg); }
table.gallery img { width: 140px; height: auto; display: block; margin: 0 auto; outline: 1px solid #c8c8c8; }
table.gallery img.labels { image-rendering: pixelated; }
table.gallery img.tile { width: 64px; }
.tiles { display: flex; flex-wrap: wrap; gap: 2px; justify-content: center; max-width: 140px; margin: 2px auto 0; }
figure.tile { margin: 0; } figure.tile figcaption { font-size: 10px; }
ol.instances { font-size: 10px; margin: 2px auto 0; padding-left: 18px; max-width: 122px; text-align: left; }
ol.instances i { display: inline-block; width: 9px; height: 9px; margin-right: 3px; vertical-align: -1px; }
.sub { font-size: 10px; color: #666; font-weight: normal; }
.missing { color: #aaa; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 13px; }
.swatch i { display: inline-block; width: 14px; height: 14px; border: 1px solid #999; margin-right: 5px;
            vertical-align: -2px; }
"""

# Lets a headless browser (the test, CI) read from the DOM how many pictures really decoded.
_LOAD_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.dataset.imagesLoaded = String(loaded);
  document.body.dataset.imagesTotal = String(images.length);
});
"""


def _page(title: str, sections: Sequence[str]) -> str:
    titles = (("summary", "Summary"), ("results", "Results"), ("training", "Training"), ("gallery", "Gallery"),
              ("sweep", "Sweep"))
    body = "\n".join(sections)
    nav = "<nav>" + "".join(f'<a href="#{key}">{name}</a>' for key, name in titles
                            if f'<section id="{key}">' in body) + "</nav>"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n<script>{_LOAD_SCRIPT}</script>\n</head>\n"
            f"<body>\n{nav}\n{body}\n</body>\n</html>\n")
