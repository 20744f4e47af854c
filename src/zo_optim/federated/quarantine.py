"""Quarantine: a client whose replies are refused again and again leaves the sampling pool for a while.

A refused reply costs the round that client's slot; a client refused on every round (a broken build, a
hostile node) would otherwise stay in the pool forever. :class:`Quarantine` counts each client's refusals
over a window of rounds; ``after`` of them within ``window`` rounds quarantine it: it is not sampled, its
replies are refused (``"quarantined"``, not counted again), and it is logged (``logging`` warning and the
round's :class:`~zo_optim.federated.RoundRecord`). It is reversible: :meth:`Quarantine.release` by hand,
or automatically ``rounds`` rounds later (``None``: only by hand). Late replies, gaps and unknown ids are
not counted: they are what a slow or restarted honest client sends.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

__all__ = ["Quarantine"]

log = logging.getLogger("zo_optim.federated")


class Quarantine:
    """Refusal counts and the quarantined clients.

    Args:
        after: refusals within ``window`` rounds that quarantine a client (None: never).
        window: rounds the refusals are counted over.
        rounds: rounds a quarantine lasts before the client is released (None: until :meth:`release`).
    """

    def __init__(self, after: int | None = None, window: int = 10, rounds: int | None = None) -> None:
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 1):
            raise ValueError(f"Invalid quarantine_after: {after!r} (an int >= 1, or None)")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"Invalid quarantine_window: {window!r} (an int >= 1)")
        if rounds is not None and (not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1):
            raise ValueError(f"Invalid quarantine_rounds: {rounds!r} (an int >= 1, or None)")
        self.after, self.window, self.rounds = after, window, rounds
        self._refusals: dict[int, deque[int]] = {}
        #: client → (round it was quarantined in, the reason)
        self.quarantined: dict[int, tuple[int, str]] = {}

    def __contains__(self, client: int) -> bool:
        return client in self.quarantined

    def refused(self, client: int, round_idx: int, reason: str) -> bool:
        """Count one refusal of ``client`` in ``round_idx``; True if it is quarantined now (newly)."""
        if self.after is None or client in self.quarantined:
            return False
        seen = self._refusals.setdefault(client, deque())
        seen.append(round_idx)
        while seen and seen[0] <= round_idx - self.window:
            seen.popleft()
        if len(seen) < self.after:
            return False
        why = f"{len(seen)} refusals in {self.window} rounds (last: {reason})"
        self.quarantined[client] = (round_idx, why)
        del self._refusals[client]
        log.warning("client %d quarantined in round %d: %s", client, round_idx, why)
        return True

    def expire(self, round_idx: int) -> list[int]:
        """Release the clients whose quarantine (``rounds`` long) is over at ``round_idx``; returns them."""
        if self.rounds is None:
            return []
        done = [c for c, (since, _) in self.quarantined.items() if round_idx - since >= self.rounds]
        for c in done:
            self.release(c)
        return done

    def release(self, client: int) -> bool:
        """End ``client``'s quarantine (and forget its refusals); True if it was quarantined."""
        self._refusals.pop(client, None)
        if self.quarantined.pop(client, None) is None:
            return False
        log.warning("client %d released from quarantine", client)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"refusals": {c: list(v) for c, v in self._refusals.items()},
                "quarantined": {c: [r, why] for c, (r, why) in self.quarantined.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (validated before anything is replaced)."""
        try:
            refusals = {int(c): deque(int(r) for r in v) for c, v in state["refusals"].items()}
            quarantined = {int(c): (int(r), str(why)) for c, (r, why) in state["quarantined"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"Invalid quarantine state: {type(e).__name__}: {e}") from e
        self._refusals, self.quarantined = refusals, quarantined
