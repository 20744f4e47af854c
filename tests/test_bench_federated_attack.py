"""``zo-optim bench federated-attack`` runs, writes its files, and shows the mean following an amplified attacker."""

from __future__ import annotations

from zo_optim.bench import federated_attack, report


def test_attack_bench_runs_and_the_robust_rules_bound_the_amplified_attacker(tmp_path):
    assert federated_attack.main(["--rounds", "6", "--clients", "5", "--factors", "-100", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(tmp_path / "attack.csv")
    dist = {r["provider"]: float(r["value"]) for r in rows if r["metric"] == "relative_distance_from_honest"}
    assert set(dist) == {"mean", "median", "trimmed_mean"}
    # one of 5 replies ×(−100): the mean moves with it (its step is ≈ 20× the honest one, the other way); the median
    # and the trimmed mean (which drops that one extreme) stay near the honest run
    assert dist["mean"] > 5 * max(dist["median"], dist["trimmed_mean"])
    assert (tmp_path / "table.txt").read_text().startswith("1 of 5 clients")
