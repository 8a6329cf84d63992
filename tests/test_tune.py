"""The tune stage on real Optuna journal storage, real training (tiny synthetic data) and a real MLflow
SQLite store: pruning, nested runs, best params, resume after SIGKILL, and parallel worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipeline import data, tracking, tune
from pipeline.config import load_settings
from tests.prefect_server import write_tiny_params
from tests.support import PROJECT_ROOT

KILL_WAIT_S = 900.0


def _settings(folder: Path, changes: dict[str, Any] | None = None):
    return load_settings(write_tiny_params(folder, changes))


@pytest.fixture(autouse=True)
def _own_tracking_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI, which tracking.tracking_uri() prefers:
    # without this, a later test in the same process would log into an earlier test's store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny synthetic raw + prepared data made once; tests point paths.raw/prepared at it."""
    settings = _settings(tmp_path_factory.mktemp("tune-data"))
    data.fetch_raw(settings)
    data.prepare(settings)
    return {"paths.raw": str(settings.path("raw")), "paths.prepared": str(settings.path("prepared"))}


def _study(settings) -> optuna.Study:
    name = tune.study_name(settings, tune.data_fingerprint(settings))
    return optuna.load_study(study_name=name, storage=tune.open_storage(settings))


def _child_runs(settings, parent_id: str | None = None) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking.tracking_uri(settings))
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    query = "tags.`optuna.trial` != ''" if parent_id is None else f"tags.`mlflow.parentRunId` = '{parent_id}'"
    return client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000)


# ------------------------------------------------------------------------------------------ fast tests


def test_study_name_follows_space_data_and_objective_not_budget(tmp_path: Path) -> None:
    base = _settings(tmp_path)
    name = tune.study_name(base, "data-a")
    assert name.startswith(f"{base.tune.study_name}-")
    # Budget and execution settings resume the same study ...
    same = base.with_overrides({"tune.n_trials": 50, "tune.workers": 3, "tune.timeout_s": 60.0})
    assert tune.study_name(same, "data-a") == name
    # ... while a new space, new data or a different objective start a new one.
    space = dict(base.tune.search_space)
    space.pop("model.dropout")
    assert tune.study_name(base.with_overrides({"tune.search_space": space}), "data-a") != name
    assert tune.study_name(base, "data-b") != name
    assert tune.study_name(base.with_overrides({"tune.epochs": 5}), "data-a") != name
    assert tune.study_name(base.with_overrides({"train.optimizer": "adamw"}), "data-a") != name


def test_apply_best_params_overlays_and_rejects_bad_files(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert tune.apply_best_params(settings) is settings  # no file: params.yaml as is
    path = settings.path("models") / tune.BEST_PARAMS_FILE
    path.parent.mkdir(parents=True)
    path.write_text("{}\n")
    assert tune.apply_best_params(settings) == settings
    path.write_text(yaml.safe_dump({"train.lr": 0.0123, "model.dropout": 0.25}))
    tuned = tune.apply_best_params(settings)
    assert (tuned.train.lr, tuned.model.dropout) == (0.0123, 0.25)
    assert tuned.train.epochs == settings.train.epochs
    path.write_text(yaml.safe_dump({"train.nope": 1}))
    with pytest.raises(tune.TuneError, match="(?s)best_params.yaml.*nope"):
        tune.apply_best_params(settings)
    path.write_text("train.lr: [unclosed\n")
    with pytest.raises(tune.TuneError, match="not valid YAML"):
        tune.apply_best_params(settings)


def test_zero_trials_writes_empty_best_params(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {"profiles.quick.tune.n_trials": 0})
    summary = tune.run(settings)
    assert yaml.safe_load((settings.path("models") / tune.BEST_PARAMS_FILE).read_text()) == {}
    assert summary["trials_complete"] == 0 and summary["best_params"] == {}
    assert json.loads((settings.path("reports") / "tune" / "summary.json").read_text()) == summary


def test_missing_prepared_data_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(tune.TuneError, match="run the prepare stage"):
        tune.run(_settings(tmp_path))


def test_fail_stale_trials_fails_only_dead_local_owners(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    storage = tune.open_storage(settings)
    study = optuna.create_study(study_name="stale", storage=storage, direction="maximize")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    owners = {
        "dead": {"host": socket.gethostname(), "pid": int(finished.stdout), "started": 0.0},
        "alive": tune._owner(),
        "elsewhere": {"host": "another-machine", "pid": 1, "started": 0.0},
    }
    for owner in owners.values():
        study.ask().set_user_attr(tune.OWNER_ATTR, owner)
    assert tune.fail_stale_trials(study, storage) == [0]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]


# ------------------------------------------------------------------------------------------ slow tests


@pytest.mark.slow
def test_study_prunes_logs_nested_runs_and_writes_best_params(tmp_path: Path, shared_data) -> None:
    settings = _settings(tmp_path, {**shared_data, "profiles.quick.tune.n_trials": 4})
    # Seed the study so a prune is certain, not luck: two moderate learning rates, then one so high that
    # the tiny net collapses to a single class (chance level) after its first epoch, below their median.
    study = optuna.create_study(study_name=tune.study_name(settings, tune.data_fingerprint(settings)),
                                storage=tune.open_storage(settings), direction="maximize")
    for lr, dropout in ((0.02, 0.3), (0.007, 0.2), (0.05, 0.5)):
        study.enqueue_trial({"train.lr": lr, "train.batch_size": 16, "model.dropout": dropout})
    summary = tune.run(settings)

    study = _study(settings)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.PRUNED) >= 1, states
    assert states.count(TrialState.COMPLETE) >= 1, states
    assert summary["trials_complete"] + summary["trials_pruned"] == 4
    best = yaml.safe_load((settings.path("models") / tune.BEST_PARAMS_FILE).read_text())
    assert set(best) == set(settings.tune.search_space) and best == study.best_trial.params
    assert summary[f"best_{tune.OBJECTIVE}"] == pytest.approx(study.best_value)
    rows = (settings.path("reports") / "tune" / tune.TRIALS_FILE).read_text().strip().splitlines()
    assert len(rows) == 1 + len(states) and rows[0].startswith("number,state,value")

    client = mlflow.MlflowClient(tracking.tracking_uri(settings))
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tune'")
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/optimization_history.html", "tune/parallel_coordinate.html", "tune/trials.csv"} <= artifacts
    children = _child_runs(settings, parent.info.run_id)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == list(range(len(states)))
    for run in children:
        trial = study.trials[int(run.data.tags["optuna.trial"])]
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.data.params["train.lr"] == str(trial.params["train.lr"])
        curve = client.get_metric_history(run.info.run_id, tune.OBJECTIVE)
        assert [m.step for m in curve] == sorted(trial.intermediate_values)


@pytest.mark.slow
def test_killed_tuning_resumes_the_same_study_without_losing_trials(tmp_path: Path, shared_data) -> None:
    params = write_tiny_params(tmp_path, shared_data)
    settings = load_settings(params)
    env = {**os.environ, "KUZUSHIJI_PARAMS": str(params), "MLFLOW_TRACKING_URI": ""}
    command = [sys.executable, "-m", "pipeline.tune"]
    log = (tmp_path / "first.log").open("wb")
    process = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        before: dict[int, tuple[str, Any]] = {}
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(1.0)
            try:
                study = _study(settings)
            except KeyError:  # not created yet
                continue
            trials = study.get_trials()
            finished = [t for t in trials if t.state in tune.FINISHED]
            running = [t for t in trials if t.state == TrialState.RUNNING and tune.OWNER_ATTR in t.user_attrs]
            if finished and running:
                before = {t.number: (t.state.name, t.value) for t in finished}
                os.kill(process.pid, signal.SIGKILL)
                break
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert before, f"never saw a finished and a running trial:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
    assert process.returncode == -signal.SIGKILL

    result = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=KILL_WAIT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = _study(settings)
    trials = study.get_trials()
    after = {t.number: (t.state.name, t.value) for t in trials if t.number in before}
    assert after == before  # no finished trial lost or changed
    assert sum(t.state in tune.FINISHED for t in trials) == settings.tune.n_trials
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and "died" in killed[0].user_attrs["fail_reason"]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len(optuna.get_all_study_names(tune.open_storage(settings))) == 1  # resumed, not a new study


@pytest.mark.slow
def test_two_worker_processes_share_one_study(tmp_path: Path, shared_data) -> None:
    settings = _settings(tmp_path, shared_data)
    tune.run(settings, workers=2)
    trials = _study(settings).get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # distinct and gap-free
    finished = sum(t.state in tune.FINISHED for t in trials)
    # MaxTrialsCallback stops each worker at the total; a worker may finish the one trial it had started.
    assert settings.tune.n_trials <= finished <= settings.tune.n_trials + 1
    assert {t.user_attrs[tune.OWNER_ATTR]["pid"] for t in trials} != {os.getpid()}
    assert len({t.user_attrs[tune.OWNER_ATTR]["pid"] for t in trials}) == 2  # both workers ran trials
    runs = _child_runs(settings)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == numbers  # one MLflow run per trial
