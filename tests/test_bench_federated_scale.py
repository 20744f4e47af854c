"""``zo-optim bench federated-scale`` on a tiny size: it runs, its catch-ups end on the server's checksum (asserted
inside), and the bytes it reports follow the protocol's formulas."""

from __future__ import annotations

from zo_optim.bench import federated_scale


def test_scale_bench_tiny():
    res = federated_scale.run(clients=50, fraction=0.04, rounds=12, absences=[3, 12])
    assert res["per_round"] == 2 and res["rounds"] == 12
    # up: 2 replies per round, each 8 + len("reply") + 29 B header + 5 float32 (docs/federated.md, Bytes per round)
    assert res["bytes_up_per_round"] == 2 * (8 + 5 + 29 + 20)
    # the log holds every round: 16 B header + 5 float32 each
    assert res["log_bytes"] == 12 * (16 + 20)
    (a3, a12) = res["catch_up"]
    # replaying: each missed round adds 16 + 4V B of entry and a 32 B chain checksum (V = 5)
    assert a12["replay_bytes"] - a3["replay_bytes"] == 9 * (16 + 20 + 32)
    assert a3["snapshot_bytes"] == a12["snapshot_bytes"] > a12["replay_bytes"]  # a tiny log is cheaper than weights
