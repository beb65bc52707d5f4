"""Labelling configurations (Label Studio's XML) for each labelling task.

Every config has the ``verdict`` choice (normal, each defect class, and a generic ``defect`` for a
defect of no listed class or from a model without classes), required, beside the image so it is on
screen whatever the image's shape; the region tools name their labels after the same defect names.
``verdict_values`` and ``region_labels`` are the one source of those names: predictions
(``convert.prediction_result``) only use values they return. Control names are what ``convert``
reads back."""

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


def region_labels(classes: list[str]) -> list[str]:
    """The defect names a project's config offers, in order: its classes, then the generic ``defect``."""
    named = [c for c in dict.fromkeys(classes) if c and c not in (NORMAL, DEFECT)]
    return [*named, DEFECT]


def verdict_values(classes: list[str]) -> list[str]:
    """The verdict choices: ``normal`` and every name of ``region_labels``."""
    return [NORMAL, *region_labels(classes)]


def defect_name(defect_class: str | None, classes: list[str]) -> str:
    """What a prediction may call a defect in a project with ``classes``: its class when the config
    has it, else the generic ``defect``."""
    return defect_class if defect_class in region_labels(classes) else DEFECT


HINTS = {"classification": "Choose the verdict for each image: normal, or the kind of defect.",
         "segmentation": "Choose the verdict; on a defect, paint it with the brush in its class.",
         "polygons": "Choose the verdict; on a defect, outline it with a polygon in its class.",
         "boxes": "Choose the verdict; on a defect, draw a box around it in its class."}


def label_config(task: str, classes: list[str]) -> str:
    """The XML for ``task`` with ``classes`` as defect classes (plus the generic 'defect'): the
    image on the left, the verdict (required) and the region labels on the right, on screen
    without scrolling for any image shape."""
    check_task(task)
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in verdict_values(classes))
    side = [f'<Header value="Verdict"/><Choices name="{VERDICT}" toName="{IMAGE}" choice="single-radio" '
            f'required="true">{choices}</Choices>']
    if task in REGION:
        tag, name = REGION[task]
        labels = "".join(f"<Label value={quoteattr(c)}/>" for c in region_labels(classes))
        side.append(f'<Header value="Regions"/><{tag} name="{name}" toName="{IMAGE}">{labels}</{tag}>')
    return ('<View style="display: flex; align-items: flex-start; gap: 1em">'
            f'<View style="flex: 1 1 auto; min-width: 0"><Image name="{IMAGE}" value="$image" zoom="true" '
            'zoomControl="true" maxWidth="100%"/></View>'
            f'<View style="flex: 0 0 14em; position: sticky; top: 0">{"".join(side)}</View></View>')
