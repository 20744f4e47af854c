"""The server's handshake: a client's contract and state checked once, the welcome with the chain digest."""

from __future__ import annotations

from typing import Any

from .. import rng
from ._contract import contract_mismatches
from .protocol import Hello, ProtocolError, Welcome, decode

__all__ = ["Handshake"]


class Handshake:
    """The handshake methods (a mixin of :class:`~zo_optim.federated.Server`)."""

    optimizer: Any
    replica: Any
    chain: Any
    digest: str
    server_seed: int
    rejections: Any
    _positions: dict[int, int]
    _owes: dict[int, int]
    position: Any

    def welcome_for(self, client_id: int, accepted: bool, reason: str, at: int | None = None) -> Welcome:
        """The welcome; ``at``: the client's position, whose chain digest it carries (if kept)."""
        opt = self.optimizer
        kept = None if at is None else self.chain.at(at)
        return Welcome(client_id=client_id, accepted=accepted, reason=reason, server_seed=self.server_seed,
                       algorithm=opt.algorithm, rng_version=rng.RNG_VERSION, num_queries=opt.num_queries,
                       local_steps=self.replica.local_steps, position=self.position,
                       chain=b"" if kept is None else kept[0])

    def handshake(self, hello: Hello | dict[str, Any]) -> Welcome:
        """Check a client's contract; register it (position from the hello) or refuse it with the reason.

        Beyond the contract, a hello's state digest is compared with the server replica's where the server
        knows it (every position its chain keeps: 0, the log's, the snapshots'): a node whose model was
        built with other weights is refused here instead of drifting silently. The welcome carries the chain
        digest at the client's position (at 0 it commits to the server's initial weights).
        """
        if isinstance(hello, dict):
            try:
                msg = decode(hello)
            except ProtocolError as e:
                return self.welcome_for(0, False, f"malformed hello: {e}")
            if not isinstance(msg, Hello):
                return self.welcome_for(0, False, f"expected a hello, got a {msg.kind}")
            hello = msg
        wrong = contract_mismatches(hello, self.optimizer, self.replica.local_steps, "server")
        if hello.config_digest != self.digest:
            wrong.append(f"optimizer configuration digest {hello.config_digest} (server {self.digest}): "
                         "hyper-parameters or parameter shapes differ")
        if not 0 <= hello.position <= self.position:
            wrong.append(f"position {hello.position} is not in 0..{self.position}")
        elif hello.state_digest and not wrong:
            ours = self.chain.checksum_hex(hello.position)
            if ours is not None and hello.state_digest != ours:
                wrong.append(f"weights or optimizer state at position {hello.position} differ from the server's "
                             f"(state digest {hello.state_digest[:16]}, server {ours[:16]}): every node must "
                             "build its model the same way (same seed or checkpoint, same dtype)")
        if wrong:
            self.rejections["handshake"] += 1
            return self.welcome_for(hello.client_id, False, "; ".join(wrong))
        self._positions[hello.client_id] = hello.position
        self._owes.pop(hello.client_id, None)
        return self.welcome_for(hello.client_id, True, "ok", at=hello.position)
