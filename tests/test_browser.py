"""What an annotator sees, in a real browser: headless Chromium (Debian's chromium and
chromium-driver, installed by .ci/install) drives the real Label Studio. It logs in, opens a task
flawline pushed with a model's pre-annotation from the labelling queue ("Label All Tasks"), checks
that the pre-annotated verdict and region are there and selected, submits a correction in the UI,
and `flawline label pull` stores it. The queue view is saved as a screenshot for the README."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from flawline.catalog import Annotation, AnnotationSource, Image
from flawline.data.ingest import import_dataset
from flawline.labelstudio import Prediction, ensure_project, pull_annotations, push_tasks

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "images"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are needed (bash .ci/install installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(120)
    yield drv
    drv.quit()


def _wait(drv, script: str, timeout: float = 90.0, what: str = ""):
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = drv.execute_script(f"try {{ return {script}; }} catch (e) {{ return null; }}")
        if value:
            return value
        time.sleep(0.5)
    shot = Path("/tmp") / "flawline-browser-failure.png"
    drv.save_screenshot(str(shot))
    raise AssertionError(f"timed out waiting for {what or script} (screenshot {shot})")


def _login(drv, labelstudio) -> None:
    from selenium.webdriver.common.by import By

    drv.get(f"{labelstudio.url}/user/login/")
    drv.find_element(By.NAME, "email").send_keys(labelstudio.username)
    drv.find_element(By.NAME, "password").send_keys(labelstudio.password)
    drv.find_element(By.CSS_SELECTOR, "form button[type=submit], form input[type=submit]").click()
    _wait(drv, "!location.pathname.startsWith('/user/login')", what="the login")


RESULTS = "window.Htx.annotationStore.selected.serializeAnnotation()"


def test_an_annotator_sees_the_pre_annotation_in_the_queue_and_corrects_it(browser, labelstudio, ls_client, catalog,
                                                                           store, magnetic_tile_slice, tmp_path):
    import_dataset(catalog, store, magnetic_tile_slice, layout="magnetic-tile", dataset="tiles", workers=4)
    with catalog.session() as s:
        image_id, width, height = s.execute(select(Image.id, Image.width, Image.height).where(
            Image.origin.like("%MT_Blowhole%")).order_by(Image.id)).first()
    project = ensure_project(catalog, ls_client, "tiles", "segmentation")
    mask = np.zeros((height, width), bool)
    mask[height // 3:height // 3 + 20, width // 3:width // 3 + 20] = True
    pred = Prediction("tiles-mixed-padim:2", 5.0, True, "blowhole", mask, readable=0.997)
    report = push_tasks(catalog, store, ls_client, project, [image_id], {image_id: pred})
    assert report.model_version == "tiles-mixed-padim:2"

    _login(browser, labelstudio)
    browser.get(f"{labelstudio.url}/projects/{project.ls_project_id}/data?labeling=1")  # "Label All Tasks"
    _wait(browser, "window.Htx && window.Htx.annotationStore.selected", what="the labelling editor")
    results = _wait(browser, f"{RESULTS}.length && {RESULTS}", what="the pre-annotation in the editor")
    kinds = {r["type"]: r["value"] for r in results}
    assert kinds["choices"]["choices"] == ["blowhole"]  # the verdict, selected
    assert kinds["brushlabels"]["brushlabels"] == ["blowhole"]  # the region, named as the config names it
    radios = browser.execute_script(
        "return [...document.querySelectorAll('input[type=radio]')].map(e => [e.checked, "
        "(e.closest('label') || e.parentElement).innerText.trim().split('\\n')[0].replace(/\\[\\d+\\]$/, '')])")
    assert [name for on, name in radios if on] == ["blowhole"], radios  # and shown as selected
    # The README's picture is rewritten only when asked (FLAWLINE_UPDATE_SCREENSHOTS=1): a test run
    # leaves the checkout as it found it.
    shots = SHOTS if os.environ.get("FLAWLINE_UPDATE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shots / "labelling-queue.png"))

    # The annotator corrects the class (it is a crack) and submits from the UI.
    browser.execute_script(
        "[...document.querySelectorAll('input[type=radio]')].find("
        "  x => (x.closest('label') || x.parentElement).innerText.trim().split('\\n')[0].replace(/\\[\\d+\\]$/, '') === 'crack').click();")
    _wait(browser, f"{RESULTS}.find(r => r.type === 'choices').value.choices[0] === 'crack'", what="the new verdict")
    buttons = browser.execute_script("return [...document.querySelectorAll('button')].map(b => b.innerText.trim())")
    assert "Submit" in buttons, buttons
    browser.execute_script("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Submit').click()")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        report = pull_annotations(catalog, store, ls_client, project)
        if report.labelled:
            break
        time.sleep(1)
    assert report.labelled == 1 and not report.errors
    with catalog.session() as s:
        row = s.scalars(select(Annotation).where(Annotation.image_id == image_id,
                                                 Annotation.source == AnnotationSource.human)).one()
        assert (row.label.value, row.defect_class, row.mask_key is not None) == ("defect", "crack", True)
