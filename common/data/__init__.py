"""Hospital data: readers per on-disk format, synthetic hospitals, splits, tensors, verification.

Everything a hospital holds stays on its machine; only the code in here touches file paths.
"""

from common.data.readers import (
    FORMATS,
    ROOT_KEYS,
    empty_split_detail,
    federated_hospitals,
    hospital_names,
    load_hospital,
    split_problems,
    verify_data,
)
from common.data.splits import SplitSpec, check_split, fold_indices, split_indices
from common.data.synthetic import generate_hospital
from common.data.tensors import SplitTensors, hospital_split, split_digest, split_tensors
from common.data.types import (
    BACKGROUND,
    CYTOPLASM,
    NUCLEUS,
    DataProblem,
    DataVerificationError,
    HospitalData,
    id_bytes,
)

__all__ = [
    "BACKGROUND",
    "CYTOPLASM",
    "FORMATS",
    "NUCLEUS",
    "ROOT_KEYS",
    "DataProblem",
    "DataVerificationError",
    "HospitalData",
    "SplitSpec",
    "SplitTensors",
    "check_split",
    "empty_split_detail",
    "generate_hospital",
    "federated_hospitals",
    "fold_indices",
    "hospital_names",
    "hospital_split",
    "id_bytes",
    "load_hospital",
    "split_digest",
    "split_indices",
    "split_problems",
    "split_tensors",
    "verify_data",
]
