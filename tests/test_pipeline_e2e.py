"""`dvc repro` of the whole pipeline in a temporary copy of the repository, on tiny synthetic params:
every stage runs as a Prefect flow run, a model version is registered, metrics are written, and a second
`dvc repro` has nothing to do."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest

from tests.prefect_server import client_env, copy_project, flow_runs, prefect_api  # noqa: F401

pytestmark = pytest.mark.slow
REPRO_TIMEOUT_S = 1800
STAGES = ["download", "prepare", "tune", "train", "evaluate", "register", "package"]
# The tuning study is exercised in test_tune.py; here one short trial is enough.
E2E_CHANGES = {"profiles.quick.tune.n_trials": 1, "profiles.quick.tune.epochs": 1}


def _dvc(args: list[str], project: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=REPRO_TIMEOUT_S)


def test_dvc_repro_runs_every_stage_then_nothing(prefect_api: str, tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", E2E_CHANGES)
    group = f"e2e-{uuid.uuid4().hex[:8]}"  # tags this test's stage runs on the shared server
    env = client_env(prefect_api, tmp_path / "prefect-home", BENTOML_HOME=str(tmp_path / "bentoml"),
                     KUZUSHIJI_PIPELINE_FLOW_RUN=group)
    env.pop("KUZUSHIJI_PARAMS", None)

    first = _dvc(["repro"], project, env)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout

    # Every stage was a completed Prefect flow run.
    runs = flow_runs(prefect_api, "stage", tags={"all_": ["dvc", f"pipeline-run:{group}"]})
    assert sorted(run["name"] for run in runs) == sorted(STAGES)
    assert {run["state_type"] for run in runs} == {"COMPLETED"}

    metrics = json.loads((project / "reports" / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_balanced_accuracy"] <= 1.0
    registry = json.loads((project / "reports" / "registry.json").read_text())
    store = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # not this process's global URIs
    version = client.get_model_version(registry["model_name"], str(registry["version"]))
    train_run = json.loads((project / "models" / "train_run.json").read_text())
    assert version.run_id == train_run["run_id"]
    assert json.loads((project / "reports" / "bento_model.json").read_text())["tag"]
    shown = _dvc(["metrics", "show", "--json"], project, env)
    assert shown.returncode == 0 and "balanced_accuracy" in shown.stdout

    second = _dvc(["repro"], project, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    rerun = flow_runs(prefect_api, "stage", tags={"all_": ["dvc", f"pipeline-run:{group}"]})
    assert len(rerun) == len(STAGES)  # nothing re-ran
