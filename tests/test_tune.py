"""The tune stage on real Optuna journal storage, real training (tiny synthetic data) and a real MLflow
SQLite store: pruning, nested runs, best params, resume after SIGKILL, and parallel worker processes."""

from __future__ import annotations

import json
import multiprocessing
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

from pipeline import tracking
from pipeline.config import load_settings
from pipeline.contract import BEST_PARAMS_FILE
from pipeline.stages import download, prepare, tune
from pipeline.training import loop
from pipeline.tuning.objective import OBJECTIVE
from pipeline.tuning.study import (
    FAIL_REASON_ATTR,
    FINISHED,
    OWNER_ATTR,
    PARENT_RUN_ATTR,
    TuneError,
    data_fingerprint,
    fail_stale_trials,
    open_storage,
    owner,
    study_name,
)
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
    download.run(settings)
    prepare.run(settings)
    return {"paths.raw": str(settings.path("raw")), "paths.prepared": str(settings.path("prepared"))}


def _study(settings) -> optuna.Study:
    name = study_name(settings, data_fingerprint(settings))
    return optuna.load_study(study_name=name, storage=open_storage(settings))


def _child_runs(settings, parent_id: str | None = None) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking.tracking_uri(settings))
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    query = "tags.`optuna.trial` != ''" if parent_id is None else f"tags.`mlflow.parentRunId` = '{parent_id}'"
    return client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000)


# ------------------------------------------------------------------------------------------ fast tests


def test_study_name_follows_space_data_and_objective_not_budget(tmp_path: Path) -> None:
    base = _settings(tmp_path)
    name = study_name(base, "data-a")
    assert name.startswith(f"{base.tune.study_name}-")
    # Budget and execution settings resume the same study ...
    same = base.with_overrides({"tune.n_trials": 50, "tune.workers": 3, "tune.timeout_s": 60.0})
    assert study_name(same, "data-a") == name
    # ... while a new space, new data or a different objective start a new one.
    space = dict(base.tune.search_space)
    space.pop("model.dropout")
    assert study_name(base.with_overrides({"tune.search_space": space}), "data-a") != name
    assert study_name(base, "data-b") != name
    assert study_name(base.with_overrides({"tune.epochs": 5}), "data-a") != name
    assert study_name(base.with_overrides({"train.optimizer": "adamw"}), "data-a") != name


def test_study_name_ignores_execution_only_train_settings(tmp_path: Path) -> None:
    base = _settings(tmp_path)
    name = study_name(base, "data-a")
    # Speed knobs of the same objective (e.g. a GPU box joining with torch.compile) resume the study ...
    for key in ("train.compile", "train.amp", "train.channels_last"):
        flipped = base.with_overrides({key: not tracking.flatten(base.resolved())[key]})
        assert study_name(flipped, "data-a") == name, key
    assert study_name(base.with_overrides({"train.device": "cpu", "train.eval_batch_size": 7}),
                           "data-a") == name
    # ... while a changed search space starts a new study.
    space = {**base.tune.search_space, "train.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}}
    assert study_name(base.with_overrides({"tune.search_space": space}), "data-a") != name


def test_zero_trials_writes_empty_best_params(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {"tune.n_trials": 0})
    summary = tune.run(settings)
    assert yaml.safe_load((settings.path("models") / BEST_PARAMS_FILE).read_text()) == {}
    assert summary["trials_complete"] == 0 and summary["best_params"] == {}
    assert json.loads((settings.path("reports") / "tune" / "summary.json").read_text()) == summary


def test_missing_prepared_data_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(TuneError, match="run the prepare stage"):
        tune.run(_settings(tmp_path))


def test_fail_stale_trials_fails_only_dead_local_owners(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    storage = open_storage(settings)
    study = optuna.create_study(study_name="stale", storage=storage, direction="maximize")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    owners = {
        "dead": {"host": socket.gethostname(), "pid": int(finished.stdout), "started": 0.0},
        "alive": owner(),
        "elsewhere": {"host": "another-machine", "pid": 1, "started": 0.0},
    }
    for who in owners.values():
        study.ask().set_user_attr(OWNER_ATTR, who)
    assert fail_stale_trials(study, storage) == [0]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]


def _finished_study(settings) -> optuna.Study:
    """The settings' study holding ``tune.n_trials`` complete trials already (nothing left to train)."""
    name = study_name(settings, data_fingerprint(settings))
    study = optuna.create_study(study_name=name, storage=open_storage(settings), direction="maximize")
    distributions = {
        "train.lr": optuna.distributions.FloatDistribution(0.002, 0.05, log=True),
        "train.batch_size": optuna.distributions.CategoricalDistribution([16]),
        "model.dropout": optuna.distributions.FloatDistribution(0.1, 0.5),
    }
    for index in range(settings.tune.n_trials):
        params = {"train.lr": 0.01 + index / 1000, "train.batch_size": 16, "model.dropout": 0.2 + index / 10}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=index / 10))
    return study


def _parent_runs(settings, name: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking.tracking_uri(settings))
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    query = f"tags.stage = 'tune' AND tags.`optuna.study` = '{name}'"
    return client.search_runs([experiment.experiment_id], filter_string=query, max_results=100)


def test_reruns_resume_the_recorded_parent_run_or_replace_a_missing_one(tmp_path: Path, shared_data) -> None:
    settings = _settings(tmp_path, shared_data)
    study = _finished_study(settings)
    # Recorded by an attempt that logged to another tracking store: not here, so a new parent replaces it.
    study.set_user_attr(PARENT_RUN_ATTR, "0" * 32)
    tune.run(settings)
    (parent,) = _parent_runs(settings, study.study_name)
    assert _study(settings).user_attrs[PARENT_RUN_ATTR] == parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.params["tune.n_trials"] == "3"

    # Later runs (with another budget too) continue that run instead of starting another parent.
    tune.run(settings.with_overrides({"tune.n_trials": 2}))
    (again,) = _parent_runs(settings, study.study_name)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["tune.n_trials"] == "3"  # params stay those of the first attempt

    # A deleted parent is not resumed either.
    mlflow.MlflowClient(tracking.tracking_uri(settings)).delete_run(parent.info.run_id)
    tune.run(settings)
    (fresh,) = _parent_runs(settings, study.study_name)
    assert fresh.info.run_id != parent.info.run_id
    assert _study(settings).user_attrs[PARENT_RUN_ATTR] == fresh.info.run_id


# ------------------------------------------------------------------------------------------ slow tests


@pytest.mark.slow
def test_study_prunes_logs_nested_runs_and_writes_best_params(tmp_path: Path, shared_data) -> None:
    settings = _settings(tmp_path, {**shared_data, "tune.n_trials": 4})
    # Seed the study so a prune is certain, not luck: two moderate learning rates, then one so high that
    # the tiny net collapses to a single class (chance level) after its first epoch, below their median.
    study = optuna.create_study(study_name=study_name(settings, data_fingerprint(settings)),
                                storage=open_storage(settings), direction="maximize")
    for lr, dropout in ((0.02, 0.3), (0.007, 0.2), (0.05, 0.5)):
        study.enqueue_trial({"train.lr": lr, "train.batch_size": 16, "model.dropout": dropout})
    summary = tune.run(settings)

    study = _study(settings)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.PRUNED) >= 1, states
    assert states.count(TrialState.COMPLETE) >= 1, states
    assert summary["trials_complete"] + summary["trials_pruned"] == 4
    best = yaml.safe_load((settings.path("models") / BEST_PARAMS_FILE).read_text())
    assert set(best) == set(settings.tune.search_space) and best == study.best_trial.params
    assert summary[f"best_{OBJECTIVE}"] == pytest.approx(study.best_value)
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
        curve = client.get_metric_history(run.info.run_id, OBJECTIVE)
        assert [m.step for m in curve] == sorted(trial.intermediate_values)


@pytest.mark.slow
def test_a_failing_trial_is_recorded_failed_and_the_study_goes_on(
    tmp_path: Path, shared_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No pruning, so every trial but the failing one completes.
    settings = _settings(tmp_path, {**shared_data, "tune.pruner_startup_trials": 100})
    failing = 1
    real_fit = loop.fit

    def fit_that_runs_out_of_memory_in_one_trial(*args: Any, callbacks: Any = (), **kwargs: Any) -> Any:
        # Real training; the chosen trial hits what a too-large batch does on a GPU, after its first epoch.
        if mlflow.active_run().info.run_name == f"trial {failing}":
            def out_of_memory(metrics: Any) -> None:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            callbacks = (*callbacks, out_of_memory)
        return real_fit(*args, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(loop, "fit", fit_that_runs_out_of_memory_in_one_trial)
    summary = tune.run(settings)

    trials = _study(settings).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    assert "CUDA out of memory" in trials[failing].user_attrs[FAIL_REASON_ATTR]
    assert (summary["trials_complete"], summary["trials_failed"]) == (3, 1)
    best = yaml.safe_load((settings.path("models") / BEST_PARAMS_FILE).read_text())
    assert best == summary["best_params"] and set(best) == set(settings.tune.search_space)
    assert summary["best_trial"] != failing

    runs = {int(r.data.tags["optuna.trial"]): r for r in _child_runs(settings)}
    assert sorted(runs) == [0, 1, 2, 3]
    for number, run in runs.items():
        expected = ("FAILED", "FAIL") if number == failing else ("FINISHED", "COMPLETE")
        assert (run.info.status, run.data.tags["optuna.state"]) == expected, number
    assert "CUDA out of memory" in runs[failing].data.tags[tracking.TAG_FAILURE]
    (parent,) = _parent_runs(settings, _study(settings).study_name)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_killed_tuning_resumes_the_same_study_without_losing_trials(tmp_path: Path, shared_data) -> None:
    params = write_tiny_params(tmp_path, shared_data)
    settings = load_settings(params)
    env = {**os.environ, "KUZUSHIJI_PARAMS": str(params), "MLFLOW_TRACKING_URI": ""}
    command = [sys.executable, "-m", "pipeline.stages.tune"]
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
            finished = [t for t in trials if t.state in FINISHED]
            running = [t for t in trials if t.state == TrialState.RUNNING and OWNER_ATTR in t.user_attrs]
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

    result = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=KILL_WAIT_S, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = _study(settings)
    trials = study.get_trials()
    after = {t.number: (t.state.name, t.value) for t in trials if t.number in before}
    assert after == before  # no finished trial lost or changed
    assert sum(t.state in FINISHED for t in trials) == settings.tune.n_trials
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and "died" in killed[0].user_attrs["fail_reason"]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len(optuna.get_all_study_names(open_storage(settings))) == 1  # resumed, not a new study

    # One MLflow parent run for the study, resumed by the rerun: every trial run of both attempts
    # (complete, pruned and the killed one) nests under it.
    (parent,) = _parent_runs(settings, study.study_name)
    assert parent.info.status == "FINISHED"
    assert study.user_attrs[PARENT_RUN_ATTR] == parent.info.run_id
    runs = {int(r.data.tags["optuna.trial"]): r for r in _child_runs(settings)}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    assert set(runs) >= {t.number for t in trials if t.state in FINISHED}
    assert set(runs) <= {t.number for t in trials}
    if killed[0].number in runs:  # the kill may have come before its MLflow run was created
        assert runs[killed[0].number].info.status == "FAILED"
        assert runs[killed[0].number].data.tags["optuna.state"] == TrialState.FAIL.name
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_two_worker_processes_share_one_study(
    tmp_path: Path, shared_data, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, shared_data)
    started: list[int] = []
    real_start = multiprocessing.context.SpawnProcess.start

    def recording_start(process: multiprocessing.context.SpawnProcess) -> None:
        real_start(process)
        started.append(process.pid)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", recording_start)
    tune.run(settings, workers=2)  # raises if a worker exits abnormally
    trials = _study(settings).get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # distinct and gap-free
    finished = sum(t.state in FINISHED for t in trials)
    # MaxTrialsCallback stops each worker at the total; a worker may finish the one trial it had started.
    assert settings.tune.n_trials <= finished <= settings.tune.n_trials + 1
    assert len(set(started)) == 2  # two worker processes ran (and exited cleanly) ...
    # ... and every trial was run by one of them, never by this process. Whether both got a trial
    # depends on how fast each starts on a busy machine, so that is not asserted.
    assert {t.user_attrs[OWNER_ATTR]["pid"] for t in trials} <= set(started)
    runs = _child_runs(settings)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == numbers  # one MLflow run per trial
