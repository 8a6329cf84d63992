"""The deployment path end to end: work pool, `prefect deploy --all` from prefect.yaml, a process worker,
`prefect deployment run` of the pipeline flow (which drives `dvc exp run`) in a temporary copy of the
repository, then the MLflow run, the registered model version and the DVC record are checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.prefect_server import (  # noqa: F401
    CLI_TIMEOUT_S,
    POOL,
    VENV_BIN,
    client_env,
    copy_project,
    flow_runs,
    prefect_api,
    prefect_cli,
    wait_for_flow_run,
)
from tests.support import background_process

pytestmark = pytest.mark.slow
DEPLOYMENT = "pipeline/dvc-pipeline"


def test_deployed_pipeline_runs_on_a_process_worker(prefect_api: str, tmp_path: Path) -> None:
    # No tuning trials here (test_tune.py covers the study): the tune stage writes empty best params.
    # A model of one epoch on tiny data is near chance: no quality floor here (tests/test_registry.py has its own).
    project = copy_project(tmp_path / "project", {"tune.n_trials": 0, "registry.min_balanced_accuracy": 0.0})
    env = client_env(prefect_api, tmp_path / "prefect-home", BENTOML_HOME=str(tmp_path / "bentoml"))
    env.pop("KUZUSHIJI_PARAMS", None)

    prefect_cli(["work-pool", "create", POOL, "--type", "process"], project, env)
    prefect_cli(["--no-prompt", "deploy", "--all"], project, env)
    worker_log = tmp_path / "worker.log"
    with background_process([str(VENV_BIN / "prefect"), "worker", "start", "--pool", POOL], env=env,
                            cwd=tmp_path, log_path=worker_log):
        # No profile given: chosen as `make run` chooses it (quick for the synthetic data).
        out = prefect_cli(["deployment", "run", DEPLOYMENT, "-p", "dataset=synthetic"], project, env)
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        run = wait_for_flow_run(prefect_api, flow_run_id, worker_log)
    assert run["state_type"] == "COMPLETED", (run["state"], worker_log.read_text(errors="replace")[-5000:])
    assert run["name"] == "synthetic · quick"

    # Each DVC stage ran as its own flow run beneath the deployment's run, tagged with it.
    stages = flow_runs(prefect_api, tags={"all_": [f"pipeline-run:{flow_run_id}"]})
    beneath = flow_runs(prefect_api, parent_flow_run_id={"any_": [flow_run_id]})
    assert {r["id"] for r in beneath} == {r["id"] for r in stages}
    assert sorted(r["name"] for r in stages) == sorted(
        ["download", "collect", "prepare", "tune", "train", "evaluate", "register", "package"])
    assert {r["state_type"] for r in stages} == {"COMPLETED"}
    # ... and all reported here: no stage process started a temporary server of its own (the worker log
    # carries the output of the flow run and of DVC's stage processes).
    assert "Starting temporary server" not in worker_log.read_text(errors="replace")

    # The MLflow run and the registered model version exist in the copy's store.
    store = f"sqlite:///{project / 'stores' / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # not this process's global URIs
    train_run = json.loads((project / "models" / "train_run.json").read_text())
    assert client.get_run(train_run["run_id"]).info.status == "FINISHED"
    registry = json.loads((project / "reports" / "registry.json").read_text())
    version = client.get_model_version(registry["model_name"], str(registry["version"]))
    assert version.run_id == train_run["run_id"]

    # DVC is the record: dvc.lock is written and the workspace is up to date.
    assert (project / "dvc.lock").is_file()
    # (collect always asks the feedback store again: DVC cannot hash it; nothing else is out of date.)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert status.returncode == 0 and set(json.loads(status.stdout)) <= {"collect"}, status.stdout + status.stderr
