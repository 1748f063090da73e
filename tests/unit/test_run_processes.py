"""server_app/run_processes: a run's processes are stopped, also after w3s-simulate was killed."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from server_app.run_processes import RUN_MARKER, guarded_run, stop_marked_processes

SLEEP = "import time; time.sleep(60)"


def marked_sleeper(marker: str) -> subprocess.Popen:
    """A stand-in for a Flower process of the run ``marker``, in a session of its own."""
    return subprocess.Popen(
        [sys.executable, "-c", SLEEP],
        env={**os.environ, RUN_MARKER: marker},
        start_new_session=True,
    )


def wait_until_ended(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not has_ended(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return has_ended(pid)


def has_ended(pid: int) -> bool:
    """The process is gone or a zombie (its parent, killed, cannot reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_runs_processes_are_stopped_with_their_descendants_and_no_one_elses():
    # Stand-ins: one of ours that started a child without the marker (as Ray rewrites its
    # workers' environment), one that ignores SIGTERM as a busy worker can, one of another run.
    spawn = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {SLEEP!r}], env={{}}); "
        "print(child.pid, flush=True); time.sleep(60)"
    )
    deaf = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(0, flush=True)"
    )
    started = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, RUN_MARKER: marker},
            stdout=subprocess.PIPE,
            text=True,
        )
        for code, marker in ((spawn, "ours"), (f"{deaf}; {SLEEP}", "ours"), (SLEEP, "theirs"))
    ]
    parent, stubborn, theirs = started
    try:
        grandchild = int(parent.stdout.readline())
        stubborn.stdout.readline()  # its handler is set
        stopped = stop_marked_processes("ours", grace_s=2.0)
        assert sorted(stopped) == sorted([parent.pid, grandchild, stubborn.pid])
        assert parent.wait(timeout=10) == -signal.SIGTERM
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
        assert has_ended(grandchild)
        assert theirs.poll() is None
    finally:
        for process in started:
            process.kill()


def test_a_killed_w3s_simulate_leaves_its_guard_to_stop_the_run_and_remove_its_files(tmp_path):
    # SIGKILL or the out-of-memory killer give w3s-simulate no chance to clean up itself.
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "run_config.toml").write_text("overrides = ''\n")
    marker = uuid.uuid4().hex
    stand_in = (
        "import os, subprocess, sys, time; from pathlib import Path; "
        "from server_app.run_processes import RUN_MARKER, guarded_run\n"
        "with guarded_run(sys.argv[1], Path(sys.argv[2]), 'Resume it.'):\n"
        "    worker = subprocess.Popen([sys.executable, '-c', sys.argv[3]], "
        "env={**os.environ, RUN_MARKER: sys.argv[1]}, start_new_session=True)\n"
        "    print(worker.pid, flush=True); time.sleep(60)"
    )
    simulate = subprocess.Popen(
        [sys.executable, "-c", stand_in, marker, str(staging), SLEEP],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker = int(simulate.stdout.readline())
        simulate.kill()
        # The guard shares the stand-in's stderr, which closes once the guard has done its work.
        _, stderr = simulate.communicate(timeout=60)
        assert wait_until_ended(worker)
        assert not staging.exists()
        assert "its guard stopped the run's 1 processes. Resume it." in stderr, stderr
    finally:
        simulate.kill()
        stop_marked_processes(marker, grace_s=1.0)


def test_a_run_that_ends_normally_dismisses_its_guard(tmp_path):
    # The caller has stopped its run itself; the guard must not touch what it left on purpose.
    staging = tmp_path / "staging"
    staging.mkdir()
    marker = uuid.uuid4().hex
    with guarded_run(marker, staging):
        kept = marked_sleeper(marker)
    try:
        # guarded_run returns once its guard has exited: whatever it did is done by now.
        assert kept.poll() is None and staging.is_dir()
    finally:
        stop_marked_processes(marker, grace_s=1.0)


def test_an_error_inside_has_the_guard_stop_what_was_left(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    marker = uuid.uuid4().hex
    try:
        with pytest.raises(RuntimeError, match="inside"), guarded_run(marker, staging):
            left = marked_sleeper(marker)
            raise RuntimeError("inside")
        assert left.wait(timeout=30) == -signal.SIGTERM
        assert not staging.exists()
    finally:
        stop_marked_processes(marker, grace_s=1.0)
