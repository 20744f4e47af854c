"""A client's identity on Flower is its client id bound to a secret it keeps, not Flower's node id.

* The secret (``state_dir/client-<id>.secret``, created once, or the node config's ``client-secret``) and the
  token derived from it, bound to the client id.
* ZOStrategy's registration with real hellos from real clients: a node that proves the secret of an id another
  node holds (a SuperNode restarted without auth: new node id) takes the id over — its messages to the old node
  are given up and the client released — while a node without the secret, or with another, is refused with the
  reason; an id registered without a secret cannot be taken over at all.
* Flower's simulation runtime: a ServerApp resumed from its checkpoint keeps the pins, so a node that presents
  another secret for client 0 is refused; client 0, with no node in the run, is away and never sampled (it used to
  be sampled and dropped, losing a slot each time).

The restart on real processes (SIGKILL of a SuperNode, restarted with a new node id) is in
``test_federated_flower_chaos``.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

flwr = pytest.importorskip("flwr")

import zo_optim  # noqa: E402
from fed_problems import batch_loss, data, mlp_fn  # noqa: E402
from flower_inprocess import use_in_process_backend  # noqa: E402
from zo_optim.federated import FederatedWrapper  # noqa: E402

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

from flwr.app import Context  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from zo_optim.federated.flower import ZOStrategy, make_client_app, make_server_app  # noqa: E402
from zo_optim.federated.flower.identity import Identities, client_secret, identity_token  # noqa: E402
from zo_optim.federated.flower.messaging import _Pending  # noqa: E402

N_NODES = 3
SEED = 5


def make_opt(model: torch.nn.Module) -> zo_optim.MeZO:
    return zo_optim.MeZO(model.parameters(), lr=1e-2, backend="reference")


def client_data(context: Context):
    return batch_loss(*data(N_NODES, seed=1)[int(context.node_config["partition-id"])])


def test_the_secret_is_created_once_kept_private_and_the_token_is_bound_to_the_id(tmp_path):
    assert client_secret(1, {}, None) is None  # nothing to prove an id with
    s = client_secret(1, {}, tmp_path)
    f = tmp_path / "client-1.secret"
    assert s is not None and len(s) == 64 and stat.S_IMODE(f.stat().st_mode) == 0o600
    assert client_secret(1, {}, tmp_path) == s  # read back, never regenerated
    assert client_secret(2, {}, tmp_path) != s  # one secret per client id
    # an operator-provisioned secret wins over the file
    assert client_secret(1, {"client-secret": "x" * 20}, tmp_path) == b"x" * 20
    with pytest.raises(ValueError, match="client-secret: it must be a string of at least 16"):
        client_secret(1, {"client-secret": "short"}, tmp_path)
    assert identity_token(1, s) != identity_token(2, s)  # the same secret under another id is another token
    assert len(list(tmp_path.iterdir())) == 2  # no temporary file left behind


def hello(cid: int):
    # a real client's hello (contract, position, state digest): what a node answers the handshake query with
    return FederatedWrapper(make_opt(mlp_fn()), 1, client_id=cid, model=None).hello()


def strategy(**kw) -> ZOStrategy:
    return ZOStrategy(make_opt(mlp_fn()), clients_per_round=2, server_seed=SEED, round_timeout=30.0, **kw)


def test_a_restarted_node_that_proves_the_secret_takes_its_id_back_and_others_are_refused():
    s = strategy()
    good, other = identity_token(1, b"s" * 32), identity_token(1, b"t" * 32)
    s._register(101, hello(1), good)
    s._register(202, hello(2), "")  # registered without a secret
    assert s.node_of == {1: 101, 2: 202} and not s.refused
    # round 0 samples both; the message to node 101 is outstanding when that node dies
    tasks = s.server.open_round()
    assert sorted(tasks) == [1, 2]
    s._pending["m1"] = _Pending("task", 101, 1, 0, 0.0)
    assert s.server.owes == {1: 0, 2: 0}

    s._register(303, hello(1), "")  # another node, no secret
    s._register(404, hello(1), other)  # another node, another secret
    s._register(505, hello(2), "")  # claims the id registered without a secret
    assert s.refused == {
        303: "client id 1 is bound to a secret and this node sent none: restart it with the same state_dir or "
             "'client-secret' it first joined with",
        404: "client id 1 is bound to another secret (a different node claims this id)",
        505: "client id 2 is already node 202's, which registered without a secret, so no other node can take it "
             "over while that node is online; give each node a state_dir (make_client_app(state_dir=...)) or a "
             "'client-secret' in its node config"}
    assert s.node_of == {1: 101, 2: 202} and s.server.owes == {1: 0, 2: 0}  # nothing moved

    s._register(606, hello(1), good)  # the restarted node 101: new node id, same secret
    assert s.node_of == {1: 606, 2: 202} and s.client_of == {606: 1, 202: 2}
    assert s.rebound == [(1, 101, 606)] and 606 not in s.refused
    # its message to the dead node is given up and the client released: the round no longer waits for it
    assert "m1" not in s._pending and s.server.owes == {2: 0}
    rec = s.server.close_round()
    assert rec.dropped == (1, 2) and rec.participants == ()
    # the pins travel in the checkpoint extra, as sha256(token) only
    # an id nobody can prove goes to the first claimant once its node is offline (or it would be locked forever)
    class Grid:
        def get_node_ids(self):
            return {606}

    s._refresh_away(Grid())
    s._register(505, hello(2), "")
    assert s.node_of == {1: 606, 2: 505} and s.rebound[-1] == (2, 202, 505)
    pins = s.server.checkpoint_extra()["flower"]["identities"]
    assert set(pins) == {"1", "2"} and pins["2"] == "" and good not in pins.values()
    assert Identities.from_state(pins).check(1, good, None, 7) is None


def test_a_client_whose_node_is_offline_is_away_and_not_sampled():
    class Grid:  # only get_node_ids is called: the nodes Flower reports online
        def __init__(self) -> None:
            self.online = {101, 202}

        def get_node_ids(self):
            return set(self.online)

    s = strategy()
    s._register(101, hello(1), "")
    s._register(202, hello(2), "")
    g = Grid()
    s._refresh_away(g)
    assert s.server.away == set() and s.server.eligible() == [1, 2]
    g.online = {202}  # node 101 missed its heartbeats
    s._refresh_away(g)
    assert s.server.away == {1} and s.server.eligible() == [2]
    assert sorted(s.server.open_round()) == [2]  # m = 2, but only the reachable client is sampled
    s.server.close_round()
    s.server.release(2)  # its message answered (as the engine does on a reply, an error or the TTL)
    g.online = {101, 202}  # back online
    s._refresh_away(g)
    assert s.server.eligible() == [1, 2]


@pytest.fixture
def in_process(monkeypatch):
    backend = use_in_process_backend(monkeypatch)
    backend.fresh_process = True
    return backend


def test_a_resumed_server_keeps_the_pins_and_refuses_a_node_with_another_secret(in_process, tmp_path):
    ckpt, states = tmp_path / "server", tmp_path / "clients"

    def run(strat, rounds):
        app = make_client_app(mlp_fn, make_opt, client_data, state_dir=states)
        run_simulation(make_server_app(strat, rounds), app, num_supernodes=N_NODES)

    first = strategy(min_nodes=N_NODES, checkpoint_dir=ckpt, sync_at_end=False)
    run(first, 2)
    assert sorted(first.node_of) == [0, 1, 2] and not first.refused
    assert sorted(p.name for p in states.glob("*.secret")) == [f"client-{c}.secret" for c in range(N_NODES)]
    # client 0's node comes back with another secret (another machine configured with partition-id 0)
    (states / "client-0.secret").write_text("f" * 64)
    second = strategy(checkpoint_dir=ckpt, resume=ckpt, handshake_timeout=20.0, idle_timeout=0.0)
    run(second, 5)
    assert list(second.refused.values()) == ["client id 0 is bound to another secret (a different node claims "
                                             "this id)"]
    assert sorted(second.node_of) == [1, 2] and second.server.position == 5
    # client 0 has no node in this run: away, never sampled (before: sampled and dropped, losing a slot)
    assert all(0 not in r.sampled and len(r.participants) == 2 for r in second.server.history[2:])
    check = second.replicas_identical()
    assert not check and (0, "did not reconnect after the resume") in check.unchecked


def test_a_node_whose_hello_failed_is_said_hello_again_when_listed_online():
    """After a SuperLink restart a live node may be answered "Node Unavailable" once (its heartbeat lapsed during the
    restart); it must get another hello when it is listed again, or its client stays unregistered all run (the chaos
    test's 'sent no checksum at the final sync'). At most HELLO_RETRIES times; a registered node is never re-helloed.
    (Flower builds a Message only inside a run, so the hello's construction and push are recorded, not sent.)
    """
    from types import SimpleNamespace

    from flwr.common.constant import SUPERLINK_NODE_ID

    class Grid:  # only get_node_ids is called: the nodes Flower lists online
        def __init__(self) -> None:
            self.online = {707}

        def get_node_ids(self):
            return set(self.online)

    s, g, pushed = strategy(), Grid(), []

    def push(grid, nodes, kind=None):  # the hello queries _discover sends, recorded with an outstanding id each
        for n in nodes:
            pushed.append(n)
            s._pending[f"h{len(pushed)}"] = _Pending(kind, n, None, None, 0.0)

    s._message = lambda grid, message_type, msg, node, round_=None: node
    s._push = push

    def superlink_error(message_id):  # the SuperLink's error reply in the node's stead
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id, src_node_id=SUPERLINK_NODE_ID),
                               has_error=lambda: True, error=SimpleNamespace(reason="Node Unavailable", code=5))

    s._discover(g)
    s._discover(g)
    assert pushed == [707]  # a known node is not said hello twice while its hello is outstanding
    for attempt in range(s.HELLO_RETRIES):
        s._on_reply(superlink_error(f"h{attempt + 1}"))
        s._discover(g)
        assert pushed == [707] * (attempt + 2)
    s._on_reply(superlink_error(f"h{s.HELLO_RETRIES + 1}"))
    s._discover(g)
    assert len(pushed) == s.HELLO_RETRIES + 1  # the cap: a node that keeps failing is not said hello forever
    # a registered node's failed hello does not send another (its client is bound to it)
    s._register(808, hello(1), "")
    g.online = {707, 808}
    s._known_nodes.add(808)
    s._pending["x"] = _Pending("hello", 808, None, None, 0.0)
    s._on_reply(superlink_error("x"))
    s._discover(g)
    assert 808 not in pushed


def test_a_hello_delivered_but_not_answered_is_sent_again_and_a_second_answer_is_ignored():
    """After a SuperLink restart a live node received the resumed run's hello and never answered it (its SuperNode
    had just ignored a message of the stopped run): without a second hello it stayed unregistered until the hello's
    TTL, after the run (the chaos test's 'did not reconnect after the resume'). An unanswered hello is sent again
    after HELLO_RESEND seconds, once per message and within HELLO_RETRIES; the first one stays pending, so whichever
    answer comes first registers the node and a second answer changes nothing (no second handshake)."""
    import time

    class Grid:
        def get_node_ids(self):
            return {707}

    s, g, pushed = strategy(), Grid(), []

    def push(grid, nodes, kind=None):
        for n in nodes:
            pushed.append(n)
            s._pending[f"h{len(pushed)}"] = _Pending(kind, n, None, None, time.monotonic())

    s._message = lambda grid, message_type, msg, node, round_=None: node
    s._push = push
    s._discover(g)
    s._expire()
    s._discover(g)
    assert pushed == [707]  # answered within HELLO_RESEND: not sent again
    s._pending["h1"].sent_at -= s.HELLO_RESEND + 1
    s._expire()
    s._discover(g)
    assert pushed == [707, 707] and set(s._pending) == {"h1", "h2"}  # the first stays pending
    s._expire()
    s._discover(g)
    assert pushed == [707, 707]  # once per message
    s._pending["h2"].sent_at -= s.HELLO_RESEND + 1
    s._expire()
    s._discover(g)
    assert len(pushed) == 3 and s._hello_retries[707] == 2  # counted against HELLO_RETRIES
    # the first answer registers the node; a second answer to another of its hellos is ignored
    s._register(707, hello(1), "")
    assert s.client_of == {707: 1} and s.node_of == {1: 707}
    calls = []
    s.server.handshake = lambda h: calls.append(h)  # would fail the test if a second handshake ran
    s._register(707, hello(1), "")
    assert calls == [] and s.client_of == {707: 1} and 707 not in s.refused
    s._pending["h3"].sent_at -= s.HELLO_RESEND + 1
    s._expire()
    s._discover(g)
    assert len(pushed) == 3  # a registered node is never said hello again


def test_the_final_sync_is_sent_to_a_registered_node_whose_duplicate_hello_is_still_pending():
    """A node registered by its answer to a hello sent again (HELLO_RESEND) may still have the other hello pending at
    the end; that is not a task in flight, so the final sync must reach it — skipping it left the client unchecked
    ('sent no checksum at the final sync', the chaos test in a fresh-clone CI run). A node with a task in flight is
    still skipped."""
    import time

    class Grid:
        def get_node_ids(self):
            return {707, 808}

        def pull_messages(self, ids):
            return []

    s, sent = strategy(), []
    s._register(707, hello(1), "")
    s._register(808, hello(2), "")
    now = time.monotonic()  # sent just now: neither expired nor due to be sent again during the test
    s._pending["old hello"] = _Pending("hello", 707, None, None, now)
    s._pending["task"] = _Pending("task", 808, 2, 0, now)  # still computing
    s._message = lambda grid, message_type, msg, node, round_=None: (message_type, node)
    s._push = lambda grid, msgs, kind=None: sent.extend(msgs)
    s.sync(Grid(), timeout=0.0)
    assert sent == [("query.sync", 707)]
