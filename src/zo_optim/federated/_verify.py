"""A client's verified catch-up: apply a task's snapshot and entries only if they match the digest chain."""

from __future__ import annotations

from typing import Any

from .chain import ChainError, link, parse_task_chain
from .protocol import ProtocolError, Task
from .replica import GapError

__all__ = ["verified_catch_up"]


def verified_catch_up(client: Any, task: Task, use_snapshot: bool) -> int:
    """Catch ``client`` (a :class:`~zo_optim.federated.FederatedWrapper`) up from ``task``, verified.

    1. The task's chain is folded over its entries from its base digest; where the fold passes the
       client's own position it must equal the digest the client holds (the entries extend its history).
    2. A snapshot, once loaded, must have the committed checksum; after the last entry applied, the
       client's checksum must equal the committed one.
    Any mismatch (and a snapshot the loader refuses) reverts the client — weights, optimizer state,
    position, digest — to where it was, from a CPU copy taken first, and raises :class:`ChainError`.
    """
    rep = client.replica
    chain = parse_task_chain(task.chain, task.snapshot, len(task.entries))
    new = [e for e in task.entries if e.round >= rep.position]
    if not use_snapshot and not (new and new[0].round == rep.position):
        _check_history(client, task, chain)  # nothing to apply: still, the task must extend our history
        return rep.position
    saved = rep.save_local()
    before = (rep.position, rep.applied_rounds, rep.snapshot_loads, client.chain_digest)
    try:
        _apply(client, task, chain, use_snapshot)
    except (ChainError, ProtocolError, ValueError) as e:  # ValueError: the optimizer refused an entry's scalars
        rep.revert_local(saved)
        rep.position, rep.applied_rounds, rep.snapshot_loads, client.chain_digest = before
        raise e if isinstance(e, ChainError) else ChainError(f"refused snapshot or entry: {e}") from e
    return rep.position


def _check_history(client: Any, task: Task, chain: Any) -> None:
    base = task.entries[0].round if task.entries else task.round
    digest, pos = chain.base, base
    for e, c in zip(task.entries, chain.after, strict=True):
        if pos == client.replica.position:
            break
        digest, pos = link(digest, e, c), e.round + 1
    if pos == client.replica.position and client.chain_digest is not None and digest != client.chain_digest:
        raise ChainError(f"the task's chain at position {pos} differs from ours: its log does not extend the "
                         "history this client applied")


def _apply(client: Any, task: Task, chain: Any, use_snapshot: bool) -> None:
    rep = client.replica
    start = rep.position
    if use_snapshot:
        assert task.snapshot is not None and chain.snapshot is not None
        rep.load_snapshot(task.snapshot)
        if rep.checksum() != chain.snapshot.hex():
            raise ChainError(f"the snapshot at position {task.snapshot.position} does not have the server's "
                             "checksum (a changed weight, hyper-parameter or state)")
        digest, pos = chain.base, task.snapshot.position
        client.chain_digest = digest
    else:
        digest, pos = chain.base, (task.entries[0].round if task.entries else task.round)
    committed = chain.snapshot if use_snapshot else None
    for e, c in zip(task.entries, chain.after, strict=True):
        if e.round != pos:
            raise ChainError(f"task entries are not consecutive at round {e.round} (chain at {pos})")
        if pos == start and not use_snapshot and client.chain_digest is not None and digest != client.chain_digest:
            raise ChainError(f"the task's chain at position {pos} differs from ours: its log does not extend the "
                             "history this client applied")
        digest, pos = link(digest, e, c), pos + 1
        if e.round >= rep.position:
            try:
                rep.apply(e)
            except GapError:
                break
            committed = c
            client.chain_digest = digest
    if committed is not None and rep.checksum() != committed.hex():
        raise ChainError(f"after catching up to position {rep.position} this client's checksum differs from the "
                         "server's (a changed scalar in the log, or a replica that diverged)")
