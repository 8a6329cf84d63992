"""Hyper-parameter search with Optuna: the ``tune`` stage.

The study lives in persistent storage (a journal file under ``paths.optuna`` by default, or the RDB URL in
``tune.storage``) under a name that hashes the search space, the prepared data and the tune settings: the
same configuration resumes the same study, a changed one starts a new study. ``tune.n_trials`` is the total
number of finished (complete + pruned) trials of the study, so a killed run started again only runs what is
missing. Several worker processes (``--workers N``, or other machines on the same storage) share one study.

Each trial trains SpinalVGG on a per-class subset for ``tune.epochs`` epochs through ``loop.fit`` and is a
nested MLflow run under one parent ``tune`` run, with its parameters, per-epoch curves and final state.
The parent run's id is a study user attribute, so a resumed study (rerun, other workers) keeps nesting
under the same parent. A trial that raises (e.g. out of memory) is recorded FAILED and the study goes on.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import yaml
from mlflow.exceptions import MlflowException
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from pipeline import files, tracking
from pipeline.config import RECIPE_SECTIONS, Settings, load_settings
from pipeline.contract import BEST_PARAMS_FILE, load_classmap

log = logging.getLogger(__name__)

OBJECTIVE = "val_balanced_accuracy"  # the K49 metric, on the validation split (never the test set)
JOURNAL_FILE = "journal.log"
SUMMARY_FILE = "summary.json"
TRIALS_FILE = "trials.csv"
HASH_CHARS = 10  # short study-name suffix; collisions within one storage are what matters
OWNER_ATTR = "owner"  # trial user attr: the process running it, to fail trials of killed processes
SEARCH_MAX_RESULTS = 1000  # MLflow runs fetched per search (RUNNING trial runs of one study: a handful)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the one MLflow "tune" run all trials nest under
FAIL_REASON_ATTR = "fail_reason"  # trial user attr: why a trial FAILED
FAIL_REASON_MAX_CHARS = 1000  # head of the error message kept in the study (tracebacks go to the log)
# Replaced in every trial (tune.epochs, tuning subsets) or speed knobs of the same objective: not part of
# what a study measures, on top of config.RUNTIME_KEYS (which raising n_trials or adding workers touch).
TRIAL_REPLACED = frozenset({"train.epochs", "train.amp", "train.channels_last"})


class TuneError(RuntimeError):
    """The study cannot run or its results cannot be used; the message says what to do."""


# --------------------------------------------------------------------------------------------- space


def study_name(settings: Settings, data_fingerprint: str) -> str:
    """``tune.study_name`` + a short hash of the search space, the data and what the objective depends on."""
    identity = settings.run_identity(*RECIPE_SECTIONS, "tune")
    identity["train"] = {key: value for key, value in identity["train"].items()
                         if f"train.{key}" not in TRIAL_REPLACED}
    identity["data"] = data_fingerprint
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{settings.tune.study_name}-{digest[:HASH_CHARS]}"


def data_fingerprint(settings: Settings) -> str:
    """SHA-256 over the prepared split files, so new data never continues an old study."""
    from pipeline.data import PREPARED_SPLITS

    digest = hashlib.sha256()
    for split in PREPARED_SPLITS:
        path = settings.path("prepared") / f"{split}.npz"
        if not path.is_file():
            raise TuneError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- storage


def open_storage(settings: Settings) -> optuna.storages.BaseStorage:
    """The study storage: ``tune.storage`` (RDB URL, with heartbeats) or a journal file under ``paths.optuna``."""
    if settings.tune.storage:
        import sqlalchemy

        try:
            return optuna.storages.RDBStorage(
                settings.tune.storage,
                heartbeat_interval=settings.tune.heartbeat_s,
                # Trials of dead workers on any machine are failed once their heartbeat is this old ...
                grace_period=2 * settings.tune.heartbeat_s,
                # ... and their MLflow runs ended FAILED too.
                heartbeat_stale_trial_callback=functools.partial(_end_heartbeat_failed_trial_run, settings),
            )
        except ImportError as exc:
            raise TuneError(f"no database driver for tune.storage = {storage_label(settings)} ({exc}): "
                            "install the pinned lock (`make venv`)") from exc
        except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as exc:
            # RuntimeError: Optuna's schema check, e.g. a database whose alembic_version belongs to MLflow.
            reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
            raise TuneError(
                f"cannot open the Optuna storage tune.storage = {storage_label(settings)}: {reason}. Fix "
                "tune.storage in params.yaml (a database of Optuna's own; the password may come from "
                "PGPASSWORD instead of the URL)."
            ) from exc
    folder = settings.path("optuna")
    folder.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(folder / JOURNAL_FILE))
    return optuna.storages.JournalStorage(backend)


def _end_heartbeat_failed_trial_run(settings: Settings, study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna failed ``trial`` because its worker (on any machine) stopped sending heartbeats."""
    log.warning("trial %d of study %s had no heartbeat for %d s: marked FAILED", trial.number,
                study.study_name, 2 * settings.tune.heartbeat_s)
    fail_stale_trial_runs(settings, study.study_name, [trial.number])


def storage_label(settings: Settings) -> str:
    """Where the study lives, for logs and reports (no credentials)."""
    if settings.tune.storage:
        url = settings.tune.storage
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    return str(settings.path("optuna") / JOURNAL_FILE)


def _owner() -> dict[str, Any]:
    import psutil

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}


def _owner_alive(owner: dict[str, Any]) -> bool | None:
    """True/False for a process on this host; None when it ran elsewhere (cannot tell)."""
    import psutil

    if owner.get("host") != socket.gethostname():
        return None
    try:
        return psutil.Process(int(owner["pid"])).create_time() == owner["started"]
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Mark RUNNING trials whose process on this host is gone as FAILED; return their numbers.

    A killed tuning process leaves its trial RUNNING in the journal (journal storage has no heartbeat).
    Trials owned by live processes or by other machines are left alone; RDB storage handles those with
    heartbeats.
    """
    stale = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER_ATTR)
        if owner is None or _owner_alive(owner) is not False:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, f"tuning process {owner['pid']} died")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        stale.append(trial.number)
    if stale:
        log.warning("marked trials %s FAILED: their tuning process on this host is gone", stale)
    return stale


def fail_stale_trial_runs(settings: Settings, name: str, numbers: Sequence[int]) -> None:
    """End the MLflow runs of trials :func:`fail_stale_trials` failed (their process died mid-run)."""
    if not numbers:
        return
    client = mlflow.MlflowClient(tracking.tracking_uri(settings))
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    if experiment is None:
        return
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`optuna.study` = '{name}' AND attributes.status = 'RUNNING'",
        max_results=SEARCH_MAX_RESULTS,
    )
    wanted = {str(number) for number in numbers}
    for run in (r for r in runs if r.data.tags.get("optuna.trial") in wanted):
        client.set_tag(run.info.run_id, "optuna.state", TrialState.FAIL.name)
        client.set_tag(run.info.run_id, tracking.TAG_FAILURE, "tuning process died")
        client.set_terminated(run.info.run_id, status="FAILED")


def parent_run_id(settings: Settings, study: optuna.Study, experiment_id: str) -> str | None:
    """The study's MLflow parent run to resume, or None when there is none yet or it cannot be used.

    A run recorded by an earlier attempt may be gone from the current tracking store (another
    ``MLFLOW_TRACKING_URI``, a deleted run or another ``mlflow.experiment``): a new parent is started then.
    """
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not run_id:
        return None
    try:
        run = mlflow.MlflowClient(tracking.tracking_uri(settings)).get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        log.warning(
            "MLflow parent run %s of study %s is not in experiment %r at %s: starting a new parent run",
            run_id, study.study_name, settings.mlflow.experiment, tracking.tracking_uri(settings),
        )
        return None
    return run_id


# ----------------------------------------------------------------------------------------- objective


@dataclass(frozen=True)
class TuneData:
    """The tuning subsets and the facts ``loop.fit`` needs, loaded once per worker."""

    train: Any
    val: Any
    num_classes: int
    pixel_mean: float
    pixel_std: float


def load_tune_data(settings: Settings) -> TuneData:
    """Prepared train/val, cut to ``tune.max_*_per_class`` per class."""
    from pipeline import data

    train = data.load_prepared(settings, "train")
    val = data.load_prepared(settings, "val")
    if settings.tune.max_train_per_class:
        train = data.subset_per_class(train, settings.tune.max_train_per_class, settings.seed)
    if settings.tune.max_val_per_class:
        val = data.subset_per_class(val, settings.tune.max_val_per_class, settings.seed)
    stats = data.read_stats(settings)
    classmap = load_classmap(settings.path("prepared") / data.CLASSMAP_NAME)
    return TuneData(train, val, len(classmap), float(stats["pixel_mean"]), float(stats["pixel_std"]))


def suggest(trial: optuna.Trial, key: str, dim: Any) -> Any:
    """Sample one dimension of ``tune.search_space`` (validated in config)."""
    if dim.type == "categorical":
        return trial.suggest_categorical(key, list(dim.choices))
    if dim.type == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
    return trial.suggest_float(key, float(dim.low), float(dim.high), log=dim.log)


def trial_settings(settings: Settings, params: dict[str, Any]) -> Settings:
    """Base settings + the trial's parameters + the tuning budget (epochs, subset already applied)."""
    return settings.with_overrides(
        {
            **params,
            "train.epochs": settings.tune.epochs,
            # The subset is cut once in load_tune_data; fit must not cut it again.
            "train.max_train_per_class": None,
            "train.max_val_per_class": None,
        }
    )


class Objective:
    """One trial: suggest, train through ``loop.fit``, report each epoch, log a nested MLflow run."""

    def __init__(self, settings: Settings, tune_data: TuneData, parent_run_id: str | None) -> None:
        self.settings = settings
        self.data = tune_data
        self.parent_run_id = parent_run_id

    def __call__(self, trial: optuna.Trial) -> float:
        from pipeline.loop import fit  # torch loads in the worker that trains, not at import

        trial.set_user_attr(OWNER_ATTR, _owner())
        params = {key: suggest(trial, key, dim) for key, dim in self.settings.tune.search_space.items()}
        run_settings = trial_settings(self.settings, params)
        tags = {"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number)}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # links runs made in worker processes too
        best = -math.inf
        state = TrialState.COMPLETE

        def report(metrics: Any) -> None:
            nonlocal best
            values = metrics.as_dict()
            tracking.log_epoch(int(values.pop("epoch")), values)
            value = float(values[OBJECTIVE])
            best = max(best, value)
            trial.report(value, metrics.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {metrics.epoch}: {OBJECTIVE} {value:.4f} below the median")

        with tracking.start_run(self.settings, f"trial-{trial.number}", nested=True, tags=tags):
            mlflow.log_params(params)
            try:
                fit(
                    run_settings,
                    self.data.train,
                    self.data.val,
                    self.data.num_classes,
                    self.data.pixel_mean,
                    self.data.pixel_std,
                    callbacks=(report,),
                )
                if best == -math.inf:
                    raise TuneError("loop.fit reported no epoch: the trial has no value")
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except BaseException as exc:
                # e.g. CUDA out of memory for a large batch: the trial FAILS, the study goes on.
                trial.set_user_attr(FAIL_REASON_ATTR, f"{type(exc).__name__}: {exc}"[:FAIL_REASON_MAX_CHARS])
                mlflow.set_tag("optuna.state", TrialState.FAIL.name)
                raise  # start_run marks the MLflow run FAILED; optimize(catch=...) records the trial FAILED
            mlflow.set_tag("optuna.state", state.name)
            if best > -math.inf:
                mlflow.log_metric(f"best_{OBJECTIVE}", best)
        if state == TrialState.PRUNED:
            raise optuna.TrialPruned()
        return best


# ---------------------------------------------------------------------------------------- optimizing


def _study(
    settings: Settings, name: str, worker_index: int, storage: optuna.storages.BaseStorage | None = None
) -> optuna.Study:
    finished = 0
    storage = storage or open_storage(settings)
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
        finished = len(existing.get_trials(deepcopy=False))
    except KeyError:
        pass
    # A fresh seed per worker and per resume: identical seeds would replay the same startup samples.
    seed = settings.seed + 1_000 * worker_index + finished
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=settings.tune.pruner_startup_trials,
            n_warmup_steps=settings.tune.pruner_warmup_epochs,
        ),
    )


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def optimize_worker(
    settings: Settings,
    name: str,
    parent_run_id: str | None,
    worker_index: int = 0,
    torch_threads: int | None = None,
) -> None:
    """Run trials on the shared study until it holds ``tune.n_trials`` finished trials (or the timeout)."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    tracking.configure(settings)
    study = _study(settings, name, worker_index)
    if finished_count(study) >= settings.tune.n_trials:
        return
    objective = Objective(settings, load_tune_data(settings), parent_run_id)
    # A bar over the study's finished trials (all workers'), drawn by one worker only and only on a
    # terminal: CI logs and the other workers stay quiet.
    bar = tqdm(total=settings.tune.n_trials, initial=finished_count(study), desc="tuning trials", unit="trial",
               disable=worker_index != 0 or not sys.stderr.isatty())

    def advance(study: optuna.Study, _trial: FrozenTrial) -> None:
        bar.update(finished_count(study) - bar.n)

    try:
        study.optimize(
            objective,
            n_trials=None,
            timeout=settings.tune.timeout_s,
            # Total over the whole study (all runs, all workers): a resumed study stops at the same total.
            callbacks=[optuna.study.MaxTrialsCallback(settings.tune.n_trials, states=FINISHED), advance],
            catch=(Exception,),  # a failed trial (e.g. out of memory) is recorded FAILED and the study goes on
            gc_after_trial=True,
        )
    finally:
        bar.close()


def _worker_entry(settings: Settings, name: str, parent_run_id: str | None, index: int, threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[tune worker {index}] %(levelname)s %(message)s")
    optimize_worker(settings, name, parent_run_id, index, threads)


def run_workers(settings: Settings, name: str, parent_run_id: str | None, workers: int) -> None:
    """``workers`` processes (not threads: training holds the GIL and torch state) on one study."""
    if workers == 1:
        optimize_worker(settings, name, parent_run_id)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no forked torch/MLflow/sqlite state
    processes = [
        context.Process(target=_worker_entry, args=(settings, name, parent_run_id, index, threads))
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [(i, p.exitcode) for i, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        raise TuneError(f"tuning worker(s) exited abnormally (index, exit code): {failed}; see their log above")


# ------------------------------------------------------------------------------------------- results


def best_params(study: optuna.Study | None) -> dict[str, Any]:
    """Best complete trial's parameters (dotted key -> value); {} when no trial completed."""
    if study is None or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return {}
    return dict(study.best_trial.params)


def _trial_rows(trials: Sequence[FrozenTrial], keys: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for trial in trials:
        reported = list(trial.intermediate_values.values())
        duration = trial.duration.total_seconds() if trial.duration else None
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value if trial.state == TrialState.COMPLETE else None,
                f"best_{OBJECTIVE}": max(reported) if reported else None,
                "epochs": len(reported),
                "seconds": duration,
                **{key: trial.params.get(key) for key in keys},
            }
        )
    return rows


def write_reports(settings: Settings, study: optuna.Study | None, name: str) -> dict[str, Any]:
    """best_params.yaml, reports/tune/summary.json and trials.csv; returns the summary."""
    params = best_params(study)
    models = settings.path("models")
    models.mkdir(parents=True, exist_ok=True)
    files.write_text(models / BEST_PARAMS_FILE, yaml.safe_dump(params, sort_keys=True))
    trials = study.get_trials(deepcopy=False) if study is not None else []
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    summary = {
        "study_name": name,
        "storage": storage_label(settings),
        "n_trials_target": settings.tune.n_trials,
        "trials_complete": counts[TrialState.COMPLETE],
        "trials_pruned": counts[TrialState.PRUNED],
        "trials_failed": counts[TrialState.FAIL],
        "trials_running": counts[TrialState.RUNNING],
        f"best_{OBJECTIVE}": study.best_value if study and params else None,
        "best_trial": study.best_trial.number if study and params else None,
        "best_params": params,
    }
    reports = settings.path("reports") / "tune"
    reports.mkdir(parents=True, exist_ok=True)
    files.write_json(reports / SUMMARY_FILE, summary)
    keys = list(settings.tune.search_space)
    fields = ["number", "state", "value", f"best_{OBJECTIVE}", "epochs", "seconds", *keys]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_trial_rows(trials, keys))
    files.write_text(reports / TRIALS_FILE, table.getvalue())
    return summary


def log_study_figures(study: optuna.Study) -> list[str]:
    """Optimization history, parameter importances (>= 2 complete trials) and parallel coordinates as
    plotly HTML artifacts on the active (parent) MLflow run."""
    from optuna import visualization as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figures: dict[str, Callable[[], Any]] = {}
    if complete:
        figures["optimization_history"] = lambda: vis.plot_optimization_history(study)
        figures["parallel_coordinate"] = lambda: vis.plot_parallel_coordinate(study)
    if len(complete) >= 2:
        figures["param_importances"] = lambda: vis.plot_param_importances(study)
    logged = []
    with tempfile.TemporaryDirectory() as folder:
        for name, make in figures.items():
            try:
                figure = make()
            except (ValueError, RuntimeError) as exc:  # e.g. importances when every value is identical
                log.warning("study figure %s skipped: %s", name, exc)
                continue
            path = Path(folder) / f"{name}.html"
            figure.write_html(path, include_plotlyjs=True)  # self-contained: viewable offline
            mlflow.log_artifact(str(path), artifact_path="tune")
            logged.append(name)
    return logged


def run(settings: Settings, workers: int | None = None) -> dict[str, Any]:
    """The tune stage: run (or resume) the study and write best params and reports."""
    workers = workers or settings.tune.workers
    if settings.tune.n_trials == 0:
        log.info("tune.n_trials is 0: tuning disabled, writing empty best params (train uses params.yaml)")
        return write_reports(settings, None, "")
    name = study_name(settings, data_fingerprint(settings))
    storage = open_storage(settings)
    study = _study(settings, name, worker_index=0, storage=storage)
    stale = fail_stale_trials(study, storage)
    already = finished_count(study)
    log.info(
        "study %s in %s: %d/%d trials finished, %d worker(s)",
        name, storage_label(settings), already, settings.tune.n_trials, workers,
    )
    experiment_id = tracking.configure(settings)
    fail_stale_trial_runs(settings, name, stale)
    resume_id = parent_run_id(settings, study, experiment_id)
    tags = {"optuna.study": name}
    with tracking.start_run(settings, "tune", run_id=resume_id, tags=tags) as active:
        parent_id = active.info.run_id
        if resume_id is None:
            # A resumed parent keeps the settings of its first attempt: the study hash pins everything
            # that matters, so later attempts can differ only in execution settings (MLflow params are
            # immutable, re-logging a changed one would fail).
            tracking.log_settings(settings)
            study.set_user_attr(PARENT_RUN_ATTR, parent_id)
        else:
            log.info("resuming MLflow parent run %s of study %s", parent_id, name)
        if already < settings.tune.n_trials:
            run_workers(settings, name, parent_id, workers)
        study = optuna.load_study(study_name=name, storage=open_storage(settings))
        summary = write_reports(settings, study, name)
        mlflow.log_metrics(
            {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
        mlflow.log_artifact(str(settings.path("reports") / "tune" / TRIALS_FILE), artifact_path="tune")
        log_study_figures(study)
    if summary["best_params"]:
        log.info("best trial %s: %s = %.4f", summary["best_trial"], OBJECTIVE, summary[f"best_{OBJECTIVE}"])
    else:
        log.warning("no trial of study %s completed: best params are empty (train uses params.yaml)", name)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run or resume the Optuna study (the tune stage).")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default tune.workers)")
    parser.add_argument("--params", default=None, help="params.yaml to use (default: the project's)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run(load_settings(args.params), args.workers), indent=2))


if __name__ == "__main__":
    main()
