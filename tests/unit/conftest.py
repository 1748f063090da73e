"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity(monkeypatch):
    """Messages take their run id from the running task; outside a run, give them one."""
    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


# Damaged and foreign model files: name -> words the one-line error must contain. The same
# cases serve the library (test_checkpoint.py) and the commands (test_cli.py).
CHECKPOINT_FAULTS = {
    "missing": "file not found",
    "empty": "empty (0 bytes)",
    "truncated": "truncated",
    "bare_tensor": "bare tensor",
    "pickled_object": "pickled Python objects",
    "not_torch": "not a PyTorch file",
    "bare_state_dict": "bare state dict",
    "mismatched_weights": "do not fit",
    "other_preset": "do not fit a mct_deit_small_patch16_224",
    "unknown_preset": "cannot be built",
    "segmenter_file": "segmenter file",
    "config_not_yaml": "its training config cannot be read",
    "config_a_list": "its training config cannot be read: it holds a ListConfig",
    "config_seed_from_env": "its training config cannot be read: seed must be a whole number",
    "huge_image": "img_size=4800 and 5 classes make 360005 tokens, the weights hold 21",
    "nan_weights": "1 not finite (NaN or infinite values), e.g. head.weight",
}
SEGMENTER_FAULTS = {
    "missing": "file not found",
    "empty": "empty (0 bytes)",
    "truncated": "truncated",
    "bare_tensor": "bare tensor",
    "pickled_object": "pickled Python objects",
    "not_torch": "not a PyTorch file",
    "bare_state_dict": "bare state dict",
    "mismatched_weights": "do not fit",
    "unknown_arch": "unknown architecture",
    "mct_file": "MCT model file",
    "input_size_zero": "segmenter.input_size=0: expected a whole number in 16..4096",
    "members_not_in_weights": "its settings name 100000 ensemble members, its weights hold 1",
    "nan_weights": "not finite (NaN or infinite values)",
}
TINY_SEGMENTER = {"arch": "lraspp_mobilenet_v3_large", "input_size": 32}


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``{"checkpoint": {fault: path}, "segmenter": {fault: path}, "good": {...}}``."""
    import torch
    from omegaconf import OmegaConf

    from common.checkpoint import model_payload, save_atomic, save_model
    from common.config import compose_config
    from common.model import create_mct_model
    from common.segmenter import create_segmenter, segmenter_payload

    folder = tmp_path_factory.mktemp("model_files")
    cfg = compose_config(["model.img_size=32"])
    classes = list(cfg.data.classes)
    torch.manual_seed(0)
    mct = create_mct_model(cfg.model, len(classes))
    good_mct = save_model(mct.state_dict(), cfg, 1, folder / "final_model.pt")
    segmenter = create_segmenter(TINY_SEGMENTER, len(classes) + 1)
    good_segmenter = save_atomic(
        segmenter_payload(segmenter, TINY_SEGMENTER, classes), folder / "segmenter.pt"
    )

    def write(name: str, payload: object) -> Path:
        path = folder / f"{name}.pt"
        torch.save(payload, path)
        return path

    def common_faults(prefix: str, good: Path, state: dict) -> dict[str, Path]:
        truncated = folder / f"{prefix}_truncated.pt"
        truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        empty = folder / f"{prefix}_empty.pt"
        empty.write_bytes(b"")
        web_page = folder / f"{prefix}_not_torch.pt"  # a download that got a login page
        web_page.write_text("<!DOCTYPE html><html><body>Sign in</body></html>\n" * 40)
        return {
            "missing": folder / f"{prefix}_missing.pt",
            "empty": empty,
            "truncated": truncated,
            "bare_tensor": write(f"{prefix}_bare_tensor", torch.ones(3)),
            "pickled_object": write(f"{prefix}_pickled_object", torch.nn.Linear(2, 2)),
            "not_torch": web_page,
            "bare_state_dict": write(f"{prefix}_bare_state_dict", state),
        }

    other_classes = create_mct_model(cfg.model, len(classes) + 2).state_dict()
    deit = model_payload(mct.state_dict(), cfg, 1)
    deit["model"] = {**deit["model"], "name": "mct_deit_small_patch16_224"}
    unknown = model_payload(mct.state_dict(), cfg, 1)
    unknown["model"] = {**unknown["model"], "name": "resnet18"}

    def payload_with(**changes: object) -> dict:
        """The good model file's payload with some of its entries replaced."""
        payload = model_payload(mct.state_dict(), cfg, 1)
        return {**payload, **changes}

    seed_from_env = compose_config(["model.img_size=32", "data.split.seed=${oc.env:HOME}"])
    huge = payload_with()
    huge["model"] = {**huge["model"], "img_size": 4800}  # position embeddings of 360000 tokens
    checkpoint = {
        **common_faults("mct", good_mct, mct.state_dict()),
        "mismatched_weights": save_model(other_classes, cfg, 1, folder / "mct_mismatch.pt"),
        "other_preset": write("mct_other_preset", deit),
        "unknown_preset": write("mct_unknown_preset", unknown),
        "segmenter_file": good_segmenter,
        "config_not_yaml": write("mct_config_not_yaml", payload_with(config="data: [\n")),
        "config_a_list": write("mct_config_a_list", payload_with(config="- a\n- b\n")),
        "config_seed_from_env": write(
            "mct_config_seed_from_env", payload_with(config=OmegaConf.to_yaml(seed_from_env))
        ),
        "huge_image": write("mct_huge_image", huge),
        "nan_weights": save_model(
            {**mct.state_dict(), "head.weight": torch.full_like(mct.head.weight, torch.nan)},
            cfg,
            1,
            folder / "mct_nan_weights.pt",
        ),
    }
    wider = create_segmenter(TINY_SEGMENTER, len(classes) + 3)
    unknown_arch = segmenter_payload(segmenter, {**TINY_SEGMENTER, "arch": "unet"}, classes)
    segmenter_files = {
        **common_faults("seg", good_segmenter, segmenter.state_dict()),
        "mismatched_weights": write(
            "seg_mismatch", segmenter_payload(wider, TINY_SEGMENTER, classes)
        ),
        "unknown_arch": write("seg_unknown_arch", unknown_arch),
        "mct_file": good_mct,
        "input_size_zero": write(
            "seg_input_size_zero",
            segmenter_payload(segmenter, {**TINY_SEGMENTER, "input_size": 0}, classes),
        ),
        "members_not_in_weights": write(
            "seg_members",
            {
                **segmenter_payload(segmenter, TINY_SEGMENTER, classes),
                "segmenter": {**TINY_SEGMENTER, "members": 100000},
            },
        ),
        "nan_weights": write(
            "seg_nan_weights",
            {
                **segmenter_payload(segmenter, TINY_SEGMENTER, classes),
                "state_dict": {
                    key: torch.full_like(value, torch.inf) if value.is_floating_point() else value
                    for key, value in segmenter.state_dict().items()
                },
            },
        ),
    }
    assert checkpoint.keys() == CHECKPOINT_FAULTS.keys()
    assert segmenter_files.keys() == SEGMENTER_FAULTS.keys()
    return {
        "checkpoint": checkpoint,
        "segmenter": segmenter_files,
        "good": {"checkpoint": good_mct, "segmenter": good_segmenter},
    }
