"""``affinitynet report RUN_DIR``: one HTML page that shows a run instead of its logs.

The page is ``RUN_DIR/report/index.html``; every picture it shows is a PNG next to it in
``RUN_DIR/report/`` (linked relatively, no external CSS, JS, fonts or CDNs), so the folder alone
can be copied, mailed or archived. It holds:

- a header: dataset, backbone, run directory, dates, the resolved ``config.yaml`` and one row per
  stage from its ``_stage.json`` (time, images, reused, skipped inputs);
- the results from ``results.json`` as tables in the layout of the paper's Tables 1 and 5 (one
  column per class, then the mean; 1 decimal) and a per-class IoU bar chart;
- the training curves of each ``train_*/log.csv`` (loss, its parts, lr and other columns);
- the label coverage from ``results.json``, which needs no ground truth: per class the images
  tagged and its share of the pixels of the CAM labels, the pseudo labels and the predictions, and
  the images whose tagged class vanished (with honest wording when there is no ground truth, and
  when the evaluation images are the training images);
- a gallery in the manner of Fig. 2, 4 and 5: image, ground truth, CAMs, background score,
  confident regions, AffinityNet boundaries, random-walk labels, pseudo labels and, for
  evaluation-split images, the segmentation network's prediction. It shows every class at its
  worst (the image where its label covers least), then fills up in split order;
- the Fig. 8 sweep plot when ``affinitynet sweep`` has been run.

Anything a run does not have yet (a stage not run, a dataset no longer on disk) is left out with a
note; the report never fails because a piece is missing.

Training logs: the per-epoch ``log.csv`` of each training stage is the log format other tools read
(pandas, spreadsheets). When ``torch.utils.tensorboard`` can be imported (it needs the optional
``tensorboard`` package), the report also converts those CSVs into TensorBoard event files in
``RUN_DIR/report/tensorboard/<stage>/``; without it that step is skipped silently.
"""
from __future__ import annotations

import csv
import html
import io
import math
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .coverage import RARE_PIXEL_PERCENT
from .io import (VOC_PALETTE, InputError, load_image, load_label_png, load_npz, read_json, save_rgb_png,
                 write_bytes, write_text)

TRAINING_STAGES = ("train_cam", "train_affinity", "train_seg")
# Longest side of a gallery picture in pixels: enough for a sharp 160 px cell on a dense screen,
# small enough that a VOC-sized gallery stays a few MB.
THUMB_SIZE = 256
IGNORE = 255
NEUTRAL_RGB = (255, 255, 255)   # neutral / ignore pixels are drawn white, as in Fig. 4a
# Log columns that are not curves worth a panel: the x axis, wall time, and pair counts.
_NOT_CURVES = ("epoch", "seconds")


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
# Small helpers

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / NaN / non-numbers (drawn as '-')."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt1(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.1f}"


def _fmt_seconds(value: Any) -> str:
    seconds = _number(value)
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _fmt_scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _read_json_or_none(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as error:
        notes.append(f"{path}: unreadable ({error.__class__.__name__}); left out")
        return None


def _colour_labels(label: np.ndarray) -> np.ndarray:
    rgb = VOC_PALETTE[label]
    rgb[label == IGNORE] = NEUTRAL_RGB
    return rgb


def _thumb_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of the gallery picture of an (height, width) map."""
    scale = min(1.0, THUMB_SIZE / max(height, width, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize(size, resample))


def _resize_float(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (values.shape[1], values.shape[0]) == size:
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _new_figure(width: float, height: float):
    # The Figure API (not pyplot) draws with Agg and leaves the process-wide backend alone.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _stage_order() -> list[str]:
    try:
        from .pipeline import STAGES
        return [spec.name for spec in STAGES]
    except Exception:  # the report must work even if the pipeline module cannot be imported
        return ["train_cam", "infer_cam", "confident_regions", "train_affinity", "random_walk",
                "train_seg", "infer_seg", "evaluate_run"]


def read_log_csv(path: Path) -> dict[str, list[float]]:
    """The numeric columns of a training ``log.csv`` as lists (NaN for empty or non-numeric cells);
    a column with no number at all is left out."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for name in (rows[0].keys() if rows else ()):
        if name is None:
            continue
        values = []
        for row in rows:
            number = _number(row.get(name))
            values.append(float("nan") if number is None else number)
        if any(math.isfinite(v) for v in values):
            columns[name] = values
    return columns


def _curve_names(columns: Mapping[str, list[float]]) -> list[str]:
    """Panels in reading order: the loss, its parts, then lr and other metrics; counts are dropped."""
    names = [n for n in columns if n not in _NOT_CURVES and not n.startswith("num_")]
    first = [n for n in ("loss",) if n in names]
    last = [n for n in ("lr",) if n in names]
    return first + [n for n in names if n not in first and n not in last] + last


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
        config_path = self.run_dir / "config.yaml"
        if config_path.is_file():
            try:
                from .config import load_config

                self.config_text = config_path.read_text(encoding="utf-8")
                self.config = load_config(config_path, check=False)
            except Exception as error:  # ConfigError, YAML or schema problems: show what we can
                self.header_notes.append(f"config.yaml could not be read ({str(error).splitlines()[0]})")
        else:
            self.header_notes.append("no config.yaml in the run directory")
        self.results = _read_json_or_none(self.run_dir / "results.json", self.header_notes)
        for path in sorted(self.run_dir.glob("*/_stage.json")):
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

    def _class_names(self) -> list[str]:
        if self.results and isinstance(self.results.get("class_names"), list):
            return [str(n) for n in self.results["class_names"]]
        table1 = self.stages.get("random_walk", {}).get("table1")
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
        stage_times = [(self.run_dir / name / "_stage.json").stat().st_mtime for name in self.stages]
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
        table1 = self.stages.get("random_walk", {}).get("table1")
        if isinstance(table1, dict) and table1:
            split = (self.config or {}).get("dataset", {}).get("label_split", "label split")
            caption = (f"Table 1 layout: synthesized segmentation labels of the {split} split in IoU % "
                       "(from random_walk/_stage.json; RW = random walk with AffinityNet).")
            parts.append(_iou_table("table1", table1, class_names, caption, with_split=False))
            if not table_rows:
                table_rows = table1
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
        for stage in TRAINING_STAGES:
            path = self.run_dir / stage / "log.csv"
            imported = (self.stages.get(stage) or {}).get("imported")
            if isinstance(imported, dict) and not path.is_file():
                parts.append(f'<p class="note">{_esc(stage)}: weights imported ({_esc(imported.get("kind"))}, '
                             f'<code>{_esc(imported.get("file"))}</code>), not trained in this run.</p>')
                continue
            if not path.is_file():
                parts.append(f'<p class="note">{_esc(stage)}: no <code>log.csv</code> yet.</p>')
                continue
            try:
                columns = read_log_csv(path)
            except (OSError, csv.Error, UnicodeDecodeError) as error:
                parts.append(f'<p class="note">{_esc(stage)}/log.csv unreadable ({_esc(error)}).</p>')
                continue
            if "epoch" not in columns or not _curve_names(columns):
                parts.append(f'<p class="note">{_esc(stage)}/log.csv has no epochs yet.</p>')
                continue
            logs[stage] = columns
            name = self._save_png(f"curves_{stage}.png", _curves_figure(stage, columns))
            last = {k: v[-1] for k, v in columns.items()}
            summary = ", ".join(f"{_esc(k)} {_esc(_fmt_scalar(v))}" for k, v in last.items() if math.isfinite(v))
            parts.append(f'<figure id="curves-{_esc(stage)}"><img src="{name}" alt="{_esc(stage)} training curves" '
                         f'class="chart"><figcaption><b>{_esc(stage)}</b>: last epoch: {summary}. '
                         f'Source: <code>{_esc(stage)}/log.csv</code>.</figcaption></figure>')
        if logs and write_tensorboard(logs, self.out / "tensorboard"):
            parts.append('<p class="note">The same logs as TensorBoard event files: '
                         f"<code>tensorboard --logdir {_esc(self.out / 'tensorboard')}</code>.</p>")
        return '<section id="training">' + "\n".join(parts) + "</section>"

    # -- gallery -------------------------------------------------------------------------------

    def _gallery_section(self) -> str:
        if self.gallery_size == 0:
            return ""
        gallery = _Gallery(self)
        return '<section id="gallery">' + gallery.render() + "</section>"

    # -- sweep ---------------------------------------------------------------------------------

    def _sweep_section(self) -> str:
        source = self.run_dir / "sweep" / "fig8.png"
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
# Tables and charts

def _iou_table(table_id: str, rows: Mapping[str, Any], class_names: Sequence[str], caption: str,
               with_split: bool) -> str:
    names = list(class_names)
    if not names:
        for row in rows.values():
            if isinstance(row, dict) and isinstance(row.get("iou"), dict):
                names = [n for n in row["iou"] if n not in names]
                break
    head = "<th>method</th>" + ("<th>split</th>" if with_split else "")
    head += "".join(f'<th data-class="{_esc(n)}">{_esc(n)}</th>' for n in names) + '<th data-class="mean">mean</th>'
    body = []
    for title, row in rows.items():
        if not isinstance(row, dict):
            continue
        iou = row.get("iou") if isinstance(row.get("iou"), dict) else {}
        cells = [f'<th scope="row">{_esc(title)}</th>']
        if with_split:
            count = row.get("num_images")
            split = f"{row.get('split', '-')}" + (f" ({count})" if count is not None else "")
            cells.append(f'<td class="split">{_esc(split)}</td>')
        for name in [*names, "mean"]:
            value = row.get("miou") if name == "mean" else iou.get(name)
            number = _number(value)
            shade = "" if number is None else f' style="background: rgba(46, 125, 50, {0.05 + 0.45 * min(max(number, 0), 100) / 100:.2f})"'
            cls = "num mean" if name == "mean" else "num"
            cells.append(f'<td class="{cls}" data-table="{table_id}" data-row="{_esc(title)}" '
                         f'data-class="{_esc(name)}"{shade}>{_fmt1(value)}</td>')
        body.append(f'<tr data-row="{_esc(title)}">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="{table_id}" class="data iou"><caption>{_esc(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _iou_bar_chart(rows: Mapping[str, Any], class_names: Sequence[str]) -> bytes:
    import matplotlib

    groups = [*class_names, "mean"]
    titles = [t for t, r in rows.items() if isinstance(r, dict)]
    width = 0.8 / max(len(titles), 1)
    figure = _new_figure(max(6.0, 0.55 * len(groups) * max(1, len(titles)) ** 0.5 + 2), 3.8)
    axis = figure.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    x = np.arange(len(groups))
    for index, title in enumerate(titles):
        row = rows[title]
        iou = row.get("iou") if isinstance(row.get("iou"), dict) else {}
        values = [_number(row.get("miou") if g == "mean" else iou.get(g)) for g in groups]
        heights = [np.nan if v is None else v for v in values]
        axis.bar(x + (index - (len(titles) - 1) / 2) * width, heights, width, label=title, color=colours(index % 10))
    axis.set_xticks(x, groups, rotation=45 if len(groups) > 8 else 0, ha="right" if len(groups) > 8 else "center")
    axis.set_ylabel("IoU (%)")
    axis.set_ylim(0, 100)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, ncols=min(len(titles), 4), loc="upper right")
    return _figure_png(figure)


def _curves_figure(stage: str, columns: Mapping[str, list[float]]) -> bytes:
    names = _curve_names(columns)
    epochs = columns["epoch"]
    per_row = min(len(names), 5)
    rows = math.ceil(len(names) / per_row)
    figure = _new_figure(2.7 * per_row + 0.4, 2.3 * rows + 0.3)
    figure.suptitle(stage, fontsize=11)
    for index, name in enumerate(names):
        axis = figure.add_subplot(rows, per_row, index + 1)
        style = {"color": "tab:blue" if name == "loss" else ("tab:gray" if name == "lr" else "tab:orange")}
        # Markers make a one-epoch log (a single point) visible.
        axis.plot(epochs, columns[name], marker="o", markersize=3, linewidth=1.5, **style)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if len(epochs) <= 10:
            axis.set_xticks(epochs)
    return _figure_png(figure)


def write_tensorboard(logs: Mapping[str, Mapping[str, list[float]]], out_dir: Path) -> bool:
    """Event files of every log in ``out_dir/<stage>/``; False (and nothing written) without
    ``torch.utils.tensorboard``. Each stage's folder is rebuilt from scratch, so running the report
    twice does not show every curve twice in TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # missing tensorboard, or a protobuf/numpy mismatch inside it: optional
        return False
    out_dir.mkdir(parents=True, exist_ok=True)
    for stage, columns in logs.items():
        # Written into a temporary folder and swapped in, so a killed report never leaves half a log.
        staging = Path(tempfile.mkdtemp(prefix=f".{stage}.", dir=out_dir))
        try:
            writer = SummaryWriter(log_dir=str(staging))
            try:
                epochs = columns.get("epoch", [])
                for name in columns:
                    if name == "epoch":
                        continue
                    for step, value in zip(epochs, columns[name]):
                        if math.isfinite(value):
                            writer.add_scalar(name, value, global_step=int(step))
            finally:
                writer.close()
            final = out_dir / stage
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return True


# ----------------------------------------------------------------------------------------------
# Gallery

class _Gallery:
    """Fig. 5-style rows: one image per row, one stage's output per column."""

    # (key, heading, caption) in the order of the pipeline.
    LABEL_COLUMNS = (
        ("image", "(a) image", ""),
        ("gt", "(b) ground truth", ""),
        ("cam", "(c) CAMs", "max over the image's classes, blended on the image; per-class maps below"),
        ("background", "background score", "(1 - max CAM)^alpha, bright = confident background (Eq. 2)"),
        ("confident", "confident regions", "white = neutral (Fig. 4a)"),
        ("boundaries", "(d) affinity boundaries", "from AffinityNet's features"),
        ("rw", "CAM+RW", "random walk result"),
        ("pseudo", "(e) pseudo label", "the segmentation network's supervision (random_walk.crf)"),
        ("prediction", "network", "prediction of the segmentation network"),
    )

    def __init__(self, report: _ReportBuilder):
        self.report = report
        self.run_dir = report.run_dir
        self.notes: list[str] = []
        self.alpha = 16.0
        config = report.config or {}
        alpha = _number(config.get("cam", {}).get("eval_alpha") if isinstance(config.get("cam"), dict) else None)
        if alpha is not None:
            self.alpha = alpha
        self.datasets = self._open_datasets()
        self.class_names = report._class_names() or (self.datasets[0].class_names if self.datasets else [])

    # -- where things are ----------------------------------------------------------------------

    def _source(self, key: str, sample_id: str) -> Path:
        stage, folder, ext = {"cam": ("infer_cam", "cams", "npz"), "background": ("infer_cam", "cams", "npz"),
                              "confident": ("confident_regions", "labels", "png"),
                              "boundaries": ("random_walk", "boundaries", "png"),
                              "rw": ("random_walk", "rw_labels", "png"),
                              "pseudo": ("random_walk", "pseudo_labels", "png"),
                              "prediction": ("infer_seg", "predictions", "png"),
                              "camlabel": ("infer_cam", "labels", "png")}[key]
        return self.run_dir / stage / folder / f"{sample_id}.{ext}"

    def _open_datasets(self) -> list:
        """The label, train and evaluation splits of the run's dataset, where it is still on disk.

        A missing dataset is a note, not a download or a generation: the report only reads.
        """
        config = self.report.config
        if config is None or not isinstance(config.get("dataset"), dict):
            self.notes.append("Input images and ground truth are not shown: no readable config.yaml.")
            return []
        section = dict(config["dataset"])
        root = self._resolve_root(section)
        if root is False:
            self.notes.append(f"Input images and ground truth are not shown: the dataset root "
                              f"'{section.get('root')}' was not found.")
            return []
        section["root"] = root
        if section.get("name") == "demo" and not self._demo_present(section):
            self.notes.append("Input images and ground truth are not shown: the demo dataset is not generated "
                              "at its root (run `affinitynet dataset generate`).")
            return []
        from .steps import dataset

        datasets = []
        local = dict(config, dataset=section)
        seen = set()
        for key in ("label_split", "train_split", "eval_split"):
            split = section.get(key)
            if not split or split in seen:
                continue
            seen.add(split)
            try:
                datasets.append(dataset(local, key))
            except Exception as error:  # InputError and whatever a damaged split list raises
                self.notes.append(f"Split '{split}' could not be read ({str(error).splitlines()[0]}).")
        return datasets

    def _resolve_root(self, section: dict[str, Any]) -> str | None | bool:
        """The dataset root as a path that exists: as written, or relative to the folder the run was
        started from (the config's run_dir is relative to it); None when the config has no root,
        False when none of the candidates exists."""
        root = section.get("root")
        if not root:
            return None
        path = Path(root)
        if path.is_absolute() or path.exists():
            return str(path) if path.exists() else False
        candidates = []
        run_dir_text = (self.report.config or {}).get("run_dir")
        if run_dir_text and not Path(run_dir_text).is_absolute():
            parts = Path(run_dir_text).parts
            resolved = self.run_dir.resolve()
            if parts and resolved.parts[-len(parts):] == parts:
                candidates.append(Path(*resolved.parts[:-len(parts)]) / path)
        candidates += [self.run_dir.resolve().parent / path, self.run_dir.resolve().parent.parent / path]
        for candidate in candidates:
            if candidate.exists():
                return str(candidate)
        return False

    @staticmethod
    def _demo_present(section: dict[str, Any]) -> bool:
        from .datasets.demo import default_demo_root, is_generated

        size, train, val = int(section.get("demo_size", 128)), int(section.get("demo_train", 240)), int(section.get("demo_val", 60))
        seed = int(section.get("demo_seed", 0))
        root = section.get("root") or default_demo_root(size, train, val, seed)
        return is_generated(root, size, train, val, seed)

    def _sample(self, sample_id: str):
        for data in self.datasets:
            try:
                return data, data.by_id(sample_id)
            except KeyError:
                continue
        return None, None

    # -- which images --------------------------------------------------------------------------

    def _ids(self, folders: Sequence[Path], split_order: Sequence[str]) -> list[str]:
        present: set[str] = set()
        for folder in folders:
            if folder.is_dir():
                present.update(p.name.rsplit(".", 1)[0] for p in folder.iterdir()
                               if p.suffix in (".png", ".npz") and not p.name.startswith("."))
        ordered = [i for i in split_order if i in present]
        return ordered + sorted(present - set(ordered))

    def _split_ids(self, key: str) -> list[str]:
        split = (self.report.config or {}).get("dataset", {}).get(key)
        for data in self.datasets:
            if data.split == split:
                return data.ids
        return []

    def _pick(self, present: Sequence[str], sources: Sequence[str], count: int, taken: set[str]) -> list[str]:
        """Gallery rows: for every class, the image where its label covers least (the worst case,
        from the run's label coverage), then the first images in split order up to ``count``."""
        coverage = ((self.report.results or {}).get("coverage") or {}).get("sources") or {}
        source = next((coverage[name] for name in sources if name in coverage), {})
        available = set(present) - taken
        picked: list[str] = []
        for entries in (source.get("worst") or {}).values():
            sample_id = next((entry[0] for entry in entries if entry[0] in available and entry[0] not in picked), None)
            if sample_id is not None:
                picked.append(sample_id)
        picked += [i for i in present if i not in taken and i not in picked][: max(0, count - len(picked))]
        return picked

    # -- rendering -----------------------------------------------------------------------------

    def render(self) -> str:
        report = self.report
        label_ids = self._pick(self._ids([self.run_dir / "infer_cam" / "labels", self.run_dir / "infer_cam" / "cams",
                                          self.run_dir / "random_walk" / "pseudo_labels"],
                                         self._split_ids("label_split")),
                               ("pseudo labels", "CAM labels"), report.gallery_size, set())
        eval_count = max(1, math.ceil(report.gallery_size / 2))
        eval_ids = self._pick(self._ids([self.run_dir / "infer_seg" / "predictions"], self._split_ids("eval_split")),
                              ("predictions",), eval_count, set(label_ids))
        parts = ["<h2>Gallery</h2>"]
        label_rows = [self._row(i) for i in label_ids]
        eval_rows = [self._row(i, only=("image", "gt", "prediction")) for i in eval_ids]
        if not label_rows and not eval_rows:
            parts.append('<p class="note">Nothing to show yet: no CAMs, pseudo labels or predictions in this run.</p>')
        parts += [f'<p class="note">{_esc(n)}</p>' for n in self.notes]
        parts.append(self._legend())
        if label_rows:
            parts.append("<h3>Label split: from CAMs to pseudo labels (Fig. 2, 4, 5)</h3>")
            parts.append(self._table("gallery-label", label_rows))
        else:
            parts.append('<p class="note">No label-split outputs yet (run <code>infer-cam</code>).</p>')
        if eval_rows:
            parts.append("<h3>Evaluation split: the segmentation network</h3>")
            parts.append(self._table("gallery-eval", eval_rows))
        else:
            parts.append('<p class="note">No network predictions yet (run <code>infer-seg</code>).</p>')
        return "\n".join(parts)

    def _table(self, table_id: str, rows: list[tuple[str, dict[str, str]]]) -> str:
        keys = [k for k, _, _ in self.LABEL_COLUMNS if any(k in cells for _, cells in rows)]
        # Ground truth is optional by nature, and label-split images rarely have a prediction.
        expected = ("image", "prediction") if table_id == "gallery-eval" else \
            [k for k, _, _ in self.LABEL_COLUMNS if k not in ("gt", "prediction")]
        missing = [h for k, h, _ in self.LABEL_COLUMNS if k in expected and k not in keys]
        head = "".join(f'<th title="{_esc(c)}">{_esc(h)}' + (f'<br><span class="sub">{_esc(c)}</span>' if c else "")
                       + "</th>" for k, h, c in self.LABEL_COLUMNS if k in keys)
        body = []
        for sample_id, cells in rows:
            tds = "".join(f'<td data-column="{k}">{cells.get(k, "<span class=missing>-</span>")}</td>' for k in keys)
            body.append(f'<tr data-id="{_esc(sample_id)}"><th scope="row">{_esc(sample_id)}</th>{tds}</tr>')
        note = (f'<p class="note">Not in this run yet: {_esc(", ".join(missing))}.</p>' if missing else "")
        return (f'<div class="scroll"><table id="{table_id}" class="gallery"><thead><tr><th>id</th>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table></div>{note}")

    def _legend(self) -> str:
        items = []
        for index, name in enumerate(self.class_names):
            r, g, b = (int(v) for v in VOC_PALETTE[index])
            items.append(f'<span class="swatch"><i style="background: rgb({r},{g},{b})"></i>{_esc(name)}</span>')
        items.append('<span class="swatch"><i style="background: #fff"></i>neutral / ignore</span>')
        return '<p class="legend" id="legend">' + "".join(items) + "</p>"

    def _img(self, sample_id: str, key: str, rgb: np.ndarray, alt: str, css: str = "") -> str:
        name = self.report._save_png(f"gallery/{sample_id}_{key}.png", rgb)
        return (f'<img src="{_esc(name)}" alt="{_esc(alt)}" width="{rgb.shape[1]}" height="{rgb.shape[0]}"'
                + (f' class="{css}"' if css else "") + ">")

    def _row(self, sample_id: str, only: Iterable[str] | None = None) -> tuple[str, dict[str, str]]:
        wanted = set(only) if only is not None else {k for k, _, _ in self.LABEL_COLUMNS}
        cells: dict[str, str] = {}
        data, sample = self._sample(sample_id)
        image = None
        if data is not None:
            try:
                image = data.load_image(sample)
            except Exception as error:
                self.notes.append(f"{sample_id}: image unreadable ({str(error).splitlines()[0]})")
        labels: dict[str, np.ndarray] = {}
        for key in ("confident", "rw", "pseudo", "prediction"):
            path = self._source(key, sample_id)
            if key in wanted and path.is_file():
                try:
                    labels[key] = load_label_png(path)
                except InputError as error:
                    self.notes.append(str(error))
        gt = None
        if data is not None and "gt" in wanted:
            try:
                gt = data.load_mask(sample)
            except Exception:
                gt = None
        # Every column is drawn at the size of the image (or of the first label map without it).
        shape = image.shape[:2] if image is not None else next((m.shape[:2] for m in labels.values()), None)
        cams = None
        if {"cam", "background"} & wanted and self._source("cam", sample_id).is_file():
            try:
                cams = load_npz(self._source("cam", sample_id))
            except InputError as error:
                self.notes.append(str(error))
        if shape is None and cams is not None and np.ndim(cams.get("cams")) == 3:
            shape = cams["cams"].shape[1:]
        if shape is None:
            return sample_id, cells
        size = _thumb_size(*shape)
        small_image = _resize_rgb(image, size, nearest=False) if image is not None else None
        if small_image is not None:
            cells["image"] = self._img(sample_id, "image", small_image, f"{sample_id} input image")
        if gt is not None:
            cells["gt"] = self._img(sample_id, "gt", _resize_rgb(_colour_labels(gt), size, True), "ground truth",
                                   css="labels")
        if cams is not None:
            cells.update(self._cam_cells(sample_id, cams, small_image, size, wanted))
        for key, alt in (("confident", "confident regions"), ("rw", "random walk labels"),
                         ("pseudo", "pseudo label"), ("prediction", "network prediction")):
            if key in labels:
                cells[key] = self._img(sample_id, key, _resize_rgb(_colour_labels(labels[key]), size, True), alt,
                                       css="labels")
        if "boundaries" in wanted and self._source("boundaries", sample_id).is_file():
            try:
                boundaries = load_image(self._source("boundaries", sample_id))
                cells["boundaries"] = self._img(sample_id, "boundaries", _resize_rgb(boundaries, size, False),
                                                "affinity boundary map")
            except InputError as error:
                self.notes.append(str(error))
        return sample_id, cells

    def _cam_cells(self, sample_id: str, cams: Mapping[str, np.ndarray], small_image: np.ndarray | None,
                   size: tuple[int, int], wanted: set[str]) -> dict[str, str]:
        import matplotlib

        maps = np.asarray(cams.get("cams", np.zeros((0, 1, 1))), dtype=np.float32)
        classes = [int(c) for c in np.asarray(cams.get("classes", np.arange(1, len(maps) + 1))).reshape(-1)]
        if maps.ndim != 3:
            self.notes.append(f"{sample_id}: CAM file has shape {maps.shape}, expected (K, H, W)")
            return {}
        maps = np.clip(np.nan_to_num(maps), 0.0, 1.0)
        peak = maps.max(axis=0) if len(maps) else np.zeros(maps.shape[1:], np.float32)
        jet = matplotlib.colormaps["jet"]

        def heat(values: np.ndarray) -> np.ndarray:
            coloured = jet(_resize_float(values, size))[..., :3] * 255.0
            if small_image is None:
                return coloured.astype(np.uint8)
            return (0.5 * coloured + 0.5 * small_image.astype(np.float32)).astype(np.uint8)

        cells = {}
        names = [self.class_names[c] if 0 <= c < len(self.class_names) else f"class {c}" for c in classes]
        if "cam" in wanted:
            html_parts = [self._img(sample_id, "cam", heat(peak), "CAM, max over classes")]
            html_parts.append(f'<div class="sub">{_esc(", ".join(names) or "no class")}</div>')
            if len(maps) > 1:
                tiles = []
                for index, (cls, name) in enumerate(zip(classes, names)):
                    tile = self._img(sample_id, f"cam{cls}", heat(maps[index]), f"CAM of {name}", css="tile")
                    tiles.append(f'<figure class="tile">{tile}<figcaption>{_esc(name)}</figcaption></figure>')
                html_parts.append('<div class="tiles">' + "".join(tiles) + "</div>")
            cells["cam"] = "".join(html_parts)
        if "background" in wanted:
            background = np.power(1.0 - peak, self.alpha)
            grey = np.clip(_resize_float(background, size) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            cells["background"] = self._img(sample_id, "background", np.repeat(grey[:, :, None], 3, axis=2),
                                            f"background score, alpha {self.alpha:g}")
        return cells


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
