"""The SQL catalog: datasets, images, annotations, runs, model versions, active-learning queues.

Names are loaded on first use (PEP 562): ``flawline.catalog.enums`` alone does not load SQLAlchemy,
so the CLI's help and the importers stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flawline.catalog.db import Catalog, check_schema, current_revision, downgrade, head_revision, upgrade
    from flawline.catalog.enums import (
        AnnotationSource,
        Label,
        LabelTaskStatus,
        ModelStage,
        QueueStatus,
        RunStatus,
        Split,
    )
    from flawline.catalog.models import (
        ActiveLearningRound,
        Annotation,
        Base,
        DataChange,
        Dataset,
        Image,
        LabelProject,
        LabelTask,
        ModelVersion,
        QueueItem,
        TrainingRun,
    )

_ENUMS = {"AnnotationSource", "Label", "LabelTaskStatus", "ModelStage", "QueueStatus", "RunStatus", "Split"}
_DB = ("Catalog", "check_schema", "current_revision", "downgrade", "head_revision", "upgrade")
_MODELS = ("ActiveLearningRound", "Annotation", "Base", "DataChange", "Dataset", "Image", "LabelProject", "LabelTask",
           "ModelVersion", "QueueItem", "TrainingRun")
_HOME = {**dict.fromkeys(_DB, "db"), **dict.fromkeys(_MODELS, "models"), **dict.fromkeys(_ENUMS, "enums")}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'flawline.catalog' has no attribute {name!r}")
    value = getattr(import_module(f"flawline.catalog.{_HOME[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ActiveLearningRound", "Annotation", "AnnotationSource", "Base", "Catalog", "DataChange", "Dataset", "Image",
    "Label", "LabelProject", "LabelTask", "LabelTaskStatus", "ModelStage", "ModelVersion", "QueueItem", "QueueStatus", "RunStatus", "Split",
    "TrainingRun", "check_schema", "current_revision", "downgrade", "head_revision", "upgrade",
]
