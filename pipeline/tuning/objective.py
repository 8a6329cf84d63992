"""One Optuna trial: sample the search space, train through ``loop.fit`` on the tuning subsets, report
each epoch for pruning, and record the trial as a nested MLflow run under the study's parent run."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline import tracking
from pipeline.config import Settings
from pipeline.training.inputs import TrainingInputs
from pipeline.tuning.study import FAIL_REASON_ATTR, OWNER_ATTR, TuneError, owner

OBJECTIVE = "val_balanced_accuracy"  # the K49 metric, on the validation split (never the test set)
FAIL_REASON_MAX_CHARS = 1000  # head of the error message kept in the study (tracebacks go to the log)


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
            # The subset is cut once when the inputs are loaded; fit must not cut it again.
            "train.max_train_per_class": None,
            "train.max_val_per_class": None,
        }
    )


class Objective:
    """Callable per trial; the inputs are loaded once per worker process."""

    def __init__(self, settings: Settings, inputs: TrainingInputs, parent_run_id: str | None) -> None:
        self.settings = settings
        self.inputs = inputs
        self.parent_run_id = parent_run_id

    def __call__(self, trial: optuna.Trial) -> float:
        from pipeline.training import loop  # torch loads in the worker that trains, not at import

        trial.set_user_attr(OWNER_ATTR, owner())
        params = {key: suggest(trial, key, dim) for key, dim in self.settings.tune.search_space.items()}
        # Source: the tune stage; `stage` says trial, so `tags.stage = 'tune'` finds the study's parent run only.
        tags = {"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number), tracking.TAG_STAGE: "trial"}
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

        with tracking.start_run(self.settings, "tune", name=f"trial {trial.number}", nested=True, tags=tags):
            tracking.log_params(params)
            data = self.inputs
            try:
                loop.fit(trial_settings(self.settings, params), data.train, data.val, data.num_classes,
                         data.pixel_mean, data.pixel_std, callbacks=(report,))
                if best == -math.inf:
                    raise TuneError("loop.fit reported no epoch: the trial has no value")
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except BaseException as exc:
                # e.g. CUDA out of memory for a large batch: the trial FAILS, the study goes on.
                trial.set_user_attr(FAIL_REASON_ATTR, f"{type(exc).__name__}: {exc}"[:FAIL_REASON_MAX_CHARS])
                tracking.set_tags({"optuna.state": TrialState.FAIL.name})
                raise  # start_run marks the MLflow run FAILED; optimize(catch=...) records the trial FAILED
            tracking.set_tags({"optuna.state": state.name})
            if best > -math.inf:
                tracking.log_metrics({f"best_{OBJECTIVE}": best})
        if state == TrialState.PRUNED:
            raise optuna.TrialPruned()
        return best
