"""LoRA adapter tensors <-> Flower ArrayRecord, shared by the client and the server.

The wire format is Flower's own: one ``Array`` per adapter tensor, serialized by
``np.save`` (``stype == "numpy.ndarray"``). Reading it back does not go through
``np.load``: the ``.npy`` header is parsed and the payload is viewed in place with
``np.frombuffer``, so a 100-site round does not copy every update once more before
aggregation. ``allow_pickle`` is never needed and object dtypes are refused.

Only the adapter travels (STYLE.md rule 8), and it is checked before it is used:
:func:`check_adapter` compares keys, shapes, dtypes and finiteness against the
:class:`AdapterSpec` that the coordinator built from its own adapter.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format

from fedretrain.errors import AdapterMismatchError

# Flower's ``SType.NUMPY``: bytes written by ``np.save(..., allow_pickle=False)``.
NUMPY_STYPE = "numpy.ndarray"

TensorLike = torch.Tensor | np.ndarray


# The epsilon a site reports in its train reply when it trains without DP (research mode):
# no finite bound exists, and a MetricRecord cannot carry infinity through every check.
NOT_PRIVATE_EPSILON = -1.0


def _to_numpy(key: str, value: TensorLike) -> np.ndarray:
    """Return ``value`` as a C-contiguous CPU ndarray in its wire dtype.

    NumPy has no bfloat16, so a bf16 tensor is widened to float32 (exact: every
    bf16 value is a float32 value). The receiver gets float32 and casts back when
    it loads the adapter into a bf16 model.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float32)
        array = tensor.contiguous().numpy()
    elif isinstance(value, np.ndarray):
        array = value
    else:
        raise AdapterMismatchError(
            f"adapter tensor '{key}' is a {type(value).__name__}, expected a torch.Tensor or numpy.ndarray"
        )
    if array.dtype.kind not in "biufc":
        raise AdapterMismatchError(f"adapter tensor '{key}' has dtype {array.dtype}; only numeric dtypes travel")
    # A Fortran-ordered array would be saved with fortran_order=True, which the
    # receiver refuses; make the C layout explicit here.
    return np.ascontiguousarray(array)


@dataclass(frozen=True)
class AdapterSpec:
    """What a valid adapter looks like: its keys, shapes and wire dtypes.

    Attributes
    ----------
    entries : tuple[tuple[str, tuple[int, ...], str], ...]
        One ``(key, shape, numpy dtype name)`` per tensor, sorted by key so two
        specs built from the same adapter compare equal.
    """

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, TensorLike]) -> AdapterSpec:
        """Build the spec of an adapter state dict, in the dtypes it travels in."""
        entries = []
        for key in sorted(sd):
            array = _to_numpy(key, sd[key])
            entries.append((key, tuple(int(n) for n in array.shape), array.dtype.name))
        return cls(entries=tuple(entries))

    @property
    def keys(self) -> tuple[str, ...]:
        """Tensor names, sorted."""
        return tuple(key for key, _, _ in self.entries)

    @property
    def nbytes(self) -> int:
        """Raw payload bytes of one adapter (no ``.npy`` headers, no key names)."""
        return sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in self.entries)


def to_array_record(sd: Mapping[str, TensorLike]) -> ArrayRecord:
    """Pack adapter tensors into an ArrayRecord (CPU, C-contiguous, dtype kept).

    bf16 tensors are sent as float32 because NumPy cannot hold bf16.
    """
    record = ArrayRecord()
    for key, value in sd.items():
        record[key] = Array(_to_numpy(key, value))
    return record


def record_digest(record: ArrayRecord) -> str:
    """SHA-256 (hex) of an ArrayRecord's keys and serialized arrays, in key order.

    The coordinator names the global adapter of a round by this digest; a site echoes
    it in its reply, so a reply to another round's model is recognised as stale.
    """
    digest = hashlib.sha256()
    for key in sorted(record.keys()):
        data = record[key].data
        digest.update(len(key).to_bytes(4, "big") + key.encode() + len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def record_nbytes(record: ArrayRecord) -> int:
    """Serialized payload bytes of ``record`` (headers included), read without parsing it."""
    return sum(len(array.data) for array in record.values())


# Bytes that hold the header length after the 8-byte magic, per .npy version.
_HEADER_LEN_BYTES = {(1, 0): 2, (2, 0): 4}


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an ``.npy`` magic + header.

    NumPy's parser runs ``ast.literal_eval`` (about 20 us), more than viewing a
    64 KB LoRA tensor costs. Every site sends byte-identical headers for the same
    key, so a round parses each distinct header once. Bounded, so hostile
    headers cannot grow it.
    """
    buffer = io.BytesIO(prefix)
    version = npy_format.read_magic(buffer)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(buffer)
    return npy_format.read_array_header_2_0(buffer)


def _view_npy(key: str, data: bytes) -> np.ndarray | None:
    """Read-only zero-copy view of an ``.npy`` payload, or None for header versions
    this fast path does not parse (the caller then falls back to ``np.load``).
    """
    is_npy = len(data) >= 8 and data[:6] == npy_format.MAGIC_PREFIX
    size = _HEADER_LEN_BYTES.get((data[6], data[7])) if is_npy else None
    if is_npy and size is None:
        return None  # version 3.0 (utf-8 field names): leave it to np.load
    try:
        if size is None or len(data) < 8 + size:
            raise ValueError("not an .npy payload")
        offset = 8 + size + int.from_bytes(data[8 : 8 + size], "little")
        if offset > len(data):
            raise ValueError("header runs past the payload")
        shape, fortran_order, dtype = _parse_npy_header(data[:offset])
    except (TypeError, ValueError) as err:  # malformed or oversized header
        raise AdapterMismatchError(f"adapter tensor '{key}': unreadable .npy header: {err}") from err
    if fortran_order or dtype.hasobject:
        raise AdapterMismatchError(f"adapter tensor '{key}': fortran-ordered or object arrays are refused")
    count = math.prod(shape)
    if len(data) != offset + count * dtype.itemsize:
        raise AdapterMismatchError(
            f"adapter tensor '{key}': payload is {len(data) - offset} bytes, header says {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into NumPy arrays without copying the payload.

    Returns
    -------
    dict[str, np.ndarray]
        Read-only views into the record's bytes for ``numpy.ndarray`` arrays (the
        record must outlive them); ``Array.numpy()`` results for anything else.

    Raises
    ------
    AdapterMismatchError
        A header is malformed, Fortran-ordered, of object dtype, or disagrees
        with the payload length.
    """
    arrays: dict[str, np.ndarray] = {}
    for key, array in record.items():
        view = _view_npy(key, array.data) if array.stype == NUMPY_STYPE else None
        if view is None:
            try:
                view = array.numpy()  # np.load(allow_pickle=False) inside
            except (TypeError, ValueError) as err:
                raise AdapterMismatchError(f"adapter tensor '{key}': {err}") from err
        arrays[key] = view
    return arrays


def check_adapter(arrays: Mapping[str, np.ndarray], spec: AdapterSpec, *, max_abs: float | None = None) -> None:
    """Check that ``arrays`` is exactly the adapter ``spec`` describes.

    ``max_abs`` bounds the magnitude of every value (None: no bound): finite but absurd
    values, from a scaled or broken update, would otherwise pass and turn the global
    model's loss into NaN.

    Raises
    ------
    AdapterMismatchError
        Keys differ (the missing and unexpected keys are named), or a tensor has
        another shape or dtype, holds NaN/Inf, or exceeds ``max_abs`` (the key is named).
    """
    expected = set(spec.keys)
    missing, unexpected = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or unexpected:
        raise AdapterMismatchError(f"adapter keys differ: missing {missing}, unexpected {unexpected}")
    for key, shape, dtype in spec.entries:
        array = arrays[key]
        if tuple(array.shape) != shape:
            raise AdapterMismatchError(f"adapter tensor '{key}': shape {tuple(array.shape)}, expected {shape}")
        if array.dtype != np.dtype(dtype):
            raise AdapterMismatchError(f"adapter tensor '{key}': dtype {array.dtype}, expected {dtype}")
        if array.dtype.kind == "f" and array.size:
            _check_values(key, array, max_abs)


def _check_values(key: str, array: np.ndarray, max_abs: float | None) -> None:
    # min and max answer both questions in two passes with no temporary (half the time of
    # a finiteness pass plus np.abs(a).max()): NaN propagates through both, and an Inf
    # is one of them.
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise AdapterMismatchError(f"adapter tensor '{key}': {bad} NaN/Inf values")
    if max_abs is not None and max(-low, high) > max_abs:
        raise AdapterMismatchError(f"{key}: values exceed the bound of {max_abs:g} in magnitude")


def to_torch_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Writable torch copies of ``arrays``, e.g. for ``peft.set_peft_model_state_dict``.

    The inputs may be read-only views into a message; the copies do not share memory
    with it, so the model owns its weights.
    """
    return {key: torch.from_numpy(np.array(value, copy=True)) for key, value in arrays.items()}


def from_torch_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float32 CPU numpy copies of adapter tensors (bf16 widened exactly): the inverse of
    :func:`to_torch_state_dict`, for a peft state dict or a loaded safetensors file."""
    return {key: value.detach().to("cpu", torch.float32).numpy().copy() for key, value in tensors.items()}
