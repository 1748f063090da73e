"""Start real Flower commands with a private FLWR_HOME and stop every process they left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.network import LOCAL_SUPERLINK_PORTS, free_port, free_ports
from server_app.launch import flower_environment

BIN = Path(sys.executable).parent


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for one test: its own FLWR_HOME and local SuperLink ports, this venv.

    ``flwr run`` reuses any local SuperLink answering on its fixed default port, whatever
    FLWR_HOME says, so each test also gets its own ports.
    """
    env = flower_environment(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env.update(zip(LOCAL_SUPERLINK_PORTS, map(str, free_ports(2)), strict=True))
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_DEDUP_LOGS"] = "0"
    return env


def pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line or environment names ``marker`` (ours, by construction)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline or marker.encode() in environ:
            found.append(int(entry.name))
    return found


def stop_processes(marker: str, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process started under ``marker`` (the test's FLWR_HOME)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_mentioning(marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


def run(
    command: list[str], env: dict[str, str], timeout_s: float, cwd: Path
) -> subprocess.CompletedProcess:
    """Run a Flower command to completion, capturing its output for the assertions."""
    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def metrics_rows(run_dir: Path) -> list[dict]:
    """The per-round rows the server wrote to ``<run_dir>/metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def simulate(flwr_home: Path, cwd: Path, overrides: list[str], run_dir: Path) -> str:
    """Run ``w3s-simulate`` into ``run_dir``, assert that it succeeded, return its output."""
    result = run(
        [str(BIN / "w3s-simulate"), *overrides, f"output_dir={run_dir}"],
        env=flower_env(flwr_home),
        timeout_s=900,
        cwd=cwd,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    deadline = time.monotonic() + 10
    while superlinks_of(flwr_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not superlinks_of(flwr_home), "w3s-simulate left its SuperLink running"
    return log


def superlinks_of(flwr_home: Path) -> list[int]:
    """The ``flower-superlink`` processes started under ``flwr_home``."""
    return [
        pid
        for pid in pids_mentioning(str(flwr_home))
        if b"flower-superlink" in _read(Path("/proc") / str(pid) / "cmdline")
    ]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def start_loopback_superlink(env: dict[str, str], flwr_home: Path, log: Path) -> int:
    """An insecure SuperLink on a free loopback port, made ``flwr``'s default in ``flwr_home``.

    For tests whose subject is not TLS (test_deployment.py covers that); returns the Fleet
    port once the SuperLink says it is up. ``stop_processes`` stops it with the rest.
    """
    port = free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    with log.open("a") as stream:
        subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--host=127.0.0.1", f"--port={port}"],
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while "Application startup complete" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the SuperLink did not start within 60 s; see {log}")
        time.sleep(0.5)
    return port
