"""Fault injection in real ``flwr run`` simulations: crashing hospitals, total failure, resume.

And what Ray leaves a ClientApp of the machine: its GPUs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from server_app.launch import run_and_check
from support.flower_processes import (
    BIN,
    flower_env,
    metrics_rows,
    pids_mentioning,
    run,
    stop_processes,
)
from tests.integration.test_simulation import TINY

pytestmark = pytest.mark.integration

FAULT_APP = Path(__file__).resolve().parents[1] / "fault_app"


def _run_fault_app(
    home: Path,
    tmp_path: Path,
    overrides: list[str],
    supernodes: int = 3,
    **faults: str | int | float,
) -> subprocess.CompletedProcess:
    """Run the fault app; ``faults`` are its run-config keys with _ for -, e.g. fail_round=2."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    settings = {"overrides": " ".join(overrides), "dump-dir": str(dumps)}
    settings.update({key.replace("_", "-"): value for key, value in faults.items()})
    run_config = tmp_path / "run_config.toml"
    run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    command = [
        str(BIN / "flwr"),
        "run",
        str(FAULT_APP),
        "--stream",
        "--run-config",
        str(run_config),
        "--federation-config",
        f"num-supernodes={supernodes} client-resources-num-cpus=1",
    ]
    code, output = run_and_check(command, flower_env(home))
    return subprocess.CompletedProcess(command, code, output, "")


def _average_of_dumps(dumps: list[Path]) -> dict[str, torch.Tensor]:
    replies = [torch.load(p, weights_only=True) for p in dumps]
    total = sum(r["num-examples"] for r in replies)
    keys = replies[0]["state_dict"]
    return {
        k: sum(r["state_dict"][k].double() * r["num-examples"] / total for r in replies)
        for k in keys
    }


def test_a_crashing_hospital_is_dropped_and_survivors_are_averaged(flwr_home, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "federation.min_replies=2", f"output_dir={run_dir}"]
    result = _run_fault_app(flwr_home, tmp_path, overrides, fail_partitions="1", fail_round=2)
    assert result.returncode == 0, result.stdout[-4000:]

    rows = metrics_rows(run_dir)
    assert [r["replies"] for r in rows] == [3, 2]
    assert len(rows[1]["failed_nodes"]) == 1
    reason = rows[1]["failures"][str(rows[1]["failed_nodes"][0])]
    assert "OSError" in reason
    assert "JohnDoe" not in reason and "/srv" not in reason and ".bmp" not in reason

    survivors = sorted((tmp_path / "dumps").glob("round2_partition*.pt"))
    assert [p.name for p in survivors] == ["round2_partition0.pt", "round2_partition2.pt"]
    expected = _average_of_dumps(survivors)
    got = load_checkpoint(run_dir / "checkpoints" / "round_002.pt")["state_dict"]
    for key, tensor in got.items():
        torch.testing.assert_close(tensor.double(), expected[key], rtol=0, atol=1e-6)


def test_all_hospitals_failing_stops_the_run_and_keeps_the_last_checkpoint(flwr_home, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"output_dir={run_dir}"]
    result = _run_fault_app(flwr_home, tmp_path, overrides, fail_partitions="0,1,2", fail_round=2)
    log = result.stdout
    assert result.returncode != 0, log[-4000:]
    assert "0 good replies, at least 3 required" in log
    assert "finished:failed" in log.splitlines()[-1]

    last = load_checkpoint(run_dir / "checkpoints" / "round_001.pt")
    expected = _average_of_dumps(sorted((tmp_path / "dumps").glob("round1_partition*.pt")))
    for key, tensor in last["state_dict"].items():
        torch.testing.assert_close(tensor.double(), expected[key], rtol=0, atol=1e-6)
    assert not (run_dir / "checkpoints" / "round_002.pt").exists()
    assert not (run_dir / "final_model.pt").exists()


def test_a_clientapp_given_no_gpu_share_sees_the_gpus_of_the_machine(flwr_home, tmp_path):
    # Unless told otherwise, Ray sets CUDA_VISIBLE_DEVICES="" in a ClientApp given no GPU share
    # (client_gpus=0, the default), so device=auto trained on the CPU of a GPU machine. It does
    # so on a machine without a GPU as well, which is what makes this checkable here.
    run_dir = tmp_path / "run"
    result = _run_fault_app(flwr_home, tmp_path, [*TINY, f"output_dir={run_dir}"])
    assert result.returncode == 0, result.stdout[-4000:]
    dumps = sorted((tmp_path / "dumps").glob("round*_partition*.pt"))
    assert len(dumps) == 6
    seen = {torch.load(p, weights_only=True)["cuda-visible-devices"] for p in dumps}
    assert seen == {os.environ.get("CUDA_VISIBLE_DEVICES")}


def test_bad_updates_are_rejected_by_name_and_cannot_take_the_model_over(flwr_home, tmp_path):
    # Seven small hospitals at 32 px. In round 2 partitions 2-6 send a NaN, a wrong shape, the
    # takeover (every value 1e30, num-examples 1e15), an impostor claiming partition 0's
    # hospital and a 64 MB message; partition 1 inflates its num-examples to 1e15 with honest
    # arrays.
    run_dir = tmp_path / "run"
    overrides = [
        "data=synthetic10",
        "pretrain=none",
        "model.img_size=32",
        "federation.rounds=2",
        "federation.min_replies=2",
        "train.local_epochs=1",
        "train.warmup_epochs=0.5",
        f"output_dir={run_dir}",
    ]
    result = _run_fault_app(
        flwr_home,
        tmp_path,
        overrides,
        supernodes=7,
        bad_updates="1:inflate,2:nan,3:shape,4:huge,5:impostor,6:oversize",
        bad_round=2,
    )
    assert result.returncode == 0, result.stdout[-4000:]

    first, second = metrics_rows(run_dir)
    assert first["replies"] == 7 and not first["rejected"]
    assert second["replies"] == 2
    reasons = sorted(second["rejected"].values())
    assert len(reasons) == 5, reasons
    assert any("NaN" in r for r in reasons)
    assert any("has shape (1,)" in r for r in reasons)
    assert any("global model's norm" in r for r in reasons)
    assert any("claims hospital 'hospital_01'" in r and "already answered" in r for r in reasons)
    assert any("MB of arrays, over 1 x the global model's" in r for r in reasons)
    (capped,) = second["capped"].values()
    assert capped[0] == 1e15

    # The new model is the two honest replies' average, weighted by what they declared.
    dumps = tmp_path / "dumps"
    expected = _average_of_dumps([dumps / "round2_partition0.pt", dumps / "round2_partition1.pt"])
    got = load_checkpoint(run_dir / "checkpoints" / "round_002.pt")["state_dict"]
    for key, tensor in got.items():
        torch.testing.assert_close(tensor.double(), expected[key], rtol=0, atol=1e-6)


def test_a_straggler_is_dropped_and_its_late_reply_never_counts(flwr_home, tmp_path):
    # Round 1 includes Ray's start-up, so the straggler comes in round 2 of 3. It holds its
    # reply until the server has saved round 2 without it, so the reply is late whatever the
    # machine's load, and it still finishes (and saves the reply) during round 3.
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "federation.rounds=3",
        "federation.min_replies=2",
        "federation.round_timeout_s=45",
        f"output_dir={run_dir}",
    ]
    result = _run_fault_app(
        flwr_home,
        tmp_path,
        overrides,
        slow_partitions="1",
        slow_round=2,
        slow_seconds=300.0,
        slow_until=str(run_dir / "checkpoints" / "round_002.pt"),
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert [r["replies"] for r in metrics_rows(run_dir)] == [3, 2, 3]

    dumps = tmp_path / "dumps"
    assert (dumps / "round2_partition1.pt").exists()  # the straggler did finish, too late
    expectations = {
        2: [dumps / "round2_partition0.pt", dumps / "round2_partition2.pt"],
        3: sorted(dumps.glob("round3_partition*.pt")),
    }
    for server_round, replies in expectations.items():
        expected = _average_of_dumps(replies)
        path = run_dir / "checkpoints" / f"round_{server_round:03d}.pt"
        for key, tensor in load_checkpoint(path)["state_dict"].items():
            torch.testing.assert_close(tensor.double(), expected[key], rtol=0, atol=1e-6)


def one_thread_env(home: Path) -> dict[str, str]:
    """A Flower test environment whose ClientApps compute on one thread.

    Comparing two runs number by number needs the same reduction order in both; with more
    threads the kernels may split their sums differently when the machine is loaded, and the
    two runs then differ in the last bits, which training amplifies.
    """
    return {**flower_env(home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def simulate_in_home(arguments: list[str], home: Path, cwd: Path) -> str:
    """Run ``w3s-simulate`` to completion on one thread under its own FLWR_HOME; its output."""
    home.mkdir()
    try:
        done = run(
            [str(BIN / "w3s-simulate"), *arguments],
            env=one_thread_env(home),
            timeout_s=600,
            cwd=cwd,
        )
    finally:
        stop_processes(str(home))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def stopped_resumed_and_compared(
    tmp_path: Path, overrides: list[str], stop: signal.Signals, when: Callable[[Path], bool]
) -> tuple[Path, str]:
    """Run ``overrides`` whole; again, sent ``stop`` once ``when(run_dir)`` holds, then resumed.

    A scheduler's time limit or `docker stop` sends SIGTERM to w3s-simulate alone: the
    SuperLink, the simulation and its Ray workers are in sessions of their own. SIGKILL (the
    out-of-memory killer, `docker kill`, a crash) leaves it no clean-up: its guard process does
    it. Either way nothing of the run may go on, and the resumed run must end where the
    uninterrupted one does. Returns the resumed run's directory and output.
    """
    simulate_in_home(
        [*overrides, f"output_dir={tmp_path / 'whole'}"], tmp_path / "home_whole", tmp_path
    )
    home, run_dir = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    process = subprocess.Popen(
        [str(BIN / "w3s-simulate"), *overrides, f"output_dir={run_dir}"],
        env=one_thread_env(home),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not when(run_dir):
            assert process.poll() is None, process.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the moment to stop did not come in 600 s"
            time.sleep(0.2)
        process.send_signal(stop)
        # Its output closes when the last process sharing it, the guard included, has ended.
        output = process.communicate(timeout=60)[0]
        if stop == signal.SIGTERM:
            assert process.returncode == 130, output[-4000:]
            assert "stopped (SIGTERM)" in output
        else:
            assert process.returncode == -signal.SIGKILL, output[-4000:]
            assert "its guard stopped the run's" in output, output[-4000:]
        assert "resume=true" in output, output[-4000:]
        # Nothing of the run goes on: no process, no round after the stop, no staging files.
        left = pids_mentioning(str(home))
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left]
        rounds = [(r["phase"], r["round"]) for r in metrics_rows(run_dir)]
        time.sleep(5)
        assert [(r["phase"], r["round"]) for r in metrics_rows(run_dir)] == rounds
        assert not (run_dir / "final_model.pt").exists()
        staged = re.search(r"--run-config (\S+)", output)
        assert staged and not Path(staged.group(1)).exists(), "its staging files stayed"
    finally:
        stop_processes(str(home))
        process.kill()
    log = simulate_in_home(
        [*overrides, f"output_dir={run_dir}", "resume=true"], tmp_path / "home_again", tmp_path
    )
    assert "resuming from" in log, "\n".join(x for x in log.splitlines() if "server_app" in x)
    assert_same_final_model(tmp_path / "whole", run_dir)
    return run_dir, log


def assert_same_final_model(whole_dir: Path, resumed_dir: Path) -> None:
    """The resumed run ends with the uninterrupted run's weights (to float rounding)."""
    a = load_checkpoint(whole_dir / "final_model.pt")["state_dict"]
    b = load_checkpoint(resumed_dir / "final_model.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_run_killed_in_its_pretraining_resumes_there_and_matches_an_uninterrupted_one(
    tmp_path,
):
    site = tmp_path / "site"
    overrides = [
        *[o for o in TINY if not o.startswith("pretrain=")],
        "pretrain=masked",
        "pretrain.rounds=3",
        "pretrain.local_epochs=1",
        "federation.rounds=1",
        f"site_state_dir={site}",
    ]

    def between_pretraining_rounds(run_dir: Path) -> bool:
        # Pretraining round 1's row is complete and the MCT rounds have not begun.
        metrics = run_dir / "metrics.jsonl"
        return metrics.is_file() and metrics.read_text().endswith("\n")

    resumed_dir, log = stopped_resumed_and_compared(
        tmp_path, overrides, signal.SIGKILL, between_pretraining_rounds
    )
    assert "(pretrain round 1)" in log or "(pretrain round 2)" in log
    # The kept rounds are not trained again; each hospital's private decoder comes off its disk.
    assert "pretrain round 1: loss" not in log
    assert "pretraining head of round" in log and "starting a fresh one" not in log
    phases = [(r["phase"], r["round"]) for r in metrics_rows(resumed_dir)]
    assert phases == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3), ("mct", 1)]
    # The MCT rounds removed the heads from the sites' disks.
    assert not list(site.rglob("*.pt"))


def test_a_stopped_w3s_simulate_stops_its_whole_flower_run_and_resumes_to_the_same_model(tmp_path):
    def after_round_1(run_dir: Path) -> bool:
        return (run_dir / "checkpoints" / "round_001.pt").exists()

    overrides = [*TINY, "federation.rounds=3"]
    run_dir, _ = stopped_resumed_and_compared(tmp_path, overrides, signal.SIGTERM, after_round_1)
    assert [r["round"] for r in metrics_rows(run_dir)] == [1, 2, 3]
