"""The model files (common/checkpoint.py): atomic writes, and one-line errors for bad files."""

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from common.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    prune_rounds,
    round_files,
    save_atomic,
    save_model,
)
from common.config import compose_config
from common.errors import JobError
from common.model import create_mct_model
from common.segmenter import load_segmenter
from tests.unit.conftest import CHECKPOINT_FAULTS, SEGMENTER_FAULTS


def test_atomic_save_round_trips_and_leaves_no_temporary(tmp_path):
    path = save_atomic({"round": 3, "state_dict": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    assert load_checkpoint(path)["round"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_files_get_the_modes_the_umask_gives_a_plain_file(tmp_path, umask):
    before = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
        saved = save_atomic({"round": 1}, tmp_path / "c.pt")
    finally:
        os.umask(before)
    assert stat.S_IMODE(saved.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~umask


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    for r in (1, 2):
        save_atomic(
            {"round": r, "state_dict": {"w": torch.full((64,), r)}}, tmp_path / f"round_{r:03d}.pt"
        )
    newest = tmp_path / "round_002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    path, payload = latest_checkpoint(tmp_path)
    assert path.name == "round_001.pt" and payload["round"] == 1
    assert "round_002.pt is unreadable" in caplog.text


def test_no_checkpoint_at_all(tmp_path):
    assert latest_checkpoint(tmp_path) is None


def _save_rounds(folder, rounds, prefix="round_"):
    for r in rounds:
        save_atomic(
            {"round": r, "state_dict": {"w": torch.full((4,), r)}}, folder / f"{prefix}{r:03d}.pt"
        )


def test_rounds_are_ordered_by_number_past_999_and_other_names_are_not_rounds(tmp_path):
    _save_rounds(tmp_path, (998, 999, 1000, 1001))
    (tmp_path / "round_best.pt").write_bytes(b"not a round")
    assert [r for r, _ in round_files(tmp_path)] == [998, 999, 1000, 1001]
    path, payload = latest_checkpoint(tmp_path)
    assert path.name == "round_1001.pt" and payload["round"] == 1001
    prune_rounds(tmp_path, "round_", 1001, kept=2)
    assert sorted(p.name for p in tmp_path.glob("round_*.pt")) == [
        "round_1000.pt",
        "round_1001.pt",
        "round_best.pt",
    ]


def test_pruning_removes_an_earlier_runs_later_rounds_not_this_runs(tmp_path):
    _save_rounds(tmp_path, (6, 7))  # an earlier run in the same folder
    _save_rounds(tmp_path, (0, 1))
    prune_rounds(tmp_path, "round_", 1, kept=2)
    assert [r for r, _ in round_files(tmp_path)] == [0, 1]
    assert latest_checkpoint(tmp_path)[1]["round"] == 1


def test_pruning_removes_the_temporaries_of_killed_writes_of_its_phase(tmp_path):
    # As replaced_atomically names them; a SIGKILL mid-write leaves one behind, a model's size.
    killed = [
        Path(tempfile.mkstemp(dir=tmp_path, prefix=f".{name}.", suffix=".tmp")[1])
        for name in ("round_002.pt", "pretrain_round_004.pt")
    ]
    _save_rounds(tmp_path, (1, 2, 3))
    prune_rounds(tmp_path, "round_", 3, kept=2)
    assert not killed[0].exists() and killed[1].exists()  # the other phase prunes its own
    assert [r for r, _ in round_files(tmp_path)] == [2, 3]


@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
def test_every_damaged_or_foreign_model_file_is_one_line_naming_it(fault, model_files):
    path = model_files["checkpoint"][fault]
    with pytest.raises(CheckpointError) as raised:
        load_model(path, classes=None)
    brief = raised.value.brief()
    assert "\n" not in str(raised.value) and brief == str(raised.value)
    assert f"checkpoint={path}" in brief and CHECKPOINT_FAULTS[fault] in brief, brief
    assert len(brief) < 400, brief


@pytest.mark.parametrize("fault", SEGMENTER_FAULTS)
def test_every_damaged_or_foreign_segmenter_file_is_one_line_naming_it(fault, model_files):
    path = model_files["segmenter"][fault]
    with pytest.raises(CheckpointError) as raised:
        load_segmenter(path)
    brief = raised.value.brief()
    assert "\n" not in str(raised.value) and brief == str(raised.value)
    assert f"segmenter={path}" in brief and SEGMENTER_FAULTS[fault] in brief, brief
    assert len(brief) < 400, brief


def test_the_good_files_load(model_files):
    model, payload = load_model(model_files["good"]["checkpoint"])
    assert not model.training and payload["round"] == 1
    segmenter, cfg, classes = load_segmenter(model_files["good"]["segmenter"])
    assert not segmenter.training and cfg["input_size"] == 32 and classes == payload["classes"]


def test_a_model_trained_on_other_classes_is_refused(model_files):
    path = model_files["good"]["checkpoint"]
    with pytest.raises(CheckpointError, match="trained on classes") as raised:
        load_model(path, classes=["x", "y"])
    assert f"checkpoint={path}" in raised.value.brief()


def test_foreground_maps_of_a_model_without_the_head_are_refused_up_front(tmp_path):
    cfg = compose_config(["model.img_size=32", "model.foreground_head=false"])
    model = create_mct_model(cfg.model, len(cfg.data.classes))
    path = save_model(model.state_dict(), cfg, 1, tmp_path / "final_model.pt")
    load_model(path, map_source="fused")
    with pytest.raises(CheckpointError, match="localization=fused") as raised:
        load_model(path, map_source="foreground")
    assert f"checkpoint={path}" in raised.value.brief()


def test_a_job_error_is_always_one_line():
    assert JobError("two\n  lines\n").brief() == "two lines"
