"""The Ray Serve application for serve/config.yaml (``import_path: serve.app:build_app``).

Thin on purpose: the deployments live in ``flawline.serving.deployments``. ``flawline serve up``
deploys it; ``serve run serve/config.yaml`` from the repository root works too.
"""

from flawline.serving.deployments import build_app

app = build_app({})

__all__ = ["app", "build_app"]
