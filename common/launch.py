"""``w3s-simulate``: compose a Hydra config, then start the matching ``flwr run`` simulation.

The Flower apps cannot own argv, so the overrides travel in the run config (key ``overrides``)
and both apps compose the same config from them. Paths are made absolute here, where the
user's working directory is known; the apps run from wherever the SuperLink started.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from common.config import CONF_DIR, compose_config
from common.data import hospital_names

APP_DIR = CONF_DIR.parent


def absolute_path_overrides(cfg: DictConfig, cwd: Path) -> list[str]:
    """Overrides that pin every relative path in ``cfg`` to ``cwd``."""
    candidates = {
        "data.root": cfg.data.get("root"),
        "model.pretrained_file": cfg.model.get("pretrained_file"),
        "output_root": cfg.get("output_root"),
        "output_dir": cfg.get("output_dir"),
    }
    for name, hospital in cfg.data.hospitals.items():
        candidates[f"data.hospitals.{name}.root"] = hospital.get("root")
    return [
        f"{key}={(cwd / value).resolve()}"
        for key, value in candidates.items()
        if value and not Path(str(value)).is_absolute()
    ]


def flwr_command(overrides: Sequence[str], cfg: DictConfig, run_config_file: Path) -> list[str]:
    """The ``flwr run`` call: one simulated SuperNode per configured hospital."""
    flwr = Path(sys.executable).with_name("flwr")
    federation = (
        f"num-supernodes={len(hospital_names(cfg.data))} "
        f"client-resources-num-cpus={cfg.federation.client_cpus} "
        f"client-resources-num-gpus={cfg.federation.client_gpus}"
    )
    return [
        str(flwr) if flwr.exists() else (shutil.which("flwr") or "flwr"),
        "run",
        str(APP_DIR),
        "--stream",
        "--run-config",
        str(run_config_file),
        "--federation-config",
        federation,
    ]


RUN_STARTED = re.compile(r"Successfully started run (\d+)")


def run_status(flwr: str, run_id: str, env: dict[str, str], wait_s: float = 30.0) -> str:
    """How the SuperLink says a run ended, e.g. ``finished:completed`` or ``finished:failed``."""
    deadline = time.monotonic() + wait_s
    while True:
        listing = subprocess.run(
            [flwr, "list", "--run-id", run_id, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            status = str(json.loads(listing.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            status = f"unknown ({listing.stdout.strip() or listing.stderr.strip()})"
        if status.startswith("finished") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def run_and_check(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Stream a ``flwr run --stream`` command, then exit non-zero unless the run completed.

    ``flwr run`` itself exits 0 when the ServerApp fails (a run with too few good replies,
    say), so the run's final status is asked of the SuperLink. Returns (exit code, output).
    """
    lines = []
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    started = next((m.group(1) for m in map(RUN_STARTED.search, lines) if m), None)
    if process.returncode != 0 or started is None:
        return process.returncode or 1, "".join(lines)
    status = run_status(command[0], started, env)
    lines.append(f"w3s: run {started} {status}\n")
    print(lines[-1], end="", flush=True)
    return (0 if status == "finished:completed" else 1), "".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a federated simulation with Hydra overrides, e.g. ``w3s-simulate data=wbc_zxaoyou``."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = compose_config(overrides)
    overrides += absolute_path_overrides(cfg, Path.cwd())
    cfg = compose_config(overrides)
    joined = " ".join(shlex.quote(o) for o in overrides)
    env = dict(os.environ)
    # Installing the app's dependencies per run (Flower's default) would re-download torch.
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # flwr starts flower-superlink by name: find this environment's even when not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory(prefix="w3s-simulate-") as tmp:
        run_config = Path(tmp) / "run_config.toml"
        run_config.write_text(f"overrides = {json.dumps(joined)}\n", encoding="utf-8")
        command = flwr_command(overrides, cfg, run_config)
        print("w3s-simulate:", shlex.join(command), flush=True)
        return run_and_check(command, env)[0]


if __name__ == "__main__":
    raise SystemExit(main())
