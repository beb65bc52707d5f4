"""The catalog's vocabulary: splits, labels, annotation sources and the states of runs, models,
queues and Label Studio tasks. Plain ``str`` enums without SQLAlchemy, so importers and the CLI
can use them without loading the database layer; ``flawline.catalog.models`` stores them as strings.
"""

from __future__ import annotations

import enum


class Split(str, enum.Enum):
    train = "train"
    val = "val"
    test = "test"


class Label(str, enum.Enum):
    normal = "normal"
    defect = "defect"


class AnnotationSource(str, enum.Enum):
    human = "human"
    pseudo = "pseudo"
    synthetic = "synthetic"
    imported = "imported"
    oracle = "oracle"  # ground truth held back for a simulated annotator: training never sees it


class RunStatus(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class ModelStage(str, enum.Enum):
    candidate = "candidate"
    production = "production"
    archived = "archived"


class QueueStatus(str, enum.Enum):
    queued = "queued"
    pushed = "pushed"
    labelled = "labelled"
    skipped = "skipped"


class LabelTaskStatus(str, enum.Enum):
    pushed = "pushed"  # in Label Studio, waiting for a person
    labelled = "labelled"  # its annotation is in the catalog
    skipped = "skipped"  # skipped or cancelled: the image is back in the unlabelled pool
    orphaned = "orphaned"  # annotated after its image was deleted from the catalog
