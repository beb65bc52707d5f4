"""Every blob goes through here: the ``minio`` SDK against any S3-compatible server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

import urllib3
from minio import Minio
from minio.error import S3Error

from flawline.errors import StorageAuthError, StorageError, StorageUnavailable

if TYPE_CHECKING:
    from flawline.config import Settings

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}


def content_key(prefix: str, digest: str, suffix: str) -> str:
    """Content-addressed key: the same bytes always land at the same key, so re-imports are free."""
    return f"{prefix}/sha256/{digest[:2]}/{digest}{suffix}"


class ObjectStore:
    """A bucket on an S3 server, with errors turned into one-line flawline errors."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        region: str | None = None,
        public_url: str | None = None,
        max_connections: int = 32,
        retries: int = 2,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        http = urllib3.PoolManager(
            maxsize=max_connections,
            timeout=urllib3.Timeout(connect=3.0, read=60.0),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
            http_client=http,
        )
        # Presigned URLs are signed for the host they name: a browser outside the cluster needs
        # them signed for the public address. Signing needs no request when the region is known.
        self.presigner = self.client
        if public_url:
            from urllib.parse import urlparse

            url = urlparse(public_url)
            self.presigner = Minio(url.netloc, access_key=access_key, secret_key=secret_key,
                                   secure=url.scheme == "https", region=region or "us-east-1", http_client=http)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> ObjectStore:
        kwargs.setdefault("max_connections", max(32, settings.upload_workers * 2))
        return cls(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key.get_secret_value(),
            settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
            public_url=settings.s3_public_url,
            **kwargs,
        )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def key_from_uri(self, uri: str) -> str:
        prefix = f"s3://{self.bucket}/"
        if not uri.startswith(prefix):
            raise StorageError(f"{uri!r} is not an object in bucket {self.bucket!r}")
        return uri[len(prefix):]

    # -- calls -------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        with self._errors("create bucket"):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

    def bucket_exists(self) -> bool:
        """Whether the bucket exists; raises unless the server answers and accepts the keys."""
        with self._errors("check bucket"):
            return self.client.bucket_exists(self.bucket)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with self._errors("upload", key):
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("download", key):
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def exists(self, key: str) -> bool:
        try:
            with self._errors("stat", key):
                self.client.stat_object(self.bucket, key)
            return True
        except _Missing:
            return False

    def size(self, key: str) -> int:
        with self._errors("stat", key):
            return int(self.client.stat_object(self.bucket, key).size)

    def remove(self, key: str) -> None:
        with self._errors("remove", key):
            self.client.remove_object(self.bucket, key)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        with self._errors("list", prefix):
            for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                yield obj.object_name

    def presigned_get(self, key: str, expires: timedelta = timedelta(hours=12)) -> str:
        with self._errors("presign", key):
            return self.presigner.presigned_get_object(self.bucket, key, expires=expires)

    # -- error translation ---------------------------------------------------------------------
    def _errors(self, action: str, key: str | None = None) -> _ErrorScope:
        return _ErrorScope(self, action, key)


class _Missing(StorageError):
    pass


class _ErrorScope:
    def __init__(self, store: ObjectStore, action: str, key: str | None) -> None:
        self.store, self.action, self.key = store, action, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        if exc is None or isinstance(exc, StorageError):
            return False
        where = f"s3://{self.store.bucket}/{self.key}" if self.key else f"bucket {self.store.bucket!r}"
        server = f"S3 server {self.store.endpoint}"
        if isinstance(exc, S3Error):
            if exc.code in _AUTH_CODES:
                raise StorageAuthError(f"{server} refused the access keys ({exc.code}) for {self.action} "
                                       f"of {where}; check FLAWLINE_S3_ACCESS_KEY / FLAWLINE_S3_SECRET_KEY"
                                       ) from None
            if exc.code in _MISSING_CODES:
                raise _Missing(f"{where} does not exist ({exc.code})") from None
            raise StorageError(f"{server} failed {self.action} of {where}: {exc.code} {exc.message}") from None
        if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, OSError)):
            raise StorageUnavailable(
                f"{server} is not reachable ({type(exc).__name__}) during {self.action} of {where}; "
                "is it running? (`flawline up` starts the local one)"
            ) from None
        if isinstance(exc, ValueError) and "access denied" in str(exc).lower():
            raise StorageAuthError(f"{server} refused the access keys for {self.action} of {where}") from None
        return False
