"""`python -m flows ...` against a real Prefect server: stages become flow runs with their task runs and
the domain package's logs; a failing stage leaves a failed flow run with the reason and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.prefect_server import client_env, flow_runs, prefect_api, run_module, write_tiny_params  # noqa: F401
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


def test_a_stage_without_prefect_api_url_runs_on_a_temporary_server_and_says_how_to_share_one(
    tmp_path: Path,
) -> None:
    # A stage started by hand, outside `make run`, with no server configured: it still runs (on Prefect's
    # temporary server of its own process) and says once how to send every stage to one server.
    params = write_tiny_params(tmp_path / "project")
    env = client_env("", tmp_path / "home", KUZUSHIJI_PARAMS=str(params))
    env.pop("PREFECT_API_URL")
    result = run_module(["flows", "download"], env, PROJECT_ROOT, STAGE_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("Starting temporary server") == 1
    assert output.count("PREFECT_API_URL is not set") == 1 and "make prefect-ui" in output
    assert (tmp_path / "project" / "data" / "raw" / "manifest.json").is_file()


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
