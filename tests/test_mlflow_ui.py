"""MLflow's own UI as a person uses it to compare runs: two short real trainings (train + evaluate stages)
with different learning rates into a temporary MLflow store, a real `mlflow ui` on loopback, Debian's
headless Chromium driven by Playwright. Set ``KUZUSHIJI_MLFLOW_SCREENSHOT=docs/mlflow-compare.png`` to
refresh the README's screenshot."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from launcher.summary import mlflow_ui_url
from pipeline import tracking
from pipeline.config import load_settings
from pipeline.contract import TRAIN_RUN_FILE, TrainRun
from tests.prefect_server import write_tiny_params
from tests.support import PROJECT_ROOT, background_process, free_port
from tests.test_page import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.slow

SCREENSHOT_ENV = "KUZUSHIJI_MLFLOW_SCREENSHOT"
UI_TIMEOUT_MS = 90_000  # a busy 2-core machine: the first page load compiles nothing but fetches a lot
# Two trainings as two `dvc exp run -S train.lr=...` would make them (DVC names each experiment).
TRAININGS = (("lr-low", 0.004), ("lr-high", 0.03))
HEADLINE = "test_balanced_accuracy"
# The compare view lists metrics in two virtualised grids, names left and values right, a row's cells
# sharing its `top`: the values shown in the row of metric `name`.
METRIC_ROW_JS = """(name) => {
  const link = [...document.querySelectorAll('[role=grid] a')].find(a => a.textContent.trim() === name);
  if (!link) return null;
  let cell = link;
  while (cell && !(cell.style && cell.style.top)) cell = cell.parentElement;
  const grids = [...document.querySelectorAll('[role=grid]')];
  const values = grids[grids.indexOf(cell.closest('[role=grid]')) + 1];
  return [...values.querySelectorAll('div')].filter(d => d.style && d.style.top === cell.style.top)
    .map(d => d.textContent.trim());
}"""


@pytest.fixture(scope="module")
def trainings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Download and prepare tiny synthetic data once, then train + evaluate twice (one epoch each)."""
    from pipeline.stages import download, evaluate, prepare, train

    root = tmp_path_factory.mktemp("mlflow-ui")
    params = write_tiny_params(root, {"tune.n_trials": 0, "train.refit": False})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(tracking.TRACKING_URI_ENV, raising=False)
        patch.delenv("DVC_EXP_NAME", raising=False)
        settings = load_settings(params)
        download.run(settings)
        prepare.run(settings)
        runs = {}
        for experiment, lr in TRAININGS:
            patch.setenv("DVC_EXP_NAME", experiment)
            cfg = settings.with_overrides({"train.lr": lr})
            train.run(cfg)
            scores = evaluate.run(cfg)
            record = TrainRun.read(cfg.path("models") / TRAIN_RUN_FILE)
            runs[experiment] = {"lr": lr, "run_id": record.run_id, "score": scores[HEADLINE],
                                "experiment_id": record.experiment_id}
        uri = tracking.tracking_uri(settings)
    yield {"root": root, "uri": uri, "runs": runs}


@pytest.fixture(scope="module")
def ui(trainings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow ui` on the trainings' store, one worker, on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-ui-server") / "server.log"
    command = [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", trainings["uri"],
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with background_process(command, ready_url=f"http://127.0.0.1:{port}/health", log_path=log,
                            env={"MLFLOW_TRACKING_URI": ""}, cwd=trainings["root"]):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def page(ui: str) -> Iterator[Page]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium or set KUZUSHIJI_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1250}).new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        yield page
        browser.close()


def _run_name(experiment: str) -> str:
    commit = tracking.git_commit(PROJECT_ROOT)
    return " · ".join(["train", "synthetic", "quick", experiment, *([commit[:7]] if commit else [])])


def test_two_trainings_are_compared_in_mlflows_training_view(trainings: dict[str, Any], ui: str,
                                                            page: Page) -> None:
    # The address `make mlflow-ui` and the run summary print: the experiment, in the training view.
    page.goto(mlflow_ui_url(trainings["root"], base=ui))
    names = [_run_name(experiment) for experiment, _ in TRAININGS]
    for name in names:  # both training runs, listed under names that say what they are
        page.get_by_text(name, exact=True).first.wait_for()
    assert "/runs" in page.url  # the runs table, not the GenAI overview (traces, tokens, cost)
    assert page.get_by_role("button", name="Model training").count() == 1
    body = page.inner_text("body")
    assert "Token Usage" not in body and "Detect Issues" not in body

    close_assistant = page.get_by_role("button", name="Close")  # MLflow's Assistant panel, open by default
    if close_assistant.count():
        close_assistant.first.click()
    page.get_by_label("Select all runs").check()
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("Comparing 2 Runs").wait_for()
    for name in names:
        page.get_by_text(name, exact=True).first.wait_for()

    # The test metric, on the training runs themselves (evaluate logs into them), one value per run.
    page.get_by_role("link", name=HEADLINE, exact=True).wait_for()
    shown = page.evaluate(METRIC_ROW_JS, HEADLINE)
    assert shown is not None and len(shown) == len(TRAININGS), shown
    expected = sorted(run["score"] for run in trainings["runs"].values())
    assert sorted(float(value) for value in shown) == pytest.approx(expected, abs=0.005), shown

    # The parameter that differs, once "Show diff only" leaves just that, as a person would look for it.
    page.get_by_text("Show diff only").first.click()
    parameters = page.locator("tr", has_text="train.lr")
    parameters.first.wait_for()
    row = parameters.first.inner_text()
    for _, lr in TRAININGS:
        assert str(lr) in row, row
    assert page.locator("tr", has_text="train.epochs").count() == 0  # equal in both: hidden
    if target := os.environ.get(SCREENSHOT_ENV):
        page.get_by_text("Visualizations", exact=True).click()  # folded: the tables fit the picture
        page.get_by_role("link", name=HEADLINE, exact=True).scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(PROJECT_ROOT / target))
