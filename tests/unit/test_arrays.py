import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from common.arrays import (
    array_specs,
    average_state_dicts,
    cast_floating,
    check_update,
    pack,
    tensor_specs,
    to_array_record,
    to_state_dict,
    unpack,
    unpack_reply,
    weighted_average,
)


def _reply(arrays: dict[str, np.ndarray], weight) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": weight, "train-loss": 1.0}),
        }
    )


@pytest.fixture
def reference() -> dict:
    sd = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "steps": torch.zeros((), dtype=torch.int64)}
    return array_specs(to_array_record(sd))


def _torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _good() -> dict[str, np.ndarray]:
    return {
        "w": np.ones((2, 3), np.float32),
        "b": np.ones(3, np.float32),
        "steps": np.array(4, np.int64),
    }


def test_round_trip_is_bit_exact():
    sd = {"a": torch.randn(4, 5), "n": torch.arange(3)}
    back = to_state_dict(to_array_record(sd))
    assert list(back) == ["a", "n"]
    assert torch.equal(back["a"], sd["a"]) and back["n"].dtype == torch.int64


def test_packed_model_is_one_array_per_kind_and_unpacks_bit_exact(reference):
    sd = {"w": torch.randn(2, 3), "steps": torch.tensor(4), "b": torch.randn(3)}
    packed = pack(to_array_record(sd))
    assert {k: a.shape for k, a in packed.items()} == {"floating": (9,), "integer": (1,)}
    assert tensor_specs(sd) == reference
    back = to_state_dict(unpack(packed, tensor_specs(sd)))
    assert list(back) == ["w", "steps", "b"]
    for key, tensor in sd.items():
        assert torch.equal(back[key], tensor) and back[key].shape == tensor.shape, key


def test_unpacking_keeps_the_senders_float16_for_the_server_to_upcast(reference):
    half = pack(cast_floating(to_array_record(_torch(_good())), "float16"))
    arrays = unpack(half, reference)
    assert arrays["w"].dtype == "float16" and arrays["steps"].dtype == "int64"


@pytest.mark.parametrize(
    ("packed", "reason"),
    [
        ({"floating": np.ones(8, np.float32), "integer": np.ones(1, np.int64)}, "has shape (8,)"),
        ({"floating": np.ones((3, 3), np.float32), "integer": np.ones(1)}, "has shape (3, 3)"),
        ({"floating": np.ones(9, np.float32)}, "packed arrays ['floating'], the global model"),
    ],
)
def test_a_packed_reply_that_does_not_fit_the_model_is_refused_by_name(reference, packed, reason):
    content = _reply(_good(), 10)
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in packed.items()})
    assert reason in unpack_reply(content, reference)


def _claiming(count: int, dtype: str = "<f4") -> bytes:
    """An npy header declaring ``count`` values of ``dtype``, followed by 64 bytes of them."""
    stream = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": (count,)}
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue() + bytes(64)


@pytest.mark.parametrize(
    ("stype", "data", "reason"),
    [
        ("torch.tensor", np.ones(9, np.float32).tobytes(), "serialised as 'torch.tensor'"),
        ("numpy.ndarray", _claiming(10**12), "declares 4000000000000 bytes of values, carries 64"),
        ("numpy.ndarray", b"\x93NUMPY" + b"x" * 10, "not a readable npy array"),
        ("numpy.ndarray", _claiming(9)[:-40], "declares 36 bytes of values, carries 24"),
        ("numpy.ndarray", _claiming(9, "<U100000000"), "holds <U100000000"),
    ],
)
def test_a_packed_array_that_cannot_be_decoded_is_refused_before_it_is(
    reference, stype, data, reason
):
    content = _reply(_good(), 10)
    bad = Array(dtype="float32", shape=(9,), stype=stype, data=data)
    content["arrays"] = ArrayRecord({"floating": bad, "integer": Array(np.ones(1, np.int64))})
    assert reason in unpack_reply(content, reference)


def test_sound_reply_passes(reference):
    assert check_update(_reply(_good(), 10), reference) is None


@pytest.mark.parametrize(
    ("mutate", "weight", "needle"),
    [
        (lambda a: a.update(w=np.full((2, 3), np.nan, np.float32)), 10, "NaN or Inf"),
        (lambda a: a.update(b=np.array([np.inf, 0, 0], np.float32)), 10, "NaN or Inf"),
        (lambda a: a.update(b=np.ones(1, np.float32)), 10, "shape (1,)"),
        (lambda a: a.update(w=np.ones((3, 2), np.float32)), 10, "shape (3, 2)"),
        (lambda a: a.update(w=np.ones((2, 3), np.float64)), 10, "dtype float64"),
        (lambda a: a.pop("b"), 10, "missing ['b']"),
        (lambda a: a.update(extra=np.ones(1, np.float32)), 10, "extra ['extra']"),
        (lambda a: None, 0, "at least 1"),
        (lambda a: None, -3, "at least 1"),
        (lambda a: None, 5e-324, "at least 1"),
        (lambda a: None, float("nan"), "at least 1"),
        (lambda a: None, [1, 2], "not a number"),
    ],
)
def test_bad_reply_is_named(reference, mutate, weight, needle):
    arrays = _good()
    mutate(arrays)
    reason = check_update(_reply(arrays, weight), reference)
    assert reason is not None and needle in reason


def test_missing_weight_and_extra_records(reference):
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in _good().items()}),
            "metrics": MetricRecord({"train-loss": 1.0}),
        }
    )
    assert "num-examples" in check_update(content, reference)
    content["more"] = ArrayRecord({k: Array(v) for k, v in _good().items()})
    assert "one ArrayRecord" in check_update(content, reference)


def test_weighted_average_matches_hand_computation(reference):
    a, b = _good(), _good()
    b["w"] = np.full((2, 3), 4.0, np.float32)
    b["steps"] = np.array(8, np.int64)
    avg = to_state_dict(weighted_average([_reply(a, 1), _reply(b, 3)], reference))
    assert torch.allclose(avg["w"], torch.full((2, 3), (1 * 1 + 3 * 4) / 4))
    assert avg["w"].dtype == torch.float32
    assert avg["steps"].dtype == torch.int64 and int(avg["steps"]) == 7


def test_weights_near_the_float_maximum_average_as_their_shares(reference):
    a, b = _good(), _good()
    b["w"] = np.full((2, 3), 4.0, np.float32)
    huge = np.finfo(np.float64).max / 1.5  # two of them sum to inf
    avg = to_state_dict(weighted_average([_reply(a, huge), _reply(b, huge)], reference))
    assert torch.allclose(avg["w"], torch.full((2, 3), (1 + 4) / 2))


def test_a_weight_soup_is_the_uniform_average_in_the_models_dtypes():
    first = {"w": torch.zeros(2, 3), "steps": torch.tensor(3)}
    second = {"w": torch.ones(2, 3), "steps": torch.tensor(4)}
    third = {"w": torch.full((2, 3), 5.0), "steps": torch.tensor(4)}
    soup = average_state_dicts([first, second, third])
    assert torch.equal(soup["w"], torch.full((2, 3), 2.0)) and soup["w"].dtype == torch.float32
    assert soup["steps"].dtype == torch.int64 and int(soup["steps"]) == 4  # 11/3 rounded
