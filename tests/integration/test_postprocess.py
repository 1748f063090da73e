"""End-to-end runs of ``w3s-postprocess`` and ``w3s-predict`` as a user starts them.

Each test trains its own tiny MCT checkpoint for a few steps (no Flower run), then runs the job
as a subprocess from an empty working directory, which must stay empty.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from common.augment import train_cache_size
from common.checkpoint import load_checkpoint, save_atomic
from common.config import compose_config
from common.data import split_digest, split_tensors
from common.localization import load_maps
from common.model import create_mct_model
from common.segmenter import SegmenterEnsemble, load_segmenter
from common.training import train_local
from post_training.artifacts import read_label_png
from tests.conftest import WBC_DEV

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
SYNTHETIC = [
    "data.hospitals.hospital_a.num_images=30",
    "data.hospitals.hospital_a.image_size=48",
]
REAL = ["data=wbc_zxaoyou", f"data.root={WBC_DEV}"]
# A job small enough for 2 CPU cores: maps at 32 px, one epoch of the smallest segmenter.
TINY_JOB = [
    "segmenter=lraspp",
    "segmenter.epochs=1",
    f"segmenter.input_size={SIZE}",
    "batch_size=8",
    "evaluation.thresholds=[0.2,0.4,0.6]",
    "evaluation.disk_radii=[0.5,0.7]",
]
STAGES = {
    "maps": "maps (seeds)",
    "pseudo_masks": "pseudo-masks (stain_grow)",
    "segmenter": "segmenter (lraspp_mobilenet_v3_large)",
    "disk": "baseline: centred disk",
    "otsu": "baseline: Otsu",
}


def make_checkpoint(path: Path, data_overrides: list[str], hospital: str) -> Path:
    """Train a 32 px tiny MCT for a few steps on one hospital; save it like final_model.pt."""
    cfg = compose_config([*data_overrides, f"model.img_size={SIZE}"])
    torch.manual_seed(0)
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    train_cfg = {**OmegaConf.to_container(cfg.train), "local_epochs": 2, "batch_size": 8}
    data = split_tensors(cfg.data, hospital, "train", train_cache_size(SIZE))
    train_local(
        model, data, train_cfg, start_epoch=0, total_epochs=2, device=torch.device("cpu"), seed=0
    )
    payload = {
        "state_dict": model.state_dict(),
        "round": 1,
        "model": OmegaConf.to_container(cfg.model),
        "classes": list(cfg.data.classes),
        "config": OmegaConf.to_yaml(cfg),
        # What the hospital sent with its training replies: post-training checks it.
        "splits": {hospital: [split_digest(cfg.data, hospital)]},
    }
    return save_atomic(payload, path)


def run_job(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)},
    )


def job_at_hospital_a(root: Path, out: Path, cwd: Path, *extra: str) -> tuple[int, str]:
    """Status and log of ``w3s-postprocess`` on the synthetic run: the tiny job plus ``extra``."""
    result = run_job(
        "post_training.postprocess",
        [
            f"checkpoint={root / 'run' / 'final_model.pt'}",
            "hospital=hospital_a",
            f"output_dir={out}",
            *SYNTHETIC,
            *TINY_JOB,
            *extra,
        ],
        cwd,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    checkpoint = make_checkpoint(root / "run" / "final_model.pt", SYNTHETIC, "hospital_a")
    out = root / "out"
    cwd = root / "cwd"
    result = run_job(
        "post_training.postprocess",
        [
            f"checkpoint={checkpoint}",
            "hospital=hospital_a",
            f"output_dir={out}",
            *SYNTHETIC,
            *TINY_JOB,
            # every pixel: a segmenter trained for one epoch is sure of none
            "self_training.rounds=1",
            "self_training.confidence=0",
        ],
        cwd,
    )
    return result, out, cwd, root


def check_outputs(out: Path, total: int, log: str) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    images = metrics["images"]
    assert sum(images.values()) == total and min(images.values()) > 0
    for split, count in images.items():
        maps = sorted((out / "maps" / split).glob("*.npz"))
        assert len(maps) == count, split
        loaded = load_maps(maps[0])
        assert loaded.shape[0] == 5 and loaded.min() >= 0 and loaded.max() <= 1
        masks = sorted((out / "pseudo_masks" / split).glob("*.png"))
        assert len(masks) == count
        assert set(np.unique(read_label_png(masks[0]))) <= set(range(6))
        assert len(list((out / "pseudo_masks" / "overlays" / split).glob("*.png"))) == count
    for split in ("val", "test"):
        assert len(list((out / "predictions" / split).glob("*.png"))) == images[split]
    assert (out / "figure.png").is_file() and (out / "config.yaml").is_file()
    model, seg_cfg, classes = load_segmenter(out / "segmenter.pt")
    assert seg_cfg["input_size"] == SIZE and len(classes) == 5

    assert {stage["key"]: stage["title"] for stage in metrics["stages"]} == STAGES
    assert [stage["key"] for stage in metrics["stages"]] == list(STAGES)
    for stage in metrics["stages"]:
        for split in ("val", "test"):
            assert 0 <= stage[split]["binary_miou"] <= 1
            assert 0 <= stage[split]["class_aware_miou"] <= 1
            # Only the segmenter names the cell types; the other stages copy the image's label.
            named = stage[split].get("cell_type_accuracy")
            assert (named is not None) == (stage["key"] == "segmenter"), stage["key"]
            assert named is None or 0 <= named <= 1
            if named is not None:  # every image of the split is counted once, by its true type
                confusion = np.array(stage[split]["cell_type_confusion"])
                assert confusion.shape == (5, 6) and confusion.sum() == images[split]
                assert np.trace(confusion[:, 1:]) / images[split] == pytest.approx(named)
    seeds = metrics["stages"][0]
    assert seeds["choice"]["background"] in (0.2, 0.4, 0.6)
    # the site fine-tuned the global model and kept whichever made the better validation maps
    personal = metrics["personalize"]
    assert personal["images"] == images["train"]
    assert personal["copies"] == 3  # the shipped soup of three fine-tuned copies
    # 10 epochs, raised to make personalize.min_steps (50) steps of the run's batch (16)
    assert personal["epochs"] == max(10, -(-50 // max(images["train"] // 16, 1)))
    kept, other = personal["kept"], {"global": "personalized", "personalized": "global"}
    assert seeds["choice"]["model"] == kept
    val = personal["val_maps"]
    assert val[kept]["class_aware_miou"] >= val[other[kept]]["class_aware_miou"]
    assert seeds["val"] == val[kept]
    assert (out / "personalized_model.pt").is_file() == (kept == "personalized")
    if kept == "personalized":  # the fine-tune keeps the split it was trained on
        splits = load_checkpoint(out / "personalized_model.pt")["splits"]
        assert list(splits) == [metrics["hospital"]] and len(splits[metrics["hospital"]]) == 1
    pseudo = metrics["stages"][1]  # the shipped pseudo.tune list, chosen on validation
    assert pseudo["choice"]["cell_fraction"] in (0.15, 0.2, 0.25, 0.3)
    text = (out / "metrics.md").read_text()
    stages_table, cell_types = text.split("\n\n")[2], text.split("(columns):\n\n")[1]
    assert stages_table.count("\n| ") == len(STAGES)  # a row per stage under the header
    assert cell_types.startswith("| true \\ named | neutrophil |")
    assert cell_types.count("\n| ") == 5  # a row per class
    assert "metrics of" in log
    return metrics


def test_postprocess_on_synthetic_data(synthetic_run):
    result, out, cwd, root = synthetic_run
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    metrics = check_outputs(out, 30, log)
    assert metrics["hospital"] == "hospital_a" and metrics["round"] == 1
    # the segmenter that was scored is the second, trained on the first one's predictions
    assert metrics["stages"][2]["choice"]["self-training rounds"] == 1
    assert "self-training round 1/1" in log
    # metrics may leave the site: no paths, no sample ids
    text = (out / "metrics.json").read_text()
    assert str(root) not in text and "synthetic/" not in text
    assert list(cwd.iterdir()) == []  # Hydra wrote nothing into the working directory


def test_without_the_fine_tune_the_global_models_maps_are_used(synthetic_run, tmp_path):
    _, _, _, root = synthetic_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "personalized_model.pt").write_bytes(b"an earlier run's copy")
    (out / "config.yaml").write_text(f"checkpoint: {root}/final_model.pt\nhospital: hospital_a\n")
    status, log = job_at_hospital_a(root, out, tmp_path / "cwd", "personalize.epochs=0")
    assert status == 0, log[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["personalize"] is None and "model" not in metrics["stages"][0]["choice"]
    assert not (out / "personalized_model.pt").exists()  # not the model of these maps


def test_an_ensemble_of_segmenters_is_trained_and_saved_whole(synthetic_run, tmp_path):
    _, _, _, root = synthetic_run
    out = tmp_path / "out"
    status, log = job_at_hospital_a(
        root, out, tmp_path / "cwd", "personalize.epochs=0", "segmenter.members=2"
    )
    assert status == 0, log[-4000:]
    assert "segmenter 1 of 2 (seed 0)" in log and "segmenter 2 of 2 (seed 1)" in log
    model, seg_cfg, _ = load_segmenter(out / "segmenter.pt")
    assert isinstance(model, SegmenterEnsemble) and seg_cfg["members"] == 2
    first, second = (member.state_dict() for member in model.members)
    assert not all(torch.equal(first[key], second[key]) for key in first)


def test_predict_segments_new_images_and_names_corrupt_files(synthetic_run, tmp_path):
    _, out, _, _ = synthetic_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(inputs / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(inputs / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(inputs / "broken.png")
    data = (inputs / "broken.png").read_bytes()
    (inputs / "broken.png").write_bytes(data[: len(data) // 2])
    (inputs / "empty.bmp").write_bytes(b"")
    result = run_job(
        "post_training.predict",
        [f"segmenter={out / 'segmenter.pt'}", f"input={inputs}", f"output={tmp_path / 'out'}"],
        tmp_path / "cwd",
    )
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-4000:]
    assert "broken.png" in log and "empty.bmp" in log
    written = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert written == ["a.png.png", "b.jpg.png"]  # the whole input name, so never a clash
    assert read_label_png(tmp_path / "out" / "a.png.png").shape == (40, 50)
    assert (tmp_path / "out" / "overlays" / "b.jpg.png").is_file()
    assert list((tmp_path / "cwd").iterdir()) == []


def test_clear_errors_for_missing_checkpoint_and_unknown_hospital(tmp_path):
    missing = tmp_path / "nowhere" / "final_model.pt"
    result = run_job(
        "post_training.postprocess",
        [f"checkpoint={missing}", "hospital=hospital_a"],
        tmp_path / "a",
    )
    assert result.returncode == 2
    assert f"checkpoint={missing}: file not found" in result.stdout + result.stderr

    result = run_job(
        "post_training.postprocess",
        [f"checkpoint={missing}", "hospital=hospital_z"],
        tmp_path / "b",
    )
    log = result.stdout + result.stderr
    assert result.returncode == 2
    assert "hospital=hospital_z is not in data.hospitals" in log and "hospital_a" in log

    # a bad setting is named before the checkpoint is even looked for (each one in
    # tests/unit/test_postprocess_config.py; here that the command exits with it)
    bad = "personalize.copies=0"
    result = run_job(
        "post_training.postprocess",
        [f"checkpoint={missing}", "hospital=hospital_a", bad],
        tmp_path / "bad",
    )
    assert result.returncode == 2
    assert bad in result.stdout + result.stderr

    result = run_job(
        "post_training.predict",
        [f"segmenter={missing}", f"input={tmp_path}", f"output={tmp_path / 'o'}"],
        tmp_path / "c",
    )
    assert result.returncode == 2
    assert f"segmenter={missing}: file not found" in result.stdout + result.stderr


def test_a_split_other_than_the_training_runs_is_refused(synthetic_run, tmp_path):
    root = synthetic_run[3]
    out = tmp_path / "out"
    status, log = job_at_hospital_a(root, out, tmp_path / "cwd", "data.split.folds=5")
    assert status == 2, log[-2000:]
    assert "was trained with data.split" in log and "folds=5" in log
    assert not out.exists()


def test_postprocess_on_real_dev_data(wbc_root, tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = make_checkpoint(run_dir / "final_model.pt", REAL, "dataset2")
    result = run_job(
        "post_training.postprocess",
        [
            f"checkpoint={checkpoint}",
            "hospital=dataset2",
            *REAL,
            *TINY_JOB,
            "evaluation.otsu_channels=[inverted_green]",
        ],
        tmp_path / "cwd",
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    out = run_dir / "postprocess" / "dataset2"  # the default output dir
    metrics = check_outputs(out, 52, log)
    disk = metrics["stages"][3]
    assert disk["test"]["binary_miou"] > 0.6  # a centred disk covers most single-cell crops
    masks = sorted((out / "pseudo_masks" / "test").glob("*.png"))
    assert read_label_png(masks[0]).shape == (300, 300)  # native size of Dataset 2


def test_stage_grid_shows_every_stage_of_a_split(synthetic_run):
    _, out, _, root = synthetic_run
    checkpoint = root / "run" / "final_model.pt"
    args = [f"checkpoint={checkpoint}", "hospital=hospital_a", f"output_dir={out}", *SYNTHETIC]
    result = run_job("experiments.stage_grid", [*args, "grid.num_images=3"], root / "cwd_grid")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with Image.open(out / "stages_test.png") as grid:
        # 8 columns (image, truth, 4 maps, pseudo-mask, segmenter) x 3 rows of 128 px tiles
        assert grid.size == (8 * 130 - 2, 16 + 3 * 130 - 2)
    assert "missing" not in result.stdout + result.stderr  # read back the job's label maps


def test_ablation_writes_one_row_per_variant(synthetic_run, tmp_path):
    _, _, _, root = synthetic_run
    variants = tmp_path / "variants.yaml"
    variants.write_text(
        'variants:\n  "threshold": [pseudo=threshold]\n  "stain grow": [pseudo=stain_grow]\n'
    )
    out = tmp_path / "ablation"
    result = run_job(
        "experiments.ablation",
        [
            f"variants={variants}",
            f"checkpoint={root / 'run' / 'final_model.pt'}",
            "hospital=hospital_a",
            f"output_dir={out}",
            *SYNTHETIC,
            *TINY_JOB,
        ],
        tmp_path / "cwd",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = json.loads((out / "ablation.json").read_text())
    assert [row["title"] for row in rows] == ["threshold", "stain grow"]
    assert all(0 <= row["accuracy"]["test"] <= 1 for row in rows)
    table = (out / "ablation.md").read_text()
    assert table.count("**") == 2 and "baseline: centred disk" in table
    assert (out / "stain_grow" / "metrics.json").is_file()
    assert (
        "stain_grow"
        in json.loads((out / "stain_grow" / "metrics.json").read_text())["stages"][1]["title"]
    )

    result = run_job(
        "experiments.ablation", ["variants=nope", "hospital=hospital_a"], tmp_path / "c"
    )
    assert result.returncode == 2 and "levers" in result.stdout + result.stderr
