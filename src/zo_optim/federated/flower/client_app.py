"""The Flower ClientApp side: :func:`make_client_app` runs a :class:`FederatedWrapper` per SuperNode.

A node's client lives in three places, each valid only with the next: an in-process cache
(:data:`_PARTICIPANTS`, per (run, node)), ``context.state`` (position, counters, server seed and a
token; weights + optimizer state as a blob, or the path of a node-local cache file) and, with
``cache_dir``, that file. All three die with the Flower run (``context.state`` is per run); with
``state_dir`` the whole client state is also written, atomically and self-checking
(:func:`~zo_optim.federated.checkpoint.write_checkpoint`), to ``state_dir/client-<id>.ckpt``, keyed
by the client id rather than the run, so a node of a *later* run (a ServerApp resumed from its
checkpoint) rejoins with its position, batch counter and weights. In deployment each message may
run in a fresh ``flwr-clientapp`` process, so the state is written after every message and the cache
is used only while its token matches ``context.state``'s.

The handlers are methods of :class:`_ClientNode`, a module-level class: Ray ships the ClientApp with
every message (cloudpickle), and a closure would travel *by value* with the globals it names (a
copy of the cache, a lock that cannot be pickled), whereas a module-level class travels by
reference, so its methods reach this process's cache and lock.
"""

from __future__ import annotations

import inspect
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from ...optim.base import ZOOptimizer
from ..checkpoint import read_checkpoint, write_checkpoint
from ..client import FederatedWrapper
from ..protocol import ProtocolError, Task, decode
from ._environment import flower_environment
from .identity import IDENTITY_KEY, client_secret, identity_token
from .records import META_KEY, RECORD_KEY, message_content, record_data

__all__ = ["STATE_KEY", "make_client_app"]

#: the key of the ConfigRecord a client keeps in ``context.state``
STATE_KEY = "zo_client"


@dataclass
class _Participant:
    model: torch.nn.Module
    wrapper: FederatedWrapper
    loss: Callable[[torch.nn.Module, int], Any]
    n_examples: int
    token: str


# one entry per (run, node) in this process; valid only while its token matches context.state's
_PARTICIPANTS: dict[tuple[int, int], _Participant] = {}
# Model factories typically seed the global torch RNG (torch.manual_seed(...); nn.Linear(...)): two nodes built
# at once in one process (a threaded simulation backend) would interleave their draws and start from different
# weights, which the handshake's state digest would then refuse. Building one client at a time keeps model_fn's
# contract.
_BUILD_LOCK = threading.Lock()


def _client_id(context: Context, client_id: Callable[[Context], int] | None) -> int:
    if client_id is not None:
        return int(client_id(context))
    pid = context.node_config.get("partition-id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        return pid
    return int(context.node_id)


class _ClientNode:
    """One ClientApp's factories and settings; builds, restores and saves a node's client, answers messages."""

    def __init__(
        self,
        model_fn: Callable[..., torch.nn.Module],
        optimizer_fn: Callable[..., ZOOptimizer],
        data_fn: Callable[[Context], Any],
        local_steps: int | Callable[[Context], int],
        extras: tuple[str, ...],
        client_id: Callable[[Context], int] | None,
        cache_dir: Path | None,
        state_dir: Path | None = None,
    ) -> None:
        self.model_fn = model_fn
        self.optimizer_fn = optimizer_fn
        self.data_fn = data_fn
        self.local_steps = local_steps
        self.extras = extras
        self.client_id = client_id
        self.cache_dir = cache_dir
        self.state_dir = state_dir
        self.model_takes_context = len(inspect.signature(model_fn).parameters) > 0
        self.opt_takes_context = len(inspect.signature(optimizer_fn).parameters) > 1

    # ------------------------------------------------------------------ message handlers

    def hello(self, msg: Message, context: Context) -> Message:
        """The handshake query: answer with the client's :class:`Hello` (saving a new client's state first)."""
        flower_environment()
        p = self.participant(context)
        if STATE_KEY not in context.state.config_records:
            self.save(context, p)
        cid = p.wrapper.client_id
        secret = client_secret(cid, dict(context.node_config), self.state_dir)  # proves the id after a restart
        more = {} if secret is None else {IDENTITY_KEY: ConfigRecord({"token": identity_token(cid, secret)})}
        return Message(message_content(p.wrapper.hello(), **more), reply_to=msg)

    def handle(self, msg: Message, context: Context) -> Message:
        """A round's task (``"train"``) or the final catch-up (``"query.sync"``): the client's reply."""
        flower_environment()
        p = self.participant(context)
        data = record_data(msg.content)
        if data is None:
            raise ProtocolError(f"message has no {RECORD_KEY!r} ConfigRecord")
        task = decode(data)
        if not isinstance(task, Task):
            raise ProtocolError(f"expected a task, got a {task.kind}")
        model, loss = p.model, p.loss
        reply = p.wrapper.handle(task, lambda step: loss(model, step), n_examples=p.n_examples)
        self.save(context, p)
        more = {}
        if reply.status == "synced":
            more[META_KEY] = ConfigRecord({"checksum": p.wrapper.checksum()})
        return Message(message_content(reply, **more), reply_to=msg)

    # ------------------------------------------------------------------ the node's client and its state

    def build(self, context: Context) -> _Participant:
        """A new client at position 0 (models built one at a time in this process, see :data:`_BUILD_LOCK`)."""
        with _BUILD_LOCK:
            model = self.model_fn(context) if self.model_takes_context else self.model_fn()
            opt = self.optimizer_fn(model, context) if self.opt_takes_context else self.optimizer_fn(model)
            data = self.data_fn(context)
        tau = self.local_steps(context) if callable(self.local_steps) else self.local_steps
        wrapper = FederatedWrapper(opt, int(tau), client_id=_client_id(context, self.client_id), model=model,
                                   extras=self.extras)
        loss, n = data if isinstance(data, tuple) else (data, 1)
        return _Participant(model, wrapper, loss, int(n), "")

    def participant(self, context: Context) -> _Participant:
        """This node's client: the cached one while ``context.state`` vouches for it, else rebuilt from there."""
        key = (context.run_id, context.node_id)
        state = context.state.config_records.get(STATE_KEY)
        cached = _PARTICIPANTS.get(key)
        if state is None:
            p = self.build(context)  # a new run for this node (or its state was lost: the protocol answers a gap)
            path = self.state_file(p.wrapper.client_id)
            if path is not None and path.exists():
                # a node of a later run (the server resumed): continue from the state the last run left. A
                # truncated or altered file raises CheckpointError (the node fails its hello, with the reason)
                # rather than rejoining at 0 with its batch counter reset
                p.wrapper.load_state_dict(read_checkpoint(path))
        elif cached is not None and cached.token == state.get("token"):
            return cached
        else:
            p = self.build(context)
            blob = state.get("snapshot")
            if blob is None and isinstance(state.get("cache_file"), str):
                path = Path(str(state["cache_file"]))
                blob = path.read_bytes() if path.exists() else None
            if isinstance(blob, bytes):
                sd: dict[str, Any] = {"position": state["position"], "snapshot": blob,
                                      "server_seed": state.get("server_seed"),
                                      "local_step_counter": state["local_step_counter"],
                                      "chain_digest": state.get("chain_digest"),
                                      "last_computed": state.get("last_computed")}
                p.wrapper.load_state_dict(sd)
        _PARTICIPANTS[key] = p
        return p

    def save(self, context: Context, p: _Participant) -> None:
        """Write the client's state to ``context.state`` (weights inline, or to the node-local cache file)."""
        sd = p.wrapper.state_dict()
        token = uuid.uuid4().hex
        rec = ConfigRecord({"position": int(sd["position"]), "local_step_counter": int(sd["local_step_counter"]),
                            "client_id": p.wrapper.client_id, "token": token})
        if sd["server_seed"] is not None:
            rec["server_seed"] = int(sd["server_seed"])
        if sd["chain_digest"] is not None:  # so the next process checks that its tasks extend this history
            rec["chain_digest"] = sd["chain_digest"]
        if sd["last_computed"] is not None:  # a round computed again reuses its batches (FederatedWrapper.compute)
            rec["last_computed"] = [int(v) for v in sd["last_computed"]]
        if self.cache_dir is None:
            rec["snapshot"] = sd["snapshot"]
        else:
            path = self.cache_dir / f"zo-{context.run_id}-{context.node_id}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{token}.tmp")
            tmp.write_bytes(sd["snapshot"])
            tmp.replace(path)  # atomic: a crash leaves the previous state, never half a file
            rec["cache_file"] = str(path)
        state_file = self.state_file(p.wrapper.client_id)
        if state_file is not None:
            write_checkpoint(state_file, sd)  # tmp + fsync + rename: a kill leaves the old state or the new, whole
        context.state[STATE_KEY] = rec
        p.token = token

    def state_file(self, client_id: int) -> Path | None:
        """The node-local file that outlives the Flower run (``state_dir``), or None."""
        return None if self.state_dir is None else self.state_dir / f"client-{client_id}.ckpt"


def make_client_app(
    model_fn: Callable[..., torch.nn.Module],
    optimizer_fn: Callable[..., ZOOptimizer],
    data_fn: Callable[[Context], Any],
    *,
    local_steps: int | Callable[[Context], int] = 1,
    extras: Iterable[str] = (),
    client_id: Callable[[Context], int] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
) -> ClientApp:
    """A Flower ``ClientApp`` running a :class:`FederatedWrapper` per node.

    Args:
        model_fn: builds the model (``model_fn()`` or ``model_fn(context)``); identical initial
            weights on every call and every node (frozen parameters too: they are never sent; the
            handshake refuses a node whose trainable weights differ from the server's).
        optimizer_fn: ``optimizer_fn(model)`` or ``optimizer_fn(model, context)`` (e.g. the
            learning rate from ``context.run_config``), the same settings as the server's (the
            handshake checks a digest).
        data_fn: ``data_fn(context)`` returns this node's ``loss(model, step)`` (the loss on its
            batch number ``step``; equal steps must mean equal batches), or ``(loss, n_examples)``
            (n_examples: its weight in the mean; default 1).
        local_steps: τ (must match the strategy's), or ``local_steps(context)``.
        extras: optional extra scalar streams (as for :class:`FederatedWrapper`).
        client_id: ``client_id(context)`` → this node's client id; default: the node config's
            ``partition-id`` (set by the simulation, ``--node-config "partition-id=..."`` in
            deployment), else the node id.
        cache_dir: keep weights and optimizer state in a file per (run, node) under this
            node-local directory instead of inside ``context.state`` (big models).
        state_dir: also write the whole client state after every message to
            ``state_dir/client-<client id>.ckpt`` (atomic, sha256-checked), and load it when a node
            starts with an empty ``context.state``: a node of a later Flower run (the ServerApp
            resumed with ``ZOStrategy(resume=...)``) rejoins where it stopped. Use one directory
            per federation: a file from another federation is refused at the handshake (its
            position or weights do not match the server's). The client's identity secret is kept
            there too (``client-<id>.secret``, unless the node config has a ``client-secret``): a
            restarted SuperNode (new node id) proves it and takes its client id back
            (:mod:`~zo_optim.federated.flower.identity`).

    Every message may run in a fresh process (deployment): the client's position, counters,
    server seed and weights + optimizer state are written to ``context.state`` (the blob, or
    the cache file's path) after every message, and a fresh process rebuilds the client from
    there. A client that lost its state starts from position 0 and answers the next task
    with a gap; the server then sends the entries (or a snapshot) from there.
    """
    flower_environment()
    node = _ClientNode(model_fn, optimizer_fn, data_fn, local_steps, tuple(extras), client_id,
                       None if cache_dir is None else Path(cache_dir), None if state_dir is None else Path(state_dir))
    if not callable(local_steps) and (not isinstance(local_steps, int) or local_steps < 1):
        raise ValueError(f"Invalid local_steps: {local_steps!r} (an int >= 1, or local_steps(context))")
    app = ClientApp()
    app.query()(node.hello)
    app.train()(node.handle)
    app.query("sync")(node.handle)
    return app
