"""``flwr run`` as a user types it: plain, with a config that cannot match, from a regular install.

- plain ``flwr run . --stream`` in the checkout trains the synthetic default to the end (Flower's
  local simulation has 2 SuperNodes: 2 of the 3 synthetic hospitals take part), its masked
  pretraining phase included; only the number of rounds and epochs comes through the run
  config, since every round repeats the first ones;
- real data on the wrong number of SuperNodes fails within seconds, not after the deployment
  wait (``federation.wait_for_nodes_s``, 120 s);
- a setting that ``w3s-simulate`` would refuse fails the ServerApp before any round, since a
  bare or deployed ``flwr run`` skips ``w3s-simulate``; so does a minimum of replies above the
  hospitals that joined, before an earlier run in ``output_dir`` is replaced;
- ``w3s-simulate`` (``python -m server_app.launch``) works from a non-editable install, outside
  the checkout.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_app.launch import RUN_STARTED, run_status
from support.flower_processes import BIN, flower_env, metrics_rows, run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FLWR = str(BIN / "flwr")


def final_status(log: str, env: dict[str, str]) -> str:
    """What the SuperLink says of the run that ``log`` started (``finished:completed``, ...)."""
    started = RUN_STARTED.search(log)
    assert started, log[-4000:]
    return run_status(FLWR, started.group(1), env)


def run_with_overrides(
    env: dict[str, str], overrides: str, *federation_config: str, timeout_s: float = 300
) -> subprocess.CompletedProcess:
    """``flwr run . --stream`` in the checkout with the app's ``overrides``."""
    command = [FLWR, "run", ".", "--stream", "--run-config", f"overrides='{overrides}'"]
    for value in federation_config:
        command += ["--federation-config", value]
    return run(command, env=env, timeout_s=timeout_s, cwd=REPO)


@pytest.mark.slow
def test_plain_flwr_run_trains_two_of_the_three_synthetic_hospitals(flwr_home, tmp_path):
    output_root = tmp_path / "runs"
    env = {**flower_env(flwr_home), "W3S_OUTPUT_ROOT": str(output_root)}
    started = time.monotonic()
    rounds = "pretrain.rounds=1 pretrain.local_epochs=1 federation.rounds=2"
    result = run_with_overrides(env, rounds, timeout_s=1200)
    seconds = time.monotonic() - started
    log = result.stdout + result.stderr
    print(f"\nflwr run (1 + 2 rounds, 2 SuperNodes): {seconds:.0f} s")

    assert result.returncode == 0, log[-4000:]
    assert final_status(log, env) == "finished:completed", log[-4000:]
    models = list(output_root.glob("*/final_model.pt"))
    assert len(models) == 1, (models, log[-4000:])
    assert "2 SuperNodes for 3 synthetic hospitals" in log, log[-4000:]
    assert "training on ['hospital_a', 'hospital_b']" in log, log[-4000:]
    rows = metrics_rows(models[0].parent)
    assert [(row["phase"], row["round"]) for row in rows] == [
        ("pretrain", 1),
        ("mct", 1),
        ("mct", 2),
    ]
    assert all(set(row["hospitals"]) == {"hospital_a", "hospital_b"} for row in rows)


def test_real_data_on_too_few_supernodes_fails_within_seconds(flwr_home, tmp_path, wbc_root):
    env = {
        **flower_env(flwr_home),
        "W3S_OUTPUT_ROOT": str(tmp_path / "runs"),
        "W3S_WBC_ROOT": str(wbc_root),
    }
    started = time.monotonic()
    result = run_with_overrides(env, "data=wbc_zxaoyou", "num-supernodes=1")
    log = result.stdout + result.stderr
    status = final_status(log, env)
    seconds = time.monotonic() - started
    print(f"\nreal data on 1 SuperNode: {status} after {seconds:.0f} s")

    assert status == "finished:failed", log[-4000:]
    assert "2 hospitals are configured but 1 SuperNodes" in log, log[-4000:]
    assert seconds < 90, f"{seconds:.0f} s: the run waited as a deployment would"
    assert not list((tmp_path / "runs").glob("*/final_model.pt"))


def test_a_setting_for_no_such_hospital_fails_the_server_before_round_1(flwr_home, tmp_path):
    output_root = tmp_path / "runs"
    env = {**flower_env(flwr_home), "W3S_OUTPUT_ROOT": str(output_root)}
    result = run_with_overrides(env, "+model.per_hospital.hospital_z.standardise_input=channels")
    log = result.stdout + result.stderr

    assert final_status(log, env) == "finished:failed", log[-4000:]
    assert "model.per_hospital.hospital_z: no such hospital" in log, log[-4000:]
    # Refused before the run directory, so no round ran and nothing was left to clean up.
    assert not output_root.exists(), list(output_root.rglob("*"))


def test_more_replies_than_joined_hospitals_fails_before_an_earlier_run_is_replaced(
    flwr_home, tmp_path
):
    # Flower's 2 SuperNodes take 2 of the 3 synthetic hospitals; 3 replies cannot come.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "final_model.pt").write_bytes(b"an earlier run's model")
    env = flower_env(flwr_home)
    result = run_with_overrides(env, f"federation.min_replies=3 output_dir={run_dir}")
    log = result.stdout + result.stderr

    assert final_status(log, env) == "finished:failed", log[-4000:]
    assert "federation.min_replies=3, but 2 hospitals joined the run" in log, log[-4000:]
    assert (run_dir / "final_model.pt").read_bytes() == b"an earlier run's model"


@pytest.mark.slow
def test_w3s_simulate_runs_from_a_regular_install(flwr_home, tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert (site / "server_app" / "pyproject.toml").is_file()
    assert (site / "conf" / "config.yaml").is_file()

    env = {**flower_env(flwr_home), "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import common, server_app; print(server_app.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout

    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run(
        [
            sys.executable,
            "-m",
            "server_app.launch",
            "pretrain=none",
            "federation.rounds=1",
            f"output_dir={run_dir}",
        ],
        env=env,
        timeout_s=900,
        cwd=tmp_path,
    )
    log = result.stdout + result.stderr
    print(f"\nw3s-simulate from a regular install (1 round): {time.monotonic() - started:.0f} s")

    assert result.returncode == 0, log[-4000:]
    assert (run_dir / "final_model.pt").is_file(), log[-4000:]
    # The app Flower ran was staged from the installed copy, not the checkout.
    launched = next(line for line in log.splitlines() if line.startswith("w3s-simulate: "))
    assert f" run {REPO} " not in launched and "w3s-simulate-" in launched, launched
