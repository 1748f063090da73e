"""Experiment building blocks: FedProx's proximal term, fp16 transport, the report's statistics."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from common.arrays import cast_floating, record_bytes, to_array_record
from common.augment import train_cache_size
from common.config import compose_config
from common.data import split_tensors
from common.model import create_mct_model
from common.training import train_local
from experiments.report import Dataset, fmt_percent, matrix_table, mean_sd, verdicts
from experiments.run import SeedRun, cell_scores, override_key, row_folder
from server_app.strategy import GuardedFedAvg
from tests.replies import prepare

SMALL = ["data.hospitals.hospital_a.num_images=30", "model.img_size=32"]


pytestmark = pytest.mark.usefixtures("task_identity")


def _train(proximal_mu: float | None) -> tuple[dict, dict]:
    """Initial and trained weights of one local round, with or without the mu argument."""
    cfg = compose_config([*SMALL, "train.local_epochs=1", "train.batch_size=8", "train.lr=5e-3"])
    torch.manual_seed(0)
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = split_tensors(cfg.data, "hospital_a", "train", train_cache_size(32))
    extra = {} if proximal_mu is None else {"proximal_mu": proximal_mu}
    kwargs = {"start_epoch": 1, "total_epochs": 2, "device": torch.device("cpu"), "seed": 3}
    train_local(model, data, cfg.train, **kwargs, **extra)
    return start, model.state_dict()


def _distance(a: dict, b: dict) -> float:
    return sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a)


def test_proximal_mu_zero_is_exactly_the_plain_step_and_mu_pulls_towards_the_start():
    start, plain = _train(None)
    _, zero = _train(0.0)
    _, pulled = _train(50.0)
    for key in plain:
        assert torch.equal(plain[key], zero[key]), key
    assert _distance(start, pulled) < 0.9 * _distance(start, plain)


def _reply(node: int, record: ArrayRecord, weight: int) -> Message:
    content = RecordDict(
        {
            "arrays": record,
            "metrics": MetricRecord({"num-examples": weight, "hospital-index": node}),
        }
    )
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)


def test_fp16_transport_halves_the_upload_and_the_server_averages_in_full_precision():
    rng = np.random.default_rng(0)
    global_record = to_array_record(
        {"w": torch.zeros(64, 64), "steps": torch.tensor(3, dtype=torch.int64)}
    )
    local = [
        {
            "w": torch.from_numpy(rng.normal(size=(64, 64)).astype(np.float32)),
            "steps": torch.tensor(3),
        }
        for _ in range(2)
    ]
    half = [cast_floating(to_array_record(s), "float16") for s in local]
    assert str(half[0]["w"].dtype) == "float16" and str(half[0]["steps"].dtype) == "int64"
    full_bytes = record_bytes(RecordDict({"a": to_array_record(local[0])}))
    half_bytes = record_bytes(RecordDict({"a": half[0]}))
    assert half_bytes < 0.52 * full_bytes

    strategy = GuardedFedAvg(num_hospitals=2, min_replies=2, transport_dtype="float16")
    prepare(strategy, global_record)
    averaged, _ = strategy.aggregate_train(1, [_reply(i, half[i], 10 * (i + 1)) for i in range(2)])
    assert averaged["w"].dtype == "float32" and averaged["steps"].dtype == "int64"
    expected = (local[0]["w"].numpy() * 10 + local[1]["w"].numpy() * 20) / 30
    np.testing.assert_allclose(averaged["w"].numpy(), expected, atol=2e-3)
    assert strategy.report.bytes_received == {0: half_bytes, 1: half_bytes}
    assert strategy.report.per_hospital[1]["bytes-received"] == half_bytes

    # Without the opt-in a half-precision reply is a dtype mismatch, rejected as before.
    strict = GuardedFedAvg(num_hospitals=2, min_replies=1)
    prepare(strict, global_record)
    strict.aggregate_train(1, [_reply(0, half[0], 10), _reply(1, to_array_record(local[1]), 10)])
    assert "dtype float16" in strict.report.rejected[0]


def test_mean_and_sample_sd_skip_missing_scores():
    mean, sd, n = mean_sd([0.5, 0.7, None, math.nan])
    assert (mean, n) == (pytest.approx(0.6), 2)
    assert sd == pytest.approx(math.sqrt(0.02))
    assert mean_sd([0.4]) == (0.4, 0.0, 1)
    assert math.isnan(mean_sd([None])[0])
    assert fmt_percent([0.5, 0.7]) == "60.0 ± 14.1"
    assert fmt_percent([]) == "-"


def _result(label: str, regime: str, seed: int, rows: dict) -> dict:
    cells = {
        row: {h: {"segmenter": {"class_aware": v[0], "binary": v[1]}} for h, v in by.items()}
        for row, by in rows.items()
    }
    return {
        "label": label,
        "regime": regime,
        "seed": seed,
        "hospitals": ["a", "b"],
        "rows": [{"row": r, "cells": c} for r, c in cells.items()],
    }


def test_matrix_table_and_verdicts_from_seed_results():
    results = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        results.append(
            _result(
                "local_only",
                "local_only",
                seed,
                {
                    "local_only (a)": {"a": (0.5 + shift, 0.7), "b": (0.1, 0.3)},
                    "local_only (b)": {"a": (0.2, 0.4), "b": (0.6, 0.8)},
                },
            )
        )
        results.append(
            _result("fedavg", "fedavg", seed, {"fedavg": {"a": (0.4, 0.6), "b": (0.5, 0.9)}})
        )
        results.append(
            _result("supervised", "supervised", seed, {"supervised (a)": {"a": (0.9, 0.95)}})
        )
    data = OmegaConf.create({"name": "toy"})
    ds = Dataset(Path("."), data, ["a", "b"], [], results)
    assert ds.rows() == ["local_only (a)", "local_only (b)", "fedavg", "supervised (a)"]
    table = matrix_table(ds, "segmenter", with_baselines=False).splitlines()
    assert table[2] == "| local_only (a) | 55.0 ± 7.1 / 70.0 ± 0.0 | 10.0 ± 0.0 / 30.0 ± 0.0 | 2 |"
    lines = "\n".join(verdicts(ds))
    assert (
        "**a test, class-aware mIoU:** fedavg (40.0) did NOT beat local-only trained here" in lines
    )
    assert "beat local-only trained at b (20.0)" in lines
    assert "binary 60.0 vs 95.0 (+35.0 points to the ceiling)" in lines
    assert (
        "class-aware mIoU: beat the local-only model trained at the test hospital on 0 of 2 "
        "test splits (0 by more than one SD), and local-only models trained at another "
        "hospital in 2 of 2 comparisons (2 by more than one SD)"
    ) in lines


def test_cell_scores_and_names():
    metrics = {
        "stages": [
            {
                "key": "segmenter",
                "title": "segmenter (lraspp)",
                "test": {"class_aware_miou": 0.3, "binary_miou": 0.6},
            },
            {"key": "maps", "title": "maps (seeds)", "val": {}},
        ]
    }
    assert cell_scores(metrics) == {"segmenter": {"class_aware": 0.3, "binary": 0.6}}
    assert row_folder("local_only (hospital_a)") == "local_only_hospital_a"
    assert override_key("+data.root=/x=y") == "data.root"


def test_personalized_reuses_fedavg_only_when_trained_with_the_same_config(tmp_path):
    fedavg = tmp_path / "fedavg" / "seed_0" / "train" / "global"
    fedavg.mkdir(parents=True)
    (fedavg / "final_model.pt").write_bytes(b"")
    trained = compose_config([f"output_dir={fedavg}"])
    (fedavg / "config.yaml").write_text(OmegaConf.to_yaml(trained))

    def seed_run(*overrides: str) -> SeedRun:
        cfg = compose_config(list(overrides))
        regime = compose_config(["regime=personalized"], "w3s_experiment").regime
        return SeedRun(cfg, regime, "personalized", [], [], 0, tmp_path / "personalized" / "seed_0")

    assert seed_run().fedavg_of_same_seed() == fedavg / "final_model.pt"
    assert seed_run("federation.rounds=3").fedavg_of_same_seed() is None
    assert seed_run("seed=1").fedavg_of_same_seed() is None
