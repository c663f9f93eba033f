"""`run --cluster` on a real local Ray cluster of three nodes (two of one kind, one of another), in a network
namespace with only loopback: a node killed mid-sweep loses no finished record, its unfinished cells go to
the other node of its kind, the kind left without nodes gets error records naming the dead node, and
`--resume` with a fresh node completes the folder. Runs tests/cluster_scenario.py `session` under `unshare -n`:
every scenario on one cluster, started and stopped once for the module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from conftest import REPO, run_cli

pytest.importorskip("ray", reason="the cluster extra is not installed: pip install -e '.[cluster]'")


def _netns_why_not() -> str | None:
    """Why a loopback-only network namespace cannot be made here (None where it can): root alone is not enough
    (a container may deny CAP_SYS_ADMIN), so it is tried."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "no unshare or ip on PATH"
    try:
        r = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


_WHY_NOT = _netns_why_not()
if _WHY_NOT:
    pytest.skip(f"the test cluster runs in a loopback-only network namespace, which cannot be made here: {_WHY_NOT}",
                allow_module_level=True)


def group_of(r: dict) -> str | None:
    return ((r.get("extra") or {}).get("cluster") or {}).get("group")


def node_of(r: dict) -> str | None:
    return ((r.get("extra") or {}).get("cluster") or {}).get("node_id")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Every scenario on one cluster (tests/cluster_scenario.py `session`): one start and stop for the module."""
    work = tmp_path_factory.mktemp("cluster")
    r = subprocess.run(["unshare", "-n", sys.executable, str(REPO / "tests" / "cluster_scenario.py"), "session",
                        str(work)], capture_output=True, text=True, timeout=1500)
    assert (work / "scenario.json").is_file(), r.stderr[-3000:]
    sc = json.loads((work / "scenario.json").read_text())
    assert "error" not in sc, sc["error"]
    return work, sc


def scenario(session, name: str):
    work, sc = session
    assert name in sc, f"the session never ran {name}: {sorted(sc)}"
    assert "error" not in sc[name], sc[name]["error"]
    return work / name, sc[name]


@pytest.fixture(scope="module")
def killed(session):
    return scenario(session, "kill")


@pytest.mark.slow
def test_a_task_that_runs_past_the_time_limit_is_cut_on_its_node(session):
    """bench.timeout_s holds on the node as locally: the child measuring there is killed, its quant gets an
    error record with its group and node, the cells measured before it are kept, and the sweep goes on."""
    work, sc = scenario(session, "hang")
    assert sc["rc"] == 1
    recs = [json.loads(x) for x in (work / "out" / "records.jsonl").read_text().splitlines()]
    errors = [r for r in recs if r["status"] == "error"]
    assert {r["quant"] for r in errors} == {"IQ3_M", "Q4_0"}
    assert all("timed out after 3 s" in r["error"] and node_of(r) == sc["nodes"]["head"] for r in errors)
    assert all(r["test"] == "pp" for r in recs if r["status"] == "ok")  # pp done, tg cut


@pytest.mark.slow
def test_a_killed_node_loses_no_record_and_its_cells_go_to_a_node_of_its_kind(killed):
    work, sc = killed
    assert sc["rc"] == 1, sc["stderr"]  # kind-b lost its only node: error records, exit 1
    ids = sc["nodes"]
    b_sent = sc["killed_after_records"]["B"]
    assert 1 <= b_sent < 8, "node B was to die mid-quant (8 cells a quant)"
    recs = [json.loads(x) for x in (work / "out" / "records.jsonl").read_text().splitlines()]
    from_b = [r for r in recs if node_of(r) == ids["B"]]
    assert len(from_b) >= b_sent and all(r["status"] == "ok" for r in from_b)  # nothing B sent is lost
    ok_a = Counter((r["quant"], r["test"], r["rep"]) for r in recs
                   if group_of(r) == "kind-a" and r["status"] == "ok")
    quants = ["IQ3_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    assert set(ok_a) == {(q, t, rep) for q in quants for t in ("pp", "tg") for rep in range(4)}
    assert max(ok_a.values()) == 1  # the retry measured only what B had not sent
    b_quant = from_b[0]["quant"]
    nodes = {node_of(r) for r in recs if r["quant"] == b_quant and group_of(r) == "kind-a"}
    assert nodes == {ids["B"], ids["head"]}
    sent = sum(1 for r in from_b if r["quant"] == b_quant)  # what B sent of its quant (some after the kill order)
    assert f"died with {8 - sent} cells unmeasured: given to another node of kind-a" in sc["stderr"]
    errors_b = [r for r in recs if group_of(r) == "kind-b" and r["status"] == "error"]
    assert any(f"node {ids['C'][:8]}" in r["error"] and "died mid-measurement" in r["error"] for r in errors_b)
    assert any("no alive node of kind-b left" in r["error"] for r in errors_b)
    assert sorted(p.name.split("-")[1] for p in (work / "out").glob("env-*.json")) >= ["kind", "kind"]


@pytest.mark.slow
def test_resume_with_a_fresh_node_completes_the_folder_and_reports_per_group(killed, tmp_path):
    work, sc = killed
    assert sc["resume"]["rc"] == 0, sc["resume"]["stderr"]
    recs = [json.loads(x) for x in (work / "out" / "records.jsonl").read_text().splitlines()]
    ok = Counter((group_of(r), r["quant"], r["test"], r["rep"]) for r in recs if r["status"] == "ok")
    assert len(ok) == 2 * 6 * 2 * 4 and max(ok.values()) == 1  # every cell of both groups, each once
    assert any(node_of(r) == sc["nodes"]["D"] for r in recs)
    r = run_cli("report", str(work / "out"), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    for g in ("kind-a", "kind-b"):
        md = (tmp_path / "rep" / g / "report.md").read_text()
        assert f"[{g}]" in md.splitlines()[0]


def test_cluster_needs_ray_message_and_bad_groups(tmp_path):
    from harness import config

    with pytest.raises(config.ConfigError, match="cluster.devices lists 'a' twice"):
        config.from_dict({"name": "x", "cluster": {"devices": ["a", "a"]}})
    out = str(tmp_path / "o")
    code = ("import sys; sys.modules['ray'] = None; from harness import cli; "
            f"sys.exit(cli.main(['run', 'configs/smoke.yaml', '--cluster', 'auto', '--out', {out!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().endswith("pip install -e '.[cluster]'"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_leaves_a_folder_that_resume_completes(session):
    """The driver interrupted (SIGINT) once a record is in: exit 130 with the folder on disk; --resume measures
    only the missing cells, and every cell ends measured exactly once."""
    work, sc = scenario(session, "interrupt")
    assert sc["rc"] == 130 and "interrupted: every finished measurement is on disk" in sc["stderr"]
    hint = sc["stderr"].rsplit("\n", 2)[-2]  # the resume hint repeats the whole command, flags kept
    assert "--cluster 127.0.0.1:6393" in hint and "--no-report --resume RESULTS_DIR" in hint, hint
    assert sc["records_at_interrupt"] >= 1
    assert sc["resume"]["rc"] == 0, sc["resume"]["stderr"]
    recs = [json.loads(x) for x in (work / "out" / "records.jsonl").read_text().splitlines()]
    ok = Counter((r["quant"], r["test"], r["rep"]) for r in recs if r["status"] == "ok")
    assert len(ok) == 3 * 2 * 4 and max(ok.values()) == 1
    assert "cells already measured" in sc["resume"]["stderr"]


@pytest.mark.slow
def test_through_ray_client(session):
    """`--cluster ray://HOST:10001` (Ray Client, which has no streaming tasks): every cell measured on the
    node, records marked with its group and node."""
    work, sc = scenario(session, "client")
    assert sc["rc"] == 0, sc["stderr"]
    recs = [json.loads(x) for x in (work / "out" / "records.jsonl").read_text().splitlines()]
    ok = Counter((r["quant"], r["test"], r["rep"]) for r in recs if r["status"] == "ok")
    assert len(ok) == 2 * 2 * 4 and max(ok.values()) == 1
    assert {node_of(r) for r in recs} == {sc["nodes"]["head"]} and {group_of(r) for r in recs} == {"kind-a"}


@pytest.mark.slow
def test_all_nodes_each_measure_every_quant_one_at_a_time(session):
    """`cluster.devices: all`: each alive node is a group of its own and measures every quant; its quants run
    one after another (never two measurements at once on a node)."""
    work, sc = scenario(session, "all")
    assert sc["rc"] == 0, sc["stderr"]
    recs = [json.loads(x) for x in (work / "out" / "records.jsonl").read_text().splitlines()]
    ids = sc["nodes"]
    assert {node_of(r) for r in recs} == {ids["head"], ids["B"]}
    assert {group_of(r) for r in recs} == {f"node-{ids['head'][:8]}", f"node-{ids['B'][:8]}"}
    for nid in (ids["head"], ids["B"]):
        mine = [r for r in recs if node_of(r) == nid]
        assert len({(r["quant"], r["test"], r["rep"]) for r in mine if r["status"] == "ok"}) == 3 * 2 * 4
        order = [r["quant"] for r in mine]  # in arrival order: one quant's records together, never interleaved
        assert len([q for i, q in enumerate(order) if i == 0 or order[i - 1] != q]) == 3
