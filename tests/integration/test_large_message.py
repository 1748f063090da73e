"""A ~600 MB state dict round-trips bit-exact through a deployed SuperLink and SuperNode.

Real ``flower-superlink`` and ``flower-supernode`` processes on loopback (insecure: the
TLS path is covered by test_deployment.py; here only the size matters), with the default
subprocess isolation, so the payload crosses ServerApp -> SuperLink -> SuperNode -> ClientApp
and back, every hop a separate process.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from server_app.launch import run_and_check
from support.flower_processes import BIN, flower_env, free_port, start_loopback_superlink

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ECHO_APP = Path(__file__).resolve().parents[1] / "echo_app"
PAYLOAD_MB = 600


def _start(env: dict[str, str], log: Path, *command: str) -> subprocess.Popen:
    with log.open("w") as stream:
        return subprocess.Popen(
            [str(BIN / command[0]), *command[1:]], env=env, stdout=stream, stderr=subprocess.STDOUT
        )


def test_a_600_mb_state_dict_round_trips_bit_exact(flwr_home, tmp_path):
    env = flower_env(flwr_home)
    port = start_loopback_superlink(env, flwr_home, tmp_path / "superlink.log")
    _start(
        env,
        tmp_path / "supernode.log",
        "flower-supernode",
        "--insecure",
        f"--superlink=127.0.0.1:{port}",
        "--host=127.0.0.1",
        f"--port={free_port()}",
    )

    result_file = tmp_path / "result.json"
    code, output = run_and_check(
        [
            str(BIN / "flwr"),
            "run",
            str(ECHO_APP),
            "loopback",
            "--stream",
            "--run-config",
            f"payload-mb={PAYLOAD_MB} result-file='{result_file}'",
        ],
        env,
    )
    assert code == 0, output[-4000:]
    verdict = json.loads(result_file.read_text())
    print("600 MB round trip:", verdict)
    assert verdict["bytes"] == PAYLOAD_MB * 10**6
    assert verdict["arrays"] == 6
    assert verdict["downlink_exact"] and verdict["uplink_exact"]
