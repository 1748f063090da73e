"""server_app/recorder: one row and one checkpoint per round, kept in step across a resume."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

import server_app.recorder
from common.config import compose_config
from common.logs import metrics_text
from server_app.recorder import RoundRecorder
from server_app.strategy import GuardedFedAvg
from tests.replies import failed, instruction, prepare, reply

HOSPITALS = ["hospital_a", "hospital_b", "hospital_c"]
MODEL = ArrayRecord({"w": Array(np.ones((2, 2), np.float32))})


def _recorder(run_dir, done: int = 0) -> RoundRecorder:
    """The MCT recorder of a run whose newest checkpoint is of round ``done``."""
    cfg = compose_config(["model.img_size=32", "federation.rounds=5"])
    strategy = prepare(GuardedFedAvg(num_hospitals=3, min_replies=3, round_offset=done), MODEL)
    recorder = RoundRecorder(run_dir, cfg, strategy, HOSPITALS)
    recorder.forget_rounds_after(done)
    return recorder


def _rounds(run_dir) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines]


def test_a_run_stopped_between_a_rounds_row_and_its_checkpoint_keeps_every_row(
    tmp_path, monkeypatch
):
    recorder = _recorder(tmp_path)
    for strategy_round in (0, 1, 2):
        recorder(strategy_round, MODEL)
    saved = server_app.recorder.save_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the server stops while writing round 3's checkpoint

    monkeypatch.setattr(server_app.recorder, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        recorder(3, MODEL)
    monkeypatch.setattr(server_app.recorder, "save_model", saved)
    assert _rounds(tmp_path) == [1, 2, 3]

    resumed = _recorder(tmp_path, done=2)  # round 2's checkpoint is the newest
    assert _rounds(tmp_path) == [1, 2]
    for strategy_round in (0, 1, 2, 3):
        resumed(strategy_round, MODEL)
    assert _rounds(tmp_path) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "round_004.pt",
        "round_005.pt",
    ]


def test_a_resume_keeps_the_other_phases_rows(tmp_path):
    rows = [{"phase": "pretrain", "round": r} for r in (1, 2, 3)] + [{"phase": "mct", "round": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _recorder(tmp_path, done=0)
    assert _rounds(tmp_path) == [1, 2, 3]


def test_a_rows_file_with_a_line_that_is_no_row_is_refused_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"phase": "mct", "round": 1}\n{"phase": "mc\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a round's row"):
        _recorder(tmp_path, done=1)


def _scores(node: int, loss: float) -> Message:
    """``node``'s evaluation reply for hospital ``node - 1``."""
    metrics = MetricRecord({"num-examples": 5, "val-loss": loss, "hospital-index": node - 1})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=instruction(node))


@pytest.mark.usefixtures("task_identity")
def test_a_row_names_evaluation_failures_apart_and_holds_no_nan(tmp_path, caplog):
    recorder = _recorder(tmp_path)
    strategy = recorder.strategy
    strategy.aggregate_train(1, [reply(1, 1.1, 10), reply(2, 1.2, 10), reply(3, 1.3, 10)])
    # Hospital c's update was averaged; its evaluation fails. Hospital a's loss is undefined.
    strategy.aggregate_evaluate(1, [_scores(1, float("nan")), _scores(2, 0.5), failed(3, "oom")])
    with caplog.at_level("INFO", logger="server_app"):
        recorder(1, MODEL)
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    row = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is no JSON"))
    assert row["replies"] == 3 and row["failed_nodes"] == [] and row["failures"] == {}
    assert row["evaluate_failures"] == {"3": "oom"} and row["evaluate_rejected"] == {}
    assert row["hospitals"]["hospital_a"]["val-loss"] is None
    assert row["hospitals"]["hospital_b"]["val-loss"] == 0.5
    assert "replies 3/3 (failed 0, rejected 0)" in caplog.text
    assert "(failed 1, rejected 0) |" in caplog.text  # after the validation scores


def test_scores_in_log_lines_have_four_decimals_and_only_the_keys_asked_for():
    scores = {"val-loss": 1.3218678488875881, "val-accuracy": 0.18181818181818182}
    assert metrics_text(scores) == "val-loss 1.3219 val-accuracy 0.1818"
    assert metrics_text(scores, ["val-accuracy"]) == "val-accuracy 0.1818"
    assert metrics_text(scores, ["train-loss"]) == "-"
