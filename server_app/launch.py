"""``w3s-simulate``: federated training in simulation, one SuperNode per configured hospital.

Composes the config, verifies every hospital's data, then starts the matching ``flwr run``
(a local SuperLink, one simulated SuperNode per hospital) and streams its log. The run
directory gets ``final_model.pt``, a checkpoint and a ``metrics.jsonl`` row per round.

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
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from common.augment import magnitude_problem
from common.cli import Command
from common.config import (
    CONF_DIR,
    compose_config,
    number_at_least,
    number_setting,
    override_value,
)
from common.data import (
    ROOT_KEYS,
    DataVerificationError,
    check_split,
    hospital_names,
    verify_data,
)
from common.errors import JobError
from common.levers import head_levers, paste_share, size_bounds
from common.localization import FOREGROUND_SOURCES, MapSettings
from common.model import (
    STANDARDISE_MODES,
    create_mct_model,
    hospital_standardisation,
    mct_presets,
    read_deit_state,
)
from common.network import LOCAL_SUPERLINK_PORTS, free_ports
from common.pretrain import PRETRAIN_METHODS
from common.training import check_device, hospital_train_config
from server_app.privacy import privacy_settings
from server_app.run_processes import RUN_MARKER, guarded_run, stop_marked_processes
from server_app.strategy import STRATEGIES

APP_DIR = CONF_DIR.parent
TRANSPORT_DTYPES = ("float32", "float16")
# Flower's telemetry and update check off (docker/ sets the same in every container).
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
# Ray sets CUDA_VISIBLE_DEVICES="" in every ClientApp given no GPU share (client_gpus=0, the
# default), so device=auto trained on the CPU of a GPU machine. Off (Ray's coming default), a
# ClientApp sees the GPUs this process sees; a share above 0 still pins each to its own.
RAY_KEEPS_GPUS = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
# Ray prints one of several ClientApps' log lines that match once their words with digits are
# dropped, and later at most "[repeated 3x across cluster]": the round lines of "dataset1" and
# "dataset2" (or hospital_01..10) are such lines, so most of a hospital's were never shown.
RAY_PRINTS_EVERY_LINE = {"RAY_DEDUP_LOGS": "0"}
# A container's CPU quota (docker --cpus), as "<quota> <period>" microseconds or "max <period>".
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# What a Flower app needs at run time: the two apps, the library they share, the configs.
APP_PACKAGES = ("common", "server_app", "client_app", "conf")
# A regular (non-editable) install ships the project's pyproject.toml here, for flower_app_dir.
INSTALLED_PYPROJECT = Path(__file__).resolve().parent / "pyproject.toml"


def flower_app_dir(staging: Path) -> Path:
    """The directory ``flwr run`` packages: the source checkout, else a staged copy.

    ``flwr run <dir>`` bundles every Python, TOML and YAML file of ``<dir>`` next to its
    ``pyproject.toml``. In a checkout that is the repository; an installed copy lives in
    site-packages among other packages, so its app files are copied into ``staging`` first.
    """
    if (APP_DIR / "pyproject.toml").is_file():
        return APP_DIR
    if not INSTALLED_PYPROJECT.is_file():
        raise JobError(f"neither {APP_DIR / 'pyproject.toml'} nor {INSTALLED_PYPROJECT} exists")
    staging.mkdir(parents=True)
    shutil.copy(INSTALLED_PYPROJECT, staging / "pyproject.toml")
    for name in APP_PACKAGES:
        shutil.copytree(
            APP_DIR / name, staging / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    return staging


def absolute_path_overrides(cfg: DictConfig, cwd: Path) -> list[str]:
    """Overrides that pin every relative path in ``cfg`` to ``cwd``, and ``~`` to the home.

    The apps run wherever the SuperLink started, so a relative path would be read from there.
    """
    candidates = {
        "data.root": cfg.data.get("root"),
        "model.pretrained_file": cfg.model.get("pretrained_file"),
        "output_root": cfg.get("output_root"),
        "output_dir": cfg.get("output_dir"),
        # In simulation every site is this machine: its state folder is read from cwd too.
        "site_state_dir": cfg.get("site_state_dir"),
    }
    for name, hospital in cfg.data.hospitals.items():
        for key in ROOT_KEYS:
            candidates[f"data.hospitals.{name}.{key}"] = hospital.get(key)
    pinned = []
    for key, value in candidates.items():
        if not value:
            continue
        path = Path(str(value)).expanduser()
        if not path.is_absolute() or str(path) != str(value):
            pinned.append(f"{key}={override_value(str((cwd / path).resolve()))}")
    return pinned


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 quota (``--cpus``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            return max(1, min(cores or 1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores or 1


def client_cpus(cfg: DictConfig) -> float | int:
    """Each simulated ClientApp's CPUs (``federation.client_cpus``; ``auto`` shares the cores).

    Ray runs as many ClientApps at once as the CPUs allow and sets each one's OMP_NUM_THREADS to
    its share, so this is also how many threads a hospital trains with: 1 each left the cores
    of a machine with more cores than hospitals idle. ``auto`` divides the usable cores among
    the hospitals (at least 1 each), so all train at once and none shares a core.
    """
    value = cfg.federation.client_cpus
    if value == "auto":
        return max(1, usable_cores() // max(1, len(hospital_names(cfg.data))))
    try:
        cpus = number_at_least(cfg, "federation.client_cpus", 0)
    except JobError:
        raise JobError(f"federation.client_cpus={value}: expected a number >= 0 or auto") from None
    return int(cpus) if cpus.is_integer() else cpus


def check_client_resources(cfg: DictConfig, *, here: bool = True) -> None:
    """Refuse ClientApp shares that are no number, and, ``here``, one larger than this machine.

    With a share larger than the machine Ray starts no ClientApp at all, and Flower ends the
    run with three tracebacks, after the SuperLink and the ServerApp started. ``here=False``
    (the deployed ServerApp's machine, which runs no ClientApp) checks the values only.
    """
    cpus = client_cpus(cfg)
    gpus = number_at_least(cfg, "federation.client_gpus", 0)
    if not here:
        return
    if cpus > (cores := usable_cores()):
        raise JobError(
            f"federation.client_cpus={cpus}: this machine lets the run use {cores} cores "
            "(auto shares them among the hospitals)"
        )
    if gpus > (count := torch.cuda.device_count()):
        raise JobError(
            f"federation.client_gpus={cfg.federation.client_gpus}: this machine has {count} "
            "CUDA device(s) (0 lets every ClientApp use them)"
        )


def flwr_command(app_dir: Path, cfg: DictConfig, run_config_file: Path) -> list[str]:
    """The ``flwr run`` call: one simulated SuperNode per configured hospital."""
    flwr = Path(sys.executable).with_name("flwr")
    federation = (
        f"num-supernodes={len(hospital_names(cfg.data))} "
        f"client-resources-num-cpus={client_cpus(cfg)} "
        f"client-resources-num-gpus={cfg.federation.client_gpus}"
    )
    return [
        str(flwr) if flwr.exists() else (shutil.which("flwr") or "flwr"),
        "run",
        str(app_dir),
        "--stream",
        "--run-config",
        str(run_config_file),
        "--federation-config",
        federation,
    ]


RUN_STARTED = re.compile(r"Successfully started run (\d+)")
# Flower's simulation prints these on every run, whatever num-supernodes it was given. The
# federation here is sized from the data config, so its hint to resize it does not apply.
FLOWER_SIZE_HINTS = (
    "default simulated SuperNodes changed",
    "To change federation size",
    "flwr federation simulation-config",
)
# Flower colours its level names and Ray a ClientApp's "(ClientAppActor pid=...)" prefix
# whether or not they reach a terminal: a run's output saved to a file held escape codes.
COLOUR_CODE = re.compile(r"\x1b\[[0-9;]*m")


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

    Flower's hints to resize the federation are left out of what is shown, and so are colour
    codes where it goes to no terminal; the output returned keeps both. ``flwr run`` itself
    exits 0 when the ServerApp fails (a run with too few good replies, say), so the run's
    final status is asked of the SuperLink. Returns (exit code, output).
    """
    lines = []
    plain = not sys.stdout.isatty()
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if not any(hint in line for hint in FLOWER_SIZE_HINTS):
                sys.stdout.write(COLOUR_CODE.sub("", line) if plain else line)
    started = next((m.group(1) for m in map(RUN_STARTED.search, lines) if m), None)
    if process.returncode != 0 or started is None:
        return process.returncode or 1, "".join(lines)
    status = run_status(command[0], started, env)
    lines.append(f"w3s: run {started} {status}\n")
    print(lines[-1], end="", flush=True)
    return (0 if status == "finished:completed" else 1), "".join(lines)


def check_training_config(cfg: DictConfig, *, hospitals_here: bool = True) -> None:
    """Refuse values that would otherwise fail inside the ServerApp, after Flower started.

    ``hospitals_here=False`` (the deployed ServerApp) checks the device's name only: the
    hospitals train on it, on their own machines.
    """
    hospitals = len(hospital_names(cfg.data))
    check_split(cfg.data)
    if str(cfg.model.name) not in mct_presets():
        raise JobError(f"model.name={cfg.model.name}: expected one of {', '.join(mct_presets())}")
    if pretrained := cfg.model.get("pretrained_file"):
        # Read here too: where the run starts (the ServerApp), a damaged file failed the run.
        read_deit_state(Path(str(pretrained)))
    number_setting(cfg, "seed", whole=True)
    check_device(cfg, here=hospitals_here)
    check_client_resources(cfg, here=hospitals_here)
    if not isinstance(cfg.resume, bool):
        raise JobError(f"resume={cfg.resume}: expected true or false")
    if cfg.resume and not cfg.output_dir:
        raise JobError("resume=true continues a run: give its folder as output_dir=<run dir>")
    number_at_least(cfg, "federation.rounds", 1, whole=True)
    if (
        cfg.federation.min_replies is not None
        and not 1 <= number_setting(cfg, "federation.min_replies", whole=True) <= hospitals
    ):
        raise JobError(f"federation.min_replies must be in 1..{hospitals} (data={cfg.data.name})")
    if str(cfg.federation.transport_dtype) not in TRANSPORT_DTYPES:
        raise JobError(
            f"federation.transport_dtype={cfg.federation.transport_dtype}: "
            f"expected one of {', '.join(TRANSPORT_DTYPES)}"
        )
    try:
        privacy_settings(cfg.privacy, hospitals)
    except ValueError as error:
        raise JobError(f"privacy={cfg.privacy.name}: {error}") from None
    if str(cfg.strategy.name) not in STRATEGIES:
        raise JobError(f"strategy={cfg.strategy.name}: expected one of {', '.join(STRATEGIES)}")
    if cfg.privacy.name != "none" and cfg.strategy.name != "fedavg":
        raise JobError(
            f"privacy={cfg.privacy.name} needs strategy=fedavg: the noise is calibrated for a mean"
        )
    for key, value in cfg.federation.guards.items():
        guard = f"federation.guards.{key}"
        if value is not None and not number_setting(cfg, guard) > 0:
            raise JobError(f"{guard}={value}: expected a positive number or null")
    if number_setting(cfg, "pretrain.rounds", whole=True) > 0:
        method = str(cfg.pretrain.method)
        if method not in PRETRAIN_METHODS:
            raise JobError(
                f"pretrain.method={method}: expected one of {', '.join(PRETRAIN_METHODS)}"
            )
        if method == "masked" and not (
            0 < number_setting(cfg, "pretrain.mask_ratio") < 1
            and number_setting(cfg, "pretrain.mask_block", whole=True) >= 1
        ):
            raise JobError(
                f"pretrain=masked: mask_ratio={cfg.pretrain.mask_ratio} must lie in (0, 1) and "
                f"mask_block={cfg.pretrain.mask_block} be a whole number of patches >= 1"
            )
        if cfg.privacy.name != "none":
            raise JobError(
                "pretrain and privacy together: the privacy accounting covers the MCT rounds "
                "only; run pretrain=none with privacy"
            )
    if not number_setting(cfg, "federation.round_wait_for_nodes_s") >= 0:
        raise JobError("federation.round_wait_for_nodes_s must be >= 0")
    check_hospital_settings(cfg)
    check_foreground_settings(cfg)
    check_training_numbers(cfg)
    if (mode := str(cfg.model.standardise_input)) not in STANDARDISE_MODES:
        raise JobError(f"model.standardise_input={mode}: expected one of {STANDARDISE_MODES}")
    try:
        MapSettings.from_config(OmegaConf.to_container(cfg.localization))
        check_thresholds(cfg.localization.thresholds)
    except ValueError as error:
        raise JobError(str(error)) from None
    try:
        # The preset's own shape checks (an image side of whole patches), before Flower starts.
        create_mct_model(cfg.model, num_classes=len(cfg.data.classes), load_pretrained=False)
    except ValueError as error:
        raise JobError(f"model={cfg.model.name}: {error}") from None


# Lower bounds of the local training and pretraining keys, and whether each is a whole number.
LOCAL_NUMBERS = {
    "local_epochs": (1, True),
    "batch_size": (1, True),
    "lr": (0, False),
    "warmup_lr": (0, False),
    "min_lr": (0, False),
    "warmup_epochs": (0, False),
    "weight_decay": (0, False),
}


def check_training_numbers(cfg: DictConfig) -> None:
    """Refuse numbers that fail every ClientApp at its first step (``batch_size=0``, ``lr=abc``).

    Each hospital's ``train.per_hospital`` values are checked as it will train with them.
    """
    for where, train in hospital_trainings(cfg):
        node = OmegaConf.create({"train": OmegaConf.to_container(train)})
        try:
            for key, (least, whole) in {**LOCAL_NUMBERS, "proximal_mu": (0, False)}.items():
                number_at_least(node, f"train.{key}", least, whole=whole)
        except JobError as error:
            raise JobError(f"{where}{error.brief()}") from None
    if number_at_least(cfg, "pretrain.rounds", 0, whole=True) > 0:
        for key, (least, whole) in LOCAL_NUMBERS.items():
            number_at_least(cfg, f"pretrain.{key}", least, whole=whole)
    number_at_least(cfg, "model.img_size", 1, whole=True)
    if not number_setting(cfg, "federation.round_timeout_s") > 0:
        raise JobError(f"federation.round_timeout_s={cfg.federation.round_timeout_s}: expected > 0")
    if cfg.strategy.name == "fedtrimmedavg" and not 0 <= number_setting(cfg, "strategy.beta") < 0.5:
        raise JobError(f"strategy.beta={cfg.strategy.beta}: expected a share in [0, 0.5)")


def check_thresholds(thresholds: object) -> None:
    """Validation's candidate foreground thresholds: a non-empty list of numbers in [0, 1]."""
    values = list(thresholds) if OmegaConf.is_list(thresholds) else []
    if not values or not all(
        isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t <= 1 for t in values
    ):
        raise ValueError(
            f"localization.thresholds={thresholds}: expected a list of numbers in [0, 1]"
        )


def hospital_trainings(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """The shared ``train`` settings, then each ``train.per_hospital`` hospital's own merge.

    Each with the prefix that names it in an error (``hospital <name>: ``), so that every check
    reads a hospital's settings as its ClientApp will train with them.
    """
    own = [
        (f"hospital {h}: ", hospital_train_config(cfg, str(h)))
        for h in cfg.train.per_hospital or {}
    ]
    return [("", cfg.train), *own]


def check_hospital_settings(cfg: DictConfig) -> None:
    """Every ``train.per_hospital`` and ``model.per_hospital`` entry fits a configured hospital.

    A misspelt hospital would otherwise be silently ignored, and an unknown key or mode would
    fail that hospital's ClientApp at its first round.
    """
    names = hospital_names(cfg.data)
    checks = (
        ("train", hospital_train_config),
        ("model", lambda cfg, hospital: hospital_standardisation(cfg.model, hospital)),
    )
    for group, check in checks:
        for hospital in cfg[group].get("per_hospital") or {}:
            if hospital not in names:
                raise JobError(
                    f"{group}.per_hospital.{hospital}: no such hospital in data={cfg.data.name} "
                    f"(hospitals: {', '.join(names)})"
                )
            try:
                check(cfg, str(hospital))
            except ValueError as error:
                raise JobError(str(error)) from None
    # Each hospital's augmentation as its ClientApp will build it.
    for _, train in hospital_trainings(cfg):
        if problem := magnitude_problem(train["augment"]):
            raise JobError(problem)


def check_foreground_settings(cfg: DictConfig) -> None:
    """Refuse foreground settings that would fail every ClientApp at its first step.

    Size bounds and the copy-paste share must be shares, at every hospital. A model without the
    foreground head can neither train it nor give its maps nor the cells that copy-paste moves;
    the head's training and maps are on by default, so ``model.foreground_head=false`` alone
    would otherwise fail at the first training step or evaluation, after any pretraining.
    """
    trainings = hospital_trainings(cfg)
    for where, train in trainings:
        try:
            size_bounds(train.levers.foreground.size_bounds)
            paste_share(train.levers.copy_paste)
        except ValueError as error:
            raise JobError(f"{where}{error}") from None
    if cfg.model.get("foreground_head"):
        return
    levers = {k: v for _, train in trainings for k, v in head_levers(train.levers).items()}
    source = str(cfg.localization.source)
    if levers or source in FOREGROUND_SOURCES:
        raise JobError(
            "model.foreground_head=false, but "
            + ", ".join(
                [f"train.levers.{k}={v}" for k, v in levers.items()]
                + ([f"localization.source={source}"] if source in FOREGROUND_SOURCES else [])
            )
            + " need the head; add localization=fused and set those levers to 0 "
            "(as experiment=paper does)"
        )


RESUME_HINT = (
    "Its checkpoints stay in the run directory printed above; the same overrides with "
    "output_dir=<that directory> resume=true continue it."
)


def flower_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the settings ``flwr run`` needs here; a variable the user set is kept."""
    # Installing the app's dependencies per run (Flower's default) would re-download torch.
    # Flower reports usage to flower.ai and asks it for updates by default; a run on hospital
    # data contacts no one (the user may set them back).
    settings = {
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        **QUIET,
        **RAY_KEEPS_GPUS,
        **RAY_PRINTS_EVERY_LINE,
    }
    return {**settings, **base}


def simulate(cfg: DictConfig, overrides: list[str]) -> int:
    """Run the federated simulation; the exit status is 0 only when the run completed."""
    overrides = [*overrides, *absolute_path_overrides(cfg, Path.cwd())]
    cfg = compose_config(overrides)
    # Refuse to start Flower on data that the ClientApps would fail to read.
    if problems := verify_data(cfg.data):
        raise DataVerificationError(problems)
    joined = " ".join(shlex.quote(o) for o in overrides)
    env = flower_environment(os.environ)
    # flwr starts flower-superlink by name: find this environment's even when not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env[RUN_MARKER] = marker = uuid.uuid4().hex
    # flwr run reuses any local SuperLink that answers on its default ports, so two runs on one
    # machine would share one, and the first to end would stop it under the other: each run
    # starts its own on free ports, unless the user chose them.
    unset = [port for port in LOCAL_SUPERLINK_PORTS if port not in env]
    env.update(zip(unset, map(str, free_ports(len(unset))), strict=True))
    # That SuperLink keeps its state in $FLWR_HOME/local-superlink/state.db; two SuperLinks on
    # one database fail each other's runs, so each run gets its own Flower home under the
    # user's, kept when the run did not complete (the SuperLink's log is in it).
    flwr_home = Path(env.get("FLWR_HOME") or Path.home() / ".flwr") / "w3s-simulate" / marker
    env["FLWR_HOME"] = str(flwr_home)
    status = 1
    with (
        tempfile.TemporaryDirectory(prefix="w3s-simulate-") as tmp,
        guarded_run(marker, Path(tmp), f"Flower's logs of this run: {flwr_home}. {RESUME_HINT}"),
    ):
        run_config = Path(tmp) / "run_config.toml"
        # Not ASCII-escaped: TOML refuses the surrogate pairs JSON writes past U+FFFF.
        run_config.write_text(
            f"overrides = {json.dumps(joined, ensure_ascii=False)}\n", encoding="utf-8"
        )
        app_dir = flower_app_dir(Path(tmp) / "app")
        command = flwr_command(app_dir, cfg, run_config)
        print("w3s-simulate:", shlex.join(command), flush=True)
        try:
            status = run_and_check(command, env)[0]
        except KeyboardInterrupt:
            print(f"w3s-simulate: stopping this run's Flower processes. {RESUME_HINT}", flush=True)
            raise
        finally:
            stop_marked_processes(marker)
            if status == 0:
                shutil.rmtree(flwr_home, ignore_errors=True)
            else:
                print(f"w3s-simulate: Flower's state and logs of this run: {flwr_home}", flush=True)
    return status


COMMAND = Command(
    name="w3s-simulate",
    summary=__doc__,
    config="config",
    job=simulate,
    check=check_training_config,
    keys={
        "data": "synthetic (default), wbc_zxaoyou, raabin, matek19, or your own conf/data/*.yaml",
        "model": "tiny (default, CPU) or deit_small (the paper's scale)",
        "federation.rounds": "rounds of FedAvg",
        "train.local_epochs": "local epochs per round at each hospital",
        "privacy": "none (default), client_clip or server_clip",
        "strategy": "fedavg (default), fedtrimmedavg or fedmedian",
        "output_dir": "the run directory (default: <output_root>/<time>_run<id>)",
        "resume": "continue output_dir from its newest checkpoint (true/false)",
    },
    examples=[
        "w3s-simulate",
        "w3s-simulate data=wbc_zxaoyou federation.rounds=30 train.local_epochs=2",
        "w3s-simulate experiment=paper device=cuda",
    ],
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-simulate``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
