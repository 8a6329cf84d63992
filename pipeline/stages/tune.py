"""The tune stage: run or resume the Optuna study until it holds ``tune.n_trials`` finished trials
(several worker processes, or machines on an RDB ``tune.storage``, share it), then write the best
parameters and reports. The study and trials are described in ``pipeline.tuning``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from pipeline import files, tracking
from pipeline.config import Settings, load_settings
from pipeline.contract import BEST_PARAMS_FILE
from pipeline.training.inputs import load_training_inputs
from pipeline.tuning.objective import OBJECTIVE, Objective
from pipeline.tuning.study import (
    FINISHED,
    PARENT_RUN_ATTR,
    TuneError,
    data_fingerprint,
    fail_stale_trials,
    finished_count,
    open_storage,
    open_study,
    storage_label,
    study_name,
    usable_parent_run,
)

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
TRIALS_FILE = "trials.csv"


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
    study = open_study(settings, name, worker_index)
    if finished_count(study) >= settings.tune.n_trials:
        return
    inputs = load_training_inputs(settings, settings.tune.max_train_per_class, settings.tune.max_val_per_class)
    objective = Objective(settings, inputs, parent_run_id)
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
            tracking.log_files([path], "tune")
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
    study = open_study(settings, name, worker_index=0, storage=storage)
    stale = fail_stale_trials(study, storage)
    already = finished_count(study)
    log.info("study %s in %s: %d/%d trials finished, %d worker(s)",
             name, storage_label(settings), already, settings.tune.n_trials, workers)
    experiment_id = tracking.configure(settings)
    tracking.fail_trial_runs(settings, name, stale)
    resume_id = usable_parent_run(settings, study, experiment_id)
    with tracking.start_run(settings, "tune", run_id=resume_id, tags={"optuna.study": name}) as active:
        parent_id = active.info.run_id
        if resume_id is None:
            # A resumed parent keeps the settings of its first attempt: the study hash pins everything
            # that matters, and MLflow params are immutable.
            tracking.log_settings(settings)
            study.set_user_attr(PARENT_RUN_ATTR, parent_id)
        else:
            log.info("resuming MLflow parent run %s of study %s", parent_id, name)
        if already < settings.tune.n_trials:
            run_workers(settings, name, parent_id, workers)
        study = optuna.load_study(study_name=name, storage=open_storage(settings))
        summary = write_reports(settings, study, name)
        tracking.log_metrics({k: float(v) for k, v in summary.items()
                              if isinstance(v, int | float) and not isinstance(v, bool)})
        tracking.log_files([settings.path("reports") / "tune" / TRIALS_FILE], "tune")
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
