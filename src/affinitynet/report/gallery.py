"""The report's gallery: one row per image, one column per stage's output (Fig. 2, 4, 5)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..config import DEFAULTS
from ..data.datasets.demo import default_demo_root, is_generated
from ..errors import InputError
from ..files import VOC_PALETTE, load_image, load_label_png, load_npz
from ..ops.instance_labels import load_instances
from ..pipeline import companion_stages, label_stage, stage, training_label_stage
from ..stages.common import dataset
from .common import _colour_labels, _esc, _number, _resize_float, _resize_rgb, _thumb_size

# ----------------------------------------------------------------------------------------------
# Gallery

# The instance masks' colours, in the order of their scores (matplotlib's tab10).
INSTANCE_COLOURS = np.asarray([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)],
                              dtype=np.float64)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` less its pixels with a 4-neighbour outside it (the image's edge counts as inside)."""
    padded = np.pad(mask, 1, mode="edge")
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])

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
        ("instances", "instances", "instance pseudo labels: each mask its colour, listed with class and score"),
        ("prediction", "network", "prediction of the segmentation network"),
    )

    def __init__(self, report: Any):   # the report being built (page._ReportBuilder)
        self.report = report
        self.run_dir = report.run_dir
        self.notes: list[str] = []
        self.alpha = 16.0
        config = report.config or {}
        alpha = _number(config.get("cam", {}).get("eval_alpha") if isinstance(config.get("cam"), dict) else None)
        if alpha is not None:
            self.alpha = alpha

        self.label_stage = label_stage(report.config or DEFAULTS).name
        # The labels that trained the network: the method's, or the refinement round's.
        self.training_labels = training_label_stage(report.config or DEFAULTS).name
        # The label method's instance labels (IRN's irn-instances), where it makes them.
        self.instance_stage = next((spec for spec in companion_stages(report.config or DEFAULTS)
                                    if {"objects", "detections"} <= set(spec.outputs)), None)
        self.datasets = self._open_datasets()
        self.class_names = report._class_names() or (self.datasets[0].class_names if self.datasets else [])

    # -- where things are ----------------------------------------------------------------------

    def _folder(self, key: str) -> Path:
        name, output = {"cam": ("infer_cam", "cams"), "background": ("infer_cam", "cams"),
                        "confident": ("confident_regions", "labels"),
                        "boundaries": (self.label_stage, "boundaries"),
                        "rw": (self.label_stage, "rw_labels"),
                        "pseudo": (self.training_labels, "pseudo_labels"),
                        "prediction": ("infer_seg", "predictions"),
                        "camlabel": ("infer_cam", "labels")}[key]
        return stage(name).output(output, self.run_dir)

    def _instances(self, sample_id: str) -> tuple[list, tuple[int, int]] | None:
        """The image's instances (highest score first) and the size of their map; None without."""
        if self.instance_stage is None:
            return None
        png = self.instance_stage.output("objects", self.run_dir) / f"{sample_id}.png"
        detections = self.instance_stage.output("detections", self.run_dir) / f"{sample_id}.json"
        if not (png.is_file() and detections.is_file()):
            return None
        try:
            return load_instances(png, detections)
        except InputError as error:
            self.notes.append(str(error))
            return None

    def _instance_cell(self, sample_id: str, found: list, shape: tuple[int, int], image: np.ndarray | None,
                       size: tuple[int, int]) -> str:
        """The masks blended on the image in the colours of ``INSTANCE_COLOURS`` (their outlines
        darker), and the list of their classes and scores, highest first."""
        picture = np.full(tuple(shape) + (3,), 255.0) if image is None else \
            _resize_rgb(image, (shape[1], shape[0]), nearest=False).astype(np.float64)
        for index, inst in enumerate(found):
            colour = INSTANCE_COLOURS[index % len(INSTANCE_COLOURS)]
            picture[inst.mask] = 0.4 * picture[inst.mask] + 0.6 * colour
            picture[inst.mask & ~_eroded(inst.mask)] = 0.5 * colour
        rgb = _resize_rgb(np.clip(picture, 0, 255).astype(np.uint8), size, nearest=True)
        items = []
        for index, inst in enumerate(found):
            r, g, b = (int(v) for v in INSTANCE_COLOURS[index % len(INSTANCE_COLOURS)])
            name = self.class_names[inst.label] if 0 <= inst.label < len(self.class_names) else f"class {inst.label}"
            items.append(f'<li data-class="{_esc(name)}" data-score="{inst.score:.3f}"><i style="background: '
                         f'rgb({r},{g},{b})"></i>{_esc(name)} {inst.score:.2f}</li>')
        listing = f'<ol class="instances">{"".join(items)}</ol>' if items else '<div class="sub">no instance</div>'
        return self._img(sample_id, "instances", rgb, f"{len(found)} instance masks") + listing

    def _source(self, key: str, sample_id: str) -> Path:
        return self._folder(key) / f"{sample_id}.{'npz' if key in ('cam', 'background') else 'png'}"

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
        size, train, val = int(section.get("demo_size", 128)), int(section.get("demo_train", 240)), int(section.get("demo_val", 60))
        seed, same_class = int(section.get("demo_seed", 0)), float(section.get("demo_same_class") or 0.0)
        root = section.get("root") or default_demo_root(size, train, val, seed, same_class)
        return is_generated(root, size, train, val, seed, same_class)

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
        label_ids = self._pick(self._ids([self._folder("camlabel"), self._folder("cam"), self._folder("pseudo")],
                                         self._split_ids("label_split")),
                               ("pseudo labels", "CAM labels"), report.gallery_size, set())
        eval_count = max(1, math.ceil(report.gallery_size / 2))
        eval_ids = self._pick(self._ids([self._folder("prediction")], self._split_ids("eval_split")),
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
            [k for k, _, _ in self.LABEL_COLUMNS if k not in ("gt", "prediction")
             and (k != "instances" or self.instance_stage is not None)]
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
            except Exception as error:  # shown, not hidden: the row is drawn without it
                self.notes.append(f"{sample_id}: ground truth unreadable ({str(error).splitlines()[0]})")
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
        instances = self._instances(sample_id) if "instances" in wanted else None
        if instances is not None:
            found, instance_shape = instances
            cells["instances"] = self._instance_cell(sample_id, found, instance_shape, image, size)
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
