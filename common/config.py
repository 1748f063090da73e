"""Hydra composition for code that cannot own argv (the Flower apps, launchers, tests)."""

from __future__ import annotations

import contextlib
import math
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from common.errors import JobError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def parse_overrides(text: str) -> list[str]:
    """Split the shell-quoted override string carried in Flower's run config."""
    return shlex.split(text)


def override_value(text: str) -> str:
    """``text`` quoted as a Hydra override value, whatever it holds.

    Unquoted, Hydra's grammar refuses spaces, commas, brackets, quotes and non-ASCII letters,
    all common in folder names (``data (copy)``, ``José``). Inside single quotes only a quote,
    and backslashes before one or at the end, need escaping.
    """
    escaped = re.sub(r"(\\*)'", lambda match: match.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda match: match.group(1) * 2, escaped)
    return f"'{escaped}'"


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "config", conf_dir: Path | None = CONF_DIR
) -> DictConfig:
    """Compose ``<conf_dir>/<config_name>.yaml`` with Hydra overrides, without touching argv or cwd.

    ``conf_dir=None`` composes a node of Hydra's config store alone, for a command whose keys
    would clash with the config groups of ``conf/``.
    """
    GlobalHydra.instance().clear()
    if conf_dir is None:
        context = initialize(config_path=None, version_base="1.3")
    elif conf_dir.is_dir():
        context = initialize_config_dir(config_dir=str(conf_dir), version_base="1.3")
    else:
        raise FileNotFoundError(f"Hydra config directory not found: {conf_dir}")
    with context:
        cfg = compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def number_setting(cfg: DictConfig, key: str, *, whole: bool = False) -> float:
    """The number at the dotted ``key``, or a :class:`JobError` that names the key and value.

    Hydra keeps a mistyped number (``epochs=1O``, ``rounds=abc``) as a string, and ``int()`` on
    it deep inside a job would end the run in a traceback instead of the command's one line.
    """
    value = OmegaConf.select(cfg, key)
    number = math.nan
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
    # A whole number must be an int, not 1.0: the job passes it on as it is (range(1.0) fails).
    if math.isnan(number) or (whole and not isinstance(value, int)):
        raise JobError(f"{key}={value}: expected {'a whole number' if whole else 'a number'}")
    return number


def number_at_least(cfg: DictConfig, key: str, least: float, *, whole: bool = False) -> float:
    """:func:`number_setting`, refused below ``least`` in one line that names the key."""
    number = number_setting(cfg, key, whole=whole)
    if number < least:
        kind = "a whole number" if whole else "a number"
        raise JobError(f"{key}={OmegaConf.select(cfg, key)}: expected {kind} >= {least:g}")
    return number
