"""Where a study lives and who runs its trials: storage (journal file or RDB URL), the study's name
(a hash of what it measures, so a changed recipe never continues an old study), stale-trial clean-up."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from pipeline import tracking
from pipeline.config import RECIPE_SECTIONS, Settings
from pipeline.data import PREPARED_SPLITS
from pipeline.databases import DatabaseUrlError, check_separate, with_pinned_driver

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.log"
HASH_CHARS = 10  # short study-name suffix; collisions within one storage are what matters
OWNER_ATTR = "owner"  # trial user attr: the process running it, to fail trials of killed processes
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the one MLflow "tune" run all trials nest under
FAIL_REASON_ATTR = "fail_reason"  # trial user attr: why a trial FAILED
# Replaced in every trial (tune.epochs, tuning subsets) or speed knobs of the same objective: not part of
# what a study measures, on top of config.RUNTIME_KEYS (which raising n_trials or adding workers touch).
TRIAL_REPLACED = frozenset({"train.epochs", "train.amp", "train.channels_last"})


class TuneError(RuntimeError):
    """The study cannot run or its results cannot be used; the message says what to do."""


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
    digest = hashlib.sha256()
    for split in PREPARED_SPLITS:
        path = settings.path("prepared") / f"{split}.npz"
        if not path.is_file():
            raise TuneError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()



def _rdb_storage(settings: Settings, url: str, attempts: int = 3) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats. Workers that start together on a fresh database race to create
    Optuna's tables and types; the loser sees "already exists" and opens the schema the winner made."""
    import sqlalchemy

    open_it = functools.partial(
        optuna.storages.RDBStorage,
        url,
        heartbeat_interval=settings.tune.heartbeat_s,
        # Trials of dead workers on any machine are failed once their heartbeat is this old ...
        grace_period=2 * settings.tune.heartbeat_s,
        # ... and their MLflow runs ended FAILED too.
        heartbeat_stale_trial_callback=functools.partial(_end_heartbeat_failed_trial_run, settings),
    )
    for attempt in range(attempts - 1):
        try:
            return open_it()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            if "already exists" not in str(exc):
                raise
            time.sleep(0.2 * (attempt + 1))
    return open_it()


def open_storage(settings: Settings) -> optuna.storages.BaseStorage:
    """The study storage: ``tune.storage`` (RDB URL, with heartbeats) or a journal file under ``paths.optuna``."""
    if settings.tune.storage:
        import sqlalchemy

        url = with_pinned_driver(settings.tune.storage)  # postgresql+psycopg2:// of the guides -> psycopg 3
        try:
            check_separate(tracking.tracking_uri(settings), url)
        except DatabaseUrlError as exc:
            raise TuneError(str(exc)) from None
        try:
            return _rdb_storage(settings, url)
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
    tracking.fail_trial_runs(settings, study.study_name, [trial.number])


def storage_label(settings: Settings) -> str:
    """Where the study lives, for logs and reports (no credentials)."""
    if settings.tune.storage:
        url = settings.tune.storage
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    return str(settings.path("optuna") / JOURNAL_FILE)


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
        who = trial.user_attrs.get(OWNER_ATTR)
        if who is None or _owner_alive(who) is not False:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, f"tuning process {who['pid']} died")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        stale.append(trial.number)
    if stale:
        log.warning("marked trials %s FAILED: their tuning process on this host is gone", stale)
    return stale



def owner() -> dict[str, Any]:
    """Who runs a trial: host, pid and the process's start time (a reused pid is another process)."""
    import psutil

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}


def usable_parent_run(settings: Settings, study: optuna.Study, experiment_id: str) -> str | None:
    """The study's MLflow parent run to resume, or None when there is none yet or it cannot be used."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id and tracking.run_is_active_in(settings, run_id, experiment_id):
        return run_id
    if run_id:
        log.warning("MLflow parent run %s of study %s is not in experiment %r at %s: starting a new parent run",
                    run_id, study.study_name, settings.mlflow.experiment, tracking.tracking_uri(settings))
    return None


def open_study(settings: Settings, name: str, worker_index: int,
               storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or load the study; TPE seeded per worker and per resume (equal seeds replay the same samples)."""
    finished = 0
    storage = storage or open_storage(settings)
    with contextlib.suppress(KeyError):  # no such study yet
        finished = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=settings.seed + 1_000 * worker_index + finished),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=settings.tune.pruner_startup_trials,
            n_warmup_steps=settings.tune.pruner_warmup_epochs,
        ),
    )


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))
