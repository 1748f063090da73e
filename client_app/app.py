"""The hospital side: train and evaluate the global MCT model on this hospital's own images."""

from __future__ import annotations

import functools
import logging
import resource
import shlex
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from client_app.pretrain_heads import forget_heads, head_directory, latest_head, save_head
from client_app.privacy import privacy_mod
from common.arrays import (
    SPLIT_KEY,
    WEIGHT_KEY,
    cast_floating,
    pack,
    tensor_specs,
    to_array_record,
    to_state_dict,
    unpack,
)
from common.augment import train_cache_size
from common.checkpoint import weights_mismatch
from common.config import compose_config, override_value, parse_overrides
from common.data import (
    DataVerificationError,
    empty_split_detail,
    federated_hospitals,
    hospital_names,
    hospital_split,
    split_digest,
    split_tensors,
)
from common.logs import metrics_text, setup_logging
from common.model import MCTFormerV2, create_mct_model
from common.pretrain import pretrain_round
from common.training import (
    TrainResult,
    evaluate_local,
    resolve_device,
    site_label_shift,
    train_round,
)

log = logging.getLogger(__name__)
# Node-state key of this hospital's private pretraining head (an instance head has one output
# per local image, a pixel decoder redraws its crops): it never leaves the site; only the
# backbone is sent back.
PRETRAIN_HEAD = "pretrain-head"
# privacy_mod clips updates only in runs with privacy=client_clip (client_app/privacy.py).
app = ClientApp(mods=[privacy_mod])


class HospitalDataError(RuntimeError):
    """Raised instead of the full data report, which names files and stays in this site's log."""


class SiteFailure(RuntimeError):
    """What the server learns of a failure here: the stage and the kind of error, nothing else.

    Flower sends ``str(type(ex)) + str(ex)`` of any exception to the server, and exception
    texts name files, sample ids and paths; the full traceback stays in this site's log.
    """


def site_private(handler: Callable[[Message, Context], Message]) -> Callable[..., Message]:
    """Log a handler's exception in full here and re-raise it without its text."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except HospitalDataError:
            raise
        except Exception as error:
            where = _message_of(msg, context)
            log.exception("%s failed at this site (%s)", handler.__name__, where)
            raise SiteFailure(
                f"{handler.__name__} failed with {type(error).__name__}; "
                "details are in this hospital's log"
            ) from None

    return guarded


def _message_of(msg: Message, context: Context) -> str:
    """Which hospital, phase and round a message was for, as far as a failure lets it be told.

    Simulated hospitals share processes and one console, and the only other line naming the
    hospital is logged once per process: a failure line must say whose it is.
    """
    name, phase, server_round = "?", "?", "?"
    try:  # the failure may lie in reading these very things
        config = msg.content.config_records.get("config", {})
        phase, server_round = config.get("phase", "mct"), config.get("server-round", "?")
        name = _hospital(context, _config(str(context.run_config["overrides"])))[1]
    except Exception:
        pass
    return f"hospital {name}, {phase} round {server_round}"


@functools.cache
def _config(overrides: str) -> DictConfig:
    return compose_config(parse_overrides(overrides))


def _hospital(context: Context, cfg: DictConfig) -> tuple[int, str]:
    """Which configured hospital this node is: ``hospital`` in node config, else partition-id.

    A deployed SuperNode names itself (``--node-config 'hospital="dataset1" ...'``); a
    simulated one only knows its partition-id, which indexes the configured hospital list.
    """
    names = hospital_names(cfg.data)
    node_config = context.node_config
    if "hospital" in node_config:
        name = str(node_config["hospital"])
        if name not in names:
            raise ValueError(f"node config names hospital '{name}', not one of {names}")
        return names.index(name), name
    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode's node config names no hospital: start it with "
            f'--node-config \'hospital="<name>" data-root="<folder>"\' (one of {names})'
        )
    partition = int(node_config["partition-id"])
    federated = federated_hospitals(cfg.data, int(node_config.get("num-partitions", len(names))))
    return partition, federated[partition]


def _setup(msg: Message, context: Context) -> tuple[DictConfig, int, str, MCTFormerV2]:
    """Compose this node's config: the run's overrides, plus its own data root when deployed.

    The run config comes from the server side and is the same for every hospital; only a
    SuperNode's ``data-root`` node config says where this hospital's images are on its disk
    (ignored for formats without files, such as the synthetic hospitals).
    """
    setup_logging()
    overrides = str(context.run_config["overrides"])
    cfg = _config(overrides)
    index, name = _hospital(context, cfg)
    if "data-root" in context.node_config and "root" in cfg.data.hospitals[name]:
        root = str(context.node_config["data-root"])
        pinned = f"data.hospitals.{name}.root={override_value(root)}"
        cfg = _config(f"{overrides} {shlex.quote(pinned)}")
    model = create_mct_model(cfg.model, len(cfg.data.classes), hospital=name, load_pretrained=False)
    layout = tensor_specs(model.state_dict())
    state = to_state_dict(unpack(msg.content["arrays"], layout))
    # NaN weights evaluated to believable accuracies beside a NaN loss: refused by name.
    if problem := weights_mismatch(model.state_dict(), state):
        raise ValueError(f"the global model received: {problem}")
    model.load_state_dict(state)
    return cfg, index, name, model


def _tensors(cfg: DictConfig, name: str, split: str, size: int):
    """A split of this hospital, read and verified when this process first needs it.

    Data-fault policy (docs/reliability.md): a file that is unreadable, truncated or, where a
    label file lists it, missing fails this hospital for the message with a HospitalDataError
    that only counts problems per kind; the full list, with paths, stays in this site's log.
    A bad file is never skipped silently; a file deleted from a class folder is no longer
    listed, and the hospital trains on the rest (its count is logged and sent as the reply's
    weight). Reads are cached per process: a deployed SuperNode starts a ClientApp process per
    message and so re-verifies every round, a simulated one keeps its copy. The server leaves
    the failing hospital out of the round, which closes if federation.min_replies others
    answered.
    """
    try:
        tensors = split_tensors(cfg.data, name, split, size)
    except DataVerificationError as error:
        log.error("%s", error)
        raise HospitalDataError(
            f"{error.redacted()}; run w3s-verify at this site for the list"
        ) from None
    if len(tensors.labels) == 0:
        # A class of one image goes to training whole and one of two leaves its test split
        # none, so a small hospital can have no validation or test image at all; each
        # round's evaluation failed on it without a word.
        raise HospitalDataError(f"hospital {name}: {empty_split_detail(cfg.data, split)}")
    return tensors


def previous_head(
    heads: Path | None, name: str, server_round: int
) -> dict[str, torch.Tensor] | None:
    """The site's newest head before ``server_round`` from its disk, when the node state lost it.

    That happens when a killed run is resumed (new processes) or this SuperNode restarted.
    """
    found = None if heads is None else latest_head(heads, server_round - 1)
    if found is None:
        log.warning(
            "hospital %s pretrain round %d: no pretraining head of an earlier round is in "
            "this node's state or on its disk; starting a fresh one",
            name,
            server_round,
        )
        return None
    head_round, head = found
    log.info("hospital %s: pretraining head of round %d read from %s", name, head_round, heads)
    return head


@app.train()
@site_private
def train(msg: Message, context: Context) -> Message:
    """Run the configured local epochs from the global weights; reply weights and train loss."""
    cfg, index, name, model = _setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    phase = str(msg.content["config"].get("phase", "mct"))
    data = _tensors(cfg, name, "train", train_cache_size(cfg.model.img_size))
    device = resolve_device(cfg.device)
    result: TrainResult
    heads = head_directory(cfg, name)
    if phase == "pretrain":
        kept = context.state.array_records.get(PRETRAIN_HEAD)
        previous = to_state_dict(kept) if kept is not None else None
        if previous is None and server_round > 1:
            previous = previous_head(heads, name, server_round)
        result, head = pretrain_round(
            model,
            data,
            cfg,
            previous,
            server_round=server_round,
            hospital_index=index,
            device=device,
        )
        context.state[PRETRAIN_HEAD] = to_array_record(head)
        if heads is not None:
            save_head(heads, server_round, head)
    elif phase == "mct":
        if heads is not None:
            forget_heads(heads)
        result = train_round(
            model,
            data,
            cfg,
            server_round=server_round,
            hospital_index=index,
            device=device,
            hospital=name,
        )
    else:
        raise ValueError(f"unknown training phase {phase!r}")
    log.info(
        "hospital %s %s round %d: loss %.4f on %d images in %.1fs on %s",
        name,
        phase,
        server_round,
        result.loss,
        result.num_examples,
        result.seconds,
        # On a CPU the threads set the speed: federation.client_cpus in simulation.
        f"cpu (threads: {torch.get_num_threads()})" if device.type == "cpu" else device,
    )
    metrics = MetricRecord(
        {
            "train-loss": result.loss,
            "train-seconds": result.seconds,
            "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            WEIGHT_KEY: result.num_examples,
            "hospital-index": index,
            SPLIT_KEY: split_digest(cfg.data, name),
        }
    )
    arrays = pack(
        cast_floating(to_array_record(model.state_dict()), cfg.federation.transport_dtype)
    )
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@site_private
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this hospital's validation split."""
    cfg, index, name, model = _setup(msg, context)
    data = _tensors(cfg, name, "val", cfg.model.img_size)
    labels = hospital_split(cfg.data, name, "train").labels
    shift = site_label_shift(cfg, name, labels, model.num_classes)
    with torch.inference_mode():
        metrics = evaluate_local(
            model, data, cfg.localization, device=resolve_device(cfg.device), shift=shift
        )
    log.info("hospital %s evaluate: %s", name, metrics_text(metrics))
    reply = MetricRecord({**metrics, WEIGHT_KEY: len(data.labels), "hospital-index": index})
    return Message(content=RecordDict({"metrics": reply}), reply_to=msg)
