"""MXNet ``.params`` files read with NumPy alone, and MXNet's ResNet-38 names mapped to this
project's keys.

The ResNet-38 ("Model A1") ImageNet weights that psa's README points to,
``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``, are an MXNet NDArray list as written by
``mx.nd.save`` / ``Module.save_checkpoint``. Its layout (MXNet ``src/ndarray/ndarray.cc``,
``NDArray::Save``/``Load``; containers in dmlc-core's serializer), all little-endian::

    uint64 0x112                      list magic
    uint64 reserved                   (0; MXNet does not check it)
    uint64 N                          number of arrays, then N NDArrays:
        uint32 magic                  0xF993FAC9 (V2), 0xF993FACA (V3: NumPy shape semantics),
                                      0xF993FAC8 (V1), anything else: legacy, the word is ndim
        int32  storage type           V2/V3 only: 0 dense, 1 row_sparse, 2 csr
        shape                         int32 ndim + ndim x int64 (legacy: ndim x uint32);
                                      V2/V1/legacy ndim 0, V3 ndim -1: an empty NDArray, no
                                      more fields (in V3, ndim 0 is a scalar)
        int32  dev_type, int32 dev_id the context it was saved from (1 CPU, 2 GPU, ...)
        int32  dtype flag             0 float32, 1 float64, 2 float16, 3 uint8, 4 int32,
                                      5 int8, 6 int64, 7 bool, ... (mshadow TypeFlag)
        data                          prod(shape) x itemsize bytes, C order
        (sparse arrays insert a storage shape, aux dtypes/shapes and aux data)
    uint64 M                          0 (an unnamed list) or N, then M names:
        uint64 length + that many bytes, e.g. ``arg:res2a_branch2a_weight``

The magic words came with MXNet 0.11 (August 2017); ademxapp's models, psa's file among them,
were published early in 2017, so expect the legacy layout there (uint32 dims, MXNet 1.x still
reads it). ``Module.save_checkpoint`` prefixes learnable parameters with ``arg:`` and BatchNorm
running statistics with ``aux:``. Only dense float32/float64/float16 arrays are read; anything else is
refused with a :class:`WeightsError` naming the file and the array.

Names are mapped as psa's ``convert_mxnet_to_torch`` (``network/resnet38d.py``) does, onto the
keys of :class:`~affinitynet.models.backbones.resnet38d.ResNet38dBackbone`::

    conv1a_weight                          conv1a.weight
    res{L}a_{branch}_weight                b{L}.conv_{branch}.weight
    res{L}b{n}_{branch}_weight             b{L}_{n}.conv_{branch}.weight
    bn{L}a_{branch}_gamma / beta           b{L}.bn_{branch}.weight / bias
    bn{L}b{n}_{branch}_moving_mean / _var  b{L}_{n}.bn_{branch}.running_mean / running_var
    bn{L}_gamma ...                        bn{L}.weight ...   (bn7, the final BatchNorm)
    linear1000_weight / bias               linear1000.weight / bias (the classifier)

with ``branch`` one of ``branch1`` (the projection shortcut), ``branch2a``, ``branch2b1``,
``branch2b2``. A name outside this scheme keeps its MXNet spelling (prefix removed), so that a
file of another network is reported key by key as not matching. float16 arrays become float32.
"""
from __future__ import annotations

import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import WeightsError

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
STORAGE_TYPES = {0: "dense", 1: "row_sparse", 2: "csr"}
# mshadow TypeFlag -> (name, itemsize); the item sizes let a refused array be skipped to reach
# the name list, so that the error can name the array.
DTYPES = {0: ("float32", 4), 1: ("float64", 8), 2: ("float16", 2), 3: ("uint8", 1),
          4: ("int32", 4), 5: ("int8", 1), 6: ("int64", 8), 7: ("bool", 1), 8: ("int16", 2),
          9: ("uint16", 2), 10: ("uint32", 4), 11: ("uint64", 8), 12: ("bfloat16", 2)}
READ_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2")}
# Sparse storage carries aux arrays: row_sparse its row indices, csr indptr and column indices.
_NUM_AUX = {1: 1, 2: 2}
# Far beyond any real tensor; a larger value means the header is garbage, not a shape.
_MAX_NDIM = 32


def has_list_magic(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) starts with the NDArray list magic."""
    return len(head) >= 8 and struct.unpack_from("<Q", head)[0] == LIST_MAGIC


@dataclass
class _Array:
    """One NDArray's header: where its data starts in the file and how to read it."""
    magic: int
    storage: int
    shape: tuple[int, ...] | None  # None: an empty NDArray (no shape, no data)
    dtype: int = 0
    offset: int = 0


class _Truncated(Exception):
    """The file ended inside ``where``."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


class _Corrupt(Exception):
    pass


class _Reader:
    """Sequential little-endian reads that know how many bytes the file has left."""

    def __init__(self, handle, size: int):
        self.handle = handle
        self.size = size
        self.where = "the list header"
        self.part = ""  # " (its header)" while reading an array's header

    def remaining(self) -> int:
        return self.size - self.handle.tell()

    def take(self, count: int) -> bytes:
        data = self.handle.read(count)
        if len(data) != count:
            raise _Truncated(self.where + self.part)
        return data

    def unpack(self, fmt: str):
        values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))
        return values if len(values) > 1 else values[0]

    def skip(self, count: int, what: str) -> None:
        if count > self.remaining():
            raise _Truncated(f"{self.where} ({what}: {count} bytes, {self.remaining()} left)")
        self.handle.seek(count, os.SEEK_CUR)

    def shape(self, legacy_ndim: int | None = None) -> tuple[int, ...] | None:
        """A TShape: int32 ndim + int64 dims, or (legacy) uint32 dims after a given ndim.
        ``None`` for MXNet's unknown shape (ndim -1)."""
        ndim = self.unpack("i") if legacy_ndim is None else legacy_ndim
        if ndim == -1:
            return None
        if not 0 <= ndim <= _MAX_NDIM:
            raise _Corrupt(f"{self.where} has {ndim} dimensions")
        dims = self.unpack(f"{ndim}{'I' if legacy_ndim is not None else 'q'}") if ndim else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        return dims


def _header(reader: _Reader) -> _Array:
    """One NDArray up to its data (left unread; its size is skipped)."""
    magic = reader.unpack("I")
    storage = 0
    if magic in (V2_MAGIC, V3_MAGIC):
        storage = reader.unpack("i")
        if storage not in STORAGE_TYPES:
            raise _Corrupt(f"{reader.where} has storage type {storage}")
    storage_shape = reader.shape() if storage else None
    if magic in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        shape = reader.shape()
    else:
        # Before V1 there was no magic: the first word is the number of dimensions.
        if magic > _MAX_NDIM:
            raise _Corrupt(f"{reader.where} starts with 0x{magic:08x}, which is no NDArray "
                           f"magic nor a dimension count")
        shape = reader.shape(legacy_ndim=magic)
    # An empty NDArray is written as its (empty) shape alone. Only V3 distinguishes a scalar
    # (ndim 0) from an empty array (ndim -1 or an unknown dim).
    if shape is None or (magic != V3_MAGIC and len(shape) == 0):
        return _Array(magic, storage, None)
    if any(d < 0 for d in shape):
        if magic == V3_MAGIC:
            return _Array(magic, storage, None)
        raise _Corrupt(f"{reader.where} has shape {shape}")
    reader.unpack("ii")  # context: the data is the same wherever it was saved from
    dtype = reader.unpack("i")
    if dtype not in DTYPES:
        raise _Corrupt(f"{reader.where} has dtype flag {dtype}")
    aux = []
    for _ in range(_NUM_AUX.get(storage, 0)):
        aux_dtype = reader.unpack("i")
        if aux_dtype not in DTYPES:
            raise _Corrupt(f"{reader.where} has aux dtype flag {aux_dtype}")
        aux.append((aux_dtype, reader.shape()))
    # Sparse data holds only the stored values: its size follows the storage shape, which MXNet
    # may save stale as (0,) and then derives from the indices (NDArray's sparse constructor).
    stored = shape
    if storage:
        stored = storage_shape or (0,)
        if _size(stored) == 0:
            stored = ((aux[0][1] or (0,))[:1] + shape[1:]) if storage == 1 else (aux[1][1] or ())
    array = _Array(magic, storage, shape, dtype, reader.handle.tell())
    reader.skip(DTYPES[dtype][1] * _size(stored), "its data")
    for aux_dtype, aux_shape in aux:
        reader.skip(DTYPES[aux_dtype][1] * _size(aux_shape or ()), "its sparse indices")
    return array


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _layout(handle, path: Path) -> tuple[list[_Array], list[str]]:
    """Headers of every array and the names, without reading any array data."""
    reader = _Reader(handle, path.stat().st_size)
    arrays: list[_Array] = []
    count = 0
    try:
        magic, _reserved = reader.unpack("QQ")
        if magic != LIST_MAGIC:
            raise WeightsError(wrong_magic_message(path, struct.pack("<Q", magic)))
        reader.where = "the array count"
        # A damaged count needs no check of its own: every array header takes at least 4 bytes,
        # so the loop stops at the end of the file, reported as truncated at that array.
        count = reader.unpack("Q")
        reader.part = " (its header)"
        for index in range(count):
            reader.where = f"array {index} of {count}"
            arrays.append(_header(reader))
        reader.where, reader.part = "the name count", ""
        name_count = reader.unpack("Q")
        if name_count not in (0, count):
            raise _Corrupt(f"it has {name_count} names for {count} arrays")
        names = []
        for index in range(name_count):
            reader.where = f"name {index} of {name_count} (after all {count} arrays)"
            length = reader.unpack("Q")
            if length > reader.remaining():
                raise _Truncated(reader.where)
            try:
                names.append(reader.take(length).decode("utf-8"))
            except UnicodeDecodeError:
                raise _Corrupt(f"{reader.where} is not UTF-8 text") from None
    except (_Truncated, _Corrupt) as error:
        sparse = next((i for i, a in enumerate(arrays) if a.storage), None)
        if sparse is not None:
            # Skipping a sparse array relies on its aux shapes; if what follows no longer
            # parses, the sparse array is the likelier culprit and the one the user must fix.
            raise WeightsError(_sparse_message(path, f"array {sparse} of {count}",
                                               arrays[sparse].storage)) from None
        if isinstance(error, _Corrupt):
            raise WeightsError(f"weight file '{path}' is a damaged MXNet NDArray list: "
                               f"{error}") from None
        raise WeightsError(f"weight file '{path}' is truncated: the MXNet NDArray list ends "
                           f"inside {error.where}") from None
    return arrays, names


def _sparse_message(path: Path, label: str, storage: int) -> str:
    return (f"weight file '{path}': {label} has sparse storage ({STORAGE_TYPES[storage]}); "
            f"only dense arrays are read (in MXNet, save it after .tostype('default'))")


def wrong_magic_message(path: Path, head: bytes) -> str:
    if len(head) < 8:
        return (f"weight file '{path}' is not an MXNet .params file: it has only {len(head)} "
                f"bytes, fewer than the 8-byte NDArray list magic 0x112")
    return (f"weight file '{path}' is not an MXNet .params file: it starts with "
            f"0x{struct.unpack_from('<Q', head)[0]:016x}, not the NDArray list magic 0x112 "
            f"(nor is it a PyTorch file)")


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an MXNet ``.params`` file by their MXNet names (``arg:``/``aux:`` kept),
    with the dtypes MXNet loads them as: what ``{k: v.asnumpy() for k, v in
    mx.nd.load(path).items()}`` returns.

    The whole file is checked (headers, sizes, names, storage and dtype of every array) before
    any data is read, so a refused file costs no memory. Raises :class:`WeightsError`.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        arrays, names = _layout(handle, path)
        if arrays and not names:
            raise WeightsError(f"weight file '{path}' holds {len(arrays)} unnamed MXNet arrays "
                               f"(mx.nd.save of a list); weights need names: save a dict")
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise WeightsError(f"weight file '{path}' names two MXNet arrays '{duplicate}'")
        for index, (array, name) in enumerate(zip(arrays, names)):
            label = f"array {index} '{name}'"
            if array.shape is None:
                raise WeightsError(f"weight file '{path}': {label} is an empty MXNet NDArray "
                                   f"(no shape, no data)")
            if array.storage != 0:
                raise WeightsError(_sparse_message(path, label, array.storage))
            if array.dtype not in READ_DTYPES:
                raise WeightsError(
                    f"weight file '{path}': {label} has unsupported dtype "
                    f"{DTYPES[array.dtype][0]} (flag {array.dtype}); weights must be float32, "
                    f"float64 or float16")
        result = {}
        for array, name in zip(arrays, names):
            data = np.empty(array.shape, READ_DTYPES[array.dtype])
            handle.seek(array.offset)
            # Straight into the array's buffer: the file is never held in memory twice.
            # (memoryview cannot cast an array with a zero in its shape; it has no data anyway)
            if data.nbytes and handle.readinto(memoryview(data).cast("B")) != data.nbytes:
                # The sizes were checked against the file's; it changed while being read.
                raise WeightsError(f"weight file '{path}' is truncated: it ended inside the "
                                   f"data of '{name}' while being read")
            if sys.byteorder != "little":
                data = data.astype(data.dtype.newbyteorder("="))
            result[name] = data
    return result


_UNIT = r"(?P<level>\d+)(?P<unit>a|b\d+)_(?P<branch>branch(?:1|2[a-z]\d*))"
_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
              "moving_var": "running_var"}
_BN_PARAM = f"(?P<param>{'|'.join(_BN_PARAMS)})"
_CONV_RE = re.compile(rf"res{_UNIT}_weight")
_BN_RE = re.compile(rf"bn{_UNIT}_{_BN_PARAM}")
_FINAL_BN_RE = re.compile(rf"bn(?P<level>\d+)_{_BN_PARAM}")
_LAYER_RE = re.compile(r"(?P<layer>conv1a|linear\d+)_(?P<param>weight|bias)")


def torch_key(name: str) -> str:
    """The resnet38d key of the MXNet array ``name`` (see the module docstring); a name outside
    the ResNet-38 scheme keeps its MXNet spelling without the ``arg:``/``aux:`` prefix."""
    bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    for pattern, layer_type in ((_CONV_RE, "conv"), (_BN_RE, "bn")):
        match = pattern.fullmatch(bare)
        if match:
            level, unit = match["level"], match["unit"]
            module = f"b{level}" if unit == "a" else f"b{level}_{unit[1:]}"
            param = _BN_PARAMS[match["param"]] if layer_type == "bn" else "weight"
            return f"{module}.{layer_type}_{match['branch']}.{param}"
    match = _FINAL_BN_RE.fullmatch(bare)
    if match:
        return f"bn{match['level']}.{_BN_PARAMS[match['param']]}"
    match = _LAYER_RE.fullmatch(bare)
    if match:
        return f"{match['layer']}.{match['param']}"
    return bare


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The arrays of an MXNet ``.params`` file as a state dict with resnet38d key names
    (:func:`torch_key`); float16 becomes float32, other dtypes are kept."""
    path = Path(path)
    arrays = read_params(path)
    if not arrays:
        raise WeightsError(f"weight file '{path}' is an MXNet NDArray list with no arrays")
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name in list(arrays):
        key = torch_key(name)
        if key in state:
            raise WeightsError(f"weight file '{path}': MXNet arrays '{sources[key]}' and "
                               f"'{name}' both map to key '{key}'")
        data = arrays.pop(name)  # popped so that float16 copies do not pile up
        if data.dtype == np.float16:
            data = data.astype(np.float32)
        state[key] = torch.from_numpy(data)
        sources[key] = name
    return state
