"""The Label Studio bridge: projects per dataset and task, tasks with pre-annotations pushed from
the catalog, finished annotations pulled back (polling and webhooks), and a simulated annotator."""

from flawline.labelstudio.client import LabelStudioClient
from flawline.labelstudio.configs import TASKS, label_config
from flawline.labelstudio.convert import HumanLabel, Prediction, prediction_result, read_annotation
from flawline.labelstudio.projects import ensure_project, find_project
from flawline.labelstudio.pull import PullReport, apply_task, fetch_and_apply, pull_annotations
from flawline.labelstudio.push import PushReport, push_tasks, reconcile

__all__ = [
    "TASKS", "HumanLabel", "LabelStudioClient", "Prediction", "PullReport", "PushReport", "apply_task",
    "ensure_project", "fetch_and_apply", "find_project", "label_config", "prediction_result", "pull_annotations",
    "push_tasks", "read_annotation", "reconcile",
]
