"""``w3s-simulate``: compose a Hydra config, then start the matching ``flwr run`` simulation.

The Flower apps cannot own argv, so the overrides travel in the run config (key ``overrides``)
and both apps compose the same config from them. Paths are made absolute here, where the
user's working directory is known; the apps run from wherever the SuperLink started.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
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
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
