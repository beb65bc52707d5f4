"""Evaluation: metrics, thresholds and reports."""
