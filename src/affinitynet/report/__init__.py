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
``RUN_DIR/report/tensorboard/<stage>/``; without it the page says why there are none.
"""
from __future__ import annotations

from .charts import write_tensorboard
from .common import read_log_csv
from .page import write_report

__all__ = ["read_log_csv", "write_report", "write_tensorboard"]
