"""Local service processes (the S3 server, Label Studio): pid files, liveness, ports, stopping."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path


def spawn_service(command: list[str], log_file: Path, pid_file: Path, cwd: Path,
                  env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a service in its own session (a Ctrl-C in the shell that started it leaves it
    running), output appended to ``log_file``, its pid in ``pid_file``."""
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd, env=env)
    pid_file.write_text(str(proc.pid))
    return proc


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


LOWEST = 20000
_handed_out: set[int] = set()


def free_ports(count: int, twin: int = 0) -> list[int]:
    """``count`` loopback ports that nothing listens on (each with ``port + twin`` free too, for
    servers that derive a second port), below the kernel's ephemeral range and never handed out
    before by this process. The ephemeral range is avoided because any outgoing connection, or
    another process's bind to port 0, may take such a port between this check and the service's
    start (seen: a Ray node's agent and SeaweedFS's gRPC port lost that race). Ports below
    20000 are left to Ray's worker processes (its default worker port range is 10002-19999)."""
    rng = random.Random()
    top = max(LOWEST + 100, _ephemeral_start() - twin)
    chosen: list[int] = []
    for _ in range(5000):
        port = rng.randrange(LOWEST, top)
        wanted = {port, port + twin}
        if wanted & _handed_out or any(abs(port - c) < 2 for c in chosen):
            continue
        if not any(port_in_use("127.0.0.1", p) for p in wanted):
            chosen.append(port)
            _handed_out.update(wanted)
            if len(chosen) == count:
                return chosen
    from flawline.errors import ServiceError

    raise ServiceError(f"no {count} free loopback ports found below {top}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child not yet reaped) counts as dead, but only once all its threads are
    # gone: a multi-threaded process (SeaweedFS, Go) shows its leader as a zombie while the other
    # threads are still exiting, and its sockets stay open until the last one has (seen: `up` right
    # after `down` found the S3 ports still taken).
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().split(")")[-1].split()[0] != "Z":
                return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except FileNotFoundError:  # gone (reaped) meanwhile
        return False
    except OSError:
        return True


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def running_pid(pid_file: Path) -> int | None:
    """The pid the file names, if that process is alive."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def stop_pid_file(pid_file: Path, timeout: float) -> bool:
    """SIGTERM the process (its whole group when it leads one), SIGKILL after ``timeout``; remove
    the pid file. Returns False if nothing was running."""
    pid = running_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    try:
        leader = os.getpgid(pid) == pid
    except OSError:
        leader = False
    kill = (lambda sig: os.killpg(pid, sig)) if leader else (lambda sig: os.kill(pid, sig))
    try:
        kill(signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        reap(pid)
        time.sleep(0.1)
    if pid_alive(pid):
        try:
            kill(signal.SIGKILL)
        except ProcessLookupError:
            pass
        # Gone before returning: a `start` right after must not find its ports still held.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pid_alive(pid):
            reap(pid)
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return True
