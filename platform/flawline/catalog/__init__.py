"""The SQL catalog: datasets, images, annotations, runs, model versions, active-learning queues."""

from flawline.catalog.db import Catalog, check_schema, current_revision, downgrade, head_revision, upgrade
from flawline.catalog.models import (
    ActiveLearningRound,
    Annotation,
    AnnotationSource,
    Base,
    DataChange,
    Dataset,
    Image,
    Label,
    LabelProject,
    LabelTask,
    LabelTaskStatus,
    ModelStage,
    ModelVersion,
    QueueItem,
    QueueStatus,
    RunStatus,
    Split,
    TrainingRun,
)

__all__ = [
    "ActiveLearningRound", "Annotation", "AnnotationSource", "Base", "Catalog", "DataChange", "Dataset", "Image",
    "Label", "LabelProject", "LabelTask", "LabelTaskStatus", "ModelStage", "ModelVersion", "QueueItem", "QueueStatus", "RunStatus", "Split",
    "TrainingRun", "check_schema", "current_revision", "downgrade", "head_revision", "upgrade",
]
