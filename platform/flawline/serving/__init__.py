"""Serving registered models: plain-Python request checks, model resolution and loading, batch
prediction and responses (``inputs``, ``models``, ``pipeline``, ``response``, ``local``), and the
Ray Serve application built from them (``deployments``; ``serve/app.py`` exposes it).

Importing this package loads neither Ray nor FastAPI; ``flawline.serving.deployments`` does.
"""
