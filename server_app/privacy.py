"""Differential privacy as an option: Flower's fixed-clipping DP wrappers around GuardedFedAvg.

``cfg.privacy`` (conf/privacy/) picks one of

- ``none``: GuardedFedAvg as it is;
- ``client_clip``: each hospital clips its update with Flower's ``fixedclipping_mod``
  (client_app/privacy.py applies it), the server adds Gaussian noise to the average;
- ``server_clip``: the server clips each update, averages and adds the noise.

Flower's wrappers skip aggregation as soon as one reply is an error, keeping the old model with
an INFO line; that would bypass the minimum-replies rule. The wrappers here take error replies
out first (logged and recorded by node id, as GuardedFedAvg does), and GuardedFedAvg's
``aggregate_train``, which Flower's wrapper calls, still checks every remaining reply and
refuses a round short of ``federation.min_replies``. Server-side clipping subtracts the global
model from each reply before that check, where a ``(1,)`` tensor would broadcast into a
well-shaped one, so a reply whose keys or shapes differ from the global model's is rejected
before clipping.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from omegaconf import DictConfig

from server_app.strategy import GuardedFedAvg

log = logging.getLogger(__name__)

PRIVACY_FILE = "privacy.json"


class _ScreensReplies:
    """Mixin for a Flower DP wrapper: error replies, and replies it cannot handle, stay out."""

    strategy: GuardedFedAvg

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop error replies, then clip, average (with GuardedFedAvg's checks) and add noise."""
        replies = list(replies)
        # GuardedFedAvg's screening of error replies only logs them by node id and records them
        # in the round report; the wrapped strategy is ours, so its helper is fair to use.
        self.strategy._sort_replies([m for m in replies if m.has_error()], check_arrays=True)
        good = [m for m in replies if not m.has_error() and self._fits(m)]
        return super().aggregate_train(server_round, good)  # type: ignore[misc]

    def _fits(self, reply: Message) -> bool:
        """Whether Flower's wrapper may see ``reply``; client-side clipping takes any."""
        return True


class GuardedClientSideClipping(_ScreensReplies, DifferentialPrivacyClientSideFixedClipping):
    """Client-side fixed clipping with server noise; error replies never reach Flower's wrapper."""


class GuardedServerSideClipping(_ScreensReplies, DifferentialPrivacyServerSideFixedClipping):
    """Server-side fixed clipping and noise, on replies shaped like the global model only."""

    def _fits(self, reply: Message) -> bool:
        """Reject (by node id) a reply whose arrays differ in keys or shapes from the model's."""
        expected = {key: tuple(array.shape) for key, array in self.current_arrays.items()}
        for record in reply.content.array_records.values():
            if {key: tuple(array.shape) for key, array in record.items()} != expected:
                node = self.strategy._node_of(reply)
                reason = "array keys or shapes differ from the global model's"
                self.strategy.report.rejected[node] = reason
                log.warning("node %d: reply rejected before clipping: %s", node, reason)
                return False
        return True


WRAPPERS: dict[str, type[Strategy]] = {
    "client_clip": GuardedClientSideClipping,
    "server_clip": GuardedServerSideClipping,
}


def privacy_settings(privacy: DictConfig, num_hospitals: int) -> dict[str, Any]:
    """The privacy parameters of a run as recorded in ``privacy.json``, defaults filled in.

    ``noise_stdev`` is the standard deviation of the Gaussian noise added to each parameter of
    the averaged model, as Flower computes it: noise_multiplier * clipping_norm / sampled.
    """
    if privacy.name == "none":
        return {"name": "none"}
    if privacy.name not in WRAPPERS:
        raise ValueError(f"unknown privacy option {privacy.name!r}; expected none or {WRAPPERS}")
    sampled = int(privacy.num_sampled_clients or num_hospitals)
    noise_multiplier = float(privacy.noise_multiplier)
    clipping_norm = float(privacy.clipping_norm)
    return {
        "name": str(privacy.name),
        "noise_multiplier": noise_multiplier,
        "clipping_norm": clipping_norm,
        "num_sampled_clients": sampled,
        "noise_stdev": noise_multiplier * clipping_norm / sampled,
    }


def with_privacy(
    strategy: GuardedFedAvg, privacy: DictConfig, num_hospitals: int, run_dir: Path
) -> Strategy:
    """Wrap ``strategy`` as ``privacy`` asks; log the parameters and write them to the run dir."""
    settings = privacy_settings(privacy, num_hospitals)
    (run_dir / PRIVACY_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    if settings["name"] == "none":
        log.info("differential privacy: none")
        return strategy
    log.info(
        "differential privacy: %s, noise multiplier %g, clipping norm %g, %d sampled hospitals, "
        "noise stdev %g per parameter",
        settings["name"],
        settings["noise_multiplier"],
        settings["clipping_norm"],
        settings["num_sampled_clients"],
        settings["noise_stdev"],
    )
    return WRAPPERS[settings["name"]](
        strategy,
        noise_multiplier=settings["noise_multiplier"],
        clipping_norm=settings["clipping_norm"],
        num_sampled_clients=settings["num_sampled_clients"],
    )
