"""Messages of the scalar-only federated protocol, their plain-data encoding and byte counts.

A round ``r`` is (r, τ seeds derived from the server seed, τ·P aggregated float32 scalars
per scalar stream). Four messages travel:

* :class:`Hello` (client → server, once): the client's contract — protocol version, RNG
  contract, algorithm, P, τ, a digest of the optimizer's configuration and one of its
  weights + optimizer state at its position.
* :class:`Welcome` (server → client, once): accepted or refused (with the reason), and the
  server seed the seeds of every round are derived from.
* :class:`Task` (server → client, per round): the round to compute (or ``compute=False``:
  only catch up), the log entries the client has not applied yet, or a snapshot + tail.
* :class:`Reply` (client → server, per round): status ``"ok"`` with τ·P scalars per stream,
  or ``"gap"`` with the client's real position (it could not catch up from the task).

:func:`encode` turns a message into a flat ``dict[str, int | float | str | bytes]`` (every
value a scalar of those four types, so Flower's ``ConfigRecord``, JSON + base64 or a
tensor can carry it); scalars are packed little-endian float32 (4 B each), round numbers
and seeds are uint64, and every encoding starts with the header ``zo_fed`` (protocol
version) and ``kind``. :func:`decode` checks the header and the types and refuses anything
malformed with :class:`ProtocolError` (it never trusts lengths it did not check).
:func:`payload_bytes` counts what the encoding holds (int/float 8 B, bytes and str their
length), the figure the server reports per round.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "PROTOCOL_VERSION",
    "Hello",
    "Message",
    "ProtocolError",
    "Reply",
    "RoundEntry",
    "Snapshot",
    "Task",
    "Welcome",
    "decode",
    "encode",
    "pack_scalars",
    "payload_bytes",
    "reply_client_id",
    "unpack_scalars",
]

#: version of the message layout; a peer with another version is refused
#: (2: a reply's header is one packed 25-byte field, see :data:`REPLY_HEADER`; 3: the header's client id is
#: uint64, 29 bytes, so Flower's random 64-bit node ids fit; tasks and welcomes carry the digest chain, replies
#: may say "diverged")
PROTOCOL_VERSION = 3

Plain = int | float | str | bytes


class ProtocolError(ValueError):
    """A message that is malformed, from another protocol version, or otherwise not decodable."""


def pack_scalars(values: Any) -> bytes:
    """float32 values (tensor, array or sequence) → packed little-endian float32 bytes."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).reshape(-1).numpy()
    return np.asarray(values, dtype="<f4").reshape(-1).tobytes()


def unpack_scalars(data: bytes) -> torch.Tensor:
    """Packed little-endian float32 bytes → a float32 CPU tensor (copy)."""
    if len(data) % 4:
        raise ProtocolError(f"scalar payload of {len(data)} bytes is not a whole number of float32 values")
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32, copy=True))


@dataclass(frozen=True)
class RoundEntry:
    """One closed round as every replica applies it.

    ``scalars`` holds τ·P packed float32 values ordered (local step k, query p), k-major;
    ``extras`` the algorithm's extra streams (e.g. HiZOO's ``curvature``) in the same layout,
    sorted by name. An entry with ``n_participants == 0`` (no valid reply) is applied as a
    no-op: the position advances, nothing else moves.
    """

    round: int
    n_participants: int
    scalars: bytes = b""
    extras: tuple[tuple[str, bytes], ...] = ()

    @property
    def empty(self) -> bool:
        return self.n_participants == 0


@dataclass(frozen=True)
class Snapshot:
    """Weights + optimizer state of the server replica after ``position`` rounds.

    ``payload`` is a ``torch.save`` blob loadable with ``weights_only=True`` (see
    :meth:`zo_optim.federated.Replica.snapshot`).
    """

    position: int
    payload: bytes


@dataclass(frozen=True)
class Message:
    """Common header fields."""

    kind: ClassVar[str] = ""
    version: int = field(default=PROTOCOL_VERSION, kw_only=True)


@dataclass(frozen=True)
class Hello(Message):
    """Handshake from a client: what it will compute with."""

    kind: ClassVar[str] = "hello"
    client_id: int
    algorithm: str
    rng_version: str
    num_queries: int
    local_steps: int
    config_digest: str
    position: int = 0
    #: sha256 (hex) of the client's weights + optimizer state at ``position`` (:meth:`Replica.checksum`);
    #: ``""``: not sent. The server compares it where it knows its own (position 0, its current position).
    state_digest: str = ""


@dataclass(frozen=True)
class Welcome(Message):
    """The server's answer to :class:`Hello`."""

    kind: ClassVar[str] = "welcome"
    client_id: int
    accepted: bool
    reason: str
    server_seed: int
    algorithm: str
    rng_version: str
    num_queries: int
    local_steps: int
    position: int
    #: the digest chain at ``position`` (:mod:`~zo_optim.federated.chain`; at 0 it commits to the initial
    #: weights); ``b""``: the server does not keep it for that position
    chain: bytes = b""


@dataclass(frozen=True)
class Task(Message):
    """Work for one client in round ``round``.

    ``entries`` are the consecutive rounds ``log_start .. round-1`` the server believes the
    client misses (possibly none); ``snapshot`` (if set) is the state after
    ``snapshot.position`` rounds, sent when the client's position is older than the log.
    ``compute=False``: only catch up (end of a simulation, a newly joined replica).
    ``streams``: comma-separated names of the extra scalar streams to send (e.g. ``"curvature"``).
    """

    kind: ClassVar[str] = "task"
    round: int
    client_id: int
    server_seed: int
    algorithm: str
    rng_version: str
    num_queries: int
    local_steps: int
    log_start: int
    entries: tuple[RoundEntry, ...] = ()
    snapshot: Snapshot | None = None
    compute: bool = True
    streams: str = ""
    #: base digest, snapshot checksum, one checksum per entry (:mod:`~zo_optim.federated.chain`); ``b""``: not
    #: verified (an engine that delivers entries itself)
    chain: bytes = b""


@dataclass(frozen=True)
class Reply(Message):
    """A client's answer to a :class:`Task`.

    ``status="ok"``: ``scalars`` (τ·P packed float32, k-major) and ``extras`` hold the
    client's projected gradients for round ``round``, measured at position ``round``.
    ``status="gap"``: the client could not reach ``round`` from the task; ``position`` is
    where it really is, so the server can send the missing part. ``status="diverged"``: what the
    task carried did not match the digest chain (the client reverted; it needs a fresh snapshot).
    """

    kind: ClassVar[str] = "reply"
    round: int
    client_id: int
    status: str
    position: int
    algorithm: str
    rng_version: str
    n_examples: int = 0
    loss: float = math.nan
    scalars: bytes = b""
    extras: tuple[tuple[str, bytes], ...] = ()


_KINDS: dict[str, type[Message]] = {c.kind: c for c in (Hello, Welcome, Task, Reply)}

#: a reply's header, one ``bytes`` field ``"h"``: status code (uint8), round (uint32), client id (uint64: every
#: id a :class:`Hello` may carry, Flower's random 64-bit node ids included), position, n_examples (uint32 each),
#: loss (float32), contract digest (uint32: CRC-32 of "algorithm|rng_version"). Packed because the reply is the
#: per-round uplink: 29 B instead of 71 B of self-describing fields, so an ``ok`` reply with τ·P = 5 scalars is
#: 62 B of payload. The handshake already pinned the algorithm and RNG contract; the digest still lets the
#: server refuse a reply from another contract.
REPLY_HEADER = struct.Struct("<BIQIIfI")
_STATUS = ("ok", "gap", "synced", "diverged")
_CONTRACTS: dict[int, tuple[str, str]] = {}


def contract_digest(algorithm: str, rng_version: str) -> int:
    """The 32-bit digest a reply carries for its (algorithm, RNG contract); remembered for :func:`decode`."""
    digest = zlib.crc32(f"{algorithm}|{rng_version}".encode())
    _CONTRACTS.setdefault(digest, (algorithm, rng_version))
    return digest


def _contract(digest: int) -> tuple[str, str]:
    if digest not in _CONTRACTS:  # the built-in optimizers under this RNG contract are always known
        from .. import optim, rng

        for cls in vars(optim).values():
            if isinstance(cls, type) and isinstance(getattr(cls, "algorithm", None), str):
                contract_digest(cls.algorithm, rng.RNG_VERSION)
    # an unknown digest: another RNG contract (or an algorithm no peer here registered); the server refuses it
    return _CONTRACTS.get(digest, ("unknown", f"unknown contract {digest:08x}"))


def _encode_reply(msg: Reply) -> dict[str, Plain]:
    if msg.status not in _STATUS:
        raise ProtocolError(f"reply status {msg.status!r} is not one of {_STATUS}")
    for name in ("round", "client_id", "position", "n_examples"):
        value, bits = getattr(msg, name), 64 if name == "client_id" else 32
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**bits:
            raise ProtocolError(f"reply field {name!r} = {value!r} is outside uint{bits}")
    head = REPLY_HEADER.pack(_STATUS.index(msg.status), msg.round, msg.client_id, msg.position, msg.n_examples,
                             msg.loss, contract_digest(msg.algorithm, msg.rng_version))
    return {"zo_fed": msg.version, "kind": msg.kind, "h": head, "scalars": msg.scalars, **_pack_extras(msg.extras)}


def reply_client_id(data: dict[str, Any]) -> int | None:
    """The client id an encoded reply claims, read without validating the rest (None if unreadable).

    For bookkeeping about a reply that fails to decode (a rejection counted against its sender).
    """
    head = data.get("h") if isinstance(data, dict) else None
    if isinstance(head, bytes) and len(head) == REPLY_HEADER.size:
        return int(REPLY_HEADER.unpack(head)[2])
    return None


def _decode_reply(data: dict[str, Any]) -> Reply:
    head = _get(data, "h", bytes)
    if len(head) != REPLY_HEADER.size:
        raise ProtocolError(f"reply header is {len(head)} B, expected {REPLY_HEADER.size}")
    code, rnd, cid, position, n_examples, loss, digest = REPLY_HEADER.unpack(head)
    if code >= len(_STATUS):
        raise ProtocolError(f"unknown reply status code {code}")
    algorithm, rng_version = _contract(digest)
    names = [n for n in _get(data, "extras", str).split(",") if n]
    return Reply(round=rnd, client_id=cid, status=_STATUS[code], position=position, algorithm=algorithm,
                 rng_version=rng_version, n_examples=n_examples, loss=float(loss), scalars=_get(data, "scalars", bytes),
                 extras=tuple((n, _get(data, f"x.{n}", bytes)) for n in names))

# entry layout in the packed log blob: round (uint64), n_participants (uint32), value count (uint32), then
# the scalars and each extra stream (names listed once in "entry_extras"), each value-count float32 values
_ENTRY_HEAD = struct.Struct("<QII")


def _pack_entries(entries: tuple[RoundEntry, ...]) -> tuple[bytes, str]:
    names: tuple[str, ...] | None = None
    out = bytearray()
    for e in entries:
        e_names = tuple(n for n, _ in e.extras)
        if not e.empty:
            if names is None:
                names = e_names
            elif names != e_names:
                raise ProtocolError(f"log entries carry different extra streams: {names} vs {e_names}")
        count = len(e.scalars) // 4
        out += _ENTRY_HEAD.pack(e.round, e.n_participants, count)
        out += e.scalars
        for _, blob in e.extras:
            if len(blob) != len(e.scalars):
                raise ProtocolError(f"round {e.round}: extra stream of {len(blob)} bytes, scalars {len(e.scalars)}")
            out += blob
    return bytes(out), ",".join(names or ())


def _unpack_entries(blob: bytes, names_csv: str) -> tuple[RoundEntry, ...]:
    names = tuple(n for n in names_csv.split(",") if n)
    entries = []
    pos = 0
    while pos < len(blob):
        if pos + _ENTRY_HEAD.size > len(blob):
            raise ProtocolError("truncated log entry header")
        rnd, n_part, count = _ENTRY_HEAD.unpack_from(blob, pos)
        pos += _ENTRY_HEAD.size
        streams = 1 + (len(names) if n_part else 0)
        end = pos + 4 * count * streams
        if end > len(blob):
            raise ProtocolError(f"truncated log entry for round {rnd}")
        scalars = blob[pos: pos + 4 * count]
        extras = tuple(
            (n, blob[pos + 4 * count * (i + 1): pos + 4 * count * (i + 2)]) for i, n in enumerate(names)
        ) if n_part else ()
        entries.append(RoundEntry(round=rnd, n_participants=n_part, scalars=scalars, extras=extras))
        pos = end
    return tuple(entries)


def _pack_extras(extras: tuple[tuple[str, bytes], ...]) -> dict[str, Plain]:
    return {"extras": ",".join(n for n, _ in extras), **{f"x.{n}": b for n, b in extras}}


def encode(msg: Message) -> dict[str, Plain]:
    """A message as a flat dict of plain values (int, float, str, bytes), header first."""
    if isinstance(msg, Reply):
        return _encode_reply(msg)
    out: dict[str, Plain] = {"zo_fed": msg.version, "kind": msg.kind}
    for f in fields(msg):
        if f.name == "version":
            continue
        value = getattr(msg, f.name)
        if f.name == "entries":
            out["entries"], out["entry_extras"] = _pack_entries(value)
        elif f.name == "snapshot":
            if value is not None:
                out["snapshot_position"] = value.position
                out["snapshot"] = value.payload
        elif f.name == "extras":
            out.update(_pack_extras(value))
        elif isinstance(value, bool):
            out[f.name] = int(value)  # Flower's MetricRecord rejects bool; ints travel everywhere
        else:
            out[f.name] = value
    return out


def _get(data: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise ProtocolError(f"message has no {key!r} field")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, typ):
        raise ProtocolError(f"field {key!r} has type {type(value).__name__}, expected {typ}")
    if isinstance(value, int) and not 0 <= value < 2**64:
        raise ProtocolError(f"field {key!r} = {value} is outside uint64")
    return value


def decode(data: dict[str, Any]) -> Message:
    """The message held by an :func:`encode` dict; :class:`ProtocolError` if it is not a valid one."""
    if not isinstance(data, dict):
        raise ProtocolError(f"a message is a dict, got {type(data).__name__}")
    version = _get(data, "zo_fed", int)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION})")
    kind = _get(data, "kind", str)
    cls = _KINDS.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if cls is Reply:
        return _decode_reply(data)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        name = f.name
        if name == "version":
            continue
        if name == "entries":
            kwargs[name] = _unpack_entries(_get(data, "entries", bytes), _get(data, "entry_extras", str))
        elif name == "snapshot":
            kwargs[name] = (
                Snapshot(_get(data, "snapshot_position", int), _get(data, "snapshot", bytes)) if "snapshot" in data
                else None
            )
        elif name == "extras":
            names = [n for n in _get(data, "extras", str).split(",") if n]
            kwargs[name] = tuple((n, _get(data, f"x.{n}", bytes)) for n in names)
        elif f.type in ("bool",):
            kwargs[name] = bool(_get(data, name, int))
        elif f.type == "float":
            kwargs[name] = float(_get(data, name, (float, int)))
        else:
            typ = {"int": int, "str": str, "bytes": bytes}[str(f.type)]
            kwargs[name] = _get(data, name, typ)
    return cls(**kwargs)


def payload_bytes(data: dict[str, Any] | Message) -> int:
    """Bytes an encoded message holds: int/float 8 each, str (UTF-8) and bytes their length, keys excluded."""
    if isinstance(data, Message):
        data = encode(data)
    total = 0
    for value in data.values():
        if isinstance(value, (bytes, bytearray)):
            total += len(value)
        elif isinstance(value, str):
            total += len(value.encode())
        else:
            total += 8
    return total
