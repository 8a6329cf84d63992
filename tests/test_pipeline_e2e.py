"""`make run DATASET=synthetic` in a temporary copy of the repository, on tiny synthetic params, exactly as a
newcomer runs it: one Prefect server is started for the run (no temporary server per stage) and every stage
is a flow run on it, a model version is registered, the run ends with a short summary, and a second
`make run` reuses the server and has nothing to do. Then `dvc exp run -S train.epochs=2` trains exactly 2
epochs and params.yaml and the MLflow run say so, and a changed module re-runs exactly the stages that import
it. The server is stopped with `make prefect-stop`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from tests.prefect_server import VENV_BIN, client_env, copy_project, flow_runs
from tests.support import free_port

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 1800
STAGES = ["download", "collect", "prepare", "tune", "train", "evaluate", "register", "package"]
ALWAYS_RUN = "collect"  # asks the feedback store, which DVC cannot hash; an unchanged export stops there
# The tuning study is exercised in test_tune.py; here one short trial is enough.
# A model of one epoch on tiny data is near chance: no quality floor here (tests/test_registry.py has its own).
E2E_CHANGES = {"tune.n_trials": 1, "tune.epochs": 1, "registry.min_balanced_accuracy": 0.0}
TEMPORARY_SERVER = "Starting temporary server"  # what Prefect logs each time it starts an ephemeral server
VENV = VENV_BIN.parent


def _make(target: str, project: Path, env: dict[str, str], *variables: str) -> subprocess.CompletedProcess:
    # `-o` the venv stamp: the copy uses this checkout's venv (a symlink) as installed, never reinstalls.
    return subprocess.run(["make", "-o", ".venv/.installed-stamp", target, *variables], cwd=project, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def _dvc(args: list[str], project: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)


def test_make_run_uses_one_prefect_server_and_ends_with_a_summary(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", E2E_CHANGES)
    (project / ".venv").symlink_to(VENV, target_is_directory=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = client_env("", tmp_path / "prefect-home", BENTOML_HOME=str(tmp_path / "bentoml"))
    for name in ("PREFECT_API_URL", "KUZUSHIJI_PARAMS", "KUZUSHIJI_PIPELINE_FLOW_RUN"):
        env.pop(name, None)  # as on a newcomer's machine: no Prefect server configured
    variables = ("DATASET=synthetic", f"PREFECT_PORT={port}")
    try:
        first = _make("run", project, env, *variables)
        output = first.stdout + first.stderr
        assert first.returncode == 0, output[-6000:]
        assert "profile quick (DATASET=synthetic" in output
        for stage in STAGES:
            assert f"Running stage '{stage}'" in output
        # One server for the whole run, started once; no stage started a temporary one of its own.
        assert output.count("Prefect: started a server") == 1
        assert output.count(TEMPORARY_SERVER) == 0
        # One parent flow run (the pipeline flow make run starts) with every stage's flow run beneath it,
        # each flow named after its stage, and the run summary as the parent's artifact.
        (parent,) = flow_runs(api, "pipeline")
        assert parent["state_type"] == "COMPLETED" and parent["name"] == "synthetic · quick"
        runs = flow_runs(api, parent_flow_run_id={"any_": [parent["id"]]})
        assert sorted(run["name"] for run in runs) == sorted(STAGES)
        assert {run["state_type"] for run in runs} == {"COMPLETED"}
        assert sorted(httpx.get(f"{api}/flows/{run['flow_id']}").json()["name"] for run in runs) == sorted(STAGES)
        artifacts = httpx.post(f"{api}/artifacts/filter", json={}).json()
        keys = {artifact["key"] for artifact in artifacts}
        assert {"run-summary", "tuning-leaderboard", "train-metrics", "test-metrics", "mlflow-run",
                "registry-decision", "bento-model"} <= keys, keys
        assert output.count("'No file hash info found'") == 1  # DVC's first-run warnings, said to be expected

        metrics = json.loads((project / "reports" / "eval" / "metrics.json").read_text())
        assert 0.0 <= metrics["test_balanced_accuracy"] <= 1.0
        registry = json.loads((project / "reports" / "registry.json").read_text())
        store = f"sqlite:///{project / 'stores' / 'mlflow' / 'mlflow.db'}"
        client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)  # not this process's global URIs
        version = client.get_model_version(registry["model_name"], str(registry["version"]))
        train_run = json.loads((project / "models" / "train_run.json").read_text())
        assert version.run_id == train_run["run_id"]
        assert json.loads((project / "reports" / "bento_model.json").read_text())["tag"]

        # The run ends with the few lines a newcomer needs, not the all-columns metrics table.
        tail = first.stdout[first.stdout.index("Run summary"):]
        assert "dataset                 synthetic" in tail and "profile                 quick" in tail
        assert f"test balanced accuracy  {metrics['test_balanced_accuracy']:.4f}" in tail
        assert f"{registry['model_name']} version {registry['version']} (alias {registry['alias']})" in tail
        assert "make serve" in tail and "make mlflow-ui" in tail
        assert f"make prefect-ui  -> http://127.0.0.1:{port}" in tail
        assert "trust                   ECE " in tail and "not-a-kana AUROC min " in tail  # issue 22: one line
        assert len(tail.splitlines()) <= 13 and max(map(len, tail.splitlines())) < 120

        second = _make("run", project, env, *variables)
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-3000:]
        assert "Prefect: using the server already running" in output
        assert [line for line in output.splitlines() if "Running stage" in line and ALWAYS_RUN not in line] == []
        assert TEMPORARY_SERVER not in output
        assert len(flow_runs(api, tags={"all_": ["dvc"]})) == len(STAGES) + 1  # nothing but collect re-ran

        # A value from the command line wins over the profile, and the record says what ran.
        dvc_env = {**env, "PREFECT_API_URL": api, "PATH": f"{VENV_BIN}:{env['PATH']}"}
        third = _dvc(["exp", "run", "-S", "data.dataset=synthetic", "-S", "profile=quick",
                      "-S", "train.epochs=2"], project, dvc_env)
        assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
        assert yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"] == 2
        trained = json.loads((project / "reports" / "train" / "metrics.json").read_text())
        assert trained["epochs_run"] == 2
        run_id = json.loads((project / "models" / "train_run.json").read_text())["run_id"]
        assert client.get_run(run_id).data.params["train.epochs"] == "2"

        # A code change re-runs exactly the stages that import the changed module.
        with (project / "pipeline" / "stages" / "register.py").open("a", encoding="utf-8") as module:
            module.write("# changed\n")
        status = _dvc(["status", "--json"], project, dvc_env)
        assert status.returncode == 0, status.stderr
        assert set(json.loads(status.stdout)) == {"register", ALWAYS_RUN}
        with (project / "pipeline" / "files.py").open("a", encoding="utf-8") as module:
            module.write("# changed\n")  # every stage writes through it
        status = _dvc(["status", "--json"], project, dvc_env)
        assert set(json.loads(status.stdout)) == set(STAGES)
    finally:
        stopped = _make("prefect-stop", project, env, f"PREFECT_PORT={port}")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=5)

