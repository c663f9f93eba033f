"""One sweep over a Ray cluster: ``harness run CONFIG --cluster ADDRESS``.

The driver plans the cells (device group x quant x test repetition) and gives each quant of each device group to
a node of that group as one Ray task. On the node the task does what a local run does for that quant: it gets
the model file (built, downloaded or found there: every node has its own cache), then measures it in a child
process (:func:`harness.measure.runner.measure_in_child`: the same isolation, time limit and header validation),
and streams each record back as it is measured (a Ray streaming generator). The driver writes every record into
the one results folder as it arrives, each marked with its group and node (``extra.cluster``), and each node's
environment into ``env-<group>-<node>.json``.

Nodes are matched by Ray's custom resources: a node of the group "RTX 4090" is started with
``ray start ... --resources '{"harness:RTX 4090": 1}'`` (capacity 1: one measurement at a time on a node) and
the group's ``gpus`` ask Ray for that many GPUs too. ``cluster.devices: all`` measures on every alive node once,
pinned to it.

Faults: a record is written the moment it arrives, so a node that dies loses only the cells it had not sent. Its
group's unfinished cells go to another alive node of the group (up to ``cluster.retries`` times), or become
error records naming the node when none is left. A task that sends nothing for longer than the run's time limit
is cancelled and becomes an error record. Ctrl-C cancels the tasks and leaves a folder that ``--resume`` (with
``--cluster``) completes: done cells are keyed by group, quant, test, depth and repetition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import config as config_mod
from harness import schema
from harness.config import Config, ConfigError
from harness.measure import runner as runner_mod
from harness.measure.bench import mem_cells

log = logging.getLogger(__name__)

RESOURCE = "harness:"  # a node of group G advertises the custom resource "harness:G"
INSTALL = "pip install -e '.[cluster]'"


POLL_S = 2.0  # how often a waiting driver thread looks at the cluster's nodes


# Ray's exceptions that mean the node or the worker process went away, not that the measurement failed
LOST = ("NodeDiedError", "WorkerCrashedError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError",
        "ObjectReconstructionFailedError", "TaskUnschedulableError", "RaySystemError")


class NodeLost(RuntimeError):
    """The node a task ran on left the cluster (its raylet died) while the driver waited for its next record."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--cluster needs Ray, which is not installed: {INSTALL}") from None
    return ray


# --- on the node --------------------------------------------------------------------------------------------------

def node_info() -> dict[str, Any]:
    """Which node this is: Ray's node id, the host name, and the resources it advertises."""
    import socket

    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "host": socket.gethostname(),
            "accelerators": list(ctx.get_accelerator_ids().get("GPU", []))}


_NODE_ENV: dict[str, Any] = {}  # this worker's environment, collected by its first task


def measure_on_node(cfg_yaml: str, quant: str, run_id: str, skip: list, skip_mem: list, group: str):
    """The task body (a generator): ("node", info, env) first, then ("record", dict) per measurement and a
    final ("done", error or None). Runs in a Ray worker on the node; the measurement itself in a child
    process, exactly as a local run."""
    from harness.measure import env as env_mod
    from harness.measure import worker
    from harness.sources import quantize
    from harness.sources.base import SourceError
    from harness.sources.resolve import resolve as resolve_source

    cfg = config_mod.from_dict(config_mod.yaml.safe_load(cfg_yaml))
    if "env" not in _NODE_ENV:  # once per worker process: its bandwidth probe alone takes a second
        _NODE_ENV["env"] = env_mod.collect()
    yield ("node", node_info(), _NODE_ENV["env"])
    try:
        mf = resolve_source(cfg, quant, progress=False)
    except Exception as e:  # noqa: BLE001 - SourceError, QuantizeError, OSError: this quant on this node
        yield ("done", str(e) if isinstance(e, SourceError) else f"{type(e).__name__}: {e}")
        return
    bench = runner_mod.resolved_bench(cfg)  # this node's threads and rounds
    base = {"run_id": run_id, "quant": quant, "weights": mf.weights, "weights_ref": mf.weights_ref,
            "file_path": str(mf.path), "file_bytes": mf.path.stat().st_size, "file_sha256": mf.sha256,
            "llama_cpp_version": quantize.llama_cpp_version()}
    expect = None if cfg.model.source == "local" else "llama"
    items: queue.Queue = queue.Queue()
    with tempfile.TemporaryDirectory(prefix="harness-node-") as tmp:
        job = worker.make_job(mf.path, bench, base, Path(tmp) / f"{quant}.llama.log", skip_cells=skip,
                              skip_mem=skip_mem, expect_arch=expect)

        def measure() -> None:
            try:
                res = runner_mod.measure_in_child(job, cfg.bench.timeout_s, lambda d: items.put(("record", d)),
                                                  lambda msg: None, Path(tmp) / "stderr")
                items.put(("done", res.error))
            except Exception as e:  # noqa: BLE001 - reported to the driver as this quant's error
                items.put(("done", f"{type(e).__name__}: {e}"))

        t = threading.Thread(target=measure, daemon=True)
        t.start()
        while True:
            item = items.get()
            yield item
            if item[0] == "done":
                break
        t.join()


def _is_client() -> bool:
    """Whether this driver is connected through Ray Client (ray://), which runs no streaming tasks."""
    try:
        from ray.util.client import ray as client_ray

        return bool(client_ray.is_connected())
    except Exception:  # noqa: BLE001 - an older or minimal Ray: not a client
        return False


def measure_all_on_node(*args) -> list:
    """measure_on_node's items as one list: for Ray Client, which runs no streaming tasks."""
    return list(measure_on_node(*args))


# --- the driver ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """Where a group's tasks go: a device group (its resource) or, for "all", one node (pinned)."""

    group: str
    resource: str | None = None
    gpus: float = 0
    node_id: str | None = None


def alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def plan_targets(ray, devices) -> list[Target]:
    """The targets of a sweep: one per device group (checked against the cluster's nodes), or one per alive node
    for "all". A group no alive node advertises is a ConfigError naming the resources the cluster has."""
    nodes = alive_nodes(ray)
    if devices == "all":
        return [Target(group=f"node-{n['NodeID'][:8]}", node_id=n["NodeID"]) for n in nodes]
    have = sorted({k for n in nodes for k in n["Resources"] if k.startswith(RESOURCE)})
    out = []
    for g in devices:
        res = RESOURCE + g.name
        if res not in have:
            raise ConfigError(f"cluster.devices: no alive node advertises {res!r} (start one with ray start ... "
                              f"--resources '{{\"{res}\": 1}}'); the cluster has: {', '.join(have) or 'none'}")
        out.append(Target(group=g.name, resource=res, gpus=g.gpus))
    return out


def nodes_of(ray, target: Target) -> list[str]:
    """Alive node ids that can take `target`'s tasks."""
    nodes = alive_nodes(ray)
    if target.node_id:
        return [n["NodeID"] for n in nodes if n["NodeID"] == target.node_id]
    return [n["NodeID"] for n in nodes if n["Resources"].get(target.resource, 0) > 0]


def _options(ray, target: Target, exclude: set[str]) -> dict[str, Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict[str, Any] = {"num_cpus": 0, "max_retries": 0, "num_gpus": target.gpus}
    if target.node_id:
        return {**opts, "scheduling_strategy": NodeAffinitySchedulingStrategy(target.node_id, soft=False)}
    opts["resources"] = {target.resource: 1}
    ok = [n for n in nodes_of(ray, target) if n not in exclude]
    if exclude and ok:  # a retry: never the node that just died (Ray may not know it yet)
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ok[0], soft=False)
    return opts


def done_key(rec: schema.Record) -> tuple | None:
    """(group, quant, test, depth, rep) of an ok record of a cluster run."""
    group = schema.cluster_group(rec.extra)
    if rec.status != "ok" or group is None:
        return None
    return (group, rec.quant, rec.test, rec.n_depth, rec.rep)


class Driver:
    def __init__(self, cfg: Config, ray, run_dir: Path, targets: list[Target], done: set,
                 echo: Callable[[str], None]):
        self.cfg, self.ray, self.run_dir, self.targets, self.done = cfg, ray, run_dir, targets, done
        self.echo = echo
        self.events: queue.Queue = queue.Queue()
        self.gens: dict[tuple[str, str], Any] = {}
        self.errors: dict[str, str] = {}
        self.bench = runner_mod.resolved_bench(cfg)
        self.cfg_yaml = config_mod.dump_yaml(cfg)
        self.stop = threading.Event()
        self.client = _is_client()

    def cells(self, quant: str) -> list[tuple[str, int, int]]:
        return [(t, d, r) for (q, t, d, r) in runner_mod.all_cells(self.cfg, self.bench) if q == quant]

    def run(self, writer: schema.RecordWriter, mem_writer: schema.RecordWriter | None) -> None:
        todo: dict[int, list[str]] = {}
        for i, target in enumerate(self.targets):
            for quant in self.cfg.quants:
                if any((target.group, quant, *c) not in self.done for c in self.cells(quant)):
                    todo.setdefault(i, []).append(quant)
                else:
                    self.echo(f"[{target.group}] {quant}: already measured (resume)")
        live = 0
        for i, quants in todo.items():
            target = self.targets[i]
            # A group's tasks all go to Ray at once: its resource (capacity 1 a node) lets one run at a time on
            # each node. A pinned node has no such resource: its quants go one after another from one thread.
            for chain in ([quants] if target.node_id else [[q] for q in quants]):
                threading.Thread(target=self._drive_each, args=(target, chain), daemon=True).start()
                live += len(chain)
        envs: set[str] = set()
        while live:
            kind, *rest = self.events.get()
            if kind == "record":
                rec = rest[0]
                (mem_writer if rec.test == "mem" and mem_writer is not None else writer).write(rec)
            elif kind == "env" and rest[0] not in envs:  # a node's environment: once per node and group
                envs.add(rest[0])
                (self.run_dir / rest[0]).write_text(json.dumps(rest[1], indent=2))
            elif kind == "say":
                self.echo(rest[0])
            elif kind == "end":
                live -= 1

    def cancel(self) -> None:
        self.stop.set()
        for gen in list(self.gens.values()):
            with contextlib.suppress(Exception):
                self.ray.cancel(gen, force=True)

    def _drive_each(self, target: Target, quants: list[str]) -> None:
        for quant in quants:
            if self.stop.is_set():
                self.events.put(("end",))
                continue
            self._drive(target, quant)

    def _drive(self, target: Target, quant: str) -> None:
        """One (group, quant): its task, retried on another node of the group when its node dies."""
        ray = self.ray
        got: set[tuple] = set()  # cells received from any node
        dead: set[str] = set()
        head = f"[{target.group}] {quant}"
        attempt = 0
        try:
            while not self.stop.is_set():
                todo = [c for c in self.cells(quant) if (target.group, quant, *c) not in self.done and c not in got]
                skip = [list(c) for c in self.cells(quant) if c not in todo]
                cq = self.bench.get("context_quants") or self.cfg.quants
                skip_mem = [] if quant in cq and attempt == 0 else [list(m.key) for m in mem_cells(self.bench)]
                node: dict[str, Any] = {}
                args = (self.cfg_yaml, quant, self.run_dir.name, skip, skip_mem, target.group)
                try:
                    if self.client:  # Ray Client has no streaming tasks: the items come when the task ends
                        ref = ray.remote(measure_all_on_node).options(**_options(ray, target, dead)).remote(*args)
                        self.gens[(target.group, quant)] = ref
                        error = self._collect(ref, target, quant, head, node, got, dead)
                    else:
                        gen = ray.remote(num_returns="streaming")(measure_on_node).options(
                            **_options(ray, target, dead)).remote(*args)
                        self.gens[(target.group, quant)] = gen
                        error = self._stream(gen, target, quant, head, node, got)
                except Exception as e:  # noqa: BLE001 - the node died, or the task broke: decided below
                    nid = node.get("node_id")
                    lost = tuple(getattr(ray.exceptions, n) for n in LOST if hasattr(ray.exceptions, n))
                    if isinstance(e, (NodeLost, *lost)):
                        gone = True  # Ray's own word that the node (or its worker) is gone
                    elif not isinstance(e, ray.exceptions.RayError):
                        gone = False  # not Ray's: a task that could not even be submitted
                    elif isinstance(e, ray.exceptions.RayTaskError) and not isinstance(
                            e, ray.exceptions.WorkerCrashedError):
                        gone = False  # the task's own exception: its node is fine, the quant is not
                    elif nid is None:
                        gone = True  # lost before it started (its node died, or Ray dropped the lease)
                    else:
                        gone = nid not in {n["NodeID"] for n in alive_nodes(ray)}
                        if not gone:
                            time.sleep(2)  # Ray's view of a dead raylet lags by a heartbeat or two
                            gone = nid not in {n["NodeID"] for n in alive_nodes(ray)}
                    where = f"node {nid[:8]} ({node.get('host')})" if nid else "its node"
                    if self.stop.is_set():
                        return
                    if gone:
                        if nid:
                            dead.add(nid)
                        others = [n for n in nodes_of(ray, target) if n not in dead]
                        left = len([c for c in self.cells(quant) if (target.group, quant, *c) not in self.done
                                    and c not in got])
                        if others and attempt < self.cfg.cluster.retries:
                            attempt += 1
                            self.events.put(("say", f"{head} {where} died with {left} cells unmeasured: given to "
                                                    f"another node of {target.group} (retry {attempt})"))
                            continue
                        error = (f"{where} died mid-measurement with {left} cells unmeasured; "
                                 + ("no other alive node of " + target.group if not others else
                                    f"retries exhausted ({self.cfg.cluster.retries})"))
                    else:
                        error = f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if self.stop.is_set():  # interrupted: what came is written, the rest is for --resume
                    return
                if error:
                    self._error(target, quant, error, node)
                else:
                    self.events.put(("say", f"{head} done on {node.get('host')} ({len(got)} cells)"))
                return
        except Exception as e:  # noqa: BLE001 - whatever breaks the driver's side of a quant ends that quant only
            self._error(target, quant, f"the driver failed: {type(e).__name__}: {e}", {})
        finally:
            self.gens.pop((target.group, quant), None)
            self.events.put(("end",))

    def _stream(self, gen, target: Target, quant: str, head: str, node: dict, got: set) -> str | None:
        """Read one task's items until it ends; raises where the task or its node fails (NodeLost where its node
        left the cluster while Ray still waits on it). Returns the task's own error (None when it measured every
        cell it was given). A queued task waits as long as an alive node of its kind exists; a started one that
        sends nothing for the run's time limit (plus building the model on the node) is cut."""
        ray = self.ray
        limit = self.cfg.bench.timeout_s + 120
        last = time.monotonic()
        while True:
            ready, _ = ray.wait([gen], timeout=POLL_S)
            if self.stop.is_set():
                return None
            if not ready:
                alive = set(nodes_of(ray, target))
                if node.get("node_id") and node["node_id"] not in {n["NodeID"] for n in alive_nodes(ray)}:
                    ray.cancel(gen, force=True)
                    raise NodeLost(node["node_id"])
                if not node and not alive:
                    ray.cancel(gen, force=True)
                    return f"no alive node of {target.group} left to measure it"
                if node and time.monotonic() - last > limit:
                    ray.cancel(gen, force=True)
                    return f"no word from the task for {limit:,.0f} s: cut at the time limit"
                continue
            try:
                ref = next(gen)
            except StopIteration:
                return "the task ended without saying it was done"
            item = ray.get(ref)
            last = time.monotonic()
            if item[0] == "done":
                return item[1]
            self._take(item, target, head, node, got)

    def _collect(self, ref, target: Target, quant: str, head: str, node: dict, got: set, dead: set) -> str | None:
        """Ray Client's way: wait for the whole task (while an alive node of its kind exists), then take its
        items. A node that dies takes the task's unsent records with it."""
        ray = self.ray
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            if self.stop.is_set():
                return None
            if ready:
                break
            if not [n for n in nodes_of(ray, target) if n not in dead]:
                ray.cancel(ref, force=True)
                return f"no alive node of {target.group} left to measure it"
        for item in ray.get(ref):
            if item[0] == "done":
                return item[1]
            self._take(item, target, head, node, got)
        return "the task ended without saying it was done"

    def _take(self, item: tuple, target: Target, head: str, node: dict, got: set) -> None:
        """One item a task sent: its node (and the node's environment), or a record, marked with group and node."""
        if item[0] == "node":
            info, env = item[1], item[2]
            node.update(info)
            self.events.put(("env", f"env-{schema.group_slug(target.group)}-{info['node_id'][:8]}.json", env))
            self.events.put(("say", f"{head} measuring on node {info['node_id'][:8]} ({info['host']})"))
        elif item[0] == "record":
            rec = schema.from_dict(item[1])
            rec = dataclasses.replace(rec, extra={**rec.extra, "cluster": {
                "group": target.group, "node_id": node.get("node_id"), "host": node.get("host")}})
            if rec.status == "ok" and rec.test != "mem":
                got.add((rec.test, rec.n_depth, rec.rep))
            self.events.put(("record", rec))

    def _error(self, target: Target, quant: str, error: str, node: dict) -> None:
        self.errors[f"{target.group}/{quant}"] = error
        rec = schema.make(run_id=self.run_dir.name, utc=runner_mod._utc(), status="error", error=error,
                          quant=quant, weights=self.cfg.model.source, weights_ref=None,
                          extra={"cluster": {"group": target.group, "node_id": node.get("node_id"),
                                             "host": node.get("host")}})
        self.events.put(("record", rec))
        self.events.put(("say", f"[{target.group}] {quant} ERROR: {error}"))


def run(cfg: Config, address: str, out: Path | None = None, resume: Path | None = None,
        echo: Callable[[str], None] | None = None) -> tuple[Path, dict[str, str]]:
    """The sweep over the cluster at `address` ("auto", "ray://host:port" or "host:port"). Returns (results
    folder, {group/quant: error})."""
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    ray = import_ray()
    cfg = runner_mod.label_globbed(cfg)
    for attempt in range(3):
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            break
        except (ConnectionError, RuntimeError, ValueError) as e:
            # a Ray Client server just started can refuse its first session ("Initialization failure")
            if attempt < 2 and address.startswith("ray://") and "Initialization failure" in str(e):
                time.sleep(3)
                continue
            raise ConfigError(f"--cluster {address}: cannot connect to a Ray cluster there: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        targets = plan_targets(ray, cfg.cluster.devices)
        run_dir, previous = runner_mod.prepare(cfg, out, resume)
        done = {k for k in (done_key(r) for r in previous) if k is not None}
        (run_dir / "config.resolved.yaml").write_text(config_mod.dump_yaml(cfg))
        from harness.measure import env as env_mod

        env_path = run_dir / "env.json"
        driver_env = {**env_mod.collect(), "cluster": {
            "address": address, "targets": [dataclasses.asdict(t) for t in targets],
            "nodes": [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"],
                       "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
                      for n in alive_nodes(ray)]}}
        if env_path.exists():
            old = json.loads(env_path.read_text())
            old.setdefault("resumed", []).append(driver_env)
            driver_env = old
        env_path.write_text(json.dumps(driver_env, indent=2))
        echo(f"results folder: {run_dir}; cluster {address}: {len(targets)} device group(s) "
             f"({', '.join(t.group for t in targets)}) x {len(cfg.quants)} quants"
             + (f" (resuming: {len(done)} cells already measured)" if resume else ""))
        if cfg.probes.enabled:
            echo("kernel probes are not run on a cluster (the calibration goes on without them)")
        driver = Driver(cfg, ray, run_dir, targets, done, echo)
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(schema.RecordWriter(run_dir / "records.jsonl"))
            mem_writer = (stack.enter_context(schema.RecordWriter(run_dir / "contexts.jsonl"))
                          if driver.bench.get("contexts") else None)
            try:
                driver.run(writer, mem_writer)
            except KeyboardInterrupt:
                driver.cancel()
                raise
        return run_dir, driver.errors
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
