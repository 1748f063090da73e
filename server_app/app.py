"""The federation's server: weighted FedAvg of the MCT transformer over every hospital."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid
from omegaconf import DictConfig, OmegaConf, open_dict

from common.arrays import to_array_record, to_state_dict
from common.checkpoint import (
    CheckpointError,
    check_model_name,
    latest_checkpoint,
    load_weights,
    round_files,
    save_model,
)
from common.config import compose_config, parse_overrides
from common.data import federated_hospitals, hospital_names
from common.errors import JobError
from common.files import read_json
from common.logs import flower_warnings_only, setup_logging
from common.model import create_mct_model
from server_app.launch import check_training_config
from server_app.privacy import PRIVACY_FILE, with_privacy
from server_app.recorder import (
    DECLARED_FILE,
    METRICS_FILE,
    PHASES,
    RoundRecorder,
    checkpoint_prefix,
    released_splits,
)
from server_app.strategy import (
    GuardedFedAvg,
    Guards,
    RunStoppedError,
    build_strategy,
    online_nodes,
)

log = logging.getLogger(__name__)

app = ServerApp()

FINAL_MODEL = "final_model.pt"

# A simulation's SuperNodes are registered before the ServerApp starts; a short wait suffices.
SIMULATION_WAIT_S = 10.0


def run_directory(cfg: DictConfig, run_id: int) -> Path:
    """``output_dir`` when set, else a fresh ``<output_root>/<time>_run<id>``; must be absolute.

    The ServerApp's working directory is wherever the SuperLink first started, so a relative
    path would land somewhere surprising; it is refused instead.
    """
    if cfg.output_dir:
        path = Path(cfg.output_dir)
    else:
        path = Path(cfg.output_root) / f"{time.strftime('%Y%m%d-%H%M%S')}_run{run_id}"
    if not path.is_absolute():
        raise ValueError(f"output directory must be an absolute path, got '{path}'")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_hospitals(cfg: DictConfig, grid: Grid) -> list[str]:
    """The hospitals of this run, one per connected SuperNode (see ``federated_hospitals``).

    Real data must match the nodes exactly: in simulation that is known within seconds, in
    deployment after ``wait_for_nodes_s``.
    """
    configured = hospital_names(cfg.data)
    simulated = isinstance(grid, InMemoryGrid)
    wait_s = cfg.federation.wait_for_nodes_s
    if simulated:
        wait_s = min(SIMULATION_WAIT_S, wait_s)
    # Deployed hospitals may come up one by one, so the wait is long there; a simulation's
    # nodes all exist from the start.
    connected = len(online_nodes(grid, len(configured), wait_s))
    if not simulated:
        # Deployed hospitals name their data themselves: none is dropped from the config.
        if connected != len(configured):
            raise RuntimeError(
                f"{len(configured)} hospitals are configured but {connected} SuperNodes are "
                f"connected after {wait_s:.0f} s"
            )
        return configured
    try:
        hospitals = federated_hospitals(cfg.data, connected)
    except ValueError as error:
        raise RuntimeError(str(error)) from None
    if len(hospitals) < len(configured):
        log.warning(
            "%d SuperNodes for %d synthetic hospitals: training on %s (w3s-simulate or "
            '--federation-config "num-supernodes=%d" runs all of them)',
            len(hospitals),
            len(configured),
            hospitals,
            len(configured),
        )
    return hospitals


@dataclass(frozen=True)
class StartingPoint:
    """Where a run starts: its phase, the rounds of that phase already done, and the model.

    ``splits`` holds the split fingerprints the hospitals sent in the rounds behind the model,
    ``declared`` the num-examples each hospital declared in its first round of the run (the
    cap's base, by hospital name): both carry over from the pretraining rounds to the MCT
    rounds, in one process or across a resume alike.
    """

    phase: str  # "pretrain" or "mct"
    done: int
    arrays: ArrayRecord
    splits: Mapping[str, Sequence[int]] = field(default_factory=dict)
    declared: Mapping[str, float] = field(default_factory=dict)


def starting_point(cfg: DictConfig, run_dir: Path) -> StartingPoint:
    """Fresh (an earlier run's model files removed), or the newest readable checkpoint.

    With ``resume=true`` the run continues in ``output_dir`` from its newest readable
    checkpoint; clients are told the true round numbers, so the learning-rate schedule and
    the shuffling seeds continue as if the run had never stopped. A run stopped in its
    pretraining phase continues that phase; each hospital reads its private head back from its
    own disk (client_app/pretrain_heads.py).
    """
    first_phase = "pretrain" if int(cfg.pretrain.rounds) > 0 else "mct"
    if cfg.resume:
        checkpoints = run_dir / "checkpoints"
        phase, found = "mct", latest_checkpoint(checkpoints)
        if found is None and first_phase == "pretrain":
            phase, found = "pretrain", latest_checkpoint(checkpoints, checkpoint_prefix("pretrain"))
        if found is None:
            raise FileNotFoundError(f"resume=true but no readable checkpoint in {run_dir}")
        path, payload = found
        check_resumable(cfg, path, payload)
        if phase == "mct" and int(payload["round"]) > int(cfg.federation.rounds):
            raise ValueError(
                f"resume=true: {path} is of round {payload['round']}, past "
                f"federation.rounds={cfg.federation.rounds}; its final model would be labelled "
                "with a round it is not of (set federation.rounds to at least that round)"
            )
        log.info("resuming from %s (%s round %d)", path, phase, payload["round"])
        return StartingPoint(
            phase,
            int(payload["round"]),
            to_array_record(payload["state_dict"]),
            dict(payload.get("splits") or {}),
            declared_examples(run_dir),
        )
    replace_earlier_run(run_dir)
    torch.manual_seed(cfg.seed)
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    return StartingPoint(first_phase, 0, to_array_record(model.state_dict()))


def check_resumable(cfg: DictConfig, path: Path, payload: Mapping[str, Any]) -> None:
    """Refuse a checkpoint the configured model cannot take, naming it, before a round starts.

    Every hospital would otherwise fail to load it in its first round, and the run would stop
    on too few replies without saying why.
    """
    check_model_name(payload, path, str(cfg.model.name))
    if list(payload["classes"]) != list(cfg.data.classes):
        raise CheckpointError(
            f"resume=true: {path} was trained on classes {list(payload['classes'])}, the data "
            f"config has {list(cfg.data.classes)}"
        )
    with torch.random.fork_rng(devices=[]):  # a resumed run draws what it drew before
        model = create_mct_model(cfg.model, len(cfg.data.classes), load_pretrained=False)
    load_weights(model, payload["state_dict"], f"resume=true: {path}", str(cfg.model.name))


def replace_earlier_run(run_dir: Path) -> None:
    """Remove an earlier run's model files and rows from ``run_dir`` before a fresh run.

    A resume of the fresh run would otherwise start from the earlier run's newest checkpoint
    (of either phase) and cap its hospitals by the earlier declarations, a fresh run that fails
    would leave the earlier ``final_model.pt``, and the earlier rows of the phase the fresh run
    has not reached would stay among its own. The earlier privacy ledger goes too: left until
    the MCT rounds, it made a resume of a run stopped in pretraining refuse the run's own
    privacy setting.
    """
    earlier = [
        path
        for phase in PHASES
        for _, path in round_files(run_dir / "checkpoints", checkpoint_prefix(phase))
    ]
    earlier += [
        path
        for name in (FINAL_MODEL, METRICS_FILE, DECLARED_FILE, PRIVACY_FILE)
        if (path := run_dir / name).exists()
    ]
    if not earlier:
        return
    log.warning(
        "%s holds an earlier run (%s); this fresh run replaces it (resume=true continues a run)",
        run_dir,
        ", ".join(path.name for path in earlier),
    )
    for path in earlier:
        path.unlink(missing_ok=True)


def guards(cfg: DictConfig) -> Guards:
    """The update guards of ``federation.guards``; a null value switches that guard off."""
    values = cfg.federation.guards

    def number(key: str) -> float | None:
        value = values.get(key)
        return None if value is None else float(value)

    return Guards(
        max_update_model_ratio=number("max_update_model_ratio"),
        max_update_norm_ratio=number("max_update_norm_ratio"),
        peer_norm_floor=number("peer_norm_floor"),
        max_examples_growth=number("max_examples_growth"),
        max_reply_model_ratio=number("max_reply_model_ratio"),
    )


def declared_examples(run_dir: Path) -> dict[str, float]:
    """What each hospital declared in its first round of a run being resumed, by name."""
    path = run_dir / DECLARED_FILE
    if not path.exists():
        return {}
    declared = read_json(path)
    if not isinstance(declared, dict) or not all(
        isinstance(n, int | float) and not isinstance(n, bool) for n in declared.values()
    ):
        raise ValueError(f"{path} should map hospital names to numbers of examples: {declared}")
    return {str(name): float(n) for name, n in declared.items()}


def federation_strategy(
    cfg: DictConfig, hospitals: list[str], start: StartingPoint
) -> GuardedFedAvg:
    """The configured strategy with its guards, for the rounds after ``start``, of any phase."""
    return build_strategy(
        cfg.strategy,
        num_hospitals=len(hospitals),
        min_replies=cfg.federation.min_replies or len(hospitals),
        round_offset=start.done,
        transport_dtype=str(cfg.federation.transport_dtype),
        hospitals=hospitals,
        guards=guards(cfg),
        round_wait_for_nodes_s=float(cfg.federation.round_wait_for_nodes_s),
        declared_examples={
            hospitals.index(name): n for name, n in start.declared.items() if name in hospitals
        },
        split_digests=start.splits,
    )


def pretrain(
    cfg: DictConfig, grid: Grid, hospitals: list[str], run_dir: Path, start: StartingPoint
) -> StartingPoint:
    """Run the ``pretrain`` phase's rounds after ``start``; return where the MCT rounds start.

    The same strategy, guards, checkpoints and metrics rows as the MCT rounds; the training
    messages carry ``phase=pretrain``, so each ClientApp runs ``cfg.pretrain.method`` instead
    of the MCT loss (client_app/app.py).
    """
    rounds = int(cfg.pretrain.rounds)
    if start.done >= rounds:
        log.info("pretraining: all %d rounds done before", rounds)
        return StartingPoint("mct", 0, start.arrays, start.splits, start.declared)
    strategy = federation_strategy(cfg, hospitals, start)
    recorder = RoundRecorder(run_dir, cfg, strategy, hospitals, phase="pretrain")
    recorder.forget_rounds_after(start.done)
    log.info(
        "pretraining: %s, %d rounds (now rounds %d..%d)",
        cfg.pretrain.method,
        rounds,
        start.done + 1,
        rounds,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=start.arrays,
        num_rounds=rounds - start.done,
        timeout=cfg.federation.round_timeout_s,
        train_config=ConfigRecord({"phase": "pretrain"}),
        # Read by a failing ClientApp's log line only, which otherwise said "mct round".
        evaluate_config=ConfigRecord({"phase": "pretrain"}),
        evaluate_fn=recorder,
    )
    arrays = result.arrays if len(result.arrays) else start.arrays
    return StartingPoint("mct", 0, arrays, strategy.split_digests, recorder.declared())


@contextmanager
def strategy_rounds(phase: str) -> Iterator[None]:
    """Around a strategy's rounds: Flower's lines per round muted, a stop logged in one line.

    The recorder logs one line a round; a phase the strategy stops (too few replies or nodes)
    gets one ``run stopped:`` line.
    """
    try:
        with flower_warnings_only():
            yield
    except RunStoppedError as error:
        log.error("run stopped: %s%s", phase, error)
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the config from the run's overrides, run the rounds, save the final model."""
    setup_logging()
    cfg = compose_config(parse_overrides(str(context.run_config["overrides"])))
    # w3s-simulate checks these before Flower starts; a deployed or bare `flwr run` reaches
    # here unchecked, where a bad value would be silently ignored or fail the ClientApps.
    check_training_config(cfg, hospitals_here=False)
    run_dir = run_directory(cfg, context.run_id)
    log.info("run directory: %s", run_dir)
    hospitals = run_hospitals(cfg, grid)
    with open_dict(cfg):
        for dropped in set(hospital_names(cfg.data)) - set(hospitals):
            del cfg.data.hospitals[dropped]
    min_replies = cfg.federation.min_replies or len(hospitals)
    if min_replies > len(hospitals):  # before an earlier run in run_dir is replaced
        raise JobError(
            f"federation.min_replies={min_replies}, but {len(hospitals)} hospitals joined "
            f"the run ({', '.join(hospitals)})"
        )
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")

    start = starting_point(cfg, run_dir)
    if start.phase == "pretrain":
        with strategy_rounds("pretraining "):
            start = pretrain(cfg, grid, hospitals, run_dir, start)
    done = start.done
    strategy = federation_strategy(cfg, hospitals, start)
    recorder = RoundRecorder(run_dir, cfg, strategy, hospitals)
    recorder.forget_rounds_after(done)
    log.info(
        "%d hospitals %s, rounds %d..%d, model %s, strategy %s, at least %d good replies per "
        "round, guards %s",
        len(hospitals),
        hospitals,
        done + 1,
        cfg.federation.rounds,
        cfg.model.name,
        strategy.name,
        min_replies,
        strategy.guards,
    )
    federation = with_privacy(strategy, cfg.privacy, len(hospitals), run_dir, bool(cfg.resume))
    with strategy_rounds(""):
        result = federation.start(
            grid=grid,
            initial_arrays=start.arrays,
            num_rounds=cfg.federation.rounds - done,
            timeout=cfg.federation.round_timeout_s,
            evaluate_fn=recorder,
        )
    final_arrays = result.arrays if len(result.arrays) else start.arrays
    final = save_model(
        to_state_dict(final_arrays),
        cfg,
        cfg.federation.rounds,
        run_dir / FINAL_MODEL,
        released_splits(cfg, strategy),
    )
    log.info("run directory: %s", run_dir)
    log.info("final model: %s", final)
