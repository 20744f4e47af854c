"""Tiny federated problems shared by the federated tests (a few hundred parameters, CPU)."""

from __future__ import annotations

import torch

import zo_optim

DIM = 16


def data(n_clients: int, n_per_client: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-client regression data from one teacher (clients differ in their inputs' scale: mildly non-IID)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(DIM, DIM, generator=g) / DIM**0.5
    out = []
    for c in range(n_clients):
        x = torch.randn(n_per_client, DIM, generator=g) * (1.0 + 0.1 * c)
        out.append((x, x @ teacher.T))
    return out


def model_fn() -> torch.nn.Module:
    """A 256-parameter linear model, identically initialised on every call."""
    torch.manual_seed(1234)
    return torch.nn.Linear(DIM, DIM, bias=False)


def mlp_fn() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, DIM))


def batch_loss(x: torch.Tensor, y: torch.Tensor, batch: int = 8):
    """loss(model, step): mean squared error on mini-batch ``step`` (cycling), same batch for equal step."""
    n = x.shape[0] // batch

    def loss(model: torch.nn.Module, step: int) -> torch.Tensor:
        i = (step % n) * batch
        return ((model(x[i: i + batch]) - y[i: i + batch]) ** 2).mean()

    return loss


def full_loss(model: torch.nn.Module, datasets) -> float:
    with torch.no_grad():
        return float(sum(((model(x) - y) ** 2).mean() for x, y in datasets) / len(datasets))


def mezo(model: torch.nn.Module, backend: str = "reference", **kw) -> zo_optim.MeZO:
    return zo_optim.MeZO(model.parameters(), **{"lr": 0.05, "backend": backend, **kw})


def hiso(model: torch.nn.Module, backend: str = "reference", **kw) -> zo_optim.HiSo:
    return zo_optim.HiSo(model.parameters(), **{"lr": 0.05, "backend": backend, **kw})


def server_and_clients(opt_fn=mezo, tau: int = 1, exact: str | None = None, model=mlp_fn):
    """A 2-client federation: a Server and two welcomed FederatedWrapper clients, as (wrapper, model) pairs."""
    from zo_optim.federated import FederatedWrapper, Server

    server = Server(opt_fn(model()), clients=2, clients_per_round=2, local_steps=tau, server_seed=99)
    ws = []
    for c in range(2):
        m = model()
        w = FederatedWrapper(opt_fn(m), tau, client_id=c, model=None if exact == "restore" else m, exact=exact)
        w.welcome(server.handshake(w.hello()))
        ws.append((w, m))
    return server, ws


def clients_match_a_scalar_only_replay(opt_fn, tau: int = 2, rounds: int = 3, exact: str = "transient"):
    """A 2-client federation of ``opt_fn`` optimizers on the MLP and a Replica that only replays the logged (seed,
    scalars) for ``rounds`` rounds of ``tau`` steps; asserts every client, the server and the replica hold the same
    weights (checksums) and returns the replica's model."""
    from zo_optim.federated import Replica

    server, ws = server_and_clients(opt_fn, tau, exact)
    replay_model = mlp_fn()
    replay = Replica(opt_fn(replay_model), local_steps=tau, server_seed=99)
    rounds_with_replay(server, ws, data(2), replay, rounds=rounds)
    for w, _ in ws:
        assert w.checksum() == server.checksum() == replay.checksum()
    return replay_model


def rounds_with_replay(server, ws, datasets, replay, rounds: int) -> None:
    """``rounds`` rounds in which every sampled client computes its reply (each must be accepted) while ``replay``
    (a Replica) only applies the logged entries; then every client is synced to the server's position."""
    for _ in range(rounds):
        for c, task in server.open_round().items():
            w, m = ws[c]
            assert server.receive(w.handle(task, lambda s, m=m, c=c: batch_loss(*datasets[c])(m, s))).accepted
        server.close_round()
        replay.apply(server.entry(server.position - 1))
    for w, _ in ws:
        w.handle(server.sync_task(w.client_id))
