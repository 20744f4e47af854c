"""One call of an optimizer at a time, with signals deferred while it runs.

Every public call that moves weights or reads the state (``estimate``, ``step``,
``apply_update``, ``take_estimate``, the state-dict calls, ``attach``/``detach``,
``restore_weights``, ``add_param_group``) runs inside :meth:`CallGuard.exclusive`:
a second call from the closure or from another thread is refused instead of moving
weights under the running step, and signals (Ctrl-C included) are deferred by a
:class:`~._interrupts.SignalGate` so they surface only where the step is consistent.
:meth:`CallGuard.ungated` opens the gate around the user's code (the closure) and
the blocking waits (the data-parallel all-reduce and seed broadcast).

A collaborator, not a mixin: the guard owns its own state (the lock and the open
gate) and needs nothing of the optimizer but its class name for the message.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ._interrupts import SignalGate

__all__ = ["CallGuard"]


class CallGuard:
    """The re-entry lock and the signal gate of one optimizer."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        # held while a call is in flight (estimate, step, apply_update, state-dict calls): a second call from
        # the closure or from another thread is refused instead of moving weights under the running step
        self._in_flight = threading.Lock()
        # closed (signals deferred) while a call is in flight, opened only around the closure and blocking waits
        self._gate: SignalGate | None = None
        # set when a failed pass could not be taken back (optim._passes): the weights are unknown, so every later
        # call but load_state_dict (the way back, which clears it) is refused with this message
        self.refusal: str | None = None

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """Refuse ``what`` while another call of this optimizer is in flight (re-entrant or concurrent).

        The call runs with signals deferred (see :mod:`._interrupts`): a Ctrl-C that arrives
        during a pass or its bookkeeping surfaces when the gate next opens (before a closure,
        around a blocking all-reduce) or when the call returns, never between a write and
        the record of it. The lock is taken and released inside the gate for the same reason.
        """
        with SignalGate() as gate:
            if not self._in_flight.acquire(blocking=False):
                raise RuntimeError(
                    f"{self._owner}.{what}() was called while a step of this optimizer is in flight (from "
                    "inside the closure, or from another thread); the optimizer is not re-entrant: call it only "
                    "after estimate()/step() have returned"
                )
            try:
                if self.refusal is not None and what != "load_state_dict":
                    raise RuntimeError(self.refusal)
                self._gate = gate
                yield
            finally:
                self._gate = None
                self._in_flight.release()

    def ungated(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run user code or a blocking wait with the user's signal handlers live (Ctrl-C interrupts it)."""
        gate = self._gate
        if gate is None:
            return fn(*args)
        gate.open()  # deferred signals are delivered here, before the call, where the step is consistent
        try:
            return fn(*args)
        finally:
            gate.close()
