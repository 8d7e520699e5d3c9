"""MXNet ``.params`` weights (psa's ResNet-38 ImageNet file) read without MXNet: values exactly as
MXNet loads them, ResNet-38's MXNet names mapped to the resnet38d keys as psa's
``convert_mxnet_to_torch`` does, the load through ``create_backbone``, and one-line errors.

The fixtures in ``fixtures/mxnet`` were written by real MXNet 1.9.1 with
``fixtures/make_mxnet_params.py``, with what MXNet loads back from each (``.npz`` or SHA-256);
MXNet itself is never imported here.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from affinitynet.errors import WeightsError
from affinitynet.models.backbones import create_backbone, resnet38d
from affinitynet.models.backbones.mxnet_params import read_params, torch_key
from affinitynet.models.backbones.weights import read_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "mxnet"
NARROW = 64  # the channel divisor of a1_narrow_f16.params (make_mxnet_params.NARROW)
V1_MAGIC, V2_MAGIC = 0xF993FAC8, 0xF993FAC9
FLAGS = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2}


def one_line_naming(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert "\n" not in message and f"'{path}'" in message, message
    return message


def expected_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


# --- a test-side writer, for the variants MXNet 1.9 no longer writes (V1, legacy, GPU) ------

def ndarray_bytes(values: np.ndarray, magic: int = V2_MAGIC, context=(1, 0)) -> bytes:
    """One dense NDArray in the layout of the mxnet_params docstring."""
    if magic == V2_MAGIC:
        head = struct.pack("<Ii", magic, 0) + struct.pack(f"<i{values.ndim}q", values.ndim,
                                                          *values.shape)
    elif magic == V1_MAGIC:
        head = struct.pack(f"<Ii{values.ndim}q", magic, values.ndim, *values.shape)
    else:  # legacy: the first word is ndim, dims are uint32
        head = struct.pack(f"<I{values.ndim}I", values.ndim, *values.shape)
    return (head + struct.pack("<iii", *context, FLAGS[values.dtype])
            + np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes())


def list_bytes(arrays: list[bytes], names: list[str]) -> bytes:
    encoded = [name.encode() for name in names]
    return (struct.pack("<QQQ", 0x112, 0, len(arrays)) + b"".join(arrays)
            + struct.pack("<Q", len(encoded))
            + b"".join(struct.pack("<Q", len(name)) + name for name in encoded))


def test_test_writer_matches_mxnet_bytes():
    """The writer above reproduces a file MXNet wrote byte for byte, so the variants it writes
    below differ from MXNet's only where they mean to."""
    expected = expected_npz("dtypes")
    data = list_bytes([ndarray_bytes(v) for v in expected.values()], list(expected))
    assert data == (FIXTURES / "dtypes.params").read_bytes()


# --- values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ("a1_subset_f32", "dtypes", "v3_numpy"))
def test_values_are_exactly_what_mxnet_loads(name):
    arrays = read_params(FIXTURES / f"{name}.params")
    expected = expected_npz(name)
    assert list(arrays) == list(expected)
    for key, value in expected.items():
        assert arrays[key].dtype == value.dtype and arrays[key].shape == value.shape, key
        # Bytes, not values: NaN, -0 and subnormals (in a1_subset_f32) must survive as well.
        assert arrays[key].tobytes() == value.tobytes(), key


def test_v3_file_keeps_scalars_and_zero_size_arrays():
    arrays = read_params(FIXTURES / "v3_numpy.params")
    assert arrays["arg:scalar"].shape == () and arrays["arg:scalar"] == 2.5
    assert arrays["arg:zero_size"].shape == (0, 3)


def test_narrow_a1_file_matches_mxnet_digests():
    arrays = read_params(FIXTURES / "a1_narrow_f16.params")
    expected = json.loads((FIXTURES / "a1_narrow_f16.params.sha256.json").read_text())
    assert list(arrays) == list(expected)
    for key, value in arrays.items():
        assert [list(value.shape), str(value.dtype)] == [expected[key]["shape"],
                                                         expected[key]["dtype"]], key
        assert hashlib.sha256(value.tobytes()).hexdigest() == expected[key]["sha256"], key


@pytest.mark.parametrize("magic", (V1_MAGIC, "legacy"))
def test_older_ndarray_formats_are_read(tmp_path, magic):
    expected = expected_npz("dtypes")
    path = tmp_path / "old.params"
    path.write_bytes(list_bytes(
        [ndarray_bytes(v, magic if magic != "legacy" else None) for v in expected.values()],
        list(expected)))
    arrays = read_params(path)
    for key, value in expected.items():
        assert arrays[key].tobytes() == value.tobytes() and arrays[key].shape == value.shape


def test_arrays_saved_from_a_gpu_read_the_same(tmp_path):
    """The context (dev_type 2: GPU) only says where the array lived; the bytes are the same."""
    expected = expected_npz("a1_subset_f32")
    path = tmp_path / "gpu.params"
    path.write_bytes(list_bytes([ndarray_bytes(v, context=(2, 1)) for v in expected.values()],
                                list(expected)))
    arrays = read_params(path)
    assert all(arrays[k].tobytes() == v.tobytes() for k, v in expected.items())


# --- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mxnet_name,key", [
    ("arg:conv1a_weight", "conv1a.weight"),
    ("arg:res2a_branch1_weight", "b2.conv_branch1.weight"),
    ("arg:res2a_branch2a_weight", "b2.conv_branch2a.weight"),
    ("arg:res4b5_branch2b1_weight", "b4_5.conv_branch2b1.weight"),
    ("arg:res6a_branch2b2_weight", "b6.conv_branch2b2.weight"),
    ("arg:bn2a_branch2a_gamma", "b2.bn_branch2a.weight"),
    ("arg:bn3b2_branch2b1_beta", "b3_2.bn_branch2b1.bias"),
    ("aux:bn5b1_branch2a_moving_mean", "b5_1.bn_branch2a.running_mean"),
    ("aux:bn7a_branch2b2_moving_var", "b7.bn_branch2b2.running_var"),
    ("arg:bn7_gamma", "bn7.weight"),
    ("aux:bn7_moving_var", "bn7.running_var"),
    ("arg:linear1000_bias", "linear1000.bias"),
    ("arg:fc1_weight", "fc1_weight"),  # another network's name is kept, to be reported
    ("conv1a_weight", "conv1a.weight"),  # Gluon-style files have no arg:/aux: prefix
])
def test_mxnet_names_map_as_psa_converts_them(mxnet_name, key):
    assert torch_key(mxnet_name) == key


def test_every_a1_name_maps_to_a_resnet38d_key_of_the_same_shape(monkeypatch):
    """All 193 arrays of the real ImageNet file (names and shapes from MXNet's own shape
    inference of Model A1): the backbone keys one to one, plus the classifier."""
    layout = json.loads((FIXTURES / "a1_layout.json").read_text())
    mapped = {torch_key(name): tuple(shape) for name, shape in layout}
    assert len(mapped) == len(layout)
    assert {k for k in mapped if k.startswith("linear1000.")} == {"linear1000.weight",
                                                                  "linear1000.bias"}
    # Shapes only: on the meta device, without the initialisation (slow there, and moot).
    monkeypatch.setattr(resnet38d, "kaiming_init", lambda model: None)
    with torch.device("meta"):
        model = resnet38d.ResNet38dBackbone()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    assert {k: v for k, v in mapped.items() if not k.startswith("linear1000.")} == expected


def test_state_dict_has_torch_names_and_float32_for_float16(tmp_path):
    state = read_state_dict(FIXTURES / "a1_subset_f32.params")
    expected = expected_npz("a1_subset_f32")
    assert sorted(state) == sorted(torch_key(k) for k in expected)
    assert state["b5_2.bn_branch2b1.bias"].numpy().tobytes() == \
        expected["arg:bn5b2_branch2b1_beta"].tobytes()
    dtypes = read_state_dict(FIXTURES / "dtypes.params")
    assert dtypes["f16"].dtype == torch.float32 and dtypes["f64"].dtype == torch.float64
    assert torch.equal(dtypes["f16"], torch.from_numpy(expected_npz("dtypes")["arg:f16"]).float())


# --- the load through create_backbone ---------------------------------------------------------

class NarrowNN:
    """``torch.nn`` for resnet38d.py with every channel count divided by NARROW (3, the RGB
    input, stays): the full ResNet-38 structure and key set at 1/4096 of the weights, the shape
    of a1_narrow_f16.params."""
    Module, Dropout2d = nn.Module, nn.Dropout2d

    @staticmethod
    def narrow(channels: int) -> int:
        return channels if channels == 3 else channels // NARROW

    class Conv2d(nn.Conv2d):
        def __init__(self, cin, cout, *args, **kwargs):
            super().__init__(NarrowNN.narrow(cin), NarrowNN.narrow(cout), *args, **kwargs)

    class BatchNorm2d(nn.BatchNorm2d):
        def __init__(self, channels, *args, **kwargs):
            super().__init__(NarrowNN.narrow(channels), *args, **kwargs)


@pytest.fixture
def narrow_resnet38d(monkeypatch):
    monkeypatch.setattr(resnet38d, "nn", NarrowNN)


@pytest.mark.parametrize("layout", ("mxnet-1.9", "legacy"))
def test_create_backbone_loads_the_a1_file(narrow_resnet38d, tmp_path, layout):
    """Through the registry, as ``backbone.weights`` does: in the layout MXNet 1.9 writes, and in
    the pre-2017-08 one that psa's file (published early 2017) most likely has."""
    path = FIXTURES / "a1_narrow_f16.params"
    arrays = read_params(path)
    if layout == "legacy":
        path = tmp_path / "a1_legacy.params"
        path.write_bytes(list_bytes([ndarray_bytes(v, None) for v in arrays.values()],
                                    list(arrays)))
    model = create_backbone("resnet38d", pretrained=str(path)).eval()
    loaded = model.state_dict()
    for name, value in arrays.items():
        key = torch_key(name)
        if key.startswith("linear1000."):
            assert key not in loaded  # the classifier is dropped, as for .pth files
            continue
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], torch.from_numpy(value.astype(np.float32))), key
    assert len(loaded) - sum(k.endswith("num_batches_tracked") for k in loaded) == len(arrays) - 2
    with torch.inference_mode():
        levels = model(torch.randn(1, 3, 32, 32))
    assert len(levels) == 5 and all(torch.isfinite(level).all() for level in levels)


def test_file_of_another_network_lists_missing_and_unexpected_keys(narrow_resnet38d):
    path = FIXTURES / "dtypes.params"
    with pytest.raises(WeightsError) as info:
        create_backbone("resnet38d", pretrained=path)
    message = str(info.value)
    assert f"'{path}'" in message and "resnet38d" in message
    assert "missing keys: b2.bn_branch2a.bias" in message and "unexpected keys: f16" in message


def test_partial_a1_file_lists_missing_keys(narrow_resnet38d, tmp_path):
    data = read_params(FIXTURES / "a1_narrow_f16.params")
    names = [n for n in data if "res4b3" not in n and "bn4b3" not in n]
    path = tmp_path / "partial.params"
    path.write_bytes(list_bytes([ndarray_bytes(data[n]) for n in names], names))
    with pytest.raises(WeightsError) as info:
        create_backbone("resnet38d", pretrained=path)
    assert "10 missing keys: b4_3.bn_branch2a.bias" in str(info.value)
    assert "unexpected" not in str(info.value)


def test_params_detected_by_magic_not_by_name(narrow_resnet38d, tmp_path):
    """An MXNet file under a .pth name loads as MXNet; a PyTorch file named .params as PyTorch."""
    mxnet_file = tmp_path / "weights.pth"
    mxnet_file.write_bytes((FIXTURES / "a1_narrow_f16.params").read_bytes())
    model = create_backbone("resnet38d", pretrained=mxnet_file)
    torch_file = tmp_path / "weights.params"
    torch.save(model.state_dict(), torch_file)
    from_mxnet = read_state_dict(mxnet_file)
    assert all(torch.equal(v, from_mxnet[k]) for k, v in read_state_dict(torch_file).items()
               if not k.endswith("num_batches_tracked"))


# --- bad files: one line naming the file ------------------------------------------------------

@pytest.mark.parametrize("name,pattern", [
    ("row_sparse", "array 1 'arg:embedding_weight' has sparse storage (row_sparse)"),
    ("csr", "array 1 'arg:csr_weight' has sparse storage (csr)"),
    ("int32", "array 1 'arg:index_table' has unsupported dtype int32"),
    ("unnamed_list", "holds 2 unnamed MXNet arrays"),
])
def test_refused_mxnet_files(name, pattern):
    path = FIXTURES / f"{name}.params"
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    assert pattern in one_line_naming(info, path)


@pytest.mark.parametrize("content,pattern", [
    (b"not an MXNet file at all", "starts with 0x"),
    (b"\x12\x01", "only 2 bytes"),
    (b"", "only 0 bytes"),
])
def test_wrong_magic_is_reported(narrow_resnet38d, tmp_path, content, pattern):
    path = tmp_path / "wrong.params"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        create_backbone("resnet38d", pretrained=path)
    message = one_line_naming(info, path)
    assert "not an MXNet .params file" in message and pattern in message


def test_truncated_file_says_where_it_ends(tmp_path):
    data = (FIXTURES / "dtypes.params").read_bytes()
    starts = [i for i in range(len(data)) if data[i:i + 4] == struct.pack("<I", V2_MAGIC)]
    assert len(starts) == 4
    path = tmp_path / "cut.params"
    for size, where in [(12, "the list header"), (20, "the array count"),
                        (starts[2] + 10, "array 2 of 4 (its header)"),
                        (starts[3] - 1, "array 2 of 4 (its data: "),
                        (len(data) - 3, "name 3 of 4")]:
        path.write_bytes(data[:size])
        with pytest.raises(WeightsError) as info:
            read_state_dict(path)
        message = one_line_naming(info, path)
        assert "is truncated" in message and where in message, (size, message)
    for size in range(8, len(data)):  # every cut is reported, none crashes
        path.write_bytes(data[:size])
        with pytest.raises(WeightsError, match="truncated"):
            read_state_dict(path)


def test_damaged_and_odd_files_are_reported(tmp_path):
    path = tmp_path / "odd.params"
    value = np.ones(2, np.float32)
    cases = [
        # the first word of an array is neither a magic nor a plausible ndim
        (list_bytes([b"\xff" * 40], ["arg:x"]), "damaged MXNet NDArray list"),
        # an empty NDArray (V2, ndim 0) has no data to load
        (list_bytes([struct.pack("<Iii", V2_MAGIC, 0, 0)], ["arg:x"]), "empty MXNet NDArray"),
        (list_bytes([ndarray_bytes(value)] * 2, ["arg:x", "arg:x"]), "two MXNet arrays 'arg:x'"),
        (list_bytes([ndarray_bytes(value)] * 2, ["arg:bn7_gamma", "bn7_gamma"]),
         "both map to key 'bn7.weight'"),
        (list_bytes([ndarray_bytes(value)] * 2, ["arg:x"]), "1 names for 2 arrays"),
        (list_bytes([], []), "no arrays"),
    ]
    for content, pattern in cases:
        path.write_bytes(content)
        with pytest.raises(WeightsError) as info:
            read_state_dict(path)
        assert pattern in one_line_naming(info, path)
