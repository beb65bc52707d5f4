"""Datasets: importers for source layouts, the import pipeline, splits, image checks."""
