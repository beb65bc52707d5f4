"""flawline: batch labeling-and-training platform for industrial visual defect detection."""

__version__ = "0.1.0"
