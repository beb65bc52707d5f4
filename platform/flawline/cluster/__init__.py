"""Compute clusters: the local Ray cluster behind `flawline up` and the tests."""
