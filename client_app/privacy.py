"""Client-side clipping for differential privacy, on only when the run asks for it.

A ClientApp's mods are fixed when it is built, but the privacy option is chosen per run
(``privacy=client_clip``). This mod reads the run's composed config and hands train messages
to Flower's ``fixedclipping_mod`` only then; every other run goes straight to the handlers.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from common.config import compose_config, parse_overrides


@functools.cache
def _privacy_option(overrides: str) -> str:
    return str(compose_config(parse_overrides(overrides)).privacy.name)


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this hospital's update before it leaves the site when the run uses client_clip.

    The clipping norm comes with the server's train message, as Flower's
    DifferentialPrivacyClientSideFixedClipping sends it; a client_clip run whose message lacks
    it gets an error reply from ``fixedclipping_mod`` rather than an unclipped update.
    """
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and _privacy_option(str(context.run_config["overrides"])) == "client_clip"
    ):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
