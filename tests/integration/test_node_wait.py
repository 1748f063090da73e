"""A later round short of SuperNodes stops the run after a bounded wait; resume continues it.

Real processes on loopback (insecure; TLS is test_deployment.py's subject): a SuperLink and two
SuperNodes running tests/fault_app on two small synthetic hospitals. Flower's node sampling
waits forever for missing nodes; here a hospital leaves between rounds 1 and 2, and round 2
must give up after ``federation.round_wait_for_nodes_s`` instead of hanging.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from common.checkpoint import load_checkpoint
from server_app.launch import run_status
from support.flower_processes import (
    BIN,
    flower_env,
    free_port,
    metrics_rows,
    start_loopback_superlink,
)

pytestmark = pytest.mark.integration

FAULT_APP = Path(__file__).resolve().parents[1] / "fault_app"
OVERRIDES = [
    "pretrain=none",
    "model.img_size=32",
    "~data.hospitals.hospital_c",
    "data.hospitals.hospital_a.num_images=30",
    "data.hospitals.hospital_b.num_images=30",
    "train.local_epochs=1",
    "train.warmup_epochs=0.5",
    "federation.rounds=2",
    "federation.min_replies=2",
    "federation.round_wait_for_nodes_s=5",
    "federation.round_timeout_s=120",
]


def _start(env: dict[str, str], log: Path, *command: str) -> subprocess.Popen:
    with log.open("a") as stream:
        return subprocess.Popen(
            [str(BIN / command[0]), *command[1:]], env=env, stdout=stream, stderr=subprocess.STDOUT
        )


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not seen within {timeout_s:.0f}s"
        time.sleep(0.5)


def _supernode(env: dict[str, str], tmp_path: Path, port: int, partition: int) -> subprocess.Popen:
    return _start(
        env,
        tmp_path / f"supernode{partition}.log",
        "flower-supernode",
        "--insecure",
        f"--superlink=127.0.0.1:{port}",
        f"--node-config=partition-id={partition} num-partitions=2",
        "--host=127.0.0.1",
        f"--port={free_port()}",
    )


def _flwr_run(env, tmp_path: Path, name: str, overrides: list[str], **faults) -> subprocess.Popen:
    dumps = tmp_path / "dumps"
    dumps.mkdir(exist_ok=True)
    settings = {"overrides": shlex.join(overrides), "dump-dir": str(dumps)}
    settings.update({key.replace("_", "-"): value for key, value in faults.items()})
    config = tmp_path / f"{name}.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    command = ["flwr", "run", str(FAULT_APP), "loopback", "--stream", "--run-config", str(config)]
    return _start(env, tmp_path / f"{name}.log", *command)


def _status(env, log: Path) -> str:
    run_id = re.search(r"Successfully started run (\d+)", log.read_text()).group(1)
    return run_status(str(BIN / "flwr"), run_id, env)


def test_a_round_short_of_nodes_stops_the_run_and_resume_continues_it(flwr_home, tmp_path):
    env = flower_env(flwr_home)
    port = start_loopback_superlink(env, flwr_home, tmp_path / "superlink.log")
    _supernode(env, tmp_path, port, 0)
    leaving = _supernode(env, tmp_path, port, 1)

    # Once partition 1 has evaluated round 1, its SuperNode is stopped while partition 0 holds
    # round 1 open, so round 2 finds one SuperNode where two are required.
    run_dir = tmp_path / "run"
    overrides = [*OVERRIDES, f"output_dir={run_dir}"]
    first = _flwr_run(env, tmp_path, "first", overrides, hold_round=1, hold_seconds=15.0)
    first_log = tmp_path / "first.log"
    marker = tmp_path / "dumps" / "evaluated_round1_partition1"
    _wait_for(marker.exists, 600, "partition 1's round-1 evaluation")
    time.sleep(3.0)  # its reply on the way to the SuperLink
    leaving.send_signal(signal.SIGTERM)
    leaving.wait(timeout=60)
    first.wait(timeout=300)

    log = first_log.read_text()
    assert _status(env, first_log) == "finished:failed", log[-4000:]
    stopped = [line for line in log.splitlines() if "run stopped:" in line]
    assert len(stopped) == 1, log[-4000:]
    assert "round 2 training: 1 SuperNodes online after 5 s" in stopped[0]
    assert "resume=true continues the run" in stopped[0]
    assert load_checkpoint(run_dir / "checkpoints" / "round_001.pt")["round"] == 1
    assert not (run_dir / "checkpoints" / "round_002.pt").exists()
    assert not (run_dir / "final_model.pt").exists()

    # The hospital comes back; resume=true continues from round 1's checkpoint with both.
    _supernode(env, tmp_path, port, 1)
    again = _flwr_run(env, tmp_path, "again", [*overrides, "resume=true"])
    again.wait(timeout=300)
    again_log = tmp_path / "again.log"
    assert _status(env, again_log) == "finished:completed", again_log.read_text()[-4000:]
    assert "resuming from" in again_log.read_text()
    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["replies"] == 2
    assert load_checkpoint(run_dir / "final_model.pt")["round"] == 2
