"""Object storage: all blobs in an S3-compatible bucket; a local SeaweedFS server for laptops and CI."""

from flawline.storage.objectstore import ObjectStore, content_key

__all__ = ["ObjectStore", "content_key"]
