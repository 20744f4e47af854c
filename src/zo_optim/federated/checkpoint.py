"""The server's on-disk checkpoint: atomic (temporary file, fsync, rename), self-checking, refused whole.

File layout: ``MAGIC`` (8 B), the payload's length (uint64), its sha256 (32 B), then the payload — a
``torch.save`` blob of a dict of plain data, tensors and bytes, loadable with ``weights_only=True``. A
reader checks the magic, the length (a truncated file) and the digest (a changed byte) before it unpickles
anything, and raises :class:`CheckpointError` naming what was wrong. A writer writes a temporary file in
the same directory, fsyncs it, renames it over the old checkpoint (``os.replace``: atomic on POSIX) and
fsyncs the directory, so a crash at any moment leaves either the old checkpoint or the new one, whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "read_checkpoint", "write_checkpoint"]

MAGIC = b"ZOFEDCK1"
_HEAD = struct.Struct("<8sQ32s")
#: the file name inside ``checkpoint_dir``
CHECKPOINT_NAME = "server.ckpt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, altered or not a server checkpoint; nothing was loaded."""


def write_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (see the module docstring); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(_pack(state), buf)
    payload = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(_HEAD.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()))
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable only once the directory entry is on disk
    finally:
        os.close(dir_fd)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state :func:`write_checkpoint` wrote to ``path``; :class:`CheckpointError` if it is not intact."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if len(data) < _HEAD.size or data[:8] != MAGIC:
        raise CheckpointError(f"{path} is not a zo-optim federated checkpoint (no {MAGIC!r} header)")
    _, length, digest = _HEAD.unpack_from(data)
    payload = data[_HEAD.size:]
    if len(payload) != length:
        raise CheckpointError(f"{path} is truncated or padded: {len(payload)} B of payload, the header says {length} B")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} was altered: its sha256 does not match the one written with it")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as e:  # an intact digest over a payload we did not write: refuse, whatever torch raised
        raise CheckpointError(f"{path}: the payload does not load ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the payload is a {type(state).__name__}, not a checkpoint dict")
    return _unpack(state)


# torch's weights_only unpickler refuses an empty bytes object (pickled as a call to the global ``bytes``), and
# an empty round's scalars are b"": every bytes value travels as a uint8 tensor (written raw, no str detour)
_BYTES = "__zo_bytes__"


def _pack(obj: Any) -> Any:
    if isinstance(obj, bytes):
        data = torch.frombuffer(bytearray(obj), dtype=torch.uint8) if obj else torch.empty(0, dtype=torch.uint8)
        return {_BYTES: data}
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_pack(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_pack(v) for v in obj)
    return obj


def _unpack(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _BYTES in obj and isinstance(obj[_BYTES], torch.Tensor):
            return obj[_BYTES].numpy().tobytes()
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_unpack(v) for v in obj)
    return obj
