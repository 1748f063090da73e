"""A hospital's pretraining heads on its own disk: what a resumed run reads back."""

import logging

import torch
from omegaconf import OmegaConf

from client_app.pretrain_heads import (
    HEADS_KEPT,
    forget_heads,
    head_directory,
    latest_head,
    save_head,
)


def config(tmp_path, output_dir):
    return OmegaConf.create({"output_dir": output_dir, "site_state_dir": str(tmp_path / "site")})


def test_each_run_and_hospital_has_its_own_folder_and_a_run_without_output_dir_none(tmp_path):
    a = head_directory(config(tmp_path, "/runs/a"), "dataset1")
    assert a is not None and a.is_relative_to(tmp_path / "site")
    assert a != head_directory(config(tmp_path, "/runs/a"), "dataset2")
    assert a.parent != head_directory(config(tmp_path, "/runs/b"), "dataset1").parent
    assert head_directory(config(tmp_path, None), "dataset1") is None


def test_a_saved_head_comes_back_exactly_and_only_the_newest_are_kept(tmp_path):
    folder = head_directory(config(tmp_path, "/runs/a"), "dataset1")
    heads = {r: {"weight": torch.randn(4, 3), "bias": torch.randn(4)} for r in range(1, 6)}
    for server_round, head in heads.items():
        save_head(folder, server_round, head)
    kept = range(6 - HEADS_KEPT, 6)
    assert sorted(p.name for p in folder.iterdir()) == [f"round_{r:03d}.pt" for r in kept]
    for server_round in kept:
        found_round, back = latest_head(folder, server_round)
        assert found_round == server_round and back.keys() == heads[server_round].keys()
        assert all(torch.equal(back[k], heads[server_round][k]) for k in back)
    assert latest_head(folder, 1) is None


def test_a_resume_reads_the_newest_head_up_to_the_round_before_it(tmp_path):
    folder = tmp_path / "heads"
    for server_round in (1, 2, 4):  # round 3 failed at this site; round 4 is being redone
        save_head(folder, server_round, {"weight": torch.full((2,), float(server_round))})
    assert latest_head(folder, 3)[0] == 2  # what the node state would have held
    assert latest_head(folder, 4)[0] == 4
    assert latest_head(folder, 0) is None


def test_a_damaged_head_is_passed_over_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "heads"
    save_head(folder, 1, {"weight": torch.ones(2)})
    save_head(folder, 2, {"weight": torch.ones(2)})
    (folder / "round_002.pt").write_bytes(b"cut short")
    with caplog.at_level(logging.WARNING):
        assert latest_head(folder, 2)[0] == 1
    assert "round_002.pt is unreadable" in caplog.text
    (folder / "round_001.pt").write_bytes(b"cut short")
    assert latest_head(folder, 2) is None


def test_an_unwritable_folder_costs_a_warning_not_the_round(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        save_head(blocker / "heads", 1, {"weight": torch.ones(2)})
    assert "cannot keep the pretraining head" in caplog.text


def test_forgetting_removes_the_hospitals_heads_and_the_run_folder_once_empty(tmp_path):
    cfg = config(tmp_path, "/runs/a")
    first, second = head_directory(cfg, "dataset1"), head_directory(cfg, "dataset2")
    other_run = head_directory(config(tmp_path, "/runs/b"), "dataset1")
    for directory in (first, second, other_run):
        save_head(directory, 1, {"weight": torch.ones(2)})
    forget_heads(first)
    assert not first.exists() and second.exists()
    forget_heads(second)
    assert not second.parent.exists() and other_run.exists()
    forget_heads(second)  # a later MCT round finds nothing to remove
    forget_heads(other_run)
    assert list((tmp_path / "site").iterdir()) == [], "the last run leaves no empty folder"
