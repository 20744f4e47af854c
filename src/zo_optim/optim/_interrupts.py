"""Make the optimizer's own code atomic with respect to signals (Ctrl-C included).

Python runs a signal handler between two bytecodes of the main thread, so a
``KeyboardInterrupt`` (or whatever a handler raises) can land anywhere: between
two tensors of a pass, between a pass and the bookkeeping that records the
offset, between the fused update and the step counter. No ``try``/``except`` can
cover that: the handler that cleans up may itself be interrupted.

:class:`SignalGate` instead *defers* signals while the optimizer's code runs.
Closed, it replaces every Python-level handler (``signal.getsignal`` returns a
callable: ``default_int_handler`` for SIGINT, a user's ``SIGALRM``/``SIGTERM``
handler, ...) by a recorder; opened, it puts the user's handlers back and runs
them for the signals that arrived meanwhile, so an exception they raise
surfaces at a point where the step is consistent. The step keeps the gate open
only around the user's code and the waits that may block (the closure, the
data-parallel all-reduce and seed broadcast), whose exceptions are handled by
restoring the weights.

Only the main thread runs Python signal handlers (and only it may install
them), so the gate does nothing in other threads: a step there is never
interrupted by a signal. Handlers at ``SIG_DFL``/``SIG_IGN`` or installed from C
are left alone. Deferred signals are coalesced per signal number and run in
arrival order; if one handler raises, the signals after it are dropped (as when
two arrive before Python checks for them).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["SignalGate"]

# every signal a Python handler can be installed for (SIGKILL/SIGSTOP never have one)
_SIGNALS = tuple(
    s for s in signal.valid_signals() if s not in {getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)}
)


class SignalGate:
    """Defers Python-level signal handlers while closed (main thread only); a context manager that closes it."""

    def __init__(self) -> None:
        self._main = threading.current_thread() is threading.main_thread()
        self._saved: dict[int, Any] = {}  # signal number -> the user's handler, while closed
        self._pending: list[tuple[int, FrameType | None]] = []
        self._recorder = self._record  # one bound method, so that getsignal() can recognise it

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append((signum, frame))  # one atomic list operation

    def close(self) -> None:
        """Start deferring the Python-level handlers installed now."""
        if not self._main:
            return
        try:
            for sig in _SIGNALS:
                handler = signal.getsignal(sig)
                if callable(handler) and handler is not self._recorder:
                    # saved before the swap: a signal that arrives right after it is recorded and replayed
                    self._saved[sig] = handler
                    signal.signal(sig, self._recorder)
        except BaseException:
            # a signal not yet deferred raised here: put back those already swapped
            self._put_back()
            self._pending.clear()
            raise

    def open(self) -> None:
        """Put the user's handlers back, then run them for the signals that arrived while closed."""
        if not self._main:
            return
        saved = self._put_back()
        pending, self._pending = self._pending, []
        seen: set[int] = set()
        for signum, frame in pending:
            if signum in seen:
                continue
            seen.add(signum)
            handler = saved.get(signum)
            if callable(handler):
                handler(signum, frame)

    def _put_back(self) -> dict[int, Any]:
        saved, self._saved = self._saved, {}
        for sig, handler in saved.items():
            if signal.getsignal(sig) is self._recorder:  # untouched since close() (not replaced by the user)
                signal.signal(sig, handler)
        return saved

    def __enter__(self) -> SignalGate:
        self.close()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.open()
