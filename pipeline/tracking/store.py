"""Where runs are stored and how a run starts and ends: ``$MLFLOW_TRACKING_URI`` when set (a shared
server or database), else SQLite under ``paths.mlflow`` with artifacts beside it, so a clone tracks with
no server."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from pipeline.config import PROJECT_ROOT, Settings
from pipeline.databases import DatabaseUrlError, check_separate, with_pinned_driver

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# URI schemes served by a tracking server that owns its artifact store; anything else is local here.
REMOTE_SCHEMES = ("http", "https", "databricks")
# Shared databases MLflow can use directly as its tracking store (SQLAlchemy dialects, any driver).
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
# A tracking server that does not accept a connection within this many seconds counts as down.
REACHABLE_TIMEOUT_S = 10.0

# Run artifact folders. The ONNX folder is what the registry hands to serving (pipeline/registry.py).
MODEL_ARTIFACT = "model"
ONNX_ARTIFACT = "onnx"

# Tag keys shared by train/evaluate/register.
TAG_STAGE = "stage"
TAG_DATASET = "dataset"
TAG_PROFILE = "profile"
TAG_GIT_COMMIT = "git_commit"
TAG_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
TAG_FAILURE = "failure_reason"
TAG_DVC_EXP = "dvc_exp"
TAG_SOURCE_NAME = "mlflow.source.name"  # MLflow's "Source" column: the stage, not `__main__.py`
# The experiment kind MLflow 3's UI reads (else it infers one and may open the GenAI view first).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Set by `dvc exp run` for the stage processes: the experiment's name.
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
SHORT_COMMIT_CHARS = 7
RUN_NAME_SEPARATOR = " · "
FAILURE_TAG_MAX_CHARS = 5000  # MLflow tag values are limited (8000 chars); keep the head of the message
# Digest length of the logged dataset (MLflow stores at most 36 characters).
DATASET_DIGEST_CHARS = 16
# MLflow rejects param values longer than this; longer settings (search space lists) are truncated.
PARAM_VALUE_MAX_CHARS = 6000


class TrackingError(RuntimeError):
    """MLflow is not usable as configured; the message says what to change."""


# mlflow.set_tracking_uri() also exports $MLFLOW_TRACKING_URI (for child processes). Remember the local
# default that configure() computed and mlflow copied there, so a later configure() for another settings
# root is not mistaken for a user's choice. None while the URI in use is the user's own.
_uri_set_here: str | None = None


def tracking_uri(settings: Settings) -> str:
    """``$MLFLOW_TRACKING_URI`` if the user set it, else ``sqlite:///<abs paths.mlflow>/mlflow.db``."""
    env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if env and env != _uri_set_here:
        return with_pinned_driver(env)  # postgresql+psycopg2:// of the guides -> the pinned psycopg 3
    return f"sqlite:///{settings.path('mlflow').resolve() / DB_FILE}"


def is_remote(uri: str) -> bool:
    """True when ``uri`` points at a tracking server (which then chooses where artifacts go)."""
    return urlparse(uri).scheme in REMOTE_SCHEMES


def redact(uri: str) -> str:
    """``uri`` with its password (if any) replaced by ``***``: safe for messages and logs."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    host = parsed.netloc.rpartition("@")[2]
    return parsed._replace(netloc=f"{parsed.username}:***@{host}").geturl()


# URIs already found reachable by this process: configure() runs before every run, check once.
_reachable: set[str] = set()


def check_reachable(uri: str) -> None:
    """Fail fast, naming ``MLFLOW_TRACKING_URI``, when a shared tracking store cannot be reached.

    Without this MLflow retries a database connection for ~100 s and an HTTP request for minutes
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) and then reports a driver error. A database is checked with
    one real connection (server down, wrong password, missing database); a server with one HTTP request
    (any answer counts: authentication is the server's business).
    """
    scheme = urlparse(uri).scheme
    if uri in _reachable or not (scheme in ("http", "https") or scheme.split("+")[0] in DATABASE_SCHEMES):
        return
    fix = (f"Start it or fix {TRACKING_URI_ENV} (a database password may also come from the driver's "
           "usual setting, e.g. PGPASSWORD for PostgreSQL).")
    if scheme in ("http", "https"):
        import httpx

        try:
            # Only whether a server answers at all: no data is sent, so the certificate is MLflow's concern
            # (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS), not this check's.
            httpx.get(uri, timeout=REACHABLE_TIMEOUT_S, verify=False)
        except httpx.HTTPError as exc:
            raise TrackingError(f"MLflow tracking server {redact(uri)} is not reachable ({exc!r}). {fix}") from exc
    else:
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
        except ImportError as exc:
            raise TrackingError(f"no database driver for {TRACKING_URI_ENV}={redact(uri)} ({exc}): install the "
                                "pinned lock (`make venv`)") from exc
        except sqlalchemy.exc.SQLAlchemyError as exc:
            reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
            raise TrackingError(f"cannot connect to the MLflow tracking database {redact(uri)}: {reason}. "
                                f"{fix}") from exc
    _reachable.add(uri)


def configure(settings: Settings) -> str:
    """Point MLflow at the tracking store and experiment of ``settings``; return the experiment id.

    A shared store that cannot be reached raises :class:`TrackingError` naming ``MLFLOW_TRACKING_URI``.
    """
    global _uri_set_here
    uri = tracking_uri(settings)
    env = os.environ.get(TRACKING_URI_ENV, "").strip()
    user_set = bool(env) and env != _uri_set_here
    if not is_remote(uri):
        settings.path("mlflow").mkdir(parents=True, exist_ok=True)
    try:
        check_separate(uri, settings.tune.storage)
    except DatabaseUrlError as exc:
        raise TrackingError(str(exc)) from None
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _uri_set_here = None if user_set else uri
    client = mlflow.MlflowClient(uri)
    name = settings.mlflow.experiment
    try:
        experiment = client.get_experiment_by_name(name)
    except MlflowException as exc:
        raise TrackingError(f"MLflow tracking store {redact(uri)} did not answer: {exc.message}. Check the "
                            f"server or fix {TRACKING_URI_ENV}.") from exc
    if experiment is None:
        location = None if is_remote(uri) else (settings.path("mlflow").resolve() / ARTIFACTS_DIR).as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=location,
                                                     tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException as exc:
            # Another process (parallel tuning worker) created it first: use theirs.
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    elif experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} at {uri} is deleted. Restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or set "
            "mlflow.experiment to a new name in params.yaml."
        )
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:  # made before the tag existed
            client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(root: Path) -> str | None:
    """The checked-out commit of the git repository holding ``root``, or None outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def dvc_experiment() -> str | None:
    """The name of the DVC experiment running this stage (``dvc exp run``), else None."""
    return os.environ.get(DVC_EXP_NAME_ENV, "").strip() or None


def default_tags(settings: Settings, stage: str) -> dict[str, str]:
    """Tags every new run carries: stage (also as MLflow's source name), dataset, profile, the DVC
    experiment and (in a git checkout) the commit."""
    tags = {TAG_STAGE: stage, TAG_SOURCE_NAME: stage, TAG_DATASET: settings.data.dataset,
            TAG_PROFILE: settings.profile}
    if experiment := dvc_experiment():
        tags[TAG_DVC_EXP] = experiment
    commit = git_commit(PROJECT_ROOT)
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        tags[TAG_MLFLOW_GIT_COMMIT] = commit
    return tags


def run_label(settings: Settings, stage: str) -> str:
    """A run name that says what the run is: ``train · k49 · full · exp-name · 1a2b3c4`` (the DVC
    experiment and the short commit when there are ones)."""
    commit = git_commit(PROJECT_ROOT)
    parts = [stage, settings.data.dataset, settings.profile, dvc_experiment(),
             commit[:SHORT_COMMIT_CHARS] if commit else None]
    return RUN_NAME_SEPARATOR.join(part for part in parts if part)


@contextmanager
def start_run(
    settings: Settings,
    stage: str,
    *,
    run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    name: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start a new run (or resume ``run_id``) in the configured experiment and always end it.

    A new run is named ``name`` (default :func:`run_label`) and tagged with :func:`default_tags`; a resumed
    run keeps its name and tags and only gets ``tags``. If the body raises, the run ends ``FAILED``
    (``KILLED`` on Ctrl-C) with the reason in the ``failure_reason`` tag, and the exception propagates.
    """
    experiment_id = configure(settings)
    run_tags = dict(tags or {}) if run_id else {**default_tags(settings, stage), **(tags or {})}
    try:
        active = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=None if run_id else (name or run_label(settings, stage)),
            nested=nested,
            tags=run_tags or None,
        )
    except MlflowException as exc:
        if run_id:
            raise TrackingError(
                f"cannot resume MLflow run {run_id} at {tracking_uri(settings)}: {exc.message}. "
                "Re-run the train stage (it writes models/train_run.json) or point MLFLOW_TRACKING_URI "
                "at the store that holds the run."
            ) from exc
        raise
    try:
        yield active
    except BaseException as exc:
        status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        try:
            reason = f"{type(exc).__name__}: {exc}"[:FAILURE_TAG_MAX_CHARS]
            mlflow.set_tag(TAG_FAILURE, reason)
        finally:
            mlflow.end_run(RunStatus.to_string(status))
        raise
    else:
        mlflow.end_run()
