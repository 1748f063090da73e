"""Echo the received state dict back unchanged, with the digests of what arrived."""

from __future__ import annotations

from digests import array_digests
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def echo(msg: Message, context: Context) -> Message:
    """Reply with the same arrays (re-serialised here) and the digests of what was received."""
    arrays = msg.content["arrays"]
    received = ConfigRecord(array_digests(arrays))
    return Message(content=RecordDict({"arrays": arrays, "received": received}), reply_to=msg)
