"""What crosses the network: state dict <-> Flower ArrayRecord, update checks, weighted averaging.

The averaging also makes a site's weight soup of its fine-tuned copies (post-training).

On the wire a model is packed into one flat array per kind of value (:func:`pack`): Flower
stores and transfers every Array as separate objects, each costing the SuperLink an HTTPS round
trip and several database commits, and with one Array per tensor (58 for the tiny preset, 154 for
DeiT-S) moving them took most of a deployed round. Both ends build the same model, so the
receiver unpacks by its own layout and checks what does not fit (:func:`unpack`).

Flower's own aggregation only checks that replies share keys: a (1,) tensor broadcasts silently
into a (C, D) average, NaNs spread, and a zero total weight divides by zero (style.md section 2).
Every reply is therefore checked here against the global model before it is averaged.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

WEIGHT_KEY = "num-examples"
# A training reply's fingerprint of the hospital's split (common.data.split_digest).
SPLIT_KEY = "split-digest"


class HasNumpy(Protocol):
    """A Flower Array or a CPU tensor: both read out as a numpy array."""

    def numpy(self) -> np.ndarray:
        """The values, on the CPU."""


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype every reply must reproduce exactly for one tensor of the global model."""

    shape: tuple[int, ...]
    dtype: str


def to_array_record(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack a torch state dict for sending (tensors are detached and moved to CPU)."""
    return ArrayRecord(
        {k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state_dict.items()}
    )


def tensor_specs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, ArraySpec]:
    """A state dict's layout, the reference by which a packed record is unpacked."""
    return {
        k: ArraySpec(tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in state_dict.items()
    }


def _kind(dtype: np.dtype | str) -> str:
    return "floating" if np.issubdtype(np.dtype(dtype), np.floating) else "integer"


def pack(record: ArrayRecord) -> ArrayRecord:
    """One flat array per kind of value, ``floating`` and ``integer``, in the record's key order.

    Floating arrays keep the sender's dtype (float16 for transport stays float16), so packing
    changes the bytes sent only by the per-array headers it saves.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for array in record.values():
        values = array.numpy()
        parts.setdefault(_kind(values.dtype), []).append(values.reshape(-1))
    return ArrayRecord({kind: Array(np.concatenate(flat)) for kind, flat in parts.items()})


def _stored_shape(array: Array, kind: str) -> tuple[int, ...]:
    """The shape an Array's bytes declare, read from the npy header before they are decoded.

    The size cap counts the bytes sent, not the values they claim: a 200-byte header may
    declare 10^12 floats, or the model's shape in 100-megabyte strings, which ``np.load``
    tries to allocate before it finds the data short. The header's dtype must be of the
    kind and its values must fill exactly the bytes sent.
    """
    if array.stype != SType.NUMPY:
        raise ValueError(f"packed '{kind}' array is serialised as {array.stype!r}, not numpy")
    stream = io.BytesIO(array.data)
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        version = np.lib.format.read_magic(stream)
        if version not in readers:
            raise ValueError(f"npy format version {version}")
        shape, _, dtype = readers[version](stream)
    except ValueError as error:
        raise ValueError(f"packed '{kind}' array is not a readable npy array: {error}") from None
    allowed = (np.floating,) if kind == "floating" else (np.integer, np.bool_)
    if not any(np.issubdtype(dtype, general) for general in allowed):
        raise ValueError(f"packed '{kind}' array holds {dtype}")
    declared = math.prod(shape) * dtype.itemsize
    if (sent := len(array.data) - stream.tell()) != declared:
        raise ValueError(
            f"packed '{kind}' array declares {declared} bytes of values, carries {sent}"
        )
    return tuple(shape)


def unpack(packed: ArrayRecord, layout: Mapping[str, ArraySpec]) -> ArrayRecord:
    """The per-tensor record of a :func:`pack`-ed one, cut by the receiver's own ``layout``.

    Raises ValueError naming the kind whose number of values differs from the layout's, the
    packed form of an update with a wrong shape. Integer values take the layout's dtype.
    """
    sizes: dict[str, int] = {}
    for spec in layout.values():
        kind = _kind(spec.dtype)
        sizes[kind] = sizes.get(kind, 0) + math.prod(spec.shape)
    if sorted(packed) != sorted(sizes):
        raise ValueError(f"packed arrays {sorted(packed)}, the global model has {sorted(sizes)}")
    for kind, size in sizes.items():
        shape = _stored_shape(packed[kind], kind)
        if shape != (size,):
            raise ValueError(
                f"packed '{kind}' array has shape {shape}, the global model has ({size},)"
            )
    flat = {kind: packed[kind].numpy() for kind in sizes}
    start = dict.fromkeys(sizes, 0)
    arrays = {}
    for key, spec in layout.items():
        kind = _kind(spec.dtype)
        count = math.prod(spec.shape)
        values = flat[kind][start[kind] : start[kind] + count].reshape(spec.shape)
        if kind == "integer":
            values = values.astype(spec.dtype)
        arrays[key] = Array(np.array(values))
        start[kind] += count
    return ArrayRecord(arrays)


def _not_one_array_record(content: RecordDict) -> str | None:
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    return None


def unpack_reply(content: RecordDict, reference: Mapping[str, ArraySpec]) -> str | None:
    """Unpack a reply's one ArrayRecord in place; return why it cannot be, or None."""
    if reason := _not_one_array_record(content):
        return reason
    name, packed = next(iter(content.array_records.items()))
    try:
        content[name] = unpack(packed, reference)
    except ValueError as error:
        return str(error)
    return None


def cast_floating(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """The record with every floating array cast to ``dtype`` (e.g. ``float16`` for transport).

    Integer arrays (counters such as BatchNorm's) keep their dtype: halving them saves little
    and could overflow.
    """
    target = np.dtype(dtype)
    return ArrayRecord(
        {
            k: Array(a.numpy().astype(target, copy=False))
            if np.issubdtype(a.dtype, np.floating)
            else a
            for k, a in record.items()
        }
    )


def upcast_reply(content: RecordDict, reference: Mapping[str, ArraySpec]) -> None:
    """Cast a reply's half-precision arrays back to the global model's dtypes, in place.

    Run before :func:`check_update`, so that the checks and the averaging see full precision;
    only float16 arrays whose reference is floating are touched, anything else is left for
    the checks to judge.
    """
    for name, arrays in list(content.array_records.items()):
        restored = {}
        for key, array in arrays.items():
            spec = reference.get(key)
            wanted = np.dtype(spec.dtype) if spec else None
            if (
                wanted is not None
                and np.dtype(array.dtype) == np.float16
                and np.issubdtype(wanted, np.floating)
            ):
                array = Array(array.numpy().astype(wanted))
            restored[key] = array
        content[name] = ArrayRecord(restored)


def array_bytes(arrays: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's arrays as serialised on the wire."""
    return sum(len(a.data) for a in arrays.values())


def record_bytes(content: RecordDict) -> int:
    """Bytes of every array a message carries, as serialised on the wire (metrics excluded)."""
    return sum(array_bytes(arrays) for arrays in content.array_records.values())


def to_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ArrayRecord into torch tensors, preserving key order."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def array_specs(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The reference against which replies are checked."""
    return {k: ArraySpec(tuple(a.shape), str(a.dtype)) for k, a in record.items()}


def _check_weight(metrics: MetricRecord) -> str | None:
    if WEIGHT_KEY not in metrics:
        return f"metrics lack '{WEIGHT_KEY}'"
    weight = metrics[WEIGHT_KEY]
    if not isinstance(weight, int | float):
        return f"'{WEIGHT_KEY}' is not a number: {weight!r}"
    # A count: a positive weight below 1 (5e-324) underflows to 0 as a share of the largest.
    if not math.isfinite(weight) or weight < 1:
        return f"'{WEIGHT_KEY}' must be a finite count of at least 1, got {weight!r}"
    return None


def _check_arrays(arrays: ArrayRecord, reference: Mapping[str, ArraySpec]) -> str | None:
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"keys differ from the global model (missing {missing[:3]}, extra {extra[:3]})"
    for key, spec in reference.items():
        array = arrays[key]
        if tuple(array.shape) != spec.shape:
            return f"'{key}' has shape {tuple(array.shape)}, expected {spec.shape}"
        if str(array.dtype) != spec.dtype:
            return f"'{key}' has dtype {array.dtype}, expected {spec.dtype}"
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"'{key}' holds NaN or Inf"
    return None


def check_metrics_reply(content: RecordDict) -> str | None:
    """Return why an evaluate reply must not be used, or None when it is sound."""
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    return _check_weight(next(iter(content.metric_records.values())))


def check_update(content: RecordDict, reference: Mapping[str, ArraySpec]) -> str | None:
    """Return why a train reply must not be averaged, or None when it is sound."""
    if reason := _not_one_array_record(content):
        return reason
    arrays = next(iter(content.array_records.values()))
    return check_metrics_reply(content) or _check_arrays(arrays, reference)


def average_arrays(
    models: Sequence[Mapping[str, HasNumpy]],
    weights: Sequence[float],
    reference: Mapping[str, ArraySpec],
) -> dict[str, np.ndarray]:
    """Average ``models`` key by key, weighted by ``weights``, accumulating in float64.

    The result keeps the reference's dtypes (Flower's in-place ``+=`` would promote or truncate
    them) and rounds integer tensors. Each array is read out only when its key is averaged, so
    no more than one tensor per model is held as float64 at a time. The weights are shares of
    the largest before they are summed: two finite weights near the float maximum (a hostile
    num-examples) would otherwise sum to inf and average every model to zero.
    """
    largest = max(weights)
    shares = [weight / largest for weight in weights]
    total = sum(shares)
    averaged: dict[str, np.ndarray] = {}
    for key, spec in reference.items():
        acc = np.zeros(spec.shape, dtype=np.float64)
        for model, share in zip(models, shares, strict=True):
            acc += model[key].numpy().astype(np.float64) * (share / total)
        dtype = np.dtype(spec.dtype)
        if not np.issubdtype(dtype, np.floating):
            acc = np.rint(acc)
        averaged[key] = np.asarray(acc, dtype=dtype)
    return averaged


def weighted_average(
    contents: Sequence[RecordDict], reference: Mapping[str, ArraySpec]
) -> ArrayRecord:
    """Average checked replies weighted by num-examples (:func:`average_arrays`).

    The result keeps the global model's dtypes, so the next round's check compares like with
    like.
    """
    weights = [float(next(iter(c.metric_records.values()))[WEIGHT_KEY]) for c in contents]
    models = [next(iter(c.array_records.values())) for c in contents]
    averaged = average_arrays(models, weights, reference)
    return ArrayRecord({key: Array(value) for key, value in averaged.items()})


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The uniform average of models of one architecture (a weight soup), on the CPU."""
    cpu = [{key: value.detach().cpu() for key, value in s.items()} for s in state_dicts]
    averaged = average_arrays(cpu, [1.0] * len(cpu), tensor_specs(cpu[0]))
    return {key: torch.from_numpy(value) for key, value in averaged.items()}
