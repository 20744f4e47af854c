"""Flower's simulation runtime with Ray's actor pool swapped for an in-process backend (fast Flower tests).

``run_simulation`` still runs Flower's LinkState, InMemoryGrid, node contexts (with their write-back)
and message loop; only the executor of ``ClientApp`` calls is a ``flwr`` ``Backend`` subclass that
runs them in the vce worker threads instead of Ray actors.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

import pytest
from flwr.app import Context, Message
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from zo_optim.federated.flower import client_app as zo_client_app

N_WORKERS = 3


class InProcessBackend(Backend):
    """Flower's Backend interface run in the calling thread instead of a Ray actor pool.

    Every message and reply is checked to hold ConfigRecords only. ``fresh_process``: forget the
    process-level client cache before every message, as a deployment running each message in a new
    ``flwr-clientapp`` process would. ``delay(partition id, message type, n)``: seconds to sleep
    before answering that node's n-th message of that type (stragglers).
    """

    seen: ClassVar[list[tuple[str, tuple[str, ...], tuple[str, ...]]]] = []
    fresh_process: ClassVar[bool] = False
    delay: ClassVar[Any] = None
    before: ClassVar[Any] = None  # before(context, partition id, message type, n): e.g. wipe a node's state
    counts: ClassVar[dict[tuple[Any, ...], int]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, backend_config: BackendConfig) -> None:
        self.app_fn = None

    def build(self, app_fn) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return N_WORKERS

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        def kinds(msg: Message) -> tuple[tuple[str, ...], tuple[str, ...]]:
            c = msg.content
            return tuple(c.array_records) + tuple(c.metric_records), tuple(c.config_records)

        with self.lock:
            self.seen.append((message.metadata.message_type, *kinds(message)))
        if self.delay is not None:
            key = (int(context.node_config["partition-id"]), message.metadata.message_type)
            with self.lock:
                n = self.counts[key] = self.counts.get(key, 0) + 1
            time.sleep(type(self).delay(*key, n))
        if self.before is not None:
            key = (int(context.node_config["partition-id"]), message.metadata.message_type)
            with self.lock:
                n = self.counts[("before", *key)] = self.counts.get(("before", *key), 0) + 1
            type(self).before(context, *key, n)
        if self.fresh_process:
            zo_client_app._PARTICIPANTS.clear()
        out = self.app_fn()(message, context)
        with self.lock:
            self.seen.append(("reply", *kinds(out)))
        return out, context


def use_in_process_backend(monkeypatch: pytest.MonkeyPatch) -> type[InProcessBackend]:
    """Make every ``run_simulation`` of the test use :class:`InProcessBackend` (call it from a fixture)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    InProcessBackend.seen = []
    InProcessBackend.fresh_process = False
    InProcessBackend.delay = None
    InProcessBackend.before = None
    InProcessBackend.counts = {}
    monkeypatch.setattr(raybackend, "RayBackend", InProcessBackend)
    return InProcessBackend


def tampered_client_app(real: Any, message_type: str, partition: int, tamper: Any) -> Any:
    """``real`` (a ClientApp from ``make_client_app``), except that node ``partition``'s replies to ``message_type``
    (``"train"``, ``"query"`` or ``"query.sync"``) pass their ``"zo"`` ConfigRecord through ``tamper(record)``."""
    from flwr.clientapp import ClientApp

    from zo_optim.federated.flower import RECORD_KEY

    def handler(msg: Message, context: Context) -> Message:
        out = real(msg, context)
        if context.node_config["partition-id"] == partition:
            tamper(out.content.config_records[RECORD_KEY])
        return out

    app = ClientApp()
    for kind, register in (("train", app.train()), ("query", app.query()), ("query.sync", app.query("sync"))):
        register(handler if kind == message_type else real.__call__)
    return app
