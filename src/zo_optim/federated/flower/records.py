"""The wire format of the Flower engine: protocol messages in and out of Flower records.

Every message carries one ``ConfigRecord`` (key :data:`RECORD_KEY`) holding
:func:`~zo_optim.federated.encode`'s flat dict: uint64 ints, strings and packed little-endian
float32 ``bytes``. No ``ArrayRecord`` is ever sent — weights never travel, only round numbers
and τ·P scalars (and, for a client older than the log, a snapshot as ``bytes``). A sync reply
adds a :data:`META_KEY` record with the client's checksum.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, RecordDict

from ..protocol import Message as ZOMessage
from ..protocol import encode

__all__ = ["META_KEY", "RECORD_KEY", "config_record", "hello_query_content", "message_content", "record_data",
           "wire_bytes"]

#: the key of the one ConfigRecord every message carries
RECORD_KEY = "zo"
#: the key of the ConfigRecord a sync reply adds (the client's checksum, to verify bit-identity)
META_KEY = "zo_meta"


def config_record(msg: ZOMessage | dict[str, Any]) -> ConfigRecord:
    """A message (or an already encoded dict) as a ``ConfigRecord``."""
    return ConfigRecord(encode(msg) if isinstance(msg, ZOMessage) else dict(msg))


def message_content(msg: ZOMessage, **more: ConfigRecord) -> RecordDict:
    """A Flower message's content: ``msg`` under :data:`RECORD_KEY`, and ``more`` records beside it."""
    return RecordDict({RECORD_KEY: config_record(msg), **more})


def hello_query_content() -> RecordDict:
    """The handshake query's content: ``{"op": "hello"}`` (no protocol message; the client answers with its hello)."""
    return RecordDict({RECORD_KEY: ConfigRecord({"op": "hello"})})


def record_data(content: RecordDict) -> dict[str, Any] | None:
    """The encoded protocol message a content carries under :data:`RECORD_KEY` (None: there is none)."""
    record = content.config_records.get(RECORD_KEY)
    return None if record is None else dict(record)


def wire_bytes(content: RecordDict) -> int:
    """Record bytes by ``ConfigRecord.count_bytes()``'s rule: keys + values (int/float 8, bool 1, str/bytes length).

    Computed here because ``count_bytes`` raises on an empty ``str``/``bytes`` value (and an empty list),
    which our encodings hold (e.g. a task with no log entries has ``entries=b""``).
    """
    total = 0
    for record in (*content.config_records.values(), *content.metric_records.values()):
        for key, value in record.items():
            total += len(key)
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, bool):
                    total += 1
                elif isinstance(v, (str, bytes)):
                    total += len(v)
                else:
                    total += 8
    return total
