"""The whole feedback loop on real kana (../shared/data/kmnist-dev): a champion trained by ``dvc repro`` on part of
the train images, served by a real `bentoml serve`; a few hundred corrections sent over HTTP; some accepted by the
review command; the ``retrain`` deployment (a real Prefect server and process worker) exports exactly those,
trains on them, and the registry's rules make the new version champion; ``POST /admin/reload`` swaps it into the
running service under a ``wrk`` load that sees no error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np

from benchmarks.load import multipart_body, require_wrk, service
from benchmarks.swap import TOKEN, swap_under_load
from pipeline.contract import FEEDBACK_ITEMS_PARAM, FEEDBACK_MANIFEST
from pipeline.data import read_npz_array
from pipeline.feedback_store import FeedbackStore, store_url
from tests.loop_support import png, run_retrain, send_corrections, split_train_set
from tests.prefect_server import client_env, copy_project, prefect_api  # noqa: F401
from tests.test_real_data import KMNIST_DEV, pytestmark  # noqa: F401  (slow; skipped or required like it)

CHAMPION_PER_CLASS = 60  # the champion's train images a class (600 in all) ...
FEEDBACK_PER_CLASS = 40  # ... and 400 others come back as corrections
ACCEPTED = 300  # the first 300 ids are accepted by the reviewer, the other 100 rejected
WORKERS = 2
# Enough epochs for 600 images to learn (~84 % on the test set); the same recipe for both runs.
RECIPE = {"train.epochs": 10, "train.patience": 10, "train.batch_size": 64, "train.lr": 0.05,
          "train.ema_decay": 0.999, "train.max_train_per_class": None, "train.max_val_per_class": None,
          "train.device": "cpu", "tune.n_trials": 0, "registry.min_balanced_accuracy": 0.3}


def _registry(project: Path) -> dict[str, Any]:
    return json.loads((project / "reports" / "registry.json").read_text())


def _send_and_review(client: httpx.Client, project: Path, env: dict[str, str], pool: dict[str, np.ndarray]
                     ) -> list[int]:
    """400 corrections over HTTP (one sent twice: stored once), the first 300 accepted, the rest rejected."""
    ids = send_corrections(client, pool["images"], pool["labels"], "1")
    again = client.post("/feedback", files={"image": ("glyph.png", png(pool["images"][0]), "image/png")},
                        data={"label": str(int(pool["labels"][0]))})
    assert again.status_code == 200 and again.json()["duplicate"] and again.json()["id"] == ids[0]
    metrics = client.get("/metrics").text
    stored = re.findall(r'kuzushiji_feedback_outcomes_total\{[^}]*outcome="accepted"[^}]*\} (\S+)', metrics)
    assert sum(map(float, stored)) == len(ids), metrics[-3000:]  # the duplicate is not counted again
    review = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.collect", "review", "--accept", f"{ids[0]}-{ids[ACCEPTED - 1]}",
         "--reject", f"{ids[ACCEPTED]}-{ids[-1]}", "--reviewer", "loop test"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert review.returncode == 0 and f"accepted: {ACCEPTED} items" in review.stdout, review.stdout + review.stderr
    return ids


def _assert_exactly_the_accepted_were_trained_on(project: Path, accepted: list[int]) -> None:
    """collect exported exactly the accepted items, DVC recorded the export, MLflow the count."""
    manifest = json.loads((project / "data" / "feedback" / FEEDBACK_MANIFEST).read_text())
    assert manifest["ids"] == accepted and manifest["n_items"] == len(accepted)
    store = FeedbackStore(store_url("stores/feedback/feedback.db", project))
    stored = {item.id: item.glyph for item in store.list_items()}
    store.close()
    exported = read_npz_array(project / "data" / "feedback" / "feedback-train-imgs.npz")
    assert np.array_equal(exported, np.stack([stored[i] for i in accepted]))
    assert "data/feedback" in (project / "dvc.lock").read_text()
    record = _registry(project)
    tracking = f"sqlite:///{project / 'stores' / 'mlflow' / 'mlflow.db'}"
    runs = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    params = {v: runs.get_run(runs.get_model_version(record["model_name"], v).run_id).data.params for v in "12"}
    assert (params["1"][FEEDBACK_ITEMS_PARAM], params["2"][FEEDBACK_ITEMS_PARAM]) == ("0", str(len(accepted)))


def test_corrections_sent_to_the_service_train_the_model_that_then_serves(prefect_api: str,
                                                                         tmp_path: Path) -> None:
    require_wrk()  # its last step puts wrk's load on the service: say so now, not after ten minutes
    pool = split_train_set(KMNIST_DEV, tmp_path / "data", CHAMPION_PER_CLASS, FEEDBACK_PER_CLASS)
    project = copy_project(tmp_path / "project", {
        **RECIPE, "data.dataset": "local", "data.local_dir": str(tmp_path / "data"), "feedback.min_new": 200,
        "feedback.rate_per_minute": 60_000, "feedback.rate_burst": 1_000})
    env = client_env(prefect_api, tmp_path / "prefect-home", BENTOML_HOME=str(tmp_path / "bentoml"),
                     KUZUSHIJI_PARAMS=str(project / "params.yaml"), KUZUSHIJI_ADMIN_TOKEN=TOKEN,
                     BENTOML_DO_NOT_TRACK="True", BENTOML_CONFIG_OPTIONS=f"services.kuzushiji.workers={WORKERS}")
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=1800, check=False)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    first = _registry(project)
    assert first["decision"] == "champion" and str(first["version"]) == "1", first

    with service(tmp_path, "serve", env, cwd=project) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/version").json()["registry_version"] == "1"
        ids = _send_and_review(client, project, env, pool)

        run, log = run_retrain(prefect_api, project, env, tmp_path)
        assert run["state_type"] == "COMPLETED", (run["state"], log[-5000:])
        assert f"{ACCEPTED} accepted feedback items (reviewed) are new" in log and "retraining" in log
        _assert_exactly_the_accepted_were_trained_on(project, ids[:ACCEPTED])
        # The registry's rule: champion only when better on the frozen test set than the champion was.
        second = _registry(project)
        assert str(second["version"]) == "2" and second["decision"] == "champion", second
        assert second["metrics"]["test_balanced_accuracy"] > first["metrics"]["test_balanced_accuracy"]

        body = tmp_path / "body"
        body.write_bytes(multipart_body("image", [png(pool["images"][-1])]))
        swap = swap_under_load(url, body, 8, 4.0, "2", WORKERS)  # wrk for 4 s, the reload after 1.3 s
        assert swap["reload_status"] == 200 and swap["swapped_to"] == "2", swap
        assert swap["requests"] > 0 and swap["errors"] == 0, swap  # wrk: no socket error, every answer 2xx
        assert client.get("/version").json()["registry_version"] == "2"
