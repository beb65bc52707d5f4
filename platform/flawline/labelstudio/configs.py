"""Labelling configurations (Label Studio's XML) for each labelling task.

Every config has the ``verdict`` choice (normal or a defect class); the region tools name their
labels after the defect classes. Control names are what ``convert`` reads back."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from flawline.errors import InvalidInput

NORMAL = "normal"
DEFECT = "defect"
IMAGE = "image"
VERDICT = "verdict"
REGION = {"segmentation": ("BrushLabels", "mask"), "polygons": ("PolygonLabels", "polygon"),
          "boxes": ("RectangleLabels", "box")}
TASKS = ("classification", *REGION)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InvalidInput(f"unknown labelling task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def label_config(task: str, classes: list[str]) -> str:
    """The XML for ``task`` with ``classes`` as defect classes (none: a plain 'defect')."""
    check_task(task)
    classes = [c for c in classes if c and c != NORMAL] or [DEFECT]
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in [NORMAL, *classes])
    parts = [f'<Image name="{IMAGE}" value="$image" zoom="true"/>',
             f'<Header value="Verdict"/><Choices name="{VERDICT}" toName="{IMAGE}" choice="single-radio" '
             f'showInline="true" required="true">{choices}</Choices>']
    if task in REGION:
        tag, name = REGION[task]
        labels = "".join(f"<Label value={quoteattr(c)}/>" for c in classes)
        parts.append(f'<{tag} name="{name}" toName="{IMAGE}">{labels}</{tag}>')
    return "<View>" + "".join(parts) + "</View>"
