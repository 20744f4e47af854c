"""A client's federated identity on Flower: its client id bound to a secret it keeps, not Flower's node id.

Without SuperNode authentication a SuperNode gets a new random node id at every start, so a server that
binds a client id to the node id it first registered from locks a restarted node out ("client id 1 is
already node …'s") while the dead registration keeps being sampled. Here the identity is the client id
(``partition-id``), and a node proves it holds the id by a token derived from a secret the client keeps:

* the client's secret is ``node_config["client-secret"]`` (provisioned by the operator:
  ``--node-config "partition-id=1 client-secret=<random hex>"``), else a 32-byte random secret created on
  first use in its ``state_dir`` (``client-<id>.secret``, mode 0600), else none;
* its hello reply carries ``token = sha256("zo-optim identity v1" | client id | secret)`` in a
  ``ConfigRecord`` beside the hello (:data:`IDENTITY_KEY`); the server keeps only ``sha256(token)`` (the
  *pin*), in memory and in its checkpoint, so a leaked server checkpoint does not let anyone claim an id;
* trust on first use: the first node to register a client id pins it (a pin of ``""`` if it sent no
  token). A later hello for that id from another node id is accepted only if its token matches the pin:
  the client is then re-bound to the new node id (its messages to the old node are given up) and
  readmitted at the position its hello announces; the server's catch-up brings it to the current round,
  verified against the digest chain. Anything else is refused with the reason.

What it protects against: a restarted or misconfigured node, or another honest-but-wrong node, taking
over a client id it does not hold (two nodes started with the same ``partition-id``); a node that kept its
state coming back under a new node id. What it does not: anyone who can read the client's messages.
Without TLS the token travels in clear and can be replayed by a network attacker (who, without TLS, can
also forge every message), and the first claim of an id is trusted (a node that registers an id before
its owner does owns it). With TLS the token is seen only by the SuperLink and the ServerApp; Flower's
SuperNode authentication (registered public keys) is what decides which *machines* may connect at all.
The pins added since the last server checkpoint are lost with a killed ServerApp (the next claim of
those ids is a first claim again).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["IDENTITY_KEY", "SECRET_KEY", "Identities", "client_secret", "identity_token"]

#: the key of the ConfigRecord a hello reply carries the identity token in
IDENTITY_KEY = "zo_id"
#: the node config key of an operator-provisioned secret
SECRET_KEY = "client-secret"
_DOMAIN = b"zo-optim identity v1\0"


def client_secret(client_id: int, node_config: dict[str, Any], state_dir: Path | None) -> bytes | None:
    """This client's secret: the node config's ``client-secret``, else the one in ``state_dir`` (created on first
    use, never overwritten), else None (the node cannot prove its id after a restart)."""
    given = node_config.get(SECRET_KEY)
    if given is not None:
        if not isinstance(given, str) or len(given) < 16:
            raise ValueError(f"Invalid node config {SECRET_KEY}: it must be a string of at least 16 characters "
                             "(e.g. the output of `python -c 'import secrets; print(secrets.token_hex(32))'`)")
        return given.encode()
    if state_dir is None:
        return None
    path = state_dir / f"client-{client_id}.secret"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and never replaces: two processes racing keep the first secret
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = path.read_text().strip()
    if len(secret) < 16:
        raise ValueError(f"Invalid client secret file {path}: {len(secret)} characters (expected 64 hex); "
                         "delete it only if this client id has never joined a federation")
    return secret.encode()


def identity_token(client_id: int, secret: bytes) -> str:
    """The token a hello carries: bound to the client id, so one secret reused for two ids gives two tokens."""
    return hashlib.sha256(_DOMAIN + int(client_id).to_bytes(8, "little") + secret).hexdigest()


def _pin(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


class Identities:
    """The server's pins: client id → ``sha256(token)`` (``""``: the id registered without a secret)."""

    def __init__(self, pins: dict[int, str] | None = None) -> None:
        self.pins: dict[int, str] = dict(pins or {})

    def check(self, client_id: int, token: str, owner: int | None, node: int, owner_online: bool = True,
              ) -> str | None:
        """None if ``node`` may hold ``client_id`` (its current ``owner`` node, if any, is then replaced);
        else the reason it may not. An id registered without a secret can be proved by nobody: it goes to the
        first node that claims it while its owner is offline (``owner_online``: Flower still lists it)."""
        pinned = self.pins.get(client_id)
        taken = owner is not None and owner != node
        if pinned is None or (pinned == "" and not (taken and owner_online)):
            return None  # a first claim (trust on first use), or an id nobody can prove and no live node holds
        if pinned == "":
            return (f"client id {client_id} is already node {owner}'s, which registered without a secret, so no "
                    "other node can take it over while that node is online; give each node a state_dir "
                    f"(make_client_app(state_dir=...)) or a '{SECRET_KEY}' in its node config")
        if not token:
            return (f"client id {client_id} is bound to a secret and this node sent none: restart it with the "
                    f"same state_dir or '{SECRET_KEY}' it first joined with")
        if _pin(token) != pinned:
            return f"client id {client_id} is bound to another secret (a different node claims this id)"
        return None

    def bind(self, client_id: int, token: str) -> None:
        """Pin ``client_id`` after an accepted handshake (a first claim, or a secret given to a secret-less id)."""
        if self.pins.get(client_id) in (None, ""):
            self.pins[client_id] = _pin(token)

    def state_dict(self) -> dict[str, str]:
        return {str(c): p for c, p in sorted(self.pins.items())}

    @classmethod
    def from_state(cls, state: Any) -> Identities:
        if not isinstance(state, dict) or not all(isinstance(p, str) for p in state.values()):
            raise ValueError(f"Invalid identity pins in the checkpoint: {type(state).__name__}")
        return cls({int(c): p for c, p in state.items()})
