"""SHA-256 of every array of an ArrayRecord, to compare large records without copying them."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ArrayRecord


def array_digests(record: ArrayRecord) -> dict[str, str]:
    """``{key: "<dtype> <shape> <sha256 of the raw bytes>"}`` for each array in ``record``."""
    digests = {}
    for key, array in record.items():
        values = np.ascontiguousarray(array.numpy())
        digest = hashlib.sha256(values.data).hexdigest()
        digests[key] = f"{values.dtype} {tuple(values.shape)} {digest}"
    return digests
