"""Experiment building blocks: FedProx's proximal term, fp16 transport, the runner's folds and
resume, the report's statistics and plots."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from common.arrays import cast_floating, pack, record_bytes, to_array_record
from common.augment import train_cache_size
from common.cli import override_key
from common.config import compose_config
from common.data import split_tensors
from common.errors import JobError
from common.model import create_mct_model
from common.pretrain import pretrain_round
from common.training import train_local
from experiments import report
from experiments import run as runner
from experiments.regimes import initial_model, train_rounds
from experiments.report import (
    Dataset,
    cell_type_parts,
    communication_table,
    convergence_figure,
    fmt_percent,
    learning_curve_table,
    matrix_table,
    mean_sd,
    paired_difference,
    paired_table,
    post_training_variants,
    split_design,
    verdicts,
    write_report,
)
from experiments.run import SeedRun, cell_scores, finished_results, row_folder
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


def test_in_process_regimes_pretrain_as_the_client_app_does_before_the_mct_rounds():
    # local_only and centralized must start their MCT rounds from the same pretraining a
    # hospital runs in FedAvg, or the regime comparison would measure the pretraining.
    overrides = [*SMALL, "pretrain=masked", "pretrain.rounds=1", "pretrain.local_epochs=1"]
    overrides += ["pretrain.warmup_epochs=0"]
    cfg = compose_config([*overrides, "federation.rounds=0", "device=cpu"])
    data = split_tensors(cfg.data, "hospital_a", "train", train_cache_size(32))
    trained = train_rounds(cfg, data, 0, "local", hospital="hospital_a").state_dict()

    expected = initial_model(cfg, "hospital_a")
    start = {k: v.clone() for k, v in expected.state_dict().items()}
    cpu = torch.device("cpu")
    pretrain_round(expected, data, cfg, None, server_round=1, hospital_index=0, device=cpu)
    for key, tensor in expected.state_dict().items():
        torch.testing.assert_close(trained[key], tensor, rtol=0, atol=0)
    assert not torch.equal(trained["patch_embed.proj.weight"], start["patch_embed.proj.weight"])

    unpretrained = compose_config([*SMALL, "pretrain=none", "federation.rounds=0"])
    untouched = train_rounds(unpretrained, data, 0, "local", hospital="hospital_a").state_dict()
    assert all(torch.equal(untouched[k], start[k]) for k in start)


def _reply(node: int, record: ArrayRecord, weight: int) -> Message:
    content = RecordDict(
        {
            "arrays": pack(record),
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


def _result(label: str, regime: str, seed: int, rows: dict, fold: int | None = None) -> dict:
    cells = {
        row: {h: {"segmenter": {"class_aware": v[0], "binary": v[1]}} for h, v in by.items()}
        for row, by in rows.items()
    }
    return {
        "label": label,
        "regime": regime,
        "fold": fold,
        "seed": seed,
        "hospitals": ["a", "b"],
        "rows": [{"row": r, "cells": c} for r, c in cells.items()],
    }


def test_the_ceiling_meets_the_baselines_on_the_folds_it_ran():
    disk = {0: 0.5, 1: 0.5, 2: 0.9, 3: 0.9, 4: 0.9}  # two hard test folds, three easy
    results = []
    for fold, value in disk.items():
        result = _result("fedavg", "fedavg", 0, {"fedavg": {"a": (0.6, 0.6)}}, fold)
        result["rows"][0]["cells"]["a"]["disk"] = {"class_aware": value, "binary": value}
        results.append(result)
    for fold in (0, 1):  # stopped after the hard folds, 20 points above the disk on both
        results.append(
            _result("supervised", "supervised", 0, {"supervised (a)": {"a": (0.7, 0.7)}}, fold)
        )
    ds = Dataset(Path("."), OmegaConf.create({"name": "toy"}), ["a"], [], results)
    line = next(line for line in verdicts(ds) if "Ceiling" in line)
    assert "class-aware 70.0: beats centred disk (50.0)" in line


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
    for result in results:
        for row in result["rows"]:
            if row["row"] == "fedavg":  # the weak pipeline's job scores the baselines too
                row["cells"]["a"]["disk"] = {"class_aware": 0.7, "binary": 0.8}
                row["cells"]["a"]["otsu"] = {"class_aware": 0.92, "binary": 0.97}
            if row["row"] == "supervised (a)":
                row["train_loss"] = 0.05 + 0.1 * result["seed"]
    data = OmegaConf.create({"name": "toy"})
    ds = Dataset(Path("."), data, ["a", "b"], [], results)
    assert ds.rows() == ["local_only (a)", "local_only (b)", "fedavg", "supervised (a)"]
    table = matrix_table(ds, "segmenter", with_baselines=False).splitlines()
    assert table[2] == "| local_only (a) | 55.0 ± 7.1 / 70.0 ± 0.0 | 10.0 ± 0.0 / 30.0 ± 0.0 | 2 |"
    lines = "\n".join(verdicts(ds))
    assert (
        "**a test, class-aware mIoU:** fedavg did NOT beat local-only trained here (40.0 vs "
        "55.0 on 2 shared runs); beat local-only trained at b (40.0 vs 20.0 on "
        "2 shared runs)." in lines
    )
    assert (
        "- **Ceiling, a test:** supervised (a), class-aware 90.0: beats centred disk (70.0), "
        "does NOT beat Otsu (92.0); binary 95.0: beats centred disk (80.0), does NOT beat Otsu "
        "(97.0); final training loss 0.100 (the baselines"
    ) in lines
    assert (
        "  - fedavg (weak labels): class-aware 40.0 vs 90.0 (44% of the ceiling, 2 shared runs)"
        in lines
    )
    assert (
        "class-aware mIoU: beat the local-only model trained at the test hospital on 0 of 2 "
        "test splits (0 by more than one SD), and local-only models trained at another "
        "hospital in 2 of 2 comparisons (2 by more than one SD)"
    ) in lines


def test_the_cell_type_matrix_counts_only_the_runs_that_recorded_it():
    results = [
        _result("fedavg", "fedavg", seed, {"fedavg": {"a": (0.4, 0.6), "b": (0.5, 0.7)}})
        for seed in (0, 1, 2)
    ]
    ds = Dataset(Path("."), OmegaConf.create({"name": "toy"}), ["a", "b"], [], results)
    assert cell_type_parts(ds) == []  # runs made before the segmenter recorded cell types
    for seed, accuracy in ((1, 0.6), (2, 0.8)):
        results[seed]["rows"][0]["cells"]["a"]["segmenter"]["cell_type"] = accuracy
    title, table = cell_type_parts(ds)
    assert title.startswith("### Cell types: segmenter")
    assert table.splitlines()[2] == "| fedavg | 70.0 ± 14.1 | - | 2 |"
    mious = matrix_table(ds, "segmenter", with_baselines=False).splitlines()
    assert mious[2] == "| fedavg | 40.0 ± 0.0 / 60.0 ± 0.0 | 50.0 ± 0.0 / 70.0 ± 0.0 | 3 |"


def test_a_baseline_counts_once_per_test_split_whatever_the_seeds_and_labels_that_scored_it():
    results = []
    for fold, disk in ((0, 0.6), (1, 0.8)):
        for seed in (0, 1):
            for label in ("fedavg", "fedprox"):
                result = _result(label, label, seed, {label: {"a": (0.4, 0.6)}}, fold)
                result["rows"][0]["cells"]["a"]["disk"] = {"class_aware": disk, "binary": disk}
                results.append(result)
    ds = Dataset(Path("."), OmegaConf.create({"name": "toy"}), ["a", "b"], [], results)
    assert ds.baseline_values("a", "disk", "binary") == [0.6, 0.8]


def test_cell_scores_and_names():
    metrics = {
        "stages": [
            {
                "key": "segmenter",
                "title": "segmenter (lraspp)",
                "test": {"class_aware_miou": 0.3, "binary_miou": 0.6, "cell_type_accuracy": 0.8},
            },
            {"key": "maps", "title": "maps (seeds)", "val": {}},
            {
                "key": "disk",
                "title": "centred disk",
                "test": {"class_aware_miou": 0.2, "binary_miou": 0.5},
            },
        ]
    }
    assert cell_scores(metrics) == {
        "segmenter": {"class_aware": 0.3, "binary": 0.6, "cell_type": 0.8},
        "disk": {"class_aware": 0.2, "binary": 0.5},
    }
    assert row_folder("local_only (hospital_a)") == "local_only_hospital_a"
    assert override_key("+data.root=/x=y") == "data.root"


def test_a_federated_model_is_reused_only_when_trained_with_the_same_config(tmp_path):
    def trained_model(label: str, *overrides: str) -> Path:
        folder = tmp_path / label / "seed_0" / "train" / "global"
        folder.mkdir(parents=True)
        (folder / "final_model.pt").write_bytes(b"")
        trained = OmegaConf.to_container(compose_config([*overrides, f"output_dir={folder}"]))
        for key in ("standardise_input", "per_hospital"):  # trained before the settings existed
            del trained["model"][key]
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(trained))
        return folder / "final_model.pt"

    def seed_run(*overrides: str) -> SeedRun:
        cfg = compose_config(list(overrides))
        regime = compose_config(["regime=personalized"], "w3s_experiment").regime
        return SeedRun(cfg, regime, "personalized", [], [], 0, tmp_path)

    assert seed_run().same_training() is None
    fedprox = trained_model("fedprox", "train.proximal_mu=0.01")
    assert seed_run().same_training() is None
    fedavg = trained_model("fedavg_learned")
    assert seed_run().same_training() == fedavg
    assert seed_run().federated("global") == fedavg
    assert seed_run("train.proximal_mu=0.01").same_training() == fedprox
    assert seed_run("federation.rounds=3").same_training() is None
    assert seed_run("seed=1").same_training() is None
    # A setting added since counts as its default for the earlier run, and only then.
    assert seed_run("model.standardise_input=image").same_training() is None
    own = "+model.per_hospital.hospital_a.standardise_input=channels"
    assert seed_run(own).same_training() is None
    # A hospital left out is no setting added since: its keys' defaults do not stand in.
    two_hospitals = trained_model("fedavg_2h", "~data.hospitals.hospital_c")
    assert seed_run().same_training() == fedavg
    assert seed_run("~data.hospitals.hospital_c").same_training() == two_hospitals
    # This run's own training, kept from a run stopped while scoring, comes first; of another
    # config it goes, or its metrics.jsonl would pass for the reused model's training.
    own_model = trained_model("personalized", "~data.hospitals.hospital_c")
    assert seed_run("~data.hospitals.hospital_c").same_training() == own_model
    assert seed_run().same_training() == fedavg
    assert not own_model.parent.exists()


def test_pooled_training_refuses_a_standardisation_per_hospital(tmp_path):
    cfg = compose_config(["+model.per_hospital.hospital_a.standardise_input=channels"])
    regime = compose_config(["regime=centralized"], "w3s_experiment").regime
    with pytest.raises(JobError, match="cannot give each its own model.per_hospital"):
        runner.models_of(SeedRun(cfg, regime, "centralized", [], [], 0, tmp_path))
    assert not (tmp_path / "centralized").exists()


def test_paired_difference_is_the_student_t_interval_of_the_mean_difference():
    # differences 1, 2, 3: mean 2, SD 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3)
    paired = paired_difference([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert paired.n == 3 and paired.mean == pytest.approx(2.0)
    assert (paired.low, paired.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert paired.verdict("fedavg") == "no detectable difference at this scale"
    assert paired_difference([0.10, 0.12, 0.11]).verdict("fedavg") == "fedavg better"
    assert paired_difference([-0.10, -0.12, -0.11]).verdict("fedavg") == "fedavg worse"
    assert paired_difference([0.1]).verdict("fedavg") == "too few pairs for an interval"


def test_paired_table_pairs_fedavg_with_local_only_of_the_same_fold_and_seed():
    results = []
    for fold, seed, local_a, fed_a in ((0, 0, 0.50, 0.60), (0, 1, 0.40, 0.45), (1, 0, 0.70, 0.72)):
        local = {"local_only (a)": {"a": (0.3, local_a)}, "local_only (b)": {"a": (0.0, 0.0)}}
        results.append(_result("local_only", "local_only", seed, local, fold))
        results.append(_result("fedavg", "fedavg", seed, {"fedavg": {"a": (0.3, fed_a)}}, fold))
    # A fedavg run without a local-only partner is left out of the pairs.
    results.append(_result("fedavg", "fedavg", 2, {"fedavg": {"a": (0.3, 0.99)}}, 1))
    ds = Dataset(Path("."), OmegaConf.create({"name": "toy"}), ["a", "b"], [], results)
    lines = paired_table(ds).splitlines()
    # binary differences 0.10 and 0.05 at fold 0 (one pair: its seeds share its test images),
    # 0.02 at fold 1: pairs 0.075 and 0.02, mean 0.0475, t(0.975, 1) = 12.7062
    half = 12.706205 * float(np.std([0.075, 0.02], ddof=1)) / math.sqrt(2)
    mean = (0.075 + 0.02) / 2
    assert lines[3] == (
        f"| fedavg | a | segmenter | binary | 2 | {100 * mean:+.1f} "
        f"| [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}] "
        "| no detectable difference at this scale |"
    )
    assert lines[2] == (
        "| fedavg | a | segmenter | class-aware | 2 | +0.0 | [+0.0, +0.0] "
        "| identical in every pair: this stage did not depend on the model |"
    )
    # On one split (the fixed one) the seeds are the pairs.
    fixed = [r for r in results if r["fold"] == 0]
    one_split = Dataset(Path("."), ds.data, ["a", "b"], [], fixed)
    assert "| fedavg | a | segmenter | binary | 2 | +7.5 |" in paired_table(one_split)
    assert len(lines) == 4  # no maps scores; at b fedavg has none: no pairs, no line
    local_runs = [r for r in results if r["regime"] == "local_only"]
    only_local = Dataset(Path("."), ds.data, ["a"], [], local_runs)
    assert paired_table(only_local) is None
    # Pooled and personalized models are what a hospital could use instead: paired too.
    pooled = _result("centralized", "centralized", 0, {"centralized": {"a": (0.3, 0.4)}}, 0)
    with_pooled = Dataset(Path("."), ds.data, ["a"], [], [*local_runs, pooled])
    assert "| centralized | a | segmenter | binary | 1 | -10.0 | - |" in paired_table(with_pooled)


def _federated_result(tmp_path: Path, label: str, seed: int, rounds: list[dict]) -> dict:
    """A federated run's results whose ``metrics.jsonl`` holds ``rounds``, one row each."""
    run_dir = tmp_path / label / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    result = _result(label, "fedavg", seed, {label: {"a": (0.1, 0.2)}})
    return {**result, "dir": str(run_dir), "metrics_jsonl": "metrics.jsonl"}


def test_convergence_figure_has_a_legend_on_every_subplot_and_distinct_line_styles(tmp_path):
    results = []
    for label, level in (("fedavg", 0.5), ("fedavg_fp16", 0.4)):
        for seed in (0, 1):
            rounds = [
                {"round": r, "hospitals": {h: {"val-loc-miou": level + 0.01 * r} for h in "ab"}}
                for r in (1, 2, 3)
            ]
            results.append(_federated_result(tmp_path, label, seed, rounds))
    ds = Dataset(tmp_path, OmegaConf.create({"name": "toy"}), ["a", "b"], [], results)
    figure = convergence_figure(ds, ["fedavg", "fedavg_fp16"])
    assert len(figure.axes) == 2
    for ax in figure.axes:
        legend = ax.get_legend()
        assert legend is not None
        assert [t.get_text() for t in legend.get_texts()] == ["fedavg", "fedavg_fp16"]
        lines = ax.get_lines()
        assert len({line.get_color() for line in lines}) == 2
        assert len({line.get_linestyle() for line in lines}) == 2
        band = ax.collections[0]
        assert band.get_alpha() == pytest.approx(0.15)
        assert band.get_zorder() < min(line.get_zorder() for line in lines)


def test_pretraining_rows_are_no_mct_rounds_of_the_curve_but_count_in_the_bytes(tmp_path):
    def row(phase: str | None, number: int, miou: float) -> dict:
        scores = {"val-loc-miou": miou, "bytes-sent": 2e6, "bytes-received": 1e6}
        # A run from before the pretraining phase wrote no phase: all MCT rounds.
        return {"round": number, "hospitals": {"a": scores}} | ({"phase": phase} if phase else {})

    pretrained = [row("pretrain", r, 0.2) for r in (1, 2, 3)] + [row("mct", 1, 0.6)]
    older = [row(None, r, 0.6) for r in (1, 2)]
    results = [
        *(_federated_result(tmp_path, "fedavg", seed, pretrained) for seed in (0, 1)),
        _federated_result(tmp_path, "fedavg_old", 0, older),
    ]
    ds = Dataset(tmp_path, OmegaConf.create({"name": "toy"}), ["a"], [], results)
    curve = convergence_figure(ds, ["fedavg"]).axes[0].get_lines()[0]
    assert list(curve.get_xdata()) == [1] and list(curve.get_ydata()) == [pytest.approx(60.0)]
    table = communication_table(ds).splitlines()
    assert table[2].startswith("| fedavg | a | 2.000 | 1.000 | 12.00 | 3 pretraining + 1 MCT |")
    assert table[3].startswith("| fedavg_old | a | 2.000 | 1.000 | 6.00 | 2 MCT |")


# Two tiny synthetic hospitals and a 3-fold split: composing and verifying them stays cheap.
TINY_EXPERIMENT = [
    "~data.hospitals.hospital_c",
    *(f"data.hospitals.hospital_{h}.{k}" for h in "ab" for k in ("num_images=30", "image_size=48")),
    "data.split.folds=3",
    "folds=[0,2]",
    "seeds=[0,1]",
]


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training and the post-training job, keep config composition; record both configs.

    Each trained run leaves a marker file, so a test sees which run folders were (re)done.
    """
    calls = {"train": [], "score": []}

    def models_of(run):
        split = run.cfg.data.split
        calls["train"].append((run.fold, run.seed, split.folds, split.fold, run.training_overrides))
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "trained").write_text("")
        model = run.out / "model.pt"
        if str(run.regime.kind) == "local":
            return {f"local_only ({h})": dict.fromkeys(run.hospitals, model) for h in run.hospitals}
        return {run.label: dict.fromkeys(run.hospitals, model)}

    def run_postprocess(cfg):
        calls["score"].append((cfg.data.split.folds, cfg.data.split.fold, cfg.seed))
        # Federated scores 10 points above local-only in every (fold, seed): a clear verdict;
        # half the training images cost 10 points.
        binary = 0.5 + 0.01 * cfg.data.split.fold + 0.02 * cfg.seed
        binary += 0.1 * ("/fedavg" in str(cfg.checkpoint))
        binary -= 0.2 * (1 - cfg.data.split.train_share)
        test = {"class_aware_miou": 0.3, "binary_miou": binary}
        return {"stages": [{"key": "segmenter", "test": test}]}

    monkeypatch.setattr(runner, "models_of", models_of)
    monkeypatch.setattr(runner, "run_postprocess", run_postprocess)
    return calls


def _experiment(tmp_path: Path, regime: str = "centralized", *extra: str) -> int:
    overrides = [*TINY_EXPERIMENT, f"regime={regime}", f"runs_dir={tmp_path / 'runs'}", *extra]
    return runner.run_experiment(compose_config(overrides, "w3s_experiment"), overrides)


def test_folds_get_their_folder_and_their_split_in_training_and_post_training(
    tmp_path, fake_training, monkeypatch
):
    ticks = iter(range(0, 1000, 5))  # each run starts and ends: 5 s apart
    monkeypatch.setattr(runner.time, "perf_counter", lambda: float(next(ticks)))
    assert _experiment(tmp_path) == 0
    runs = tmp_path / "runs" / "centralized"
    for fold in (0, 2):
        for seed in (0, 1):
            results = json.loads(
                (runs / f"fold_{fold}" / f"seed_{seed}" / "results.json").read_text()
            )
            assert (results["fold"], results["seed"]) == (fold, seed)
            assert results["seconds"] == 5.0  # the run's own wall time
    trained = [call[:4] for call in fake_training["train"]]
    assert trained == [(0, 0, 3, 0), (0, 1, 3, 0), (2, 0, 3, 2), (2, 1, 3, 2)]
    # The federated regimes launch flwr with these overrides, not with the composed config.
    assert all(f"data.split.fold={call[0]}" in call[4] for call in fake_training["train"])
    # Two hospitals scored per run, each with the fold the model was trained for.
    assert fake_training["score"] == [
        (3, fold, seed) for fold in (0, 2) for seed in (0, 1) for _ in range(2)
    ]


def test_rerun_skips_finished_runs_and_redoes_a_half_finished_one(
    tmp_path, fake_training, caplog, monkeypatch
):
    # A command run earlier in this process stops the project's loggers from propagating.
    monkeypatch.setattr(logging.getLogger("experiments"), "propagate", True)
    assert _experiment(tmp_path) == 0
    runs = tmp_path / "runs" / "centralized"
    half = runs / "fold_2" / "seed_1"
    (half / "results.json").unlink()  # killed before its results were written
    (half / "leftover").write_text("")
    fake_training["train"].clear()
    with caplog.at_level(logging.INFO, logger="experiments.run"):
        assert _experiment(tmp_path) == 0
    assert [call[:2] for call in fake_training["train"]] == [(2, 1)]
    assert not (half / "leftover").exists() and (half / "results.json").exists()
    # A set: after other CLI tests the project's loggers may reach caplog twice.
    skipped = sorted({r.getMessage() for r in caplog.records if "skipped" in r.getMessage()})
    assert len(skipped) == 3 and str(runs / "fold_0" / "seed_0") in skipped[0]


def test_a_rerun_with_another_config_is_refused_before_it_runs_or_writes_anything(
    tmp_path, fake_training
):
    assert _experiment(tmp_path, "centralized", "seeds=[1]") == 0
    label = tmp_path / "runs" / "centralized"
    results = label / "fold_0" / "seed_1" / "results.json"
    before = results.read_text(), (label / "experiment.yaml").read_text()
    fake_training["train"].clear()
    # Seed 0 comes first and has no results: it must not be trained with the new config.
    overrides = [*TINY_EXPERIMENT, "regime=centralized", f"runs_dir={tmp_path / 'runs'}"]
    overrides.append("train.lr=0.5")
    with pytest.raises(JobError, match=r"fold_0/seed_1 finished with another config \(train.lr"):
        runner.run_experiment(compose_config(overrides, "w3s_experiment"), overrides)
    assert (results.read_text(), (label / "experiment.yaml").read_text()) == before
    assert fake_training["train"] == [] and not (label / "fold_0" / "seed_0").exists()


def test_new_seeds_from_another_shell_environment_join_the_label(
    tmp_path, fake_training, monkeypatch
):
    assert _experiment(tmp_path, "fedavg", "seeds=[0]") == 0
    # Where runs would go outside an experiment, and the sites' state: not what is trained.
    monkeypatch.setenv("W3S_OUTPUT_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("W3S_SITE_STATE", str(tmp_path / "state"))
    assert _experiment(tmp_path, "fedavg", "seeds=[1]") == 0


def test_new_seeds_with_the_same_overrides_in_another_order_join_the_label(tmp_path, fake_training):
    overrides = ("postprocess=['segmenter.epochs=1','pseudo.reach=1.5']", "train.lr=0.002")
    assert _experiment(tmp_path, "fedavg", "seeds=[0]", *overrides) == 0
    reordered = ("train.lr=0.002", "postprocess=['pseudo.reach=1.5','segmenter.epochs=1']")
    assert _experiment(tmp_path, "fedavg", "seeds=[1]", *reordered) == 0
    with pytest.raises(JobError, match=r"\(postprocess differ\)"):
        _experiment(
            tmp_path, "fedavg", "seeds=[2]", "train.lr=0.002", "postprocess=['pseudo.reach=1.0']"
        )


def test_another_regime_under_a_label_is_refused(tmp_path, fake_training):
    assert _experiment(tmp_path, "local_only", "label=mine") == 0
    with pytest.raises(JobError, match=r"finished with another config \(regime.kind"):
        _experiment(tmp_path, "centralized", "label=mine")


def test_new_seeds_under_a_label_must_share_its_finished_runs_config(tmp_path, fake_training):
    assert _experiment(tmp_path) == 0
    with pytest.raises(JobError, match=r"fold_0/seed_0 finished with another config \(train.lr"):
        _experiment(tmp_path, "centralized", "seeds=[5]", "train.lr=0.5")
    assert not (tmp_path / "runs" / "centralized" / "fold_0" / "seed_5").exists()
    assert _experiment(tmp_path, "centralized", "seeds=[5]") == 0  # same config: pooled


def test_a_report_refuses_labels_whose_rows_or_columns_it_cannot_tell_apart(
    tmp_path, fake_training
):
    def refused(runs: str, *experiments: tuple[str, ...]) -> str:
        for regime, *extra in experiments:
            quick = ("folds=[0]", "seeds=[0]", f"runs_dir={tmp_path / runs}")
            assert _experiment(tmp_path, regime, *extra, *quick) == 0
        with pytest.raises(JobError) as error:
            write_report([tmp_path / runs], tmp_path / "E.md", tmp_path / "figures", None)
        return str(error.value)

    long = ("label=local_long", "federation.rounds=4")
    assert "labels local_long, local_only all ran regime=local_only, whose rows" in refused(
        "two", ("local_only",), ("local_only", *long)
    )
    # At one share of a learning curve too: its row would show one label's runs.
    half = "data.split.train_share=0.5"
    assert "labels local_long, local_short all ran regime=local_only at data.split" in refused(
        "curve",
        ("local_only",),
        ("local_only", "label=local_short", half),
        ("local_only", *long, half),
    )
    # TINY_EXPERIMENT leaves hospital_c out; this label puts it back.
    third = (
        "+data.hospitals.hospital_c={format:synthetic,domain:c,num_images:30,image_size:48,seed:3}"
    )
    assert (
        "labels fedavg_3h (hospital_a, hospital_b, hospital_c) and local_only (hospital_a, "
        "hospital_b) ran at different hospitals"
        in refused("hospitals", ("local_only",), ("fedavg", "label=fedavg_3h", third))
    )
    # Fold 0 of another split tests other images: pairing it with this fold 0 would mislead.
    assert "labels fedavg and local_only split the data differently" in refused(
        "splits", ("local_only",), ("fedavg", "data.split.seed=7")
    )


def test_labels_that_draw_the_same_images_have_one_split_design():
    def design(**split) -> dict:
        return split_design(OmegaConf.create({"split": split}))

    fixed = {"seed": 0, "fractions": [0.6, 0.2, 0.2]}
    # A label written before data.split.folds existed split by the fractions.
    assert design(**fixed) == design(**fixed, folds=None, fold=0, train_share=0.5)
    # Cross-validation ignores the fractions; the seed and the number of folds it does not.
    crossed = {"seed": 0, "folds": 5, "fold": 1}
    assert design(**crossed, fractions=[0.6, 0.2, 0.2]) == design(
        **crossed, fractions=[0.8, 0.1, 0.1]
    )
    assert design(**crossed) != design(**{**crossed, "folds": 3})
    assert design(**fixed) != design(**{**fixed, "seed": 1})


def _scored(label: str, regime: str, fold: int, rows: dict, share: float = 1.0) -> dict:
    """A finished run of one seed at hospital a: its rows' segmenter score, both metrics."""
    return {
        "label": label,
        "regime": regime,
        "fold": fold,
        "seed": 0,
        "hospitals": ["a"],
        "config": {"training": {"data": {"split": {"train_share": share}}}},
        "rows": [
            {"row": row, "cells": {"a": {"segmenter": {"class_aware": v, "binary": v}}}}
            for row, v in rows.items()
        ],
    }


# Folds 0-2 are hard, 3-4 easy: a row averaged over other folds than another's moves by 10+.
FOLD_SCORES = {0: 0.50, 1: 0.52, 2: 0.54, 3: 0.80, 4: 0.82}


def test_verdicts_compare_rows_on_the_runs_both_have():
    # FedAvg is 2 points above local-only on every fold but finished folds 0-2 only.
    results = [
        _scored("local_only", "local_only", f, {"local_only (a)": v})
        for f, v in FOLD_SCORES.items()
    ]
    results += [
        _scored("fedavg", "fedavg", f, {"fedavg": FOLD_SCORES[f] + 0.02}) for f in (0, 1, 2)
    ]
    ds = Dataset(Path("."), OmegaConf.create({"name": "toy"}), ["a"], [], results)
    lines = "\n".join(verdicts(ds))
    assert "fedavg beat local-only trained here (54.0 vs 52.0 on 3 shared runs)." in lines
    assert "on 1 of 1 test splits" in lines


def test_a_learning_curve_row_compares_its_shares_on_the_runs_it_has_at_every_share():
    whole = [
        _scored("local_only", "local_only", f, {"local_only (a)": v})
        for f, v in FOLD_SCORES.items()
    ]
    whole += [_scored("fedavg", "fedavg", f, {"fedavg": v}) for f, v in FOLD_SCORES.items()]
    whole += [_scored("supervised", "supervised", f, {"supervised (a)": 0.9}) for f in FOLD_SCORES]
    # FedAvg on a quarter of the images is as good as on all, but finished folds 0 and 1 only;
    # the ceiling at a quarter is the one row of its regime named by a hospital.
    curve = [
        _scored("local_only_q", "local_only", f, {"local_only (a)": v - 0.01}, 0.25)
        for f, v in FOLD_SCORES.items()
    ]
    curve += [_scored("fedavg_q", "fedavg", f, {"fedavg_q": FOLD_SCORES[f]}, 0.25) for f in (0, 1)]
    curve += [_scored("supervised_q", "supervised", 0, {"supervised (a)": 0.8}, 0.25)]
    ds = Dataset(Path("."), OmegaConf.create({"name": "toy"}), ["a"], [], whole, curve=curve)
    table = learning_curve_table(ds)
    assert "| fedavg | a | 51.0 ± 1.4 (2) | 51.0 ± 1.4 (2) |" in table
    assert "| local_only (a) | a | 62.6 ± 16.0 (5) | 63.6 ± 16.0 (5) |" in table
    assert "| supervised (a) | a | 80.0 ± 0.0 (1) | 90.0 ± 0.0 (1) |" in table
    assert "| supervised | supervised |" not in table


def test_a_label_keeps_every_command_that_ran_under_it(tmp_path, fake_training):
    assert _experiment(tmp_path, "local_only", "seeds=[0]") == 0
    assert _experiment(tmp_path, "local_only", "seeds=[1]") == 0
    assert _experiment(tmp_path, "local_only", "seeds=[1]") == 0  # a rerun adds no line
    text = write_report([tmp_path / "runs"], tmp_path / "E.md", tmp_path / "figures", None)
    commands = text.split("```bash\n")[1].split("\n```")[0].splitlines()
    assert len(commands) == 2
    assert commands[0].endswith("'seeds=[0]'") and commands[1].endswith("'seeds=[1]'")


def test_a_report_that_fails_part_way_leaves_the_earlier_report_and_figures(
    tmp_path, fake_training, monkeypatch
):
    assert _experiment(tmp_path, "local_only") == 0
    output, figures = tmp_path / "E.md", tmp_path / "figures"
    write_report([tmp_path / "runs"], output, figures, None)
    before = {p.name: p.read_bytes() for p in [output, *figures.iterdir()]}
    assert _experiment(tmp_path, "local_only", "seeds=[5]") == 0  # new scores: a new matrix

    def overlays_of_a_removed_run(ds, path):
        raise FileNotFoundError("a run's files were removed since it finished")

    monkeypatch.setattr(report, "plot_overlays", overlays_of_a_removed_run)
    with pytest.raises(FileNotFoundError):  # drawn after the matrix and the curves
        write_report([tmp_path / "runs"], output, figures, None)
    assert {p.name: p.read_bytes() for p in [output, *figures.iterdir()]} == before


def test_a_report_of_runs_dirs_without_finished_runs_is_one_line(tmp_path, fake_training):
    def refused(runs: Path) -> str:
        with pytest.raises(JobError) as error:
            write_report([runs], tmp_path / "E.md", tmp_path / "figures", None)
        return str(error.value)

    assert "no w3s-experiment runs" in refused(tmp_path / "empty")
    assert _experiment(tmp_path, "local_only", "folds=[0]", "seeds=[0]") == 0
    (tmp_path / "runs" / "local_only" / "fold_0" / "seed_0" / "results.json").unlink()  # stopped
    assert "no finished run" in refused(tmp_path / "runs")


def test_a_report_reads_runs_made_before_runs_recorded_their_config(tmp_path, fake_training):
    assert _experiment(tmp_path, "local_only", "folds=[0]", "seeds=[0]") == 0
    results = tmp_path / "runs" / "local_only" / "fold_0" / "seed_0" / "results.json"
    older = json.loads(results.read_text())
    del older["config"]
    results.write_text(json.dumps(older))
    text = write_report([tmp_path / "runs"], tmp_path / "E.md", tmp_path / "figures", None)
    assert "| local_only (hospital_a) |" in text


def test_a_half_finished_run_keeps_only_a_federated_model_it_finished(tmp_path):
    out = tmp_path / "seed_0"
    for name in ("train/global/final_model.pt", "train/global/config.yaml", "train/a/x.pt", "e"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("")
    runner.clear_unfinished(out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "train",
        "train/global",
        "train/global/config.yaml",
        "train/global/final_model.pt",
    ]
    (out / "train/global/final_model.pt").unlink()  # killed while training: nothing to keep
    runner.clear_unfinished(out)
    assert not out.exists()
    runner.clear_unfinished(out)  # nothing there: nothing to do


def test_a_run_counts_as_finished_only_with_a_readable_results_file(tmp_path):
    assert finished_results(tmp_path) is None
    (tmp_path / "results.json").write_text('{"rows": [')  # cut short
    assert finished_results(tmp_path) is None
    (tmp_path / "results.json").write_text('{"rows": [], "seconds": 1.0}')
    assert finished_results(tmp_path) == {"rows": [], "seconds": 1.0}


def test_report_reads_folds_and_pairs_fedavg_with_local_only(tmp_path, fake_training):
    for regime in ("local_only", "fedavg"):
        assert _experiment(tmp_path, regime) == 0
    output = tmp_path / "EXPERIMENTS.md"
    text = write_report([tmp_path / "runs"], output, tmp_path / "figures", None)
    assert "Seeds [0, 1]; folds [0, 2] of a 3-fold cross-validation" in text
    assert "Compute: 8 runs," in text and "fedavg: 4 runs" in text
    for hospital in ("hospital_a", "hospital_b"):
        assert (
            f"| fedavg | {hospital} | segmenter | binary | 2 | +10.0 | [+10.0, +10.0] "
            "| fedavg better |" in text
        )
    assert "| local_only (hospital_a) | 30.0 ± 0.0 / 52.0 ± 1.6 |" in text


def test_a_learning_curve_stays_out_of_the_matrix_and_pairs_its_regimes_per_share(
    tmp_path, fake_training
):
    for regime in ("local_only", "fedavg"):
        assert _experiment(tmp_path, regime) == 0
        half = (f"label={regime}_half", "data.split.train_share=0.5")
        assert _experiment(tmp_path, regime, *half) == 0
    text = write_report(
        [tmp_path / "runs"], tmp_path / "EXPERIMENTS.md", tmp_path / "figures", None
    )
    assert "Compute: 16 runs," in text and "fedavg_half: 4 runs" in text
    # The matrix and its pairs hold the full-share runs only, as without the curve.
    assert "| local_only (hospital_a) | 30.0 ± 0.0 / 52.0 ± 1.6 |" in text
    assert "| fedavg | hospital_a | segmenter | binary | 2 | +10.0 |" in text
    # The curve: a local-only model at its own hospital, the shared model (named by its
    # regime, its labels differ per share) at both.
    assert "| local_only (hospital_a) | hospital_a | 42.0 ± 1.6 (4) | 52.0 ± 1.6 (4) |" in text
    assert "| local_only (hospital_a) | hospital_b |" not in text
    assert "| fedavg | hospital_b | 52.0 ± 1.6 (4) | 62.0 ± 1.6 (4) |" in text
    paired = text.split("Paired at share 0.5")[1]
    assert "| fedavg_half | hospital_b | segmenter | binary | 2 | +10.0 |" in paired


def test_a_curve_on_fewer_folds_compares_every_share_on_those_folds_only(tmp_path, fake_training):
    assert _experiment(tmp_path, "local_only") == 0  # folds 0 and 2
    half = ("label=local_only_half", "data.split.train_share=0.5")  # folds 0 and 2
    assert _experiment(tmp_path, "local_only", *half) == 0
    quarter = ("label=local_only_quarter", "data.split.train_share=0.25", "folds=[0]")
    assert _experiment(tmp_path, "local_only", *quarter) == 0
    text = write_report([tmp_path / "runs"], tmp_path / "E.md", tmp_path / "figures", None)
    curve = text.split("| local_only (hospital_a) | hospital_a |")[1].splitlines()[0]
    assert curve.count("(2)") == 3  # every share on fold 0's two seeds, none on 4 runs


def test_two_chains_on_one_dataset_keep_their_figures_and_name_their_post_training(
    tmp_path, fake_training
):
    runs = {"default": "postprocess=[]", "learned": "postprocess=['pseudo=threshold']"}
    for folder, chain in runs.items():
        overrides = [*TINY_EXPERIMENT, "regime=fedavg", chain, f"runs_dir={tmp_path / folder}"]
        assert runner.run_experiment(compose_config(overrides, "w3s_experiment"), overrides) == 0
    text = write_report(
        [tmp_path / f for f in runs], tmp_path / "EXPERIMENTS.md", tmp_path / "figures", None
    )
    assert "Post-training (`w3s-postprocess`): the defaults for fedavg." in text
    assert "Post-training (`w3s-postprocess`): `pseudo=threshold` for fedavg." in text
    for folder in runs:
        assert f"hospitals: hospital_a, hospital_b): runs `{folder}`" in text
        assert (tmp_path / "figures" / f"synthetic_{folder}_matrix.png").is_file()
        assert f"(figures/synthetic_{folder}_matrix.png)" in text


def test_folds_and_shares_do_not_count_as_different_post_training_configs(tmp_path):
    def scored(label: str, fold: int, share: float | None = None, **segmenter) -> None:
        folder = tmp_path / label / f"fold_{fold}" / "seed_0" / "eval" / label / "a"
        folder.mkdir(parents=True)
        split = {"folds": 5, "fold": fold} | ({} if share is None else {"train_share": share})
        cfg = {"data": {"split": split}, "segmenter": segmenter, "seed": 0}
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))

    for fold in range(3):
        scored("fedavg", fold, input_size=128)
    scored("fedavg_share25", 0, share=0.25, input_size=128)
    scored("fedavg_share100", 0, share=1.0, input_size=128)
    assert post_training_variants(tmp_path, {}) == 1
    scored("local_only", 0, input_size=192)
    assert post_training_variants(tmp_path, {}) == 2
    # Another chain on purpose (w3s-experiment's postprocess=[...]) is compared with itself.
    assert post_training_variants(tmp_path, {"local_only": ["segmenter.input_size=192"]}) == 1


def test_post_training_settings_a_headless_model_cannot_serve_are_refused_before_training(
    tmp_path,
):
    def seed_run(training: str, regime: str, *postprocess: str) -> SeedRun:
        kind = compose_config([f"regime={regime}"], "w3s_experiment").regime
        return SeedRun(compose_config([training]), kind, regime, [], list(postprocess), 0, tmp_path)

    with pytest.raises(JobError) as refused:
        runner.check_postprocess_fits_model(seed_run("experiment=paper", "fedavg"))
    assert "localization.source=foreground" in str(refused.value)
    assert "personalize.train.levers.foreground.compact=1.0" in str(refused.value)
    assert "postprocess=[localization=fused,personalize.epochs=0]" in str(refused.value)
    with pytest.raises(JobError, match="compact=1.0 need the head"):
        runner.check_postprocess_fits_model(
            seed_run("experiment=paper", "fedavg", "localization=fused")
        )
    for fitted in (
        seed_run("experiment=paper", "fedavg", "localization=fused", "personalize.epochs=0"),
        seed_run("experiment=paper", "fedavg", "localization=fused", "~personalize.train.levers"),
        seed_run("experiment=paper", "supervised"),  # no MCT model to post-train
        seed_run("seed=0", "fedavg"),  # the default model has the head
    ):
        runner.check_postprocess_fits_model(fitted)


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (
            ["postprocess=['segmenter.epochz=3']"],
            "segmenter.epochz=3: no such setting (did you mean",
        ),
        (["postprocess=['pseudo=nope']"], "Could not find 'pseudo/nope'"),
        (["postprocess=['segmenter.members=two']"], "segmenter.members=two: expected a whole"),
        (["postprocess=abc"], "postprocess=abc: expected a list of overrides"),
        (["regime.proximal_mu=abc"], "regime.proximal_mu=abc: expected a number"),
        (["train.proximal_mu=0.1"], "train.proximal_mu: the regime's setting"),
        (
            ["+train.per_hospital.hospital_a.proximal_mu=0.1"],
            "train.per_hospital.hospital_a.proximal_mu: the regime's setting",
        ),
        (["regime=personalized", "regime.finetune_lr_scale=0"], "regime.finetune_lr_scale=0"),
        (["seeds=abc"], "seeds=abc: expected a list of whole numbers"),
        (["seeds=0"], "seeds=0: expected a list of whole numbers"),
        (["seeds=[]"], "seeds=[]: expected a list of whole numbers"),
        (["seeds=[a]"], "seeds=['a']: expected a list of whole numbers"),
        (["folds=[0]", "data.split.folds=abc"], "data.split.folds=abc: expected a whole number"),
        (["folds=[x]", "data.split.folds=5"], "folds=['x']: expected a list of whole numbers"),
        (["folds=0"], "folds=0: expected a list of whole numbers"),
        (["folds=false"], "folds=False: expected a list of whole numbers"),
        (["folds=null", "data.split.fold=2"], "data.split.folds=3 needs folds=[...]"),
        (["label=fedavg/fp16"], "label=fedavg/fp16: expected a folder name"),
        (["label=.."], "label=..: expected a folder name"),
        (["label="], "label=: expected a folder name"),
        (["seed=7"], "give the seeds as seeds=[...]"),
    ],
)
def test_a_bad_post_training_override_or_regime_value_stops_the_experiment_before_any_run(
    tmp_path, fake_training, capsys, bad, said
):
    overrides = [*TINY_EXPERIMENT, "regime=fedprox", f"runs_dir={tmp_path}", *bad]
    assert runner.main(overrides) == 2
    error = capsys.readouterr().err.strip()
    assert said in error and len(error.splitlines()) == 1
    assert fake_training["train"] == [] and list(tmp_path.iterdir()) == []


def test_a_bad_training_setting_stops_the_experiment_before_any_run(tmp_path, capsys):
    status = runner.main(["regime=fedavg", "federation.rounds=abc", f"runs_dir={tmp_path}"])
    assert status == 2
    assert "federation.rounds=abc: expected a whole number" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing trained


def test_a_report_of_learning_curve_runs_only_is_refused_in_one_line(tmp_path, fake_training):
    half = ("label=local_only_half", "data.split.train_share=0.5")
    assert _experiment(tmp_path, "local_only", *half) == 0
    with pytest.raises(JobError, match="only learning-curve runs"):
        write_report([tmp_path / "runs"], tmp_path / "E.md", tmp_path / "figures", None)


def test_an_unreadable_run_is_left_out_of_the_report_by_name(tmp_path, fake_training, caplog):
    assert _experiment(tmp_path, "local_only") == 0
    broken = tmp_path / "runs" / "local_only" / "fold_2" / "seed_1" / "results.json"
    broken.write_text('{"label": "local_only", "rows": [')
    with caplog.at_level(logging.WARNING):
        text = write_report([tmp_path / "runs"], tmp_path / "E.md", tmp_path / "figures", None)
    assert f"{broken}: unreadable" in caplog.text
    assert "Compute: 3 runs," in text


def test_runs_dirs_of_one_folder_name_keep_their_own_figures(tmp_path, fake_training):
    for parent in ("old", "new"):
        overrides = [*TINY_EXPERIMENT, "regime=fedavg", f"runs_dir={tmp_path / parent / 'runs'}"]
        assert runner.run_experiment(compose_config(overrides, "w3s_experiment"), overrides) == 0
    runs = [tmp_path / parent / "runs" for parent in ("old", "new")]
    text = write_report(runs, tmp_path / "E.md", tmp_path / "figures", None)
    for number in (1, 2):
        assert (tmp_path / "figures" / f"synthetic_runs_{number}_matrix.png").is_file()
        assert f"(figures/synthetic_runs_{number}_matrix.png)" in text
