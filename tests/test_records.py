"""Adapter tensors <-> ArrayRecord: round trips, the zero-copy reader, check_adapter."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format

from fedretrain.arrays import (
    AdapterSpec,
    check_adapter,
    from_array_record,
    to_array_record,
    to_torch_state_dict,
)
from fedretrain.errors import AdapterMismatchError


def _npy_array(write) -> Array:
    """An Array whose bytes come from ``write(buffer)``."""
    buffer = io.BytesIO()
    write(buffer)
    return Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buffer.getvalue())


def test_round_trip_keeps_float32_and_widens_bf16():
    # Prepare: bf16 values that bf16 holds exactly, so float32 must equal them
    sd = {
        "a.lora_A": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a.lora_B": torch.tensor([[1.5], [-2.0]], dtype=torch.bfloat16),
        "half": torch.tensor([0.25], dtype=torch.float16),
    }

    # Execute
    out = from_array_record(to_array_record(sd))

    # Assert
    assert out["a.lora_A"].dtype == np.float32
    np.testing.assert_array_equal(out["a.lora_A"], [[0, 1, 2], [3, 4, 5]])
    assert out["a.lora_B"].dtype == np.float32
    np.testing.assert_array_equal(out["a.lora_B"], [[1.5], [-2.0]])
    assert out["half"].dtype == np.float16


def test_to_array_record_makes_non_contiguous_input_c_ordered():
    # Prepare: a transposed view (Fortran-contiguous) would be saved fortran_order=True
    sd = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).T}

    # Execute
    out = from_array_record(to_array_record(sd))

    # Assert
    np.testing.assert_array_equal(out["w"], [[0, 3], [1, 4], [2, 5]])


def test_spec_from_state_dict_uses_wire_dtypes_and_sorted_keys():
    # Prepare
    sd = {"b": torch.zeros(2, 1, dtype=torch.bfloat16), "a": np.zeros((1, 2), np.float16)}

    # Execute
    spec = AdapterSpec.from_state_dict(sd)

    # Assert: bf16 travels as float32; 2 float16 + 2 float32 = 4 + 8 bytes
    assert spec.entries == (("a", (1, 2), "float16"), ("b", (2, 1), "float32"))
    assert spec.keys == ("a", "b")
    assert spec.nbytes == 12


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([1.0, -2.5], dtype=np.float64),
        np.array([[7, 8]], dtype=np.int64),
        np.array(3.0, dtype=np.float32),  # 0-d
        np.zeros((0, 4), dtype=np.float32),  # empty
    ],
)
def test_fast_path_equals_array_numpy_and_is_a_read_only_view(value):
    # Prepare
    record = ArrayRecord({"t": Array(value)})

    # Execute
    fast = from_array_record(record)["t"]

    # Assert
    slow = record["t"].numpy()
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)
    assert not fast.flags.writeable


def test_fast_path_reads_version_2_headers():
    # Prepare
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = _npy_array(lambda buf: npy_format.write_array(buf, value, version=(2, 0)))

    # Execute
    out = from_array_record(ArrayRecord({"t": array}))["t"]

    # Assert
    np.testing.assert_array_equal(out, value)


def test_version_3_headers_fall_back_to_array_numpy():
    # Prepare
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = _npy_array(lambda buf: npy_format.write_array(buf, value, version=(3, 0)))

    # Execute
    out = from_array_record(ArrayRecord({"t": array}))["t"]

    # Assert
    np.testing.assert_array_equal(out, value)


def test_fortran_ordered_payload_is_refused():
    # Prepare
    value = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    array = _npy_array(lambda buf: npy_format.write_array(buf, value))

    # Execute / Assert
    with pytest.raises(AdapterMismatchError, match="'t'.*fortran"):
        from_array_record(ArrayRecord({"t": array}))


def test_object_dtype_payload_is_refused_without_unpickling():
    # Prepare: a header declaring an object array, followed by 8 arbitrary bytes
    header = {"descr": "|O", "fortran_order": False, "shape": (1,)}
    array = _npy_array(lambda buf: (npy_format.write_array_header_1_0(buf, header), buf.write(b"\x80" * 8)))

    # Execute / Assert
    with pytest.raises(AdapterMismatchError, match="'t'.*object"):
        from_array_record(ArrayRecord({"t": array}))


@pytest.mark.parametrize("cut", [-4, 4])
def test_truncated_or_padded_payload_is_refused(cut):
    # Prepare: drop or append 4 bytes
    data = Array(np.zeros(4, np.float32)).data
    data = data[:cut] if cut < 0 else data + b"\x00" * cut
    array = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data)

    # Execute / Assert
    with pytest.raises(AdapterMismatchError, match="'t'.*bytes"):
        from_array_record(ArrayRecord({"t": array}))


@pytest.mark.parametrize("data", [b"not npy", b"\x93NUMPY", b"\x93NUMPY\x01\x00\xff\xff"])
def test_garbage_payload_is_refused(data):
    # Prepare: no magic; the magic alone; a header length past the end
    array = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data)

    # Execute / Assert
    with pytest.raises(AdapterMismatchError, match="'t': unreadable .npy header"):
        from_array_record(ArrayRecord({"t": array}))


SPEC = AdapterSpec(entries=(("a", (1, 2), "float32"), ("b", (2, 1), "float32")))


def _good() -> dict[str, np.ndarray]:
    return {"a": np.array([[1.0, 2.0]], np.float32), "b": np.array([[3.0], [4.0]], np.float32)}


def test_check_adapter_accepts_the_exact_adapter():
    check_adapter(_good(), SPEC)  # no exception


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("b"), r"missing \['b'\], unexpected \[\]"),
        (lambda d: d.update(c=np.zeros(1, np.float32)), r"missing \[\], unexpected \['c'\]"),
        (lambda d: d.update(b=np.zeros((3, 1), np.float32)), r"'b': shape \(3, 1\), expected"),
        (lambda d: d.update(a=np.zeros((1, 2), np.float64)), "'a': dtype float64, expected"),
        (lambda d: d["b"].__setitem__((1, 0), np.nan), "'b': 1 NaN/Inf"),
        (lambda d: d["a"].__setitem__((0, 0), -np.inf), "'a': 1 NaN/Inf"),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan", "inf"],
)
def test_check_adapter_names_the_offending_key(change, message):
    # Prepare
    arrays = _good()
    change(arrays)

    # Execute / Assert
    with pytest.raises(AdapterMismatchError, match=message):
        check_adapter(arrays, SPEC)


def test_check_adapter_accepts_huge_finite_values():
    # Prepare: the float32 sum overflows to inf although every value is finite
    arrays = _good()
    arrays["a"][:] = 3e38

    # Execute / Assert: the exact fallback check lets it through
    check_adapter(arrays, SPEC)


def test_to_torch_state_dict_copies_into_writable_tensors():
    # Prepare: read-only views, as from_array_record returns them
    arrays = from_array_record(to_array_record(_good()))

    # Execute
    sd = to_torch_state_dict(arrays)
    sd["a"][0, 0] = 9.0

    # Assert: the message bytes are untouched
    assert sd["a"].dtype == torch.float32
    assert arrays["a"][0, 0] == 1.0
    torch.testing.assert_close(sd["b"], torch.tensor([[3.0], [4.0]]))
