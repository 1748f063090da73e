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

from common.arrays import cast_floating
from common.config import compose_config, parse_overrides


@functools.cache
def _run_options(overrides: str) -> tuple[str, str]:
    """The run's privacy option and transport dtype, composed once per run."""
    cfg = compose_config(parse_overrides(overrides))
    return str(cfg.privacy.name), str(cfg.federation.transport_dtype)


def _in_transport_dtype(reply: Message, dtype: str) -> Message:
    """``reply`` with its floating arrays cast back to ``dtype``.

    ``fixedclipping_mod`` adds the clipped update to the float32 global model it received, so a
    float16 reply would otherwise leave the site at float32, twice the bytes it should take.
    """
    if not reply.has_error():
        for name, record in list(reply.content.array_records.items()):
            reply.content[name] = cast_floating(record, dtype)
    return reply


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this hospital's update before it leaves the site when the run uses client_clip.

    The clipping norm comes with the server's train message, as Flower's
    DifferentialPrivacyClientSideFixedClipping sends it; a client_clip run whose message lacks
    it gets an error reply from ``fixedclipping_mod`` rather than an unclipped update.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    privacy, transport_dtype = _run_options(str(context.run_config["overrides"]))
    if privacy != "client_clip":
        return call_next(msg, context)
    return _in_transport_dtype(fixedclipping_mod(msg, context, call_next), transport_dtype)
