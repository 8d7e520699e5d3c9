"""The report's tables and charts: Tables 1 and 5 as HTML, the per-class IoU bars, the training
curves, and the logs as TensorBoard event files."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .common import _curve_names, _esc, _figure_png, _fmt1, _new_figure, _number

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


def write_tensorboard(logs: Mapping[str, Mapping[str, list[float]]], out_dir: Path) -> str | None:
    """Event files of every log in ``out_dir/<stage>/``; without ``torch.utils.tensorboard``
    nothing is written and the reason is returned (None when written). Each stage's folder is
    rebuilt from scratch, so running the report twice does not show every curve twice in
    TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as error:  # missing tensorboard, or a protobuf/numpy mismatch inside it: optional
        return str(error).splitlines()[0] if str(error) else error.__class__.__name__
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
    return None
