"""What a Ray cluster has free, what holds the rest, what waits, and whether a job's request fits.

One home for the resource logic behind ``flawline train submit`` / ``runs resume`` / the scoring
jobs (checked before submission), ``runs show`` / ``--wait`` ("waiting for …") and ``flawline
status``. Everything is read from the dashboard (no ``ray.init`` in the CLI process):

- each alive node's totals: the state API's ``list_nodes``;
- what is free per node and the pending demand: the dashboard's ``/api/cluster_status``, the
  autoscaler's load report (``usageByNode``, ``resourceDemand``, ``pgDemand``). The dashboard
  camel-cases dict keys there (``second_node`` → ``secondNode``), so resource names are mapped
  back through the node's totals. Autoscaler v2 writes no such report: free is then unknown
  (None) and only the "can it ever fit" half of a check applies;
- who holds and who waits (``read_cluster(..., holders=True)``): the state API's actors,
  placement groups and tasks, labelled by their Ray job's submission id (Serve's actors as
  "Serve replicas").

``check`` is pure: a request (one bundle per worker × workers, the elastic minimum, the driver's
own bundle) against the nodes' totals (never fits → refuse) and free amounts (not now → wait).
Ray is imported only inside the readers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

EPS = 1e-6
SERVE_REPLICAS = "Serve replicas"
SERVE_OTHER = "Serve"
OTHER = "other"
JOB_PREFIX = "job "
_SUPERVISOR = "_ray_internal_job_actor_"  # the Job Submission API's supervisor actor: <prefix><submission id>
# Resources every node has that nobody asks for by hand; left out of "the cluster offers …".
_IMPLICIT = ("memory", "object_store_memory")


def _shown(name: str) -> bool:
    return name not in _IMPLICIT and not name.startswith(("node:", "accelerator_type:"))


def fmt(amount: float) -> str:
    return f"{amount:.4g}"


def fmt_amount(resource: str, amount: float) -> str:
    """``1.5 CPU``, ``1 GPU``; a custom resource as ``gpu_node=1`` (as --worker-resource takes it)."""
    return f"{fmt(amount)} {resource}" if resource in ("CPU", "GPU") else f"{resource}={fmt(amount)}"


def fmt_bundle(bundle: dict[str, float]) -> str:
    """``{"CPU": 1.5, "gpu_node": 1}`` → ``1.5 CPU + gpu_node=1``."""
    return " + ".join(fmt_amount(k, v) for k, v in bundle.items() if v > 0) or "nothing"


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    ip: str
    head: bool
    total: dict[str, float]
    free: dict[str, float] | None = None  # None: the autoscaler reported no usage for this node


@dataclass
class Pending:
    """One request that waits for resources: a placement group (a Ray Train run's workers), an
    actor (a scoring job's model actors) or a task."""

    holder: str  # "job <submission id>", "Serve replicas", "Ray job <hex id>"
    kind: str  # "placement group" | "actor" | "task"
    bundles: list[dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return {"holder": self.holder, "kind": self.kind, "bundles": self.bundles,
                "cpus": sum(b.get("CPU", 0.0) for b in self.bundles),
                "gpus": sum(b.get("GPU", 0.0) for b in self.bundles)}

    def describe(self) -> str:
        shapes: dict[str, int] = defaultdict(int)
        for b in self.bundles:
            shapes[fmt_bundle(b)] += 1
        return ", ".join(f"{n} × {s}" if n > 1 else s for s, n in shapes.items())


@dataclass
class ClusterResources:
    nodes: list[NodeResources]  # alive nodes
    # The autoscaler's pending demand, cluster-wide: {"bundle", "count", "kind"}.
    demand: list[dict[str, Any]] = field(default_factory=list)
    # With holders=True: who holds what (label → resources) and who waits for what.
    held: dict[str, dict[str, float]] | None = None
    pending: list[Pending] | None = None
    dead: list[NodeResources] = field(default_factory=list)  # nodes the cluster lost (shown, never counted)

    def total(self, resource: str) -> float:
        return sum(n.total.get(resource, 0.0) for n in self.nodes)

    def free(self, resource: str) -> float | None:
        """Free amount of ``resource`` on all nodes; None when some node's usage is unknown."""
        if any(n.free is None for n in self.nodes):
            return None
        return sum(n.free.get(resource, 0.0) for n in self.nodes)  # type: ignore[union-attr]

    @property
    def free_known(self) -> bool:
        return bool(self.nodes) and all(n.free is not None for n in self.nodes)

    def offered(self) -> list[str]:
        """Resource names any node offers (CPU, GPU and custom ones)."""
        return sorted({k for n in self.nodes for k, v in n.total.items() if v > 0 and _shown(k)})

    def pending_of(self, holder: str) -> list[Pending]:
        return [p for p in self.pending or [] if p.holder == holder]

    def summary(self) -> dict[str, Any]:
        """Free and total CPUs/GPUs, who holds them, and the pending demand per job (JSON-ready)."""
        def amount(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        out: dict[str, Any] = {"cpus": amount(self.total("CPU")), "cpus_free": amount(self.free("CPU")),
                               "gpus": amount(self.total("GPU")), "gpus_free": amount(self.free("GPU")),
                               "demand": self.demand}
        if self.held is not None:
            out["held_by"] = {k: {r: round(v, 4) for r, v in res.items() if _shown(r)} for k, res in self.held.items()}
        if self.pending is not None:
            out["pending"] = [p.as_dict() for p in self.pending]
        return out


@dataclass(frozen=True)
class Request:
    """What a job asks for: ``count`` copies of ``bundle`` (one per worker or model actor), of
    which ``min_count`` must fit for it to start (an elastic run; a scoring job's actor pool),
    plus its driver's ``driver`` bundle."""

    bundle: dict[str, float]
    count: int = 1
    min_count: int | None = None
    driver: dict[str, float] = field(default_factory=dict)
    unit: str = "worker"  # what one bundle is, for messages

    @property
    def start_count(self) -> int:
        return self.count if self.min_count is None else min(self.min_count, self.count)


@dataclass(frozen=True)
class Verdict:
    ever: bool  # False: no set of the cluster's nodes can ever hold it (refuse)
    now: bool | None  # None: what is free is unknown
    message: str | None = None  # one line: why never, or what it waits for

    @property
    def waits(self) -> bool:
        return self.ever and self.now is False


def _holds(capacity: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` fit in ``capacity``."""
    fits = math.inf
    for k, v in bundle.items():
        if v > 0:
            fits = min(fits, math.floor(capacity.get(k, 0.0) / v + EPS))
    return 0 if fits < 0 else (10**9 if fits == math.inf else int(fits))


def _minus(a: dict[str, float], b: dict[str, float]) -> dict[str, float] | None:
    out = dict(a)
    for k, v in b.items():
        if v > 0:
            out[k] = out.get(k, 0.0) - v
            if out[k] < -EPS:
                return None
    return out


def fits(capacities: list[dict[str, float]], request: Request, count: int) -> bool:
    """Whether ``count`` bundles and the driver fit on nodes with these capacities (bundles may
    share a node: Ray Train's SPREAD is a preference)."""
    if not any(v > 0 for v in request.driver.values()):
        return sum(_holds(c, request.bundle) for c in capacities) >= count
    for i, cap in enumerate(capacities):  # the driver on node i, the bundles wherever they fit
        rest = _minus(cap, request.driver)
        if rest is not None and sum(_holds(rest if j == i else c, request.bundle)
                                    for j, c in enumerate(capacities)) >= count:
            return True
    return False


def _never(cluster: ClusterResources, request: Request) -> str | None:
    """Why no set of the cluster's nodes can ever hold the request; None if they can."""
    totals = [n.total for n in cluster.nodes]
    if not totals:
        return "the cluster has no alive node"
    each = f"each {request.unit} asks for"
    for what, bundle in ((each, request.bundle), ("the job's driver asks for", request.driver)):
        for k, v in bundle.items():
            if v <= 0:
                continue
            largest = max(t.get(k, 0.0) for t in totals)
            if largest <= 0:
                return (f"{what} {fmt_amount(k, v)}, but no node offers {k} (the cluster's {len(totals)} node(s) "
                        f"offer {', '.join(cluster.offered()) or 'nothing'})")
            if largest + EPS < v:
                return (f"{what} {fmt_amount(k, v)}, but the largest node has {fmt_amount(k, largest)} "
                        f"({fmt_amount(k, cluster.total(k))} on {len(totals)} node(s))")
        if bundle and not any(_holds(t, bundle) for t in totals):
            return (f"{what} {fmt_bundle(bundle)} on one node, and no node has all of it (nodes: "
                    + "; ".join(fmt_bundle({k: v for k, v in t.items() if k in bundle}) for t in totals) + ")")
    n = request.start_count
    if not fits(totals, request, n):
        most = max((k for k in range(n) if fits(totals, request, k)), default=0)
        return (f"{n} {request.unit}s × {fmt_bundle(request.bundle)} do not fit on the cluster's "
                f"{len(totals)} node(s) even when idle (at most {most} at once: "
                + "; ".join(fmt_bundle({k: v for k, v in t.items() if k in request.bundle}) for t in totals) + ")")
    return None


def held_by(cluster: ClusterResources, resource: str) -> str:
    """``Serve replicas 1.5 CPU, job flawline-run-3-ab12cd 0.5 CPU`` (largest first); '' unknown."""
    if not cluster.held:
        return ""
    parts = sorted(((v.get(resource, 0.0), k) for k, v in cluster.held.items() if v.get(resource, 0.0) > EPS),
                   reverse=True)
    return ", ".join(f"{k} {fmt(v)} {resource}" for v, k in parts)


def waiting_line(cluster: ClusterResources, request: Request, count: int | None = None) -> str:
    """``waiting for 1 CPU (free: 0.5 of 2 CPU; held by: Serve replicas 1.5 CPU)``: for each
    resource the request is short of; else (enough free in all, but not together on one node)
    ``waiting for room on the nodes for …`` with what each node has free."""
    n = request.start_count if count is None else count
    parts = []
    asked = {k: n * v + request.driver.get(k, 0.0) for k, v in request.bundle.items() if v > 0}
    for k, v in request.driver.items():
        asked.setdefault(k, v)
    short = [k for k, v in asked.items() if (free := cluster.free(k)) is not None and free + EPS < v]
    if not short and cluster.free_known:  # enough free in all, but not together on one node
        free_nodes = [x.free or {} for x in cluster.nodes]
        room = max((c for c in range(n) if fits(free_nodes, request, c)), default=0)
        keys = [k for k in asked if asked[k] > 0]
        driver = f" and the job's driver {fmt_bundle(request.driver)}" if any(request.driver.values()) else ""
        return (f"waiting for room on the nodes for {n} {request.unit}{'s' if n != 1 else ''} × {fmt_bundle(request.bundle)}{driver} "
                f"(room now for {room} of {n}; free per node: "
                + "; ".join(fmt_bundle({k: f.get(k, 0.0) for k in keys}) for f in free_nodes) + ")")
    for k in short or [k for k in asked if k in ("CPU", "GPU")] or list(asked)[:1]:
        free = cluster.free(k)
        who = held_by(cluster, k)
        notes = [f"{n} {request.unit}s × {fmt_amount(k, request.bundle[k])}"] if n > 1 and k in request.bundle else []
        notes.append(f"free: {'?' if free is None else fmt(free)} of {fmt_amount(k, cluster.total(k))}")
        if who:
            notes.append(f"held by: {who}")
        parts.append(f"{fmt_amount(k, asked[k])} ({'; '.join(notes)})")
    return "waiting for " + " and ".join(parts)


def check(cluster: ClusterResources, request: Request, autoscaling: bool = False) -> Verdict:
    """Whether the cluster can ever hold ``request`` (else a one-line reason: the resource and
    what the cluster has) and whether it can now (else "waiting for …"). ``autoscaling``: the
    cluster adds nodes on demand, so what no node has now is waited for, not refused."""
    never = _never(cluster, request)
    if never and not autoscaling:
        return Verdict(False, False, never)
    if never:
        return Verdict(True, False, f"waiting for a node the autoscaler may add: {never}")
    if not cluster.free_known:
        return Verdict(True, None)
    free = [n.free or {} for n in cluster.nodes]
    if fits(free, request, request.start_count):
        return Verdict(True, True)
    return Verdict(True, False, waiting_line(cluster, request))


# ---- reading (imports Ray) -------------------------------------------------------------------

def _camel(name: str) -> str:
    """The dashboard's key conversion (ray.dashboard.utils.to_camel_case)."""
    head, *rest = name.split("_")
    return head + "".join(x.title() for x in rest)


def _resources(d: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items() if isinstance(v, (int, float)) and v > 0}


def _load_report(client: Any) -> dict[str, Any] | None:
    """The autoscaler's load metrics report, as the dashboard serves it; None when there is none
    (autoscaler v2, or the monitor has not written one yet)."""
    resp = client._do_request("GET", "/api/cluster_status")  # private, but it carries the client's auth
    if resp.status_code != 200:
        return None
    status = (resp.json().get("data") or {}).get("clusterStatus") or {}
    return status.get("loadMetricsReport")


def _demand(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for bundle, count in (report or {}).get("resourceDemand") or []:
        out.append({"kind": "tasks/actors", "bundle": _resources(bundle), "count": int(count)})
    for group, count in (report or {}).get("pgDemand") or []:
        for bundle, n in group.get("bundles") or []:
            out.append({"kind": f"placement group ({group.get('strategy', '?')})", "bundle": _resources(bundle),
                        "count": int(n) * int(count)})
    for bundle, count in (report or {}).get("requestDemand") or []:
        out.append({"kind": "requested", "bundle": _resources(bundle), "count": int(count)})
    return out


def read_cluster(dashboard_url: str, holders: bool = False, timeout: int = 10, client: Any = None) -> ClusterResources:
    """The alive nodes' totals and free amounts and the pending demand, read from the dashboard;
    with ``holders`` also who holds and who waits for what. ``client``: a JobSubmissionClient
    for this dashboard (made here if None). Raises what Ray raises when the dashboard does not
    answer."""
    import logging

    from ray.util.state import list_nodes

    logging.getLogger("ray").setLevel(logging.ERROR)
    if client is None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(dashboard_url)
    listed = list_nodes(address=dashboard_url, timeout=timeout, raise_on_missing_output=False)
    report = _load_report(client)
    by_node = (report or {}).get("usageByNode") or {}
    nodes, dead = [], []
    for n in listed:
        if n.state != "ALIVE":
            dead.append(NodeResources(n.node_id, n.node_ip, bool(n.is_head_node),
                                      {k: float(v) for k, v in (n.resources_total or {}).items()}))
            continue
        total = {k: float(v) for k, v in (n.resources_total or {}).items()}
        usage = by_node.get(n.node_id)
        free = None
        if usage is not None:
            names = {_camel(k): k for k in total}
            free = {k: 0.0 for k in total}
            for key, pair in usage.items():
                name = names.get(key, key)
                if name in free and isinstance(pair, list) and len(pair) == 2:
                    free[name] = max(0.0, float(pair[1]) - float(pair[0]))
        nodes.append(NodeResources(n.node_id, n.node_ip, bool(n.is_head_node), total, free))
    nodes.sort(key=lambda x: (not x.head, x.ip, x.node_id))
    cluster = ClusterResources(nodes, _demand(report), dead=dead)
    if holders:
        _read_holders(cluster, dashboard_url, client, timeout)
    return cluster


def _read_holders(cluster: ClusterResources, dashboard_url: str, client: Any, timeout: int) -> None:
    """Fill ``held`` and ``pending`` from the state API: live actors, created placement groups and
    running tasks hold resources; pending ones wait. An actor or task inside a placement group
    is counted through its group (the group reserved its resources)."""
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    jobs = {j.job_id: j.submission_id for j in client.list_jobs() if j.job_id and j.submission_id}
    opts = {"address": dashboard_url, "detail": True, "timeout": timeout, "limit": 10000,
            "raise_on_missing_output": False}
    actors = list_actors(filters=[("state", "!=", "DEAD")], **opts)
    groups = list_placement_groups(filters=[("state", "!=", "REMOVED")], **opts)
    tasks = [*list_tasks(filters=[("type", "=", "NORMAL_TASK"), ("state", "=", "RUNNING")], **opts),
             *list_tasks(filters=[("type", "=", "NORMAL_TASK"), ("state", "=", "PENDING_NODE_ASSIGNMENT")], **opts)]
    serve_jobs = {a.job_id for a in actors if a.ray_namespace == "serve"}

    def of_job(job_id: str | None) -> str:
        if job_id in serve_jobs:
            return SERVE_REPLICAS
        if job_id in jobs:
            return JOB_PREFIX + jobs[job_id]
        return f"Ray job {job_id}" if job_id else OTHER

    def of_actor(a: Any) -> str:
        if a.ray_namespace == "serve":
            return SERVE_REPLICAS if str(a.class_name).startswith("ServeReplica") else SERVE_OTHER
        if a.name and str(a.name).startswith(_SUPERVISOR):
            return JOB_PREFIX + str(a.name)[len(_SUPERVISOR):]
        return of_job(a.job_id)

    held: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    pending: list[Pending] = []

    def hold(who: str, res: dict[str, float]) -> None:
        for k, v in res.items():
            held[who][k] += v

    for a in actors:
        if a.placement_group_id:
            continue
        res = _resources(a.required_resources)
        if a.state == "ALIVE":
            hold(of_actor(a), res)
        elif a.state == "PENDING_CREATION" and res:
            pending.append(Pending(of_actor(a), "actor", [res]))
    for g in groups:
        bundles = [_resources(b.get("unit_resources")) for b in g.bundles or []]
        if g.state == "CREATED":
            for b in bundles:
                hold(of_job(g.creator_job_id), b)
        elif g.state in ("PENDING", "RESCHEDULING"):
            waiting = [b for b, raw in zip(bundles, g.bundles or []) if not raw.get("node_id")] or bundles
            pending.append(Pending(of_job(g.creator_job_id), "placement group", waiting))
    for t in tasks:
        if t.placement_group_id:
            continue
        res = _resources(t.required_resources)
        if t.state == "RUNNING":
            hold(of_job(t.job_id), res)
        elif res:
            pending.append(Pending(of_job(t.job_id), "task", [res]))
    if cluster.free_known:  # what the state API did not explain (tasks not reported yet, Ray internals)
        for k in ("CPU", "GPU"):
            rest = cluster.total(k) - (cluster.free(k) or 0.0) - sum(v.get(k, 0.0) for v in held.values())
            if rest > 0.01:
                held[OTHER][k] += rest
    cluster.held = {k: dict(v) for k, v in held.items() if any(x > EPS for x in v.values())}
    cluster.pending = pending


_UNIT = {"placement group": "worker"}  # a pending group's bundles: a Ray Train run's workers


def job_waiting(dashboard_url: str, submission_id: str, client: Any = None, timeout: int = 10) -> str | None:
    """``waiting for …`` when the Ray job ``submission_id`` has a placement group (a run's Ray
    Train workers) or actors (a scoring job's model actors) pending for resources; None when
    nothing of it waits (``pending_line``)."""
    return pending_line(read_cluster(dashboard_url, holders=True, timeout=timeout, client=client), submission_id)


def pending_line(cluster: ClusterResources, submission_id: str) -> str | None:
    """``waiting for …`` for what the job ``submission_id`` has pending, or None when nothing of it
    waits for resources. Pending tasks are left out (Ray Data's queued tasks are its normal
    backpressure while a run trains); so are placement constraints (``node:…``, e.g. the job
    supervisor's pin to the head node) and anything pending that fits in what is free now: it is
    being scheduled (an actor's creation), not waiting."""
    mine = [p for p in cluster.pending_of(JOB_PREFIX + submission_id) if p.kind != "task"]
    bundles = [b for p in mine for b in ({k: v for k, v in b.items() if _shown(k)} for b in p.bundles) if b]
    if not bundles:
        return None
    shapes = {tuple(sorted(b.items())) for b in bundles}
    if len(shapes) == 1:
        request = Request(bundles[0], len(bundles), unit=_UNIT.get(mine[0].kind, mine[0].kind))
    else:  # mixed shapes: the sum as one bundle
        total: dict[str, float] = defaultdict(float)
        for b in bundles:
            for k, v in b.items():
                total[k] += v
        request = Request(dict(total), 1, unit="request")
    if cluster.free_known and fits([n.free or {} for n in cluster.nodes], request, request.start_count):
        return None
    return waiting_line(cluster, request)
