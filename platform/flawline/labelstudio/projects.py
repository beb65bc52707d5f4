"""One Label Studio project per dataset and labelling task, remembered in the catalog."""

from __future__ import annotations

from sqlalchemy import select

from flawline.catalog import Catalog, LabelProject
from flawline.catalog.queries import get_dataset, summarize_dataset
from flawline.errors import NotFound
from flawline.labelstudio.client import LabelStudioClient
from flawline.labelstudio.configs import HINTS, check_task, label_config


def project_title(dataset: str, task: str) -> str:
    return f"flawline {dataset} ({task})"


def find_project(catalog: Catalog, client: LabelStudioClient, dataset: str, task: str) -> LabelProject:
    """The catalog's record of the project, or NotFound naming the command that makes it."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        row = s.scalar(select(LabelProject).where(LabelProject.dataset_id == ds.id, LabelProject.task == task,
                                                  LabelProject.ls_url == client.url))
        if row is None:
            raise NotFound(f"no Label Studio {task} project for dataset {dataset!r} at {client.url}; "
                           f"run `flawline label setup --dataset {dataset} --task {task}`")
        s.expunge(row)
        return row


def ensure_project(catalog: Catalog, client: LabelStudioClient, dataset: str, task: str = "segmentation",
                   classes: list[str] | None = None) -> LabelProject:
    """The project for (dataset, task) on this server: created with the task's labelling config and
    the dataset's defect classes the first time, found again afterwards; made anew if it was
    deleted in Label Studio."""
    check_task(task)
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        row = s.scalar(select(LabelProject).where(LabelProject.dataset_id == ds.id, LabelProject.task == task,
                                                  LabelProject.ls_url == client.url))
        if row is not None:
            alive = True
            try:
                client.call("find the project", lambda: client.sdk.projects.get(id=row.ls_project_id))
            except NotFound:
                alive = False
            if alive:
                s.expunge(row)
                return row
            s.delete(row)  # deleted in Label Studio: its ledger goes with it; make it again
            s.flush()
        if classes is None:
            classes = sorted(summarize_dataset(s, ds).by_class)
        # Always a new project: a title match could be another catalog's project on the same server.
        title = project_title(dataset, task)
        created = client.call("create a project", lambda: client.sdk.projects.create(
            title=title, label_config=label_config(task, classes),
            description=f"Images of flawline dataset {dataset}. {HINTS[task]}"))
        ls_id = created.id
        row = LabelProject(dataset_id=ds.id, task=task, ls_url=client.url, ls_project_id=ls_id, title=title,
                           classes=list(classes))
        s.add(row)
        s.flush()
        s.expunge(row)
        return row
