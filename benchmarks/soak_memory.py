"""Soak: resident memory of the server side over many rounds of a real federated run.

Two set-ups:

- simulation (default): ``w3s-simulate``. The ServerApp runs inside the ``flwr-simulation``
  process next to the Ray driver, and the SuperLink is not on the message path.
- ``--deployed``: a SuperLink and one SuperNode per hospital as separate processes on loopback
  (insecure; TLS is tested in tests/integration/test_deployment.py), then ``flwr run`` of this
  app. Every model goes ServerApp -> SuperLink -> SuperNode -> ClientApp process and back.

Per round, the ServerApp's RSS is the ``server-rss-mb`` of its metrics row (the recorder reads
/proc/self/status after the round). The SuperLink's and SuperNodes' RSS are read from /proc by
pid when that row appears. Prints a Markdown table per round, then the change from round 5 to
the last and a least-squares slope per round. Can also write JSON.

    python -m benchmarks.soak_memory --rounds 30 [--deployed] [--json out.json] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.config import compose_config
from common.data import hospital_names
from common.files import write_text_atomically
from server_app.launch import APP_DIR
from support.flower_processes import (
    BIN,
    flower_env,
    free_port,
    pids_mentioning,
    stop_processes,
)

# Small hospitals and one local epoch: the soak measures memory over rounds, not training. The
# MCT rounds only: a pretraining phase numbers its own rounds from 1, and its rows would not be
# the rounds asked for (the run was refused after its 20 pretraining rounds and the rest).
DEFAULT_OVERRIDES = ["pretrain=none", "train.local_epochs=1"]
# Images of each synthetic hospital (of whichever data config the overrides choose).
SYNTHETIC_IMAGES = 40
# Command-line markers of the long-lived Flower processes besides the ServerApp's; RSS of
# several processes of one kind (the SuperNodes) is summed.
PROCESSES = {"superlink": "flower-superlink", "supernodes": "flower-supernode"}
CONNECTION = "loopback"
LOG_TAIL = 20  # lines of the run's log shown when it ends early


def rss_mb(pid: int) -> float:
    """Current resident memory of ``pid`` in MB, NaN once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def flower_rss(marker: str) -> dict[str, float]:
    """Summed RSS (MB) of each kind in :data:`PROCESSES` among the processes under ``marker``."""
    found: dict[str, float] = {}
    for pid in pids_mentioning(marker):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for name, needle in PROCESSES.items():
            if needle in cmdline:
                found[name] = found.get(name, 0.0) + rss_mb(pid)
    return found


def start(env: dict[str, str], log: Path, *command: str) -> subprocess.Popen:
    """Start a long-running Flower process with its output in ``log``."""
    with log.open("w") as stream:
        return subprocess.Popen(
            [str(BIN / command[0]), *command[1:]], env=env, stdout=stream, stderr=subprocess.STDOUT
        )


def deployed_command(home: Path, env: dict[str, str], overrides: list[str]) -> list[str]:
    """Start a SuperLink and a SuperNode per hospital; return the ``flwr run`` command."""
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink = ["flower-superlink", "--insecure", "--host=127.0.0.1", f"--port={port}"]
    start(env, home / "superlink.log", *superlink)
    for name in hospital_names(compose_config(overrides).data):
        start(
            env,
            home / f"supernode-{name}.log",
            "flower-supernode",
            "--insecure",
            f"--superlink=127.0.0.1:{port}",
            f'--node-config=hospital="{name}"',
            "--host=127.0.0.1",
            f"--port={free_port()}",
        )
    run_config = home / "run_config.toml"
    run_config.write_text(f"overrides = {json.dumps(shlex.join(overrides))}\n")
    run = ["run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(run_config)]
    return [str(BIN / "flwr"), *run]


class SoakStopped(RuntimeError):
    """The run ended before its last round; ``rows`` holds the rounds it finished."""

    def __init__(self, message: str, rows: list[dict]) -> None:
        super().__init__(message)
        self.rows = rows


def soak_overrides(overrides: list[str]) -> list[str]:
    """The soak's defaults, small synthetic hospitals, then the user's overrides (they win)."""
    cfg = compose_config([*DEFAULT_OVERRIDES, *overrides])
    small = [
        f"data.hospitals.{name}.num_images={SYNTHETIC_IMAGES}"
        for name in hospital_names(cfg.data)
        if cfg.data.hospitals[name].format == "synthetic"
    ]
    return [*DEFAULT_OVERRIDES, *small, *overrides]


def soak(rounds: int, overrides: list[str], work: Path, deployed: bool) -> list[dict]:
    """Run ``rounds`` rounds; return one row of RSS figures (MB) per round.

    Raises
    ------
    SoakStopped
        When the run ends early: with the rows of the rounds it finished and the tail of its
        log, which tells why.
    """
    home = work / "flwr_home"
    home.mkdir()
    run_dir = work / "run"
    metrics = run_dir / "metrics.jsonl"
    env = flower_env(home)
    overrides = [*overrides, f"federation.rounds={rounds}", f"output_dir={run_dir}"]
    rows: list[dict] = []
    try:
        if deployed:
            command = deployed_command(home, env, overrides)
        else:
            command = [str(BIN / "w3s-simulate"), *overrides]
        log = work / "run.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, env=env, cwd=work, stdout=output, stderr=subprocess.STDOUT
            )
        while process.poll() is None or len(rows) < _count_rows(metrics):
            written = _count_rows(metrics)
            if written > len(rows):
                sampled = flower_rss(str(home))
                for line in metrics.read_text().splitlines()[len(rows) : written]:
                    row = json.loads(line)
                    rows.append(
                        {
                            "round": row["round"],
                            "seconds": row["seconds"],
                            "serverapp": row["server-rss-mb"],
                            **sampled,
                        }
                    )
            time.sleep(0.2)
    finally:
        stop_processes(str(home))
    if len(rows) != rounds:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:]
        raise SoakStopped(
            f"{shlex.join(command)} ended after {len(rows)} of {rounds} rounds; its log ends:\n"
            + "\n".join(tail),
            rows,
        )
    return rows


def _count_rows(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``; NaN from fewer than two rounds (no trend)."""
    if len(set(xs)) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def report(rows: list[dict]) -> str:
    """Markdown: RSS per round, then change and slope of each process after warm-up."""
    names = [key for key in rows[0] if key not in ("round", "seconds")]
    lines = [
        "| round | seconds | " + " | ".join(f"{n} RSS (MB)" for n in names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    lines += [
        f"| {r['round']} | {r['seconds']:.1f} | " + " | ".join(f"{r[n]:.0f}" for n in names) + " |"
        for r in rows
    ]
    steady = [r for r in rows if r["round"] >= 5] or rows
    lines.append("")
    for name in names:
        values = [r[name] for r in steady]
        per_round = slope([float(r["round"]) for r in steady], values)
        lines.append(
            f"- {name}: round {steady[0]['round']} {values[0]:.0f} MB, round "
            f"{steady[-1]['round']} {values[-1]:.0f} MB (change {values[-1] - values[0]:+.0f} MB, "
            f"min {min(values):.0f}, max {max(values):.0f}), slope {per_round:+.2f} MB/round"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--deployed", action="store_true", help="SuperLink + SuperNodes")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args, overrides = parser.parse_known_args()
    stopped = None
    with tempfile.TemporaryDirectory(prefix="w3s-soak-") as tmp:
        started = time.perf_counter()
        try:
            rows = soak(args.rounds, soak_overrides(overrides), Path(tmp), args.deployed)
        except SoakStopped as error:  # the rounds it finished are still measured
            stopped, rows = error, error.rows
        print(f"{len(rows)} rounds in {time.perf_counter() - started:.0f} s\n")
    if rows:
        print(report(rows))
    if args.json:
        write_text_atomically(args.json, json.dumps(rows, indent=1) + "\n")
    if stopped is not None:
        sys.exit(f"soak_memory: {stopped}")


if __name__ == "__main__":
    main()
