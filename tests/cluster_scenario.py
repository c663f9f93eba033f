"""A local Ray cluster on this machine, in a network namespace with only loopback (run under `unshare -n`, as
root), and a sweep of the tiny model over it: used by tests/test_cluster.py and benchmarks/cluster_overhead.py.

    unshare -n python tests/cluster_scenario.py SCENARIO WORKDIR

Nodes: the head advertises harness:kind-a, node B harness:kind-a too (same kind, its own port), node C
harness:kind-b, each started when a scenario first needs it. Scenarios:
  kill:    the sweep over [kind-a, kind-b]; node B's raylet is killed once B has sent a record, node C's once C
           has; then the sweep is resumed with a fresh kind-b node (D).
  all, client, hang, interrupt: see tests/test_cluster.py.
  plain:   the same sweep with no fault, timed (for the overhead benchmark), beside the same sweep run locally.
  session: client, hang, interrupt, all and kill one after another on one cluster (the tests' way: one
           cluster's start and stop instead of five), each in WORKDIR/<scenario>/.
Writes WORKDIR/scenario.json: what happened (return codes, node ids killed, timings); for `session`, one such
entry per scenario."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PORT = 6393
TEMP_DIRS: list[str] = []


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kw)


def ray_start(work: Path, name: str, resource: str, head: bool = False, nm_port: int | None = None,
              client_port: int | None = None) -> None:
    args = [str(BIN / "ray"), "start", "--num-cpus=1", f"--resources={json.dumps({resource: 1})}",
            "--disable-usage-stats"]
    if head:
        # Ray's sockets live under its temp dir, and a Unix socket path is at most 107 bytes: a short one
        args += [f"--port={PORT}", "--head", "--include-dashboard=false",
                 f"--temp-dir={tempfile.mkdtemp(prefix='ray-', dir='/tmp')}"]
        TEMP_DIRS.append(args[-1].split("=", 1)[1])
    else:
        args += [f"--address=127.0.0.1:{PORT}"]
    if nm_port:
        args.append(f"--node-manager-port={nm_port}")
    if client_port:  # Ray Client's server on the head (ray://), off Ray's worker ports (10002 and up)
        args.append(f"--ray-client-server-port={client_port}")
    for _ in range(3):  # a node joining right after another died can be refused once: try again
        r = sh(*args, check=False, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        (work / f"ray-{name}.log").write_text(r.stdout + r.stderr)
        if not r.returncode:
            break
        time.sleep(3)
    if r.returncode:
        raise SystemExit(f"ray start {name} failed: {r.stderr[-2000:]}")


def node_id_of(nm_port: int) -> str:
    """The id of the alive node on this node manager port, waiting for it to register (up to 60 s).

    Ray can print its own lines on stdout (a warning at shutdown), so the answer is the line after a marker.
    """
    code = (f"import ray, json; ray.init(address='127.0.0.1:{PORT}', log_to_driver=False, logging_level='ERROR'); "
            "print('NODE-IDS ' + json.dumps([n['NodeID'] for n in ray.nodes() "
            f"if n['Alive'] and n['NodeManagerPort'] == {nm_port}]))")
    deadline = time.monotonic() + 60
    while True:
        out = sh(str(BIN / "python"), "-c", code, check=False).stdout
        ids = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("NODE-IDS ")]
        if ids and ids[-1]:
            return ids[-1][0]
        if time.monotonic() > deadline:
            raise SystemExit(f"no alive node with node_manager_port={nm_port} after 60 s; last answer: {out[-2000:]!r}")
        time.sleep(1)


def kill_raylet(nm_port: int) -> None:
    """The node dies: its raylet and the workers it started (a machine that goes away takes both)."""
    out = sh("pgrep", "-af", "raylet", check=False).stdout.splitlines()
    pids = [int(line.split()[0]) for line in out if f"node_manager_port={nm_port}" in line]
    if not pids:
        raise SystemExit(f"no raylet with node_manager_port={nm_port}: {out}")
    for pid in pids:
        children = sh("pgrep", "-P", str(pid), check=False).stdout.split()
        for c in [pid, *map(int, children)]:
            try:
                os.kill(c, 9)
            except ProcessLookupError:
                pass


def records_of(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def write_config(work: Path, quants: list[str], threads: int = 1, groups=("kind-a", "kind-b"), n_gen: int = 256,
                 timeout_s: float = 120) -> Path:
    cfg = work / "cfg.yaml"
    cfg.write_text(json.dumps({
        "name": "cluster-test", "model": {"source": "synthetic", "architecture": "tiny"}, "quants": quants,
        "bench": {"n_prompt": 256, "n_gen": n_gen, "repetitions": 4, "rounds": 1, "threads": threads,
                  "n_batch": 256, "n_ubatch": 256, "timeout_s": timeout_s},
        "probes": False, "cluster": {"devices": [{"name": g} for g in groups], "retries": 2}}))
    return cfg


def harness(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "python"), "-m", "harness", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def configure(scenario: str, work: Path) -> Path:
    quants = ["IQ3_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    if scenario == "kill":
        return write_config(work, quants)
    if scenario == "all":  # cluster.devices: all: every node once, its quants one after another
        cfg = write_config(work, quants[:3], groups=("kind-a",))
        cfg.write_text(cfg.read_text().replace('"devices": [{"name": "kind-a"}]', '"devices": "all"'))
        return cfg
    if scenario == "client":  # through Ray Client (ray://): no streaming tasks there
        return write_config(work, quants[:2], groups=("kind-a",))
    if scenario == "interrupt":  # Ctrl-C once a record is in, then --resume
        return write_config(work, quants[:3], groups=("kind-a",))
    if scenario == "hang":  # every repetition outlasts the time limit: the node's child is cut
        return write_config(work, quants[:2], groups=("kind-a",), n_gen=100_000, timeout_s=3)
    return write_config(work, quants, threads=2, groups=("kind-a",))  # plain: against the same sweep run locally


def sweep(scenario: str, work: Path, ids: dict[str, str]) -> dict:
    """One scenario's sweep on the running cluster (nodes `ids`); what happened, as a dict."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = configure(scenario, work)
    out = work / "out"
    report: dict = {"scenario": scenario, "nodes": dict(ids)}
    t0 = time.monotonic()
    address = "ray://127.0.0.1:10001" if scenario == "client" else f"127.0.0.1:{PORT}"
    p = harness("run", str(cfg), "--cluster", address, "--out", str(out), "--no-report")
    if scenario == "kill":
        killed: dict[str, int] = {}
        deadline = time.monotonic() + 300
        while p.poll() is None and len(killed) < 2 and time.monotonic() < deadline:
            recs = records_of(out / "records.jsonl")
            by = {((r.get("extra") or {}).get("cluster") or {}).get("node_id") for r in recs}
            for name, port in (("B", 6802), ("C", 6803)):
                if name not in killed and ids[name] in by:
                    killed[name] = sum(1 for r in recs if ((r.get("extra") or {}).get("cluster") or {})
                                       .get("node_id") == ids[name])
                    kill_raylet(port)
            time.sleep(0.05)
        report["killed_after_records"] = killed
    if scenario == "interrupt":
        deadline = time.monotonic() + 300
        while p.poll() is None and not records_of(out / "records.jsonl") and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        report["records_at_interrupt"] = len(records_of(out / "records.jsonl"))
    stdout, stderr = p.communicate(timeout=600)
    report.update(rc=p.returncode, seconds=time.monotonic() - t0, stdout=stdout[-4000:], stderr=stderr[-6000:])
    if scenario in ("kill", "interrupt"):  # resume (after a kill: with a fresh node of kind-b)
        if scenario == "kill":
            ray_start(work, "D", "harness:kind-b", nm_port=6804)
            report["nodes"]["D"] = ids["D"] = node_id_of(6804)
        p = harness("run", str(cfg), "--cluster", f"127.0.0.1:{PORT}", "--resume", str(out))
        stdout, stderr = p.communicate(timeout=600)
        report["resume"] = {"rc": p.returncode, "stdout": stdout[-4000:], "stderr": stderr[-6000:]}
    if scenario == "plain":  # the same sweep locally, for the overhead ratio
        t0 = time.monotonic()
        p = harness("run", str(cfg), "--out", str(work / "local"), "--no-report", "--no-progress")
        p.communicate(timeout=600)
        report["local_seconds"] = time.monotonic() - t0
        report["local_rc"] = p.returncode
    return report


# `session`: every test scenario on one cluster, in the order the nodes they need come and go: the head
# alone (client, hang, interrupt: each asserts its cells ran there), then node B (all: every node is a group),
# then node C (kill: B and C die, D joins for the resume).
SESSION = ("client", "hang", "interrupt", "all", "kill")


def main() -> int:
    scenario, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    sh("ip", "link", "set", "lo", "up")
    names = SESSION if scenario == "session" else (scenario,)
    report: dict = {}
    t0 = time.monotonic()
    try:
        ray_start(work, "head", "harness:kind-a", head=True, nm_port=6801,
                  client_port=10001 if "client" in names else None)
        ids = {"head": node_id_of(6801)}
        for name in names:
            if name in ("all", "kill") and "B" not in ids:
                ray_start(work, "B", "harness:kind-a", nm_port=6802)
                ids.update(B=node_id_of(6802))
            if name == "kill":
                ray_start(work, "C", "harness:kind-b", nm_port=6803)
                ids.update(C=node_id_of(6803))
            try:
                report[name] = sweep(name, work / name if len(names) > 1 else work, ids)
            except Exception as e:  # noqa: BLE001 - said in scenario.json, for that scenario's test
                import traceback

                report[name] = {"error": "".join(traceback.format_exception(e))[-4000:]}
    except BaseException as e:  # noqa: BLE001 - said in scenario.json, for the tests' message
        import traceback

        report["error"] = "".join(traceback.format_exception(e))[-4000:]
        raise
    finally:
        sh(str(BIN / "ray"), "stop", "--force", check=False)
        for d in TEMP_DIRS:
            shutil.rmtree(d, ignore_errors=True)
        report["session_seconds"] = time.monotonic() - t0
        out = report if scenario == "session" else dict(report.get(scenario, {}))
        if report.get("error"):  # the cluster's own failure; a scenario's stays in its entry
            out["error"] = report["error"]
        (work / "scenario.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
