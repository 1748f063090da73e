"""Where a ServerApp run starts (server_app/app.py): fresh, or resumed from its own files."""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.checkpoint import CheckpointError, load_checkpoint, save_model
from common.config import compose_config
from common.model import create_mct_model
from server_app.app import StartingPoint, federation_strategy, pretrain, starting_point
from server_app.strategy import GuardedFedAvg


def _run_dir_with_an_earlier_run(tmp_path, cfg):
    """A run folder as an earlier run left it: checkpoints of both phases and a final model."""
    run_dir = tmp_path / "run"
    state = create_mct_model(cfg.model, len(cfg.data.classes)).state_dict()
    for name, server_round in (("pretrain_round_020", 20), ("round_006", 6), ("round_007", 7)):
        splits = {"hospital_a": [server_round]}  # a stand-in fingerprint: which file was read
        state = {key: value.clone() for key, value in state.items()}
        next(iter(state.values())).fill_(server_round)  # weights that tell the files apart
        save_model(state, cfg, server_round, run_dir / "checkpoints" / f"{name}.pt", splits)
    save_model(state, cfg, 7, run_dir / "final_model.pt")
    rows = [{"phase": "pretrain", "round": r} for r in range(1, 21)]
    rows += [{"phase": "mct", "round": r} for r in range(1, 8)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "declared_examples.json").write_text('{"hospital_a": 96, "hospital_b": 40}\n')
    (run_dir / "privacy.json").write_text('{"privacy": "client_clip"}\n')
    return run_dir


def test_a_fresh_run_replaces_an_earlier_runs_model_files_and_says_so(tmp_path, caplog):
    cfg = compose_config(["model.img_size=32", "pretrain.rounds=2"])
    run_dir = _run_dir_with_an_earlier_run(tmp_path, cfg)
    with caplog.at_level(logging.WARNING):
        start = starting_point(cfg, run_dir)
    assert (start.phase, start.done) == ("pretrain", 0)
    assert not list((run_dir / "checkpoints").iterdir())
    # Its rows of both phases, its hospitals' declarations and its privacy ledger go with its
    # models.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]
    assert "holds an earlier run" in caplog.text and "round_007.pt" in caplog.text
    assert start.declared == {}


def test_a_resume_starts_from_the_newest_mct_checkpoint_and_removes_nothing(tmp_path):
    cfg = compose_config(["model.img_size=32", "pretrain.rounds=2", "resume=true"])
    run_dir = _run_dir_with_an_earlier_run(tmp_path, cfg)
    start = starting_point(cfg, run_dir)
    assert (start.phase, start.done) == ("mct", 7)
    assert start.splits == {"hospital_a": [7]}
    assert start.declared == {"hospital_a": 96.0, "hospital_b": 40.0}
    assert len(list((run_dir / "checkpoints").iterdir())) == 3
    first = next(iter(load_checkpoint(run_dir / "final_model.pt")["state_dict"]))
    assert (start.arrays[first].numpy() == 7).all()


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


def test_a_damaged_declarations_file_is_refused_naming_it(tmp_path):
    cfg = compose_config(["model.img_size=32", "resume=true"])
    run_dir = _run_dir_with_an_earlier_run(tmp_path, cfg)
    (run_dir / "declared_examples.json").write_text("")  # cut short
    with pytest.raises(ValueError, match="declared_examples.json is not valid JSON"):
        starting_point(cfg, run_dir)


def test_the_declarations_of_the_pretraining_rounds_cap_the_mct_rounds(tmp_path, monkeypatch):
    """Fresh or resumed, the MCT rounds hold each hospital to its first declaration of the run."""
    cfg = compose_config(["model.img_size=32", "pretrain.rounds=2"])
    hospitals = ["hospital_a", "hospital_b", "hospital_c"]
    model = ArrayRecord({"w": Array(np.ones((2, 2), np.float32))})

    configs = []

    def pretraining_rounds(self, *, initial_arrays, evaluate_fn, **configs_sent):
        self.declared_examples.update({0: 96.0, 2: 32.0})  # what the replies declared
        configs.append(configs_sent)
        return SimpleNamespace(arrays=initial_arrays)

    monkeypatch.setattr(GuardedFedAvg, "start", pretraining_rounds)
    start = pretrain(cfg, None, hospitals, tmp_path, StartingPoint("pretrain", 0, model))
    # Both kinds of message say their phase: a failing site's log line names it.
    assert configs[0]["train_config"]["phase"] == "pretrain"
    assert configs[0]["evaluate_config"]["phase"] == "pretrain"
    assert (start.phase, start.done) == ("mct", 0)
    assert start.declared == {"hospital_a": 96.0, "hospital_c": 32.0}
    assert federation_strategy(cfg, hospitals, start).declared_examples == {0: 96.0, 2: 32.0}
