"""The retrain deployment: deployed from prefect.yaml (schedule off), run on a real Prefect server and process
worker; with fewer new accepted feedback items than feedback.min_new it finishes saying why, running nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from pipeline.config import load_settings
from pipeline.feedback_store import ACCEPTED, Feedback, FeedbackStore, open_configured, store_url, upload_digest
from pipeline.retraining import retrain_decision
from tests.loop_support import RETRAIN, run_retrain
from tests.prefect_server import client_env, copy_project, flow_runs, prefect_api  # noqa: F401
from tests.support import PROJECT_ROOT


def _fill(store: FeedbackStore, count: int, accept: int) -> None:
    ids = []
    for seed in range(count):
        glyph = np.full((28, 28), seed, dtype=np.uint8)
        ids.append(store.add(Feedback(glyph, upload_digest(glyph.tobytes()), 0, "あ"))[0])
    store.review(ids[:accept], ACCEPTED)


def test_the_deployment_is_declared_with_its_schedule_off():
    deployments = {d["name"]: d for d in yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]}
    retrain = deployments["retrain"]
    assert retrain["entrypoint"] == "flows.retrain:retrain"
    assert [schedule["active"] for schedule in retrain["schedules"]] == [False] and retrain["schedules"][0]["cron"]


def test_the_decision_counts_accepted_items_against_min_new(make_settings):
    settings = make_settings({"feedback.min_new": 3})
    decision = retrain_decision(settings)  # no store, no champion
    assert not decision["retrain"] and decision["new"] == 0 and "no champion yet" in decision["why"]
    store = open_configured(settings.feedback, settings.root)
    assert store is not None
    _fill(store, 5, accept=2)
    store.close()
    decision = retrain_decision(settings)
    assert not decision["retrain"] and decision["new"] == 2 and "too few" in decision["why"]
    assert retrain_decision(settings.with_overrides({"feedback.accept": "all"}))["retrain"]  # 5 not rejected
    assert retrain_decision(settings, min_new=2)["retrain"]


@pytest.mark.slow
def test_a_retrain_run_with_too_little_feedback_finishes_saying_why(prefect_api: str, tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", {"feedback.min_new": 5})
    settings = load_settings(project / "params.yaml")
    store = FeedbackStore(store_url(settings.feedback.store, project))
    _fill(store, 4, accept=3)
    store.close()
    env = client_env(prefect_api, tmp_path / "prefect-home", BENTOML_HOME=str(tmp_path / "bentoml"))
    env.pop("KUZUSHIJI_PARAMS", None)
    run, log = run_retrain(prefect_api, project, env, tmp_path)
    assert run["state_type"] == "COMPLETED", (run["state"], log[-5000:])
    assert "3 accepted feedback items (reviewed) are new" in log and "not retraining, too few" in log
    assert not flow_runs(prefect_api, parent_flow_run_id={"any_": [run["id"]]})  # no pipeline, no stage ran
    assert not (project / "dvc.lock").exists()
    schedules = httpx.get(f"{prefect_api}/deployments/name/{RETRAIN}", timeout=30).json()["schedules"]
    assert [schedule["active"] for schedule in schedules] == [False]  # deployed off; a manual run leaves it off
