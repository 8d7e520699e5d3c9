"""The segmentation network as an ONNX file: ``affinitynet export`` writes it from a
``train_seg/model.pt``, and ``affinitynet predict`` runs it with onnxruntime (issue 39).

The file holds the network of :class:`segmentation.SegmentationNet` (backbone, head and the
bilinear upsampling of the logits to the input size, A.1) with a dynamic batch, height and width:
input ``images`` float32 (N, 3, H, W), RGB normalised by the recorded mean and std; output
``logits`` float32 (N, C, H, W). Its ``metadata_props`` carry every key of the checkpoint's meta
(class names, mean, std, output stride, backbone, head...), each JSON-encoded, so that ``predict``
needs nothing else, as with ``model.pt``.

Inference goes through the same :func:`segmentation.predict_labels` as ``model.pt``: scales,
flips, resizing, softmax averaging and the dense CRF are written once; only the network's forward
pass differs (:class:`OnnxSegmentationNet` is called as the PyTorch module is).

``onnx`` and ``onnxruntime`` are an optional extra (``pip install 'affinitynet[onnx]'``): they
are imported when a command needs them, and their absence is one line saying what to install.
"""
from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import DependencyError, ExportError, InputError
from ..files import write_bytes
from .networks import model_from_checkpoint
from .segmentation import CHECKPOINT_KIND, META_KEYS

INSTALL_HINT = "pip install 'affinitynet[onnx]'"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Opset 17 is read by every onnxruntime since 1.11 and has every op these networks use
# (Resize with half_pixel coordinates is PyTorch's bilinear upsampling with align_corners=False).
OPSET = 17
# The size the network is traced at, and the other size the export is checked at: a backbone
# whose forward pass computes something from the input's size in Python would be frozen at the
# first size by the trace, and then differ at the second.
TRACE_SHAPE = (2, 3, 64, 96)
CHECK_SHAPE = (1, 3, 75, 53)
# A faithful graph differs from PyTorch by float32 rounding (about 1e-6 of the logits' range);
# a wrong one by the logits' own size.
EXPORT_TOLERANCE = 1e-3
# What the file says about its input and output, beside the checkpoint's meta.
FILE_META = {
    "input": f"{INPUT_NAME}: float32 (N, 3, H, W), RGB in [0, 1] minus mean, divided by std",
    "output": f"{OUTPUT_NAME}: float32 (N, num_classes, H, W), class scores before softmax, at the input size",
}


def import_optional(name: str, purpose: str):
    """The optional module ``name`` (``onnx`` or ``onnxruntime``), or a one-line
    :class:`DependencyError` saying what to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DependencyError(f"{purpose} needs the package {name}, which is not installed: {INSTALL_HINT}") from None


def is_onnx_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected|: the largest error relative to the logits' range."""
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(got - expected).max()) / scale


def _trace_to_onnx(model: torch.nn.Module, opset: int) -> bytes:
    """The ONNX bytes of ``model`` traced at :data:`TRACE_SHAPE`, with batch, height and width
    dynamic, by PyTorch's TorchScript exporter."""
    # The TorchScript exporter: deprecated since PyTorch 2.9 in favour of the torch.export one,
    # but that one needs onnxscript besides, took 7 s where this takes under 1 s on the tests'
    # tiny network (28 s against 1.3 s on MobileNetV2), and gives the same graph numerically.
    # PyTorch before 2.5 has no `dynamo` argument and only this exporter.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    dynamic = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The deprecation notice above, and the tracer's warnings about Python values computed
        # from tensors: the check at a second size (export_onnx) is what tells whether they matter.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (torch.zeros(TRACE_SHAPE),), buffer, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
                          opset_version=opset, do_constant_folding=True, **legacy)
    return buffer.getvalue()


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, opset: int = OPSET) -> dict[str, Any]:
    """Write the segmentation network of ``checkpoint`` (a ``train_seg/model.pt``) as the ONNX
    file ``out``, with its meta in ``metadata_props``; returns that meta.

    The graph is checked by ``onnx.checker.check_model`` and run by onnxruntime at a size other
    than the traced one, against PyTorch; any failure is one line and leaves nothing written.
    """
    onnx = import_optional("onnx", "affinitynet export")
    ort = import_optional("onnxruntime", "affinitynet export")
    out = Path(out)
    if not is_onnx_path(out):
        raise InputError(out, "the exported file's name must end in .onnx")
    if out.is_dir():
        raise InputError(out, "is a directory; name the .onnx file to write")
    model, meta = model_from_checkpoint(checkpoint, "cpu")
    proto = onnx.load_from_string(_trace_to_onnx(model, opset))
    # The tracer leaves the output's class axis symbolic (after Resize); it is the number of
    # classes, which a reader of the file should see without running it.
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = len(meta["class_names"])
    recorded = {**{key: json.dumps(value) for key, value in meta.items()},
                "affinitynet_version": json.dumps(__version__), **{k: json.dumps(v) for k, v in FILE_META.items()}}
    for key, value in recorded.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"affinitynet segmentation network ({meta['backbone']}, head {meta['head']}, "
                        f"{len(meta['class_names'])} classes), exported from {Path(checkpoint).name}")
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()

    session = ort.InferenceSession(data, _session_options(ort, threads=None), providers=["CPUExecutionProvider"])
    images = torch.randn(CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    same_shape = got.shape == expected.shape
    difference = relative_difference(got, expected) if same_shape else float("inf")
    if difference > EXPORT_TOLERANCE:
        how = f"relative difference {difference:.2g}" if same_shape else f"shape {got.shape}, PyTorch's {expected.shape}"
        raise ExportError(f"{checkpoint}: the ONNX graph's logits at {CHECK_SHAPE[2]}x{CHECK_SHAPE[3]} differ from "
                          f"PyTorch's ({how}): the backbone's forward pass depends on the input size in a way "
                          f"tracing cannot record; nothing written")
    write_bytes(out, data)
    return meta


def _session_options(ort, threads: int | None):
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # onnxruntime's warnings (unused initializers, providers it skips) are its own business; an
    # error still raises, and predict turns it into one line.
    options.log_severity_level = 3
    return options


def _providers(ort, device: str | torch.device) -> tuple[list[Any], torch.device]:
    """onnxruntime's execution providers for ``device`` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``), and where the multi-scale code around the network runs: the CPU, as the
    network's inputs and outputs are numpy arrays."""
    name = str(device)
    available = ort.get_available_providers()
    if name == "cpu" or (name == "auto" and "CUDAExecutionProvider" not in available):
        return ["CPUExecutionProvider"], torch.device("cpu")
    if name == "auto" or name.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise DependencyError(f"device '{name}': this onnxruntime has no CUDA provider (pip install "
                                  f"onnxruntime-gpu, or use --device cpu)")
        index = int(name.split(":")[1]) if ":" in name else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], torch.device("cpu")
    raise InputError(name, "not a device for an ONNX model: use auto, cpu, cuda or cuda:N")


class OnnxSegmentationNet:
    """An exported segmentation network run by onnxruntime, called as
    :class:`segmentation.SegmentationNet` is: images (N, 3, H, W) float32 -> logits (N, C, H, W)
    at the input size. ``device``: where its inputs are expected (the CPU)."""

    def __init__(self, session, device: torch.device):
        self.session = session
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])


def onnx_meta(path: str | os.PathLike, metadata: dict[str, str]) -> dict[str, Any]:
    """The checkpoint meta recorded in an exported file's ``metadata_props``; a file without it
    (not written by ``affinitynet export``) raises a one-line :class:`InputError`."""
    meta: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    missing = [key for key in ("kind", *META_KEYS) if key not in meta]
    if missing:
        raise InputError(path, f"an ONNX model without affinitynet's metadata ({', '.join(missing)} missing): "
                               f"export it with `affinitynet export RUN_DIR/train_seg/model.pt --out FILE.onnx`")
    if meta["kind"] != CHECKPOINT_KIND:
        raise InputError(path, f"a '{meta['kind']}' network, not a segmentation model")
    return meta


def load_onnx_model(path: str | os.PathLike, device: str | torch.device = "auto",
                    threads: int | None = None) -> tuple[OnnxSegmentationNet, dict[str, Any]]:
    """(the network of an exported ``.onnx`` file as an onnxruntime session, its meta); any
    problem with the file is one line naming it. ``threads``: onnxruntime's intra-op threads
    (None: its default, one per physical core)."""
    ort = import_optional("onnxruntime", "predict with an ONNX model")
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "ONNX model not found" if not path.exists() else "not a file")
    providers, where = _providers(ort, device)
    try:
        session = ort.InferenceSession(str(path), _session_options(ort, threads), providers=providers)
    except Exception as error:   # onnxruntime raises its own classes for every kind of bad file
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), error.__class__.__name__)
        raise InputError(path, f"not a readable ONNX model ({first[:160]})") from None
    meta = onnx_meta(path, session.get_modelmeta().custom_metadata_map)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    channels = outputs[0].shape[1] if outputs and len(outputs[0].shape) == 4 else None
    if [i.name for i in inputs] != [INPUT_NAME] or outputs[0].name != OUTPUT_NAME or channels != len(meta["class_names"]):
        raise InputError(path, f"the graph is not the exported network (input {[i.name for i in inputs]}, "
                               f"{channels} output channels for {len(meta['class_names'])} classes)")
    return OnnxSegmentationNet(session, where), meta
