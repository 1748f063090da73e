"""Verification: every broken file is reported in one pass, by name and kind; the CLI exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageFile

from common.config import compose_config
from common.data import DataVerificationError, load_hospital, verify_data
from common.errors import JobError
from post_training.verify import main

REAL_ROOT = Path(__file__).resolve().parents[2].parent / "shared/data/segmentation_WBC-dev"
FIVE = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]


@pytest.fixture
def broken_tree(tmp_path):
    """Copy nine real Dataset 1 samples and break seven of them, each in its own way."""
    if not REAL_ROOT.is_dir():
        pytest.skip(f"real zxaoyou data not found at {REAL_ROOT}")
    source, target = REAL_ROOT / "Dataset 1", tmp_path / "Dataset 1"
    target.mkdir()
    ids = sorted(int(p.stem) for p in source.glob("*.bmp"))[:9]
    for i in ids:
        for suffix in (".bmp", ".png"):
            shutil.copy(source / f"{i:03d}{suffix}", target / f"{i:03d}{suffix}")
    names = [f"{i:03d}" for i in ids]
    truncated, empty, unlabelled, class9, small_mask, no_mask, bad_mask = names[:7]
    data = (target / f"{truncated}.bmp").read_bytes()
    (target / f"{truncated}.bmp").write_bytes(data[: len(data) // 2])
    (target / f"{empty}.bmp").write_bytes(b"")
    Image.open(target / f"{small_mask}.png").resize((50, 50)).save(target / f"{small_mask}.png")
    (target / f"{no_mask}.png").unlink()
    (target / f"{bad_mask}.png").write_bytes(b"not a png at all")
    twin = f"{ids[7]}.bmp"  # the id of {ids[7]:03d}.bmp again, unpadded: whose label row?
    shutil.copy(target / f"{ids[7]:03d}.bmp", target / twin)
    rows = [f"{i},{9 if f'{i:03d}' == class9 else 1}" for i in ids if f"{i:03d}" != unlabelled]
    rows.append("999,2")  # a label row whose image is missing
    labels = "image ID,class label\r\n" + "\r\n".join(rows) + "\r\n"
    (tmp_path / "Class Labels of Dataset 1.csv").write_text(labels)
    expected = {
        (f"{truncated}.bmp", "truncated_image"),
        (f"{empty}.bmp", "unreadable_image"),
        (f"{unlabelled}.bmp", "missing_label"),
        (f"{class9}.bmp", "unknown_class"),
        (f"{small_mask}.png", "mask_size_mismatch"),
        (f"{no_mask}.bmp", "missing_mask"),
        (f"{bad_mask}.png", "unreadable_mask"),
        ("999.bmp", "unreadable_image"),
        (twin, "missing_label"),
    }
    return tmp_path, expected


def zxaoyou_cfg(root: Path):
    return compose_config(["data=wbc_zxaoyou", f"data.root={root}"]).data


def test_verify_reports_every_problem_in_one_call(broken_tree):
    root, expected = broken_tree
    problems = verify_data(zxaoyou_cfg(root), ["dataset1"])
    assert {(Path(p.path).name, p.kind) for p in problems} == expected
    assert all(p.hospital == "dataset1" and Path(p.path).is_absolute() for p in problems)
    class9 = next(p for p in problems if p.kind == "unknown_class")
    assert "'9'" in class9.detail and "row" in class9.detail
    missing = next(p for p in problems if Path(p.path).name == "999.bmp")
    assert "listed in labels but file missing" in missing.detail


def test_a_label_file_in_a_legacy_encoding_is_one_problem_naming_it(broken_tree):
    root, _ = broken_tree
    labels = root / "Class Labels of Dataset 1.csv"
    labels.write_bytes("image ID,class label\r\n1,n\xe9utrophil\r\n".encode("cp1252"))
    problems = verify_data(zxaoyou_cfg(root), ["dataset1"])
    [problem] = [p for p in problems if Path(p.path) == labels]  # not one per image
    assert problem.kind == "missing_label"
    assert not any("no row for image id" in p.detail for p in problems)
    assert "not UTF-8 text" in problem.detail


def test_a_label_file_that_cannot_be_read_or_parsed_is_one_problem_naming_it(
    broken_tree, monkeypatch
):
    root, _ = broken_tree
    labels = root / "Class Labels of Dataset 1.csv"
    labels.write_text("image ID,class label\n1," + "x" * 200_000 + "\n", encoding="utf-8")
    [problem] = [p for p in verify_data(zxaoyou_cfg(root), ["dataset1"]) if Path(p.path) == labels]
    assert problem.kind == "missing_label" and "not a CSV label file" in problem.detail
    read_text = Path.read_text

    def denied(path, *args, **kwargs):
        if path == labels:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    [problem] = [p for p in verify_data(zxaoyou_cfg(root), ["dataset1"]) if Path(p.path) == labels]
    assert problem.detail == "the label file cannot be read: Permission denied"


def test_files_in_hidden_folders_are_not_data(tmp_path):
    for folder in ("Neutrophil/batch1", "Neutrophil/.thumbnails", ".trash/Neutrophil"):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "a.png")
    data = load_hospital(class_folders_cfg(tmp_path), "h")
    assert data.sample_ids == ["Neutrophil/batch1/a.png"]
    # One extension may be given as text, not only as a list.
    assert load_hospital(class_folders_cfg(tmp_path, extensions=".png"), "h").sample_ids == [
        "Neutrophil/batch1/a.png"
    ]


def test_a_hospital_name_read_as_a_number_is_named():
    cfg = OmegaConf.create({"classes": FIVE, "hospitals": {2019: {"format": "synthetic"}}})
    with pytest.raises(JobError, match="hospital name 2019 must be text; quote it: '2019'"):
        verify_data(cfg)


@pytest.mark.parametrize("name", ["..", ".", "site/a", "site\\a", ""])
def test_a_hospital_name_that_is_no_folder_name_of_its_own_is_named(name):
    # A hospital's name names its folders: '..' would put its pretraining heads (removed when
    # the MCT rounds start) outside the site's state folder.
    cfg = OmegaConf.create({"classes": FIVE, "hospitals": {name: {"format": "synthetic"}}})
    with pytest.raises(JobError, match="must be a folder name of its own"):
        verify_data(cfg)


def test_truncation_is_reported_even_if_pil_was_told_to_pad(broken_tree, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do
    root, expected = broken_tree
    problems = verify_data(zxaoyou_cfg(root), ["dataset1"])
    assert {(Path(p.path).name, p.kind) for p in problems} == expected
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the caller's setting is restored"


def test_load_hospital_raises_with_the_full_report(broken_tree):
    root, expected = broken_tree
    with pytest.raises(DataVerificationError) as caught:
        load_hospital(zxaoyou_cfg(root), "dataset1")
    error = caught.value
    assert {(Path(p.path).name, p.kind) for p in error.problems} == expected
    for name, kind in expected:
        assert name in str(error) and kind in str(error)
    assert str(root) not in error.redacted() and "truncated_image" in error.redacted()


def test_main_returns_1_and_prints_every_problem(broken_tree, capsys):
    root, expected = broken_tree
    assert main(["data=wbc_zxaoyou", f"data.root={root}"]) == 1
    out = capsys.readouterr().out
    for name, kind in expected:
        assert any(name in line and kind in line for line in out.splitlines()), (name, kind)
    assert "Dataset 2" in out and "missing_root" in out, "the absent second subset is reported"


def test_main_on_clean_real_data_returns_0(capsys):
    if not REAL_ROOT.is_dir():
        pytest.skip(f"real zxaoyou data not found at {REAL_ROOT}")
    assert main(["data=wbc_zxaoyou", f"data.root={REAL_ROOT}"]) == 0
    out = capsys.readouterr().out
    assert "dataset1: 151 usable images, masks: yes, ok" in out
    assert "neutrophil 17, lymphocyte 19, monocyte 8, eosinophil 6, basophil 2" in out


def test_main_on_default_synthetic_returns_0(capsys):
    assert main([]) == 0
    assert "hospital_c: 160 usable images" in capsys.readouterr().out


def test_main_without_argv_reads_sys_argv(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("sys.argv", ["w3s-verify", "data=wbc_zxaoyou", f"data.root={tmp_path}"])
    assert main() == 1
    # A folder that is not there has no masks to speak of, not "masks: yes".
    assert "dataset1: 0 usable images, masks: none read, 1 problem(s)" in capsys.readouterr().out


def test_main_bad_override_returns_2(capsys):
    assert main(["data=no_such_dataset"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w3s-verify: ") and "no_such_dataset" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("split", "named"),
    [
        (["data.split.folds=5", "data.split.fold=7"], "fold must be in 0..4"),
        (["data.split.fractions=[0.5,0.5,0.5]"], "fractions"),
    ],
)
def test_a_split_training_would_refuse_is_refused_before_reading(split, named, capsys):
    assert main(split) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w3s-verify: data.split: ") and named in err
    assert len(err.splitlines()) == 1


def class_folders_cfg(root: Path, **extra):
    spec = {"format": "class_folders", "root": str(root), **extra}
    return OmegaConf.create({"classes": FIVE, "hospitals": {"h": spec}})


def test_class_folders_empty_hospital_and_wrong_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    [problem] = verify_data(class_folders_cfg(empty))
    assert (problem.kind, problem.path) == ("empty_hospital", str(empty))

    tree = tmp_path / "tree"
    for folder in ("Neutrophil", "Neutrophils", "promyelocyte"):
        (tree / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tree / folder / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tree / "loose.png")
    problems = verify_data(class_folders_cfg(tree))
    found = {(Path(p.path).name, p.kind) for p in problems}
    assert found == {
        ("Neutrophils", "unknown_class"),
        ("promyelocyte", "unknown_class"),
        ("loose.png", "missing_label"),
    }
    assert all("neutrophil" in p.detail for p in problems if p.kind == "unknown_class")


def test_config_problems_are_collected_not_raised(tmp_path):
    cfg = OmegaConf.create(
        {
            "classes": FIVE,
            "hospitals": {
                "gone": {"format": "class_folders", "root": str(tmp_path / "nope")},
                "typo": {"format": "class_folders", "root": str(tmp_path), "mask_rot": "x"},
                "odd": {"format": "dicom", "root": str(tmp_path)},
                "named": {"format": "class_folders", "root": str(tmp_path), "class_map": "matek"},
                "synth": {"format": "synthetic", "domain": "q", "num_images": 4,
                          "image_size": 32, "seed": 0},
                # These raised a traceback or read the working folder.
                "count": {"format": "class_folders", "root": str(tmp_path), "extensions": 5},
                "mixed": {"format": "class_folders", "root": str(tmp_path),
                          "extensions": ["png", 5]},
                "roots": {"format": "class_folders", "root": ["a", "b"]},
                "blank": {"format": "class_folders", "root": str(tmp_path), "mask_root": ""},
            },
        }
    )  # fmt: skip
    by_hospital = {p.hospital: p for p in verify_data(cfg)}
    assert "extensions must be a suffix or a list of them, got 5" in by_hospital["count"].detail
    assert "got ['png', 5]" in by_hospital["mixed"].detail
    assert "root must be a folder path, got ['a', 'b']" in by_hospital["roots"].detail
    assert "mask_root must be a folder path, got ''" in by_hospital["blank"].detail
    assert by_hospital["gone"].kind == "missing_root"
    assert by_hospital["gone"].path == str(tmp_path / "nope")
    assert "mask_rot" in by_hospital["typo"].detail
    assert "dicom" in by_hospital["odd"].detail
    assert "matek" in by_hospital["named"].detail
    assert "domain" in by_hospital["synth"].detail
    assert {p.kind for p in by_hospital.values()} - {"missing_root"} == {"bad_config"}


def test_a_class_map_of_number_and_name_keys_reads(tmp_path):
    # YAML reads `6:` as a number: the data's cache key sorted them with the names and raised.
    image_folder = tmp_path / "B"
    image_folder.mkdir()
    Image.new("RGB", (8, 8), "white").save(image_folder / "a.png")
    spec = {"format": "class_folders", "root": str(tmp_path)}
    cfg = OmegaConf.create(
        {
            "classes": FIVE,
            "hospitals": {"h": {**spec, "class_map": {6: "basophil", "B": "basophil"}}},
        }
    )
    assert verify_data(cfg) == []


@pytest.mark.parametrize("dataset", ["raabin", "matek19"])
def test_dataset_configs_compose_and_report_missing_root(dataset, tmp_path):
    cfg = compose_config([f"data={dataset}", f"data.root={tmp_path / 'absent'}"]).data
    problems = verify_data(cfg)
    assert [(p.kind, p.path) for p in problems] == [("missing_root", str(tmp_path / "absent"))]
