"""``zo-optim bench flower-round-time``: where a Flower deployment round goes, on real processes on 127.0.0.1.

An insecure ``flower-superlink --disable-runtime-dependency-installation``, ``--nodes`` SuperNodes (each behind a
byte-counting proxy; :mod:`.flower_processes`), ``FLWR_HOME`` in a temporary directory, and two apps run with
``flwr run`` one after the other on the same processes (:mod:`._flower_rt_app`):

* ``bare`` — Flower's own floor: a ClientApp that imports nothing but Flower and answers at once, a ServerApp
  that pushes one tiny message per node and round and pulls every 0.05 s;
* ``torch`` — the same, but the ClientApp imports torch and runs the tiny model's forward: a plain torch app's
  floor;
* ``zo`` — our engine on a tiny model (``nn.Linear(8, 2)``, HiSo P = 5, τ = 1, every node sampled every round).

Per task (round, node) it measures, from timestamps the processes write themselves:

=================  =============================================================================================
``wait``           task pushed → ``flwr-clientapp`` process started: the SuperNode's poll of the SuperLink (3 s
                   when idle), the SuperExec's poll of the SuperNode (1 s) and the launch
``flower_start``   process start → the app module's first line: interpreter, Flower's imports, pulling the task,
                   installing the FAB, loading the app
``import_torch``   ``import torch`` in the app module (the bare app: 0)
``import_zo``      ``import zo_optim.federated.flower`` (the bare app: 0)
``app``            the rest of the app module and ``make_client_app`` until the handler runs
``build``          ``model_fn`` + ``optimizer_fn`` + ``data_fn``
``restore``        the client restored from ``context.state`` (minus ``build``)
``catch_up``       applying the round's log entries with their digest checks
``compute``        the τ local steps
``save``           the client's state written back to ``context.state``
``reply``          handler returned → process exit (Flower pushes the reply to the SuperNode)
``return``         process exit → the ServerApp pulled the reply (the SuperNode's 0.5 s reply poll, its push to
                   the SuperLink, the ServerApp's 0.05 s pull)
``round_trip``     task pushed → reply pulled
=================  =============================================================================================

and per round the time from the first push to the last reply, the TCP payload per node and round, and an idle
node's bytes per second. Output (``--out``): ``phases.csv`` (long format), ``table.txt``, ``traces.jsonl`` (every
timestamp), ``env.json``. Needs ``zo-optim[flower]`` (``flower-superlink``, ``flower-supernode`` and ``flwr``
beside the interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report
from ._engine_times import distributed_seconds_per_round, simulate_seconds_per_round
from ._flower_rt_app import KINDS, write_app
from .flower_processes import BIN, Federation, missing_executables

PHASES = ("wait", "flower_start", "import_torch", "import_zo", "app", "build", "restore", "catch_up", "compute",
          "save", "reply", "return", "round_trip")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench flower-round-time", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes (default 3)")
    p.add_argument("--rounds", type=int, default=6, help="rounds per app (default 6)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle traffic to measure first (default 10)")
    p.add_argument("--apps", default="bare,torch,zo", help="apps to run, in order (default bare,torch,zo)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per flwr run (default 900)")
    p.add_argument("--out", type=Path, default=Path("zo-optim-bench-flower-round-time"))
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, FLWR_HOME)")
    p.add_argument("--zo-backend", default="auto", choices=("auto", "cpu", "chunked", "reference"),
                   help="ops backend of the zo app's optimizer, on every participant (default auto: numba on CPU)")
    p.add_argument("--no-engines", action="store_true",
                   help="skip timing simulate() and torch.distributed (gloo) on the same problem")
    return p


def _phases(msg: dict[str, Any], push: float, exit_t: float | None, reply: float | None) -> dict[str, float]:
    ph = msg["phases"]
    build = ph.get("build", 0.0)
    out = {"wait": msg["start"] - push, "flower_start": msg["top"] - msg["start"],
           "import_torch": msg["torch"] - msg["top"], "import_zo": msg["zo"] - msg["torch"],
           "app": msg["h0"] - msg["zo"], "build": build, "restore": ph.get("participant", 0.0) - build,
           "catch_up": ph.get("catch_up", 0.0), "compute": ph.get("compute", 0.0), "save": ph.get("save", 0.0)}
    if exit_t is not None:
        out["reply"] = exit_t - msg["h1"]
    if reply is not None:
        if exit_t is not None:
            out["return"] = reply - exit_t
        out["round_trip"] = reply - push
    return out


def analyse(records: list[dict[str, Any]], proxies: list[Any] | None = None) -> dict[str, Any]:
    """Per-task phases and per-round times/bytes of one app's trace records (see the module docstring)."""
    push = {(r["round"], r["node"]): r["t"] for r in records if r["side"] == "server" and r["event"] == "push"}
    reply = {(r["round"], r["node"]): r["t"] for r in records if r["side"] == "server" and r["event"] == "reply"}
    exits = {r["pid"]: r["t"] for r in records if r["side"] == "client" and r["event"] == "exit"}
    tasks = []
    for m in (r for r in records if r["side"] == "client" and r["event"] == "message"):
        key = (m["round"], m["node"])
        if key not in push:
            continue
        tasks.append({"kind": m["kind"], "round": m["round"], "node": m["node"],
                      **_phases(m, push[key], exits.get(m["pid"]), reply.get(key))})
    rounds = sorted({int(t["round"]) for t in tasks if t["kind"] == "train" and int(t["round"]) >= 0})
    per_round = []
    for rnd in rounds:
        keys = [k for k in push if k[0] == str(rnd)]
        t0, t1 = min(push[k] for k in keys), max(reply.get(k, float("nan")) for k in keys)
        row: dict[str, Any] = {"round": rnd, "seconds": t1 - t0}
        if proxies:
            by_node = [p.bytes_between(t0, t1) for p in proxies]
            row["tcp_up"] = statistics.mean(u for u, _ in by_node)
            row["tcp_down"] = statistics.mean(d for _, d in by_node)
        per_round.append(row)
    done = next((r for r in records if r["side"] == "server" and r["event"] == "done"), {})
    return {"tasks": tasks, "rounds": per_round, "done": done}


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def summarise(app: str, res: dict[str, Any]) -> dict[str, float]:
    """Medians over the app's train tasks and rounds."""
    train = [t for t in res["tasks"] if t["kind"] == "train"]
    out = {ph: _median([t[ph] for t in train if ph in t]) for ph in PHASES}
    out["round"] = _median([r["seconds"] for r in res["rounds"]])
    for k in ("tcp_up", "tcp_down"):
        if res["rounds"] and k in res["rounds"][0]:
            out[k] = _median([r[k] for r in res["rounds"]])
    return out


def _read_traces(folder: Path, t0: float, t1: float) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("trace-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            t = rec.get("t", rec.get("h0"))
            if t is not None and t0 <= t <= t1:
                out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    apps = [s for s in a.apps.split(",") if s]
    bad = [s for s in apps if s not in KINDS]
    if bad or not apps:
        print(f"zo-optim bench flower-round-time: Invalid --apps {a.apps!r} (a comma list of {', '.join(KINDS)})",
              file=sys.stderr)
        return 2
    if a.nodes < 1 or a.rounds < 1:
        print(f"zo-optim bench flower-round-time: Invalid --nodes {a.nodes} / --rounds {a.rounds} (>= 1)",
              file=sys.stderr)
        return 2
    missing = missing_executables()
    if missing:
        print(f"zo-optim bench flower-round-time: {missing} not in {BIN}: pip install 'zo-optim[flower]'",
              file=sys.stderr)
        return 2
    env_rec = report.environment(
        argv=sys.argv if argv is None else ["zo-optim", "bench", "flower-round-time", *argv])
    root = Path(tempfile.mkdtemp(prefix="zo-rt-"))
    trace = root / "trace"
    trace.mkdir()
    src = str(Path(__file__).resolve().parents[2])  # the zo_optim the ClientApp processes must import
    # (Federation adds FLWR_HOME under root, telemetry and update check off, OMP_NUM_THREADS=1)
    env = {"ZO_RT_TRACE": str(trace), "ZO_RT_BACKEND": a.zo_backend,
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, float] = {}
    try:
        with Federation(root, env=env, proxies=True) as fed:
            fed.start_superlink()
            for i in range(a.nodes):
                fed.start_supernode(i, a.nodes)
            proxies = [fed.proxies[i] for i in range(a.nodes)]
            fed.wait_for("every SuperNode's first bytes to the SuperLink", lambda: all(p.events for p in proxies),
                         120, watch=("superlink", *(f"supernode{i}" for i in range(a.nodes))))
            time.sleep(3.0)  # past registration
            t0 = time.time()
            time.sleep(a.idle)
            idle = [p.bytes_between(t0, time.time()) for p in proxies]
            idle_up = statistics.mean(u for u, _ in idle) / a.idle
            idle_down = statistics.mean(d for _, d in idle) / a.idle
            for app in apps:
                start = time.time()
                runs[app] = fed.flwr_run(f"num-server-rounds={a.rounds} min-nodes={a.nodes}", a.timeout,
                                         app=write_app(root, app), stream=True)
                results[app] = analyse(_read_traces(trace, start, time.time()), proxies)
                results[app]["records"] = _read_traces(trace, start, time.time())
        left = fed.leftovers()  # every process it started is gone (killed by pid while still its own)
        if left:
            print(f"zo-optim bench flower-round-time: processes still running after the stop: {left}", file=sys.stderr)
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    summary = {app: summarise(app, res) for app, res in results.items()}
    engines: dict[str, float] = {}
    if not a.no_engines:  # after the cluster is gone: nothing else runs beside them
        engines["simulate"] = simulate_seconds_per_round(a.nodes, a.rounds)
        with tempfile.TemporaryDirectory() as tmp:
            engines["torch.distributed (gloo)"] = distributed_seconds_per_round(a.nodes, a.rounds, Path(tmp) / "s")
    rows = [report.Row(app, "flower-deployment", ph, "s" if not ph.startswith("tcp") else "B", a.nodes, float(v))
            for app, s in summary.items() for ph, v in s.items()]
    rows += [report.Row("idle", "flower-deployment", "tcp_up_per_s", "B/s", a.nodes, idle_up),
             report.Row("idle", "flower-deployment", "tcp_down_per_s", "B/s", a.nodes, idle_down)]
    rows += [report.Row(app, "flower-deployment", "flwr_run_wall", "s", a.nodes, w) for app, w in runs.items()]
    rows += [report.Row(name, "engine", "round", "s", a.nodes, v) for name, v in engines.items()]
    names = list(summary)
    table = report.format_table(["phase (median, s)", *names],
                                [[ph, *[summary[n].get(ph, float("nan")) for n in names]] for ph in
                                 (*PHASES, "round", "tcp_up", "tcp_down")],
                                title=f"one deployment round, {a.nodes} SuperNodes, {a.rounds} rounds per app")
    lines = [table, "", f"idle node TCP payload: {idle_up:.0f} B/s up, {idle_down:.0f} B/s down",
             "flwr run wall: " + ", ".join(f"{k} {v:.1f} s" for k, v in runs.items())]
    if engines:
        lines.append("the same problem on the other engines, median s per round: " + ", ".join(
            f"{k} {v:.4f}" for k, v in engines.items()))
    done = results.get("zo", {}).get("done", {})
    if done:
        pay = done.get("payload", [])
        n_part = sum(p[3] for p in pay) or 1
        lines.append(f"zo payload per sampled client and round: {sum(p[1] for p in pay) / n_part:.0f} B up / "
                     f"{sum(p[2] for p in pay) / n_part:.0f} B down; Flower records: "
                     f"{sum(v for k, v in done['wire_up'].items() if k != '-1') / n_part:.0f} B up / "
                     f"{sum(v for k, v in done['wire_down'].items() if k != '-1') / n_part:.0f} B down; "
                     f"replicas: {done.get('check')}")
        rows += [report.Row("zo", "flower-deployment", m, "B", a.nodes, float(v)) for m, v in (
            ("payload_up", sum(p[1] for p in pay) / n_part), ("payload_down", sum(p[2] for p in pay) / n_part),
            ("records_up", sum(v for k, v in done["wire_up"].items() if k != "-1") / n_part),
            ("records_down", sum(v for k, v in done["wire_down"].items() if k != "-1") / n_part))]
    text = "\n".join(lines)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(a.out / "phases.csv", rows, env_rec)
    (a.out / "table.txt").write_text(text + "\n")
    with open(a.out / "traces.jsonl", "w") as f:
        for app, res in results.items():
            for rec in res["records"]:
                f.write(json.dumps({"app": app, **rec}) + "\n")
    from importlib import metadata

    report.write_environment(a.out / "env.json", env_rec, flwr=metadata.version("flwr"),
                             load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()),
                             **{k: str(v) for k, v in vars(a).items()})
    return 0
