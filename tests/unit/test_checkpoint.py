import torch

from common.checkpoint import latest_checkpoint, load_checkpoint, save_atomic


def test_atomic_save_round_trips_and_leaves_no_temporary(tmp_path):
    path = save_atomic({"round": 3, "state_dict": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    assert load_checkpoint(path)["round"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


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
