"""`python -m flows ...` against a real Prefect server: stages become flow runs with their task runs and
the domain package's logs; a failing stage leaves a failed flow run with the reason and a non-zero exit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.prefect_server import (  # noqa: F401
    client_env,
    copy_project,
    flow_runs,
    prefect_api,
    run_module,
    write_tiny_params,
)
from tests.support import PROJECT_ROOT

pytestmark = pytest.mark.slow
STAGE_TIMEOUT_S = 600


def _task_runs(api_url: str, flow_run_id: str) -> list[dict]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    response = httpx.post(f"{api_url}/task_runs/filter", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def _logs(api_url: str, flow_run_id: str) -> list[dict]:
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    response = httpx.post(f"{api_url}/logs/filter", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def test_stages_run_as_tagged_flow_runs_with_progress_logs(prefect_api: str, tmp_path: Path) -> None:
    params = write_tiny_params(tmp_path / "project")
    env = client_env(prefect_api, tmp_path / "home", KUZUSHIJI_PARAMS=str(params),
                     KUZUSHIJI_PIPELINE_FLOW_RUN="parent-123")
    for stage in ("download", "prepare"):
        result = run_module(["flows", stage], env, PROJECT_ROOT, STAGE_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    runs = flow_runs(prefect_api, tags={"all_": ["pipeline-run:parent-123"]})
    assert sorted(run["name"] for run in runs) == ["download", "prepare"]
    assert {run["state_type"] for run in runs} == {"COMPLETED"}
    for run in runs:
        assert [task["name"].rsplit("-", 1)[0] for task in _task_runs(prefect_api, run["id"])] == [run["name"]]
    (prepare_run,) = [run for run in runs if run["name"] == "prepare"]
    # prefect.toml attaches the `pipeline` loggers, so the domain code's progress is in the run log.
    assert any(log["name"].startswith("pipeline.") for log in _logs(prefect_api, prepare_run["id"]))
    assert (tmp_path / "project" / "data" / "prepared" / "train.npz").is_file()
    assert (tmp_path / "project" / "reports" / "data" / "summary.json").is_file()


def test_a_stage_without_prefect_api_url_reports_to_the_projects_one_server(prefect_api: str, tmp_path: Path) -> None:
    # A stage started by hand or by `dvc repro`, with no server configured: it uses the project's one local
    # server as `make run` does (here the session's, on its port), never a temporary server of its own.
    params = write_tiny_params(tmp_path / "project")
    port = prefect_api.rsplit(":", 1)[1].split("/")[0]
    env = client_env("", tmp_path / "home", KUZUSHIJI_PARAMS=str(params), KUZUSHIJI_PREFECT_PORT=port)
    env.pop("PREFECT_API_URL")
    before = {run["id"] for run in flow_runs(prefect_api, "download")}
    result = run_module(["flows", "download"], env, PROJECT_ROOT, STAGE_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Starting temporary server" not in output
    assert "Prefect: using the server already running" in output
    (run,) = [run for run in flow_runs(prefect_api, "download") if run["id"] not in before]
    assert run["state_type"] == "COMPLETED"
    assert (tmp_path / "project" / "data" / "raw" / "manifest.json").is_file()


def _flow_name(api_url: str, flow_id: str) -> str:
    return httpx.get(f"{api_url}/flows/{flow_id}", timeout=30).json()["name"]


def test_a_pipeline_run_is_one_parent_flow_run_with_its_stages_beneath_and_a_summary(
    prefect_api: str, tmp_path: Path
) -> None:
    # `make run`'s flow (python -m flows flow pipeline) on a copy whose dvc.yaml keeps its first three stages:
    # DVC drives them, each is a flow run named after its stage, beneath the one pipeline flow run.
    project = copy_project(tmp_path / "project")
    dvc_yaml = project / "dvc.yaml"
    pipeline = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    pipeline["stages"] = {name: pipeline["stages"][name] for name in ("download", "collect", "prepare")}
    pipeline.pop("plots", None)
    dvc_yaml.write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    subprocess.run(["git", "-C", str(project), "commit", "-qam", "three stages"], check=True)
    env = client_env(prefect_api, tmp_path / "home")
    env.pop("KUZUSHIJI_PARAMS", None)
    before = {run["id"] for run in flow_runs(prefect_api, "pipeline")}

    result = run_module(["flows", "flow", "pipeline", "--dataset", "synthetic"], env, project, STAGE_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "profile quick (DATASET=synthetic" in output  # chosen as `make run` chooses, none given
    assert "Run summary" in result.stdout and "dataset                 synthetic" in result.stdout
    assert output.count("'No file hash info found'") == 1  # the first run's DVC warnings, said to be expected

    (parent,) = [run for run in flow_runs(prefect_api, "pipeline") if run["id"] not in before]
    assert parent["state_type"] == "COMPLETED" and parent["name"] == "synthetic · quick"
    children = flow_runs(prefect_api, parent_flow_run_id={"any_": [parent["id"]]})
    assert sorted((run["name"], _flow_name(prefect_api, run["flow_id"])) for run in children) == [
        ("collect", "collect"), ("download", "download"), ("prepare", "prepare")]
    assert {run["state_type"] for run in children} == {"COMPLETED"}
    assert all(f"pipeline-run:{parent['id']}" in run["tags"] for run in children)
    response = httpx.post(f"{prefect_api}/artifacts/filter",
                          json={"artifacts": {"flow_run_id": {"any_": [parent["id"]]}}}, timeout=30)
    (summary,) = [artifact for artifact in response.json() if artifact["key"] == "run-summary"]
    assert summary["type"] == "markdown" and "Run summary" in summary["data"]


def test_the_removed_grouped_flows_point_to_dvc(tmp_path: Path) -> None:
    result = run_module(["flows", "flow", "train"], client_env("", tmp_path / "home"), PROJECT_ROOT, 120)
    assert result.returncode == 2
    assert "dvc repro" in result.stderr and "python -m flows <stage>" in result.stderr


def test_failing_stage_leaves_a_failed_flow_run_with_the_reason(prefect_api: str, tmp_path: Path) -> None:
    params = write_tiny_params(tmp_path / "project")  # nothing downloaded: prepare cannot run
    env = client_env(prefect_api, tmp_path / "home", KUZUSHIJI_PARAMS=str(params),
                     KUZUSHIJI_PIPELINE_FLOW_RUN="parent-fail")
    result = run_module(["flows", "prepare"], env, PROJECT_ROOT, STAGE_TIMEOUT_S)
    assert result.returncode != 0  # DVC stops the pipeline here
    assert "DataError" in result.stderr
    (run,) = flow_runs(prefect_api, tags={"all_": ["pipeline-run:parent-fail"]})
    assert run["state_type"] == "FAILED"
    assert "DataError" in run["state"]["message"] and "download" in run["state"]["message"]
    assert not (tmp_path / "project" / "data" / "prepared").exists()


def test_a_data_error_in_download_is_not_retried_by_prefect(prefect_api: str, tmp_path: Path) -> None:
    # A missing local folder cannot heal: the task fails on its first attempt instead of backing off.
    params = write_tiny_params(
        tmp_path / "project", {"data.dataset": "local", "data.local_dir": str(tmp_path / "missing")}
    )
    env = client_env(prefect_api, tmp_path / "home", KUZUSHIJI_PARAMS=str(params),
                     KUZUSHIJI_PIPELINE_FLOW_RUN="parent-no-retry")
    result = run_module(["flows", "download"], env, PROJECT_ROOT, STAGE_TIMEOUT_S)
    assert result.returncode != 0
    assert "DataError" in result.stderr and "missing" in result.stderr
    (run,) = flow_runs(prefect_api, tags={"all_": ["pipeline-run:parent-no-retry"]})
    (task_run,) = _task_runs(prefect_api, run["id"])
    assert task_run["state_type"] == "FAILED"
    assert task_run["run_count"] == 1
