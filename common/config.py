"""Hydra composition for code that cannot own argv (the Flower apps, launchers, tests)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def parse_overrides(text: str) -> list[str]:
    """Split the shell-quoted override string carried in Flower's run config."""
    return shlex.split(text)


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, without touching argv or cwd."""
    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"Hydra config directory not found: {CONF_DIR}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg
