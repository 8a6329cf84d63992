"""Scale-out on real shared services, each set through the tool's usual setting: a real PostgreSQL (started
by tests/postgres.py) behind an MLflow tracking server with proxied artifacts (``MLFLOW_TRACKING_URI=
http://...``) and behind MLflow directly (``MLFLOW_TRACKING_URI=postgresql://...``), Optuna
(``tune.storage``) and a Prefect server (``PREFECT_SERVER_DATABASE_CONNECTION_URL``). Two Prefect workers
run the tuning deployment into one study; the package stage fetches the champion through the server; a
killed worker's trial is failed by the RDB heartbeat; connection errors name the setting to fix."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from pipeline import tracking
from pipeline.config import Settings, load_settings
from pipeline.contract import STATUS_READY, TAG_STATUS
from pipeline.stages import download, evaluate, prepare, train, tune
from pipeline.stages import register as registry
from pipeline.tuning.study import FAIL_REASON_ATTR, FINISHED, OWNER_ATTR, TuneError, open_storage
from tests.postgres import PostgresServer, database_name, running_postgres
from tests.prefect_server import VENV_BIN, client_env, copy_project, flow_runs, write_tiny_params
from tests.support import PROJECT_ROOT, background_process, free_port

POOL = "kuzushiji-process"  # the work pool prefect.yaml names
TUNE_DEPLOYMENT = "tune/shared-study"
SERVER_START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 900.0
CLI_TIMEOUT_S = 300.0
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# A tiny model trained for one epoch is near chance: let it compete (the quality gate has its own tests).
NO_QUALITY_FLOOR = {"registry.min_balanced_accuracy": 0.0}
# MLflow's HTTP client retries a refused connection for minutes; the tests only need one attempt.
ONE_HTTP_ATTEMPT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass(frozen=True)
class TrackingServer:
    url: str
    artifacts: Path  # --artifacts-destination: where the server keeps what clients upload through it


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which tracking.tracking_uri() prefers.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (a few seconds to start); tests make their own databases."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_server(postgres: PostgresServer,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """``mlflow server``: backend store in PostgreSQL, artifacts served through the server."""
    home = tmp_path_factory.mktemp("mlflow-server")
    database = postgres.create_database(database_name("mlflow_server"))
    artifacts = home / "artifacts"
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", postgres.url(database),
               "--serve-artifacts", "--artifacts-destination", artifacts.as_uri(),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    try:
        with background_process(command, ready_url=f"http://127.0.0.1:{port}/health", cwd=home,
                                env={"MLFLOW_TRACKING_URI": ""}, log_path=home / "server.log",
                                ready_timeout_s=SERVER_START_TIMEOUT_S):
            yield TrackingServer(url=f"http://127.0.0.1:{port}", artifacts=artifacts)
    finally:
        postgres.drop_database(database)


@pytest.fixture(scope="module")
def prefect_on_postgres(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``prefect server start`` whose database is PostgreSQL; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    database = postgres.create_database(database_name("prefect"))
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres.url(database, "postgresql+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    try:
        with background_process(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            ready_url=f"http://127.0.0.1:{port}/api/health", env=env, cwd=home, log_path=home / "server.log",
            ready_timeout_s=SERVER_START_TIMEOUT_S,
        ):
            # The server really keeps its state in PostgreSQL, not in a SQLite file under PREFECT_HOME.
            assert "flow_run" in postgres.table_names(database)
            assert not list(home.rglob("*.db"))
            yield f"http://127.0.0.1:{port}/api"
    finally:
        postgres.drop_database(database)


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny synthetic raw + prepared data made once; tests point paths.raw/prepared at it."""
    settings = load_settings(write_tiny_params(tmp_path_factory.mktemp("scaleout-data")))
    download.run(settings)
    prepare.run(settings)
    return {"paths.raw": str(settings.path("raw")), "paths.prepared": str(settings.path("prepared"))}


@pytest.fixture
def databases(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """One fresh database per tool (MLflow and Optuna both keep an ``alembic_version`` table, so they
    cannot share one), dropped after the test."""
    names = {tool: postgres.create_database(database_name(f"{tool}_{request.node.name}"))
             for tool in ("mlflow", "optuna")}
    try:
        yield names
    finally:
        for name in names.values():
            postgres.drop_database(name)


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(client: mlflow.MlflowClient, settings: Settings, query: str) -> list[Any]:
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    return client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000)


def _study(settings: Settings) -> optuna.Study:
    (name,) = optuna.get_all_study_names(open_storage(settings))
    return optuna.load_study(study_name=name, storage=open_storage(settings))


def _assert_one_mlflow_run_per_trial(client: mlflow.MlflowClient, settings: Settings,
                                     study: optuna.Study) -> list[Any]:
    query = f"tags.`optuna.study` = '{study.study_name}' AND tags.`optuna.trial` != ''"
    children = _runs(client, settings, query)
    numbers = sorted(int(run.data.tags["optuna.trial"]) for run in children)
    assert numbers == [trial.number for trial in study.get_trials()]
    parents = {run.info.run_id for run in _runs(client, settings, "tags.stage = 'tune'")}
    assert {run.data.tags["mlflow.parentRunId"] for run in children} <= parents
    return children


# ------------------------------------------------------------------------------- connection errors


@pytest.mark.parametrize("failure", ["wrong password", "missing database", "server down"])
def test_connection_errors_name_the_setting_to_fix(
    failure: str, postgres: PostgresServer, tmp_path: Path, shared_data: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = postgres.create_database(database_name("errors"))
    try:
        url = {
            "wrong password": postgres.url(database, password="not-the-password"),
            "missing database": postgres.url(f"{database}_missing"),
            "server down": f"postgresql://{postgres.user}:{postgres.password}@127.0.0.1:{free_port()}/{database}",
        }[failure]
        expected = {"wrong password": "password authentication failed", "missing database": "does not exist",
                    "server down": "Connection refused"}[failure]
        settings = load_settings(write_tiny_params(tmp_path, {**shared_data, "tune.storage": url}))

        with pytest.raises(TuneError, match=rf"(?s)tune\.storage.*{expected}") as tune_error:
            tune.run(settings)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        # MLflow alone on that URL (the same database for both tools is refused before any connection).
        settings = settings.with_overrides({"tune.storage": None})
        started = time.monotonic()
        with pytest.raises(tracking.TrackingError,
                           match=rf"(?s){expected}.*MLFLOW_TRACKING_URI") as mlflow_error:
            registry.run(settings)
        assert time.monotonic() - started < 30  # one attempt, not MLflow's ~100 s of retries
        for error in (tune_error, mlflow_error):
            assert postgres.password not in str(error.value)  # URLs in messages are redacted
        assert not (settings.path("reports") / registry.REPORT_FILE).exists()
    finally:
        postgres.drop_database(database)


def test_psycopg2_urls_from_guides_work_and_one_database_for_both_tools_is_refused(
    postgres: PostgresServer, databases: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The form most MLflow and Optuna guides show; the lock installs psycopg 3, not psycopg2.
    optuna_url = postgres.url(databases["optuna"], "postgresql+psycopg2")
    mlflow_url = postgres.url(databases["mlflow"], "postgresql+psycopg2")
    settings = load_settings(write_tiny_params(tmp_path, {"tune.storage": optuna_url}))
    optuna.create_study(study_name="guide-url", storage=open_storage(settings))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    experiment_id = tracking.configure(settings)
    assert _client(postgres.url(databases["mlflow"])).get_experiment(experiment_id).name == settings.mlflow.experiment
    assert optuna.get_all_study_names(open_storage(settings)) == ["guide-url"]

    # MLflow's database as the study's too: refused before either tool touches it, saying what to do.
    shared = settings.with_overrides({"tune.storage": postgres.url(databases["mlflow"])})
    with pytest.raises(TuneError, match="each need a database of their own") as tune_error:
        open_storage(shared)
    with pytest.raises(tracking.TrackingError, match="each need a database of their own") as mlflow_error:
        tracking.configure(shared)
    for error in (tune_error, mlflow_error):
        assert databases["mlflow"] in str(error.value) and postgres.password not in str(error.value)


def test_a_tracking_server_that_is_down_is_named_in_the_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ONE_HTTP_ATTEMPT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    settings = load_settings(write_tiny_params(tmp_path))
    with pytest.raises(tracking.TrackingError, match=r"(?s)not reachable.*MLFLOW_TRACKING_URI"):
        tracking.configure(settings)


# ---------------------------------------------------------------------------- MLflow on PostgreSQL


@pytest.mark.slow
def test_pipeline_tracks_straight_into_postgres_and_a_failed_connection_keeps_the_champion(
    postgres: PostgresServer, databases: dict[str, str], tmp_path: Path, shared_data: dict[str, str],
    monkeypatch: pytest.MonkeyPatch, one_torch_thread: None,
) -> None:
    tracking_url = postgres.url(databases["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_url)
    settings = load_settings(write_tiny_params(tmp_path, {
        **shared_data, **NO_QUALITY_FLOOR, "tune.storage": postgres.url(databases["optuna"]),
        "tune.n_trials": 2,
    }))
    summary = tune.run(settings)
    train.run(settings)  # applies the tuned values itself
    evaluate.run(settings)
    record = registry.run(settings)

    study = _study(settings)
    assert summary["trials_complete"] + summary["trials_pruned"] == 2
    client = _client(tracking_url)
    _assert_one_mlflow_run_per_trial(client, settings, study)
    (parent,) = _runs(client, settings, "tags.stage = 'tune'")
    assert parent.info.status == "FINISHED"
    figures = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "tune")}
    assert "tune/optimization_history.html" in figures
    name = settings.registered_model_name()
    champion = client.get_model_version_by_alias(name, settings.registry.champion_alias)
    assert (record["decision"], str(champion.version)) == ("champion", record["version"])
    assert champion.tags[TAG_STATUS] == STATUS_READY

    # A register stage that cannot reach its store (or its study's) writes nothing and moves nothing.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres.url(databases["mlflow"], password="wrong"))
    with pytest.raises(tracking.TrackingError, match="MLFLOW_TRACKING_URI"):
        registry.run(settings)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_url)
    still = client.get_model_version_by_alias(name, settings.registry.champion_alias)
    assert str(still.version) == record["version"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    wrong_storage = postgres.url(databases["optuna"], password="wrong")
    with pytest.raises(TuneError, match=r"tune\.storage"):
        tune.run(settings.with_overrides({"tune.storage": wrong_storage}))
    assert len(_runs(client, settings, "tags.stage = 'tune'")) == 1


# ------------------------------------------- MLflow server + Prefect on PostgreSQL, two tuning workers


def _prefect(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=CLI_TIMEOUT_S, check=False)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{output}"
    return result.stdout


def _flow_runs_executed(worker_log: Path) -> list[str]:
    """Flow runs a worker submitted and kept (both workers may grab the same run; the server lets one)."""
    text = worker_log.read_text(errors="replace")
    submitted = re.findall(r"submitting flow run '([0-9a-f-]{36})'", text)
    aborted = set(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", text))
    return [run_id for run_id in submitted if run_id not in aborted]


def _wait_for(api_url: str, flow_run_ids: list[str], logs: list[Path]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = [httpx.get(f"{api_url}/flow_runs/{run_id}", timeout=30).json() for run_id in flow_run_ids]
        if all(run["state_type"] in TERMINAL for run in runs):
            return runs
        time.sleep(3)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
    raise AssertionError(f"flow runs {flow_run_ids} not finished in {RUN_TIMEOUT_S:.0f}s:\n{tails}")


@pytest.mark.slow
def test_two_prefect_workers_fill_one_postgres_study_and_the_champion_is_packaged_from_the_server(
    postgres: PostgresServer, mlflow_server: TrackingServer, prefect_on_postgres: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, one_torch_thread: None,
) -> None:
    optuna_db = postgres.create_database(database_name("optuna_two_workers"))
    try:
        _tune_on_two_workers_then_train_and_package(postgres, optuna_db, mlflow_server, prefect_on_postgres,
                                                   tmp_path, monkeypatch)
    finally:
        postgres.drop_database(optuna_db)


def _tune_on_two_workers_then_train_and_package(
    postgres: PostgresServer, optuna_db: str, server: TrackingServer, api_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n_trials = 2  # one trial a worker, give or take: what matters is that both fill the same study
    # The study URL carries no password: every process takes it from libpq's PGPASSWORD, as a second
    # machine would, so params.yaml (and DVC's record of it) holds no secret.
    project = copy_project(tmp_path / "project", {
        **NO_QUALITY_FLOOR, "tune.storage": postgres.url_without_password(optuna_db),
        "tune.n_trials": n_trials, "tune.epochs": 1,
    })
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    settings = load_settings(project / "params.yaml")
    download.run(settings)
    prepare.run(settings)
    env = client_env(api_url, tmp_path / "prefect-home", MLFLOW_TRACKING_URI=server.url,
                     PGPASSWORD=postgres.password, BENTOML_HOME=str(tmp_path / "bentoml"),
                     # Poll often; two concurrent flow runs, one torch thread each (CI has 2 cores).
                     PREFECT_WORKER_QUERY_SECONDS="2", OMP_NUM_THREADS="1", **ONE_HTTP_ATTEMPT)
    env.pop("KUZUSHIJI_PARAMS", None)

    _prefect(["work-pool", "create", POOL, "--type", "process"], project, env)
    _prefect(["--no-prompt", "deploy", "--all"], project, env)
    # Two workers, one flow run at a time each: two concurrent runs of the deployment land on both.
    logs = [tmp_path / f"worker-{name}.log" for name in ("a", "b")]
    with background_process([str(VENV_BIN / "prefect"), "worker", "start", "--pool", POOL, "--name",
                             "tune-worker-a", "--limit", "1"], env=env, cwd=tmp_path, log_path=logs[0]), \
         background_process([str(VENV_BIN / "prefect"), "worker", "start", "--pool", POOL, "--name",
                             "tune-worker-b", "--limit", "1"], env=env, cwd=tmp_path, log_path=logs[1]):
        flow_run_ids = []
        for _ in range(2):
            out = _prefect(["deployment", "run", TUNE_DEPLOYMENT, "-p", "workers=1"], project, env)
            flow_run_ids.append(re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1))
        runs = _wait_for(api_url, flow_run_ids, logs)
    details = "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
    assert [run["state_type"] for run in runs] == ["COMPLETED", "COMPLETED"], details
    ran_on = [_flow_runs_executed(log) for log in logs]
    assert sorted(run for runs_of_worker in ran_on for run in runs_of_worker) == sorted(flow_run_ids), ran_on
    assert all(len(runs_of_worker) == 1 for runs_of_worker in ran_on), ran_on  # one run on each worker

    # One study in PostgreSQL: every trial numbered once, none left running, the total reached (each of
    # the two processes may finish the trial it had started when the other reached the total).
    study = _study(settings)
    trials = study.get_trials()
    assert [trial.number for trial in trials] == list(range(len(trials)))
    assert not [trial for trial in trials if trial.state == TrialState.RUNNING]
    assert n_trials <= sum(trial.state in FINISHED for trial in trials) <= n_trials + 1
    flow_run_pids = {int(str(run["infrastructure_pid"]).rpartition(":")[2]) for run in runs}
    assert {trial.user_attrs[OWNER_ATTR]["pid"] for trial in trials} <= flow_run_pids

    # Through the tracking server: a run per trial nested under the study's tune run, figures uploaded
    # through the server into its artifact destination.
    client = _client(server.url)
    _assert_one_mlflow_run_per_trial(client, settings, study)
    assert list(server.artifacts.rglob("optimization_history.html"))

    # Train, evaluate and register through the tracking server, then the package stage's own command (a
    # flow run on the PostgreSQL-backed Prefect server) fetches the champion from it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    train.run(settings)
    evaluate.run(settings)
    registry.run(settings)
    result = subprocess.run([sys.executable, "-m", "flows", "package"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    record = json.loads((project / "reports" / registry.REPORT_FILE).read_text())
    packaged = json.loads((project / "reports" / "bento_model.json").read_text())
    champion = client.get_model_version_by_alias(record["model_name"], settings.registry.champion_alias)
    assert record["decision"] == "champion" and str(champion.version) == record["version"]
    assert (packaged["registry_model"], packaged["registry_version"], packaged["run_id"]) == (
        record["model_name"], record["version"], champion.run_id)
    # The champion's files live only in the server's artifact store, which the package stage read them from.
    assert client.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    # (MLflow 3 keeps a logged model's files under the experiment's models/, not under the run's artifacts.)
    stored = {hashlib.md5(path.read_bytes()).hexdigest() for path in server.artifacts.rglob("model.onnx")}
    assert packaged["onnx_md5"] in stored
    (package_run,) = flow_runs(api_url, "package")  # flows are named after their stage
    assert package_run["state_type"] == "COMPLETED"


# ------------------------------------------------------------------------------- RDB heartbeat


@pytest.mark.slow
def test_a_killed_worker_on_another_machine_is_failed_by_the_heartbeat_and_the_study_resumes(
    postgres: PostgresServer, databases: dict[str, str], tmp_path: Path, shared_data: dict[str, str],
) -> None:
    heartbeat_s = 1
    # Two trials of a few seconds each (all 20 images a class, 3 epochs), so the poll below catches the
    # first finished and the second running: the second is killed, the resumed run adds the last.
    params = write_tiny_params(tmp_path, {**shared_data, "tune.storage": postgres.url(databases["optuna"]),
                                          "tune.heartbeat_s": heartbeat_s, "tune.n_trials": 2,
                                          "tune.epochs": 3, "tune.max_train_per_class": None})
    settings = load_settings(params)
    env = {**os.environ, "KUZUSHIJI_PARAMS": str(params), "MLFLOW_TRACKING_URI": ""}
    # The first process reports another host name, like a worker on a second machine: this host's
    # dead-process check cannot judge its trials, so only the RDB heartbeat can fail the killed one.
    on_another_machine = ("import socket; socket.gethostname = lambda: 'another-tuning-machine'; "
                          "from pipeline.stages.tune import main; main([])")
    first_log = tmp_path / "first.log"
    with first_log.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-c", on_another_machine], env=env, cwd=PROJECT_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            before = _kill_once_a_trial_finished_and_another_runs(process, settings)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)
    assert before, f"never saw a finished and a running trial:\n{first_log.read_text()[-3000:]}"
    time.sleep(2 * heartbeat_s + 1)  # past the grace period: the killed trial's heartbeat is stale

    result = subprocess.run([sys.executable, "-m", "pipeline.stages.tune"], env=env, cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = _study(settings)  # one study: resumed, not a new one
    trials = study.get_trials()
    assert {t.number: (t.state.name, t.value) for t in trials if t.number in before} == before
    assert sum(t.state in FINISHED for t in trials) == settings.tune.n_trials
    (killed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert FAIL_REASON_ATTR not in killed.user_attrs  # not the local dead-process check
    assert killed.user_attrs[OWNER_ATTR]["host"] == "another-tuning-machine"
    assert "no heartbeat" in result.stderr
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    client = _client(tracking.tracking_uri(settings))
    runs = {int(r.data.tags["optuna.trial"]): r for r in _runs(client, settings, "tags.`optuna.trial` != ''")}
    if killed.number in runs:  # the kill may have come before its MLflow run was created
        assert runs[killed.number].info.status == "FAILED"
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


def _kill_once_a_trial_finished_and_another_runs(process: subprocess.Popen,
                                                 settings: Settings) -> dict[int, tuple[str, Any]]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    storage = None
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        try:
            storage = storage or open_storage(settings)  # once: the worker may be creating the schema
            (name,) = optuna.get_all_study_names(storage)
            trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        except ValueError:  # no study yet
            continue
        finished = [t for t in trials if t.state in FINISHED]
        running = [t for t in trials if t.state == TrialState.RUNNING and OWNER_ATTR in t.user_attrs]
        if finished and running:
            os.kill(process.pid, signal.SIGKILL)
            return {t.number: (t.state.name, t.value) for t in finished}
    return {}
