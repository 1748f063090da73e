"""Differential privacy as an option: clipping, calibrated Gaussian noise and an ε accountant.

``cfg.privacy`` (conf/privacy/) picks one of

- ``none``: the guarded strategy as it is;
- ``client_clip``: each hospital clips its update with Flower's ``fixedclipping_mod``
  (client_app/privacy.py applies it); the server rejects a reply whose update is over the
  clipping norm, re-clips the rest (idempotent, it only absorbs rounding) and adds the noise;
- ``server_clip``: the server clips each update, sums over the hospitals asked and adds noise.

Calibration (docs/privacy.md): the updates of the round's screened replies, each clipped to
``C = clipping_norm``, are summed with equal weights (not by num-examples, which would let a
hospital with more images, or one that claims more, move the model by more than its share) and
divided by ``n``, the hospitals asked, whether or not all replied: DP-FedAvg's fixed
denominator (McMahan et al., ICLR 2018). Gaussian noise of standard deviation
``noise_multiplier * C / n`` is added to every parameter. Adding or removing one hospital moves
the release by at most ``C / n`` and leaves its noise as it was, so each round is one Gaussian
mechanism of multiplier ``noise_multiplier`` for that relation; dividing by the replies instead
would let the noise scale reveal how many took part and double the reach of one hospital's
update. Flower's RDP accountant (``flwr.serverapp.RdpAccountant``, Google's dp-accounting
underneath) composes the rounds and reports ε at ``privacy.delta``.

Flower's wrapper classes are kept for configuring rounds (the client-side one sends the clipping
norm); their ``aggregate_train`` is replaced: Flower's skips a round with any error reply,
assumes ``num_sampled_clients`` replies, averages by num-examples and divides by an update's
norm (an update equal to the global model raised ZeroDivisionError).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from omegaconf import DictConfig

from common.files import read_json, write_text_atomically
from server_app.strategy import GuardedFedAvg, model_norm

log = logging.getLogger(__name__)

PRIVACY_FILE = "privacy.json"
# Rounding slack when checking that a client_clip update is within the clipping norm.
CLIENT_CLIP_TOLERANCE = 1.01
OPTIONS = ("none", "client_clip", "server_clip")


def privacy_settings(privacy: DictConfig, num_hospitals: int) -> dict[str, Any]:
    """The privacy parameters of a run as recorded in ``privacy.json``, defaults filled in."""
    if privacy.name == "none":
        return {"name": "none"}
    if privacy.name not in OPTIONS:
        raise ValueError(f"unknown privacy option {privacy.name!r}; expected one of {OPTIONS}")
    values = {}
    for key in ("noise_multiplier", "clipping_norm", "delta"):
        try:
            values[key] = float(privacy[key])
        except (TypeError, ValueError):
            raise ValueError(f"privacy.{key}={privacy[key]}: expected a number") from None
    noise_multiplier, clipping_norm, delta = values.values()
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if clipping_norm <= 0 or not math.isfinite(clipping_norm):
        raise ValueError(f"clipping_norm must be > 0, got {clipping_norm}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return {
        "name": str(privacy.name),
        "noise_multiplier": noise_multiplier,
        "clipping_norm": clipping_norm,
        "delta": delta,
        "hospitals": num_hospitals,
        "aggregation": "sum of the clipped updates of the replies / hospitals asked",
        "noise": "stdev noise_multiplier * clipping_norm / hospitals asked, per parameter",
        "accountant": "RDP (flwr.serverapp.RdpAccountant on dp-accounting), no sampling "
        "amplification, add-or-remove-one hospital",
    }


class PrivacyLedger:
    """Every noisy release of the run, the ε spent so far, and ``privacy.json`` kept current.

    A resumed run keeps every release ``earlier`` (what ``privacy.json`` held) records, those
    after the checkpoint it resumes from included: Flower sends a round's noisy model to the
    hospitals for evaluation before that round's checkpoint is written, so a server stopped in
    between has released a model, and the redone round releases another. ε therefore covers
    the whole run and never shrinks. Each release is composed with its own noise multiplier, so
    a resume with another ``privacy.noise_multiplier`` cannot re-price the releases made before
    it. A fresh run starts an empty ledger, whatever an earlier run left in ``path``.
    """

    def __init__(
        self, settings: dict[str, Any], path: Path, earlier: Mapping[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.path = path
        self.rounds: list[dict[str, Any]] = _recorded_releases(earlier or {})
        self._write()

    def epsilon(self) -> float | None:
        """ε spent at ``delta`` by the releases so far; None once one had no noise (ε = ∞)."""
        multipliers = [float(row["noise_multiplier"]) for row in self.rounds]
        if 0.0 in multipliers:
            return None
        if not multipliers:
            return 0.0
        hospitals = int(self.settings["hospitals"])
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=self.settings["delta"],
                population_size=hospitals,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        for multiplier, count in Counter(multipliers).items():
            event = GaussianPrivacyEvent(
                noise_multiplier=multiplier, sample_size=hospitals, population_size=hospitals
            )
            accountant.compose(event, count)
        return float(accountant.get_privacy_spent().epsilon)

    def release(self, server_round: int, replies: int, noise_stdev: float) -> None:
        """Account one noisy global model; log the ε so far and rewrite ``privacy.json``."""
        self.rounds.append(
            {
                "round": server_round,
                "replies": replies,
                "noise_stdev": noise_stdev,
                "noise_multiplier": self.settings["noise_multiplier"],
            }
        )
        epsilon = self.epsilon()
        shown = "inf (no noise)" if epsilon is None else f"{epsilon:.4g}"
        log.info(
            "differential privacy: round %d summed %d clipped updates with equal weights over "
            "%d hospitals, noise stdev %.4g per parameter; epsilon %s at delta %g after %d rounds",
            server_round,
            replies,
            int(self.settings["hospitals"]),
            noise_stdev,
            shown,
            self.settings["delta"],
            len(self.rounds),
        )
        self._write()

    def _write(self) -> None:
        record = {**self.settings, "epsilon": self.epsilon(), "rounds": self.rounds}
        write_text_atomically(self.path, json.dumps(record, indent=2) + "\n")


def _recorded_releases(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The releases a ``privacy.json`` record holds, each with its own noise multiplier.

    Files written before releases carried their own multiplier had one for the whole run, at
    the top level.
    """
    default = record.get("noise_multiplier")
    return [
        {**row, "noise_multiplier": row.get("noise_multiplier", default)}
        for row in record.get("rounds", [])
    ]


def _scaled_update(record: ArrayRecord, global_arrays: ArrayRecord, scale: float) -> ArrayRecord:
    """``global + scale * (record - global)``, in float64, kept in ``record``'s dtypes."""
    moved = {}
    for key, array in record.items():
        base = global_arrays[key].numpy().astype(np.float64)
        values = base + scale * (array.numpy().astype(np.float64) - base)
        moved[key] = Array(np.asarray(values, dtype=array.numpy().dtype))
    return ArrayRecord(moved)


def _clip_to(msg: Message, norm: float, clipping_norm: float, global_arrays: ArrayRecord) -> None:
    """Scale ``msg``'s update (reply - global) to an L2 norm of at most ``clipping_norm``.

    A zero update stays as it is (Flower's clipping divided by its norm).
    """
    scale = 1.0 if norm <= clipping_norm else clipping_norm / norm
    for name, record in list(msg.content.array_records.items()):
        msg.content[name] = _scaled_update(record, global_arrays, scale)


def _add_noise(arrays: ArrayRecord, stdev: float, rng: np.random.Generator) -> ArrayRecord:
    """``arrays`` plus Gaussian noise of ``stdev`` on every floating parameter."""
    noisy = {}
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and stdev > 0:
            values = (values.astype(np.float64) + rng.normal(0.0, stdev, values.shape)).astype(
                values.dtype
            )
        noisy[key] = Array(np.asarray(values))
    return ArrayRecord(noisy)


class _PrivateAggregation:
    """Mixin for a Flower DP wrapper: screen, clip, sum over the hospitals asked, add noise."""

    strategy: GuardedFedAvg
    num_sampled_clients: int  # Flower's name for the hospitals asked each round
    noise_multiplier: float
    clipping_norm: float
    ledger: PrivacyLedger
    rng: np.random.Generator
    # A reply over the clipping norm: rejected (client_clip) or clipped (server_clip).
    rejects_unclipped = False

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply, clip, sum with equal weights over the ``n`` asked, add the noise."""
        inner = self.strategy
        max_norm = self._client_clip_bound() if self.rejects_unclipped else None
        good = inner.screen_train(server_round, replies, max_norm=max_norm)
        assert inner._global is not None
        for msg in good:
            norm = inner.update_norms[inner._node_of(msg)]
            _clip_to(msg, norm, self.clipping_norm, inner._global)
        # The mean of the m replies times m / n: their summed updates over the n asked.
        asked = self.num_sampled_clients
        arrays = _scaled_update(inner.combine(server_round, good), inner._global, len(good) / asked)
        stdev = self.noise_multiplier * self.clipping_norm / asked
        arrays = _add_noise(arrays, stdev, self.rng)
        self.ledger.release(server_round + inner.round_offset, len(good), stdev)
        return inner.finish_train(server_round, good, arrays)

    def _client_clip_bound(self) -> float:
        """The largest update norm a hospital that clipped can send.

        A float16 reply is rounded after the hospital clipped it: each weight by up to 2^-11 of
        itself, so the update by up to 2^-11 of the reply's norm. Over the bound the reply is
        refused; under it, it is clipped here anyway, so the slack costs no privacy.
        """
        inner = self.strategy
        assert inner._global is not None
        bound = self.clipping_norm * CLIENT_CLIP_TOLERANCE
        if inner.transport_dtype == "float16":
            bound += 2.0**-11 * (model_norm(inner._global) + self.clipping_norm)
        return bound


class GuardedClientSideClipping(_PrivateAggregation, DifferentialPrivacyClientSideFixedClipping):
    """Hospitals clip (the train message carries the clipping norm); the server adds noise."""

    rejects_unclipped = True


class GuardedServerSideClipping(_PrivateAggregation, DifferentialPrivacyServerSideFixedClipping):
    """The server clips each screened update, sums them over the hospitals asked, adds noise."""


WRAPPERS: dict[str, type[_PrivateAggregation]] = {
    "client_clip": GuardedClientSideClipping,
    "server_clip": GuardedServerSideClipping,
}


def with_privacy(
    strategy: GuardedFedAvg,
    privacy: DictConfig,
    num_hospitals: int,
    run_dir: Path,
    resumed: bool = False,
    rng: np.random.Generator | None = None,
) -> Strategy:
    """Wrap ``strategy`` as ``privacy`` asks; log the parameters and write ``privacy.json``.

    A resume must keep the run's choice between privacy and none: rounds released without
    noise have no ε to add, and a resume without privacy would overwrite the ledger of those
    released with it.
    """
    settings = privacy_settings(privacy, num_hospitals)
    path = run_dir / PRIVACY_FILE
    earlier = read_json(path) if resumed and path.exists() else {}
    if not isinstance(earlier, dict):
        raise ValueError(f"{path} should hold one JSON object, not {type(earlier).__name__}")
    if earlier and (earlier.get("name", "none") == "none") != (settings["name"] == "none"):
        raise ValueError(
            f"resume=true: {path} records privacy={earlier.get('name', 'none')}, the config "
            f"asks for privacy={settings['name']}; resume with privacy="
            f"{earlier.get('name', 'none')}, or start a fresh run"
        )
    if settings["name"] == "none":
        write_text_atomically(path, json.dumps(settings, indent=2) + "\n")
        log.info("differential privacy: none")
        return strategy
    if strategy.name != GuardedFedAvg.name:
        raise ValueError(f"privacy={settings['name']} needs strategy=fedavg, not {strategy.name}")
    # The noise is calibrated for equal weights; comparing a reply with the others would make
    # one hospital's inclusion depend on another's update, which the accounting does not cover.
    # With equal weights a hospital's num-examples no longer moves the model: no cap either.
    strategy.uniform_weights = True
    strategy.guards = replace(strategy.guards, max_update_norm_ratio=None, max_examples_growth=None)
    ledger = PrivacyLedger(settings, path, earlier)
    log.info(
        "differential privacy: %s, noise multiplier %g, clipping norm %g, delta %g; updates "
        "summed with equal weights over the %d hospitals asked (a fixed denominator), noise "
        "stdev noise_multiplier x clipping_norm / %d",
        settings["name"],
        settings["noise_multiplier"],
        settings["clipping_norm"],
        settings["delta"],
        num_hospitals,
        num_hospitals,
    )
    wrapper = WRAPPERS[settings["name"]](
        strategy,
        noise_multiplier=settings["noise_multiplier"],
        clipping_norm=settings["clipping_norm"],
        num_sampled_clients=num_hospitals,
    )
    wrapper.ledger = ledger
    wrapper.rng = rng or np.random.default_rng()
    return wrapper
