"""Where a ServerApp run starts (server_app/app.py): fresh, or resumed from its own files."""

import logging

import pytest
import torch

from common.checkpoint import CheckpointError, load_checkpoint, save_model
from common.config import compose_config
from common.model import create_mct_model
from server_app.app import starting_point


def _run_dir_with_an_earlier_run(tmp_path, cfg):
    """A run folder as an earlier run left it: checkpoints of both phases and a final model."""
    run_dir = tmp_path / "run"
    state = create_mct_model(cfg.model, len(cfg.data.classes)).state_dict()
    for name, server_round in (("pretrain_round_020", 20), ("round_006", 6), ("round_007", 7)):
        splits = {"hospital_a": [server_round]}  # a stand-in fingerprint: which file was read
        save_model(state, cfg, server_round, run_dir / "checkpoints" / f"{name}.pt", splits)
    save_model(state, cfg, 7, run_dir / "final_model.pt")
    return run_dir


def test_a_fresh_run_replaces_an_earlier_runs_model_files_and_says_so(tmp_path, caplog):
    cfg = compose_config(["model.img_size=32", "pretrain.rounds=2"])
    run_dir = _run_dir_with_an_earlier_run(tmp_path, cfg)
    with caplog.at_level(logging.WARNING):
        start = starting_point(cfg, run_dir)
    assert (start.phase, start.done) == ("pretrain", 0)
    assert not list((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "final_model.pt").exists()
    assert "holds an earlier run" in caplog.text and "round_007.pt" in caplog.text


def test_a_resume_starts_from_the_newest_mct_checkpoint_and_removes_nothing(tmp_path):
    cfg = compose_config(["model.img_size=32", "pretrain.rounds=2", "resume=true"])
    run_dir = _run_dir_with_an_earlier_run(tmp_path, cfg)
    start = starting_point(cfg, run_dir)
    assert (start.phase, start.done) == ("mct", 7)
    assert start.splits == {"hospital_a": [7]}
    assert len(list((run_dir / "checkpoints").iterdir())) == 3
    newest = load_checkpoint(run_dir / "checkpoints" / "round_007.pt")["state_dict"]
    first = next(iter(newest))
    assert torch.equal(torch.as_tensor(start.arrays[first].numpy()), newest[first])


def test_a_resume_past_the_configured_rounds_is_refused_naming_the_checkpoint(tmp_path):
    cfg = compose_config(["model.img_size=32", "federation.rounds=5", "resume=true"])
    run_dir = _run_dir_with_an_earlier_run(tmp_path, cfg)
    with pytest.raises(ValueError, match="round_007.pt is of round 7, past federation.rounds=5"):
        starting_point(cfg, run_dir)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.classes=[a,b,c,d,e]", "was trained on classes"),
        ("model.foreground_head=false", "the weights do not fit"),
    ],
)
def test_a_resume_from_a_checkpoint_the_model_cannot_take_is_one_line_naming_it(
    tmp_path, override, message
):
    trained = compose_config(["model.img_size=32"])
    run_dir = _run_dir_with_an_earlier_run(tmp_path, trained)
    cfg = compose_config(["model.img_size=32", "resume=true", override])
    with pytest.raises(CheckpointError, match=f"resume=true: .*round_007.pt.*{message}"):
        starting_point(cfg, run_dir)
